// delta[b, h, i] = sum_d grad_out[b, h, i, d] * out[b, h, i, d]: the row term of the softmax
// gradient (dS = P * (dP - delta)), computed once before the backward kernels so they read one
// float per query row instead of redoing a Dv-long dot product per key block.
//
// A row is read by a group of lanes_per_row lanes (a power of two up to a warp), each loading
// kVec consecutive elements at a time: 16 bytes (one 128-bit load) when every row start is
// 16-byte aligned, else one element (any strides). D = 64 fp16/bf16 rows take 8 lanes, so a
// warp reads 4 rows per step. The kernel is bound by the bytes it keeps in flight: one 2-byte
// load per lane (a warp per row) read ~1 TB/s on H100. fp32 accumulation, then a butterfly
// reduction inside the group.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/check.h"
#include "cuda/common/semantics.cuh"
#include "cuda/launch.h"

namespace memattn::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;

// kVec consecutive elements, loaded as one access (128 bits when kVec * sizeof(T) == 16).
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Chunk {
  T v[kVec];
};

template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_delta_kernel(const __grid_constant__ DeviceParams p, int lanes_per_row) {
  const std::int64_t rows = static_cast<std::int64_t>(p.B) * p.Hq * p.Lq;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (kThreads / lanes_per_row) +
                           threadIdx.x / lanes_per_row;
  const int lane = static_cast<int>(threadIdx.x) % lanes_per_row;
  // Lanes past the last row stay for the shuffles (every lane of the warp takes part).
  const bool active = row < rows;
  float sum = 0.f;
  if (active) {
    const std::int64_t i = row % p.Lq, bh = row / p.Lq, h = bh % p.Hq, b = bh / p.Hq;
    // grad_out, out: [B, Hq, Lq, Dv]
    const T* grad_out = static_cast<const T*>(p.grad_out) + b * p.grad_out_st.b +
                        h * p.grad_out_st.h + i * p.grad_out_st.l;
    const T* out = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.l;
    for (int d = lane * kVec; d < p.Dv; d += lanes_per_row * kVec) {
      const auto g = *reinterpret_cast<const Chunk<T, kVec>*>(grad_out + d);
      const auto o = *reinterpret_cast<const Chunk<T, kVec>*>(out + d);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum += to_float(g.v[e]) * to_float(o.v[e]);
    }
  }
  for (int offset = lanes_per_row / 2; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (active && lane == 0) p.delta[row] = sum;  // delta: [B, Hq, Lq] contiguous
}

// Whether every row of t (and each kVec-element chunk of it) starts on a 16-byte boundary.
bool rows_aligned_16(const void* data, const Strides3& st, int element_bytes) {
  const auto aligned = [&](std::int64_t elements) { return elements * element_bytes % 16 == 0; };
  return reinterpret_cast<std::uintptr_t>(data) % 16 == 0 && aligned(st.b) && aligned(st.h) &&
         aligned(st.l);
}

// Smallest power of two >= n, at most a warp.
int lanes_for(int n) {
  int lanes = 1;
  while (lanes < n && lanes < kWarpSize) lanes *= 2;
  return lanes;
}

template <class T, int kVec>
void launch(const DeviceParams& p, std::int64_t rows, cudaStream_t stream) {
  const int lanes_per_row = lanes_for((p.Dv + kVec - 1) / kVec);
  const int rows_per_block = kThreads / lanes_per_row;
  const auto blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  backward_delta_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p, lanes_per_row);
  check_launch("backward_delta_kernel");
}

}  // namespace

template <class T>
void launch_backward_delta(const DeviceParams& p, cudaStream_t stream) {
  const std::int64_t rows = static_cast<std::int64_t>(p.B) * p.Hq * p.Lq;
  if (rows == 0) return;  // an empty grid is a launch error
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kBytes = static_cast<int>(sizeof(T));
  if (p.Dv % kVec == 0 && rows_aligned_16(p.grad_out, p.grad_out_st, kBytes) &&
      rows_aligned_16(p.out, p.out_st, kBytes))
    launch<T, kVec>(p, rows, stream);
  else
    launch<T, 1>(p, rows, stream);
}

template void launch_backward_delta<float>(const DeviceParams&, cudaStream_t);
template void launch_backward_delta<__half>(const DeviceParams&, cudaStream_t);
template void launch_backward_delta<__nv_bfloat16>(const DeviceParams&, cudaStream_t);

}  // namespace memattn::cuda
