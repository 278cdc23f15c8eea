// Tensor maps through the driver's cuTensorMapEncodeTiled, reached by the runtime's entry-point
// query so the library needs no link against libcuda.
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/common/check.h"
#include "cuda/sm90/hopper.cuh"
#include "cuda/sm90/tensor_map.h"
#include "memattn/error.h"

namespace memattn::cuda::sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || f == nullptr)
      throw Error(ErrorKind::not_implemented,
                  "memattn sm90 kernels: the CUDA driver has no cuTensorMapEncodeTiled (needs a "
                  "CUDA 12 driver or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace

CUtensorMap make_tile_map(const void* data, bool bf16, int B, int H, int L, int D,
                          const Strides3& strides, int box_rows) {
  constexpr std::uint64_t kElem = 2;
  // A size-1 dim's stride is never stepped along; any multiple of 16 bytes will do.
  const auto stride_bytes = [](int size, std::int64_t stride) -> cuuint64_t {
    return size > 1 ? static_cast<cuuint64_t>(stride) * kElem : 16;
  };
  // L = 0 (no keys): the kernel issues no copy, but the driver wants non-zero dims.
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(L > 0 ? L : 1),
                              static_cast<cuuint64_t>(H), static_cast<cuuint64_t>(B)};
  const cuuint64_t byte_strides[3] = {stride_bytes(L, strides.l), stride_bytes(H, strides.h),
                                      stride_bytes(B, strides.b)};
  const cuuint32_t box[4] = {kChunkCols, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = encode_tiled()(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(data), dims, byte_strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error(ErrorKind::runtime,
                "memattn sm90 kernels: cuTensorMapEncodeTiled failed (CUresult " +
                    std::to_string(static_cast<int>(r)) + ") for a [" + std::to_string(B) + ", " +
                    std::to_string(H) + ", " + std::to_string(L) + ", " + std::to_string(D) +
                    "] tensor with strides [" + std::to_string(strides.b) + ", " +
                    std::to_string(strides.h) + ", " + std::to_string(strides.l) + ", 1]");
  return map;
}

MaskTileMap make_mask_map(const DeviceParams& p, int block_rows) {
  MaskTileMap tiles;
  // bool and 16-bit masks only (float32 ones keep the per-element reads)
  const int elem = mask_value_bytes(p.mask_kind);
  if (elem > 2 || !mask_rows_16_byte_aligned(p)) return tiles;
  // Broadcast dims (stride 0) become size-1 dims read at coordinate 0; their stride is never
  // stepped along, so any multiple of 16 bytes will do.
  const auto extent = [&](int d, int size) -> cuuint64_t { return p.mask_st[d] != 0 ? size : 1; };
  const auto stride_bytes = [&](int d) -> cuuint64_t {
    return p.mask_st[d] != 0 ? static_cast<cuuint64_t>(p.mask_st[d]) * elem : 16;
  };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.Lk), extent(2, p.Lq), extent(1, p.Hq),
                              extent(0, p.B)};
  const cuuint64_t byte_strides[3] = {stride_bytes(2), stride_bytes(1), stride_bytes(0)};
  const int rows = p.mask_st[2] != 0 ? block_rows : 1;
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kRowBytes / elem),
                             static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode_tiled()(
      &tiles.map, elem == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16, 4,
      const_cast<void*>(p.mask), dims, byte_strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  // The checks above are the driver's documented rules; should it refuse anyway, the kernels
  // read the mask per element (slower, same results).
  if (r == CUDA_SUCCESS) tiles.rows = rows;
  return tiles;
}

}  // namespace memattn::cuda::sm90
