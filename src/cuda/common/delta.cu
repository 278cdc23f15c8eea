// delta[b, h, i] = sum_d grad_out[b, h, i, d] * out[b, h, i, d]: the row term of the softmax
// gradient (dS = P * (dP - delta)), computed once before the backward kernels so they read one
// float per query row instead of redoing a Dv-long dot product per key block.
//
// One warp per row (B * Hq * Lq rows): lanes stride over d, so each load of the warp is one
// coalesced row segment; fp32 accumulation, then a butterfly reduction across the warp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/check.h"
#include "cuda/common/semantics.cuh"
#include "cuda/launch.h"

namespace memattn::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;

template <class T>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    backward_delta_kernel(const __grid_constant__ DeviceParams p) {
  const std::int64_t rows = static_cast<std::int64_t>(p.B) * p.Hq * p.Lq;
  const std::int64_t row =
      static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // the whole warp leaves together: no shuffle sees a missing lane
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const std::int64_t i = row % p.Lq, bh = row / p.Lq, h = bh % p.Hq, b = bh / p.Hq;

  // grad_out, out: [B, Hq, Lq, Dv]
  const T* grad_out = static_cast<const T*>(p.grad_out) + b * p.grad_out_st.b +
                      h * p.grad_out_st.h + i * p.grad_out_st.l;
  const T* out = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.l;
  float sum = 0.f;
  for (int d = lane; d < p.Dv; d += kWarpSize) sum += to_float(grad_out[d]) * to_float(out[d]);
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = sum;  // delta: [B, Hq, Lq] contiguous
}

}  // namespace

template <class T>
void launch_backward_delta(const DeviceParams& p, cudaStream_t stream) {
  const std::int64_t rows = static_cast<std::int64_t>(p.B) * p.Hq * p.Lq;
  if (rows == 0) return;  // an empty grid is a launch error
  const auto blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  backward_delta_kernel<T><<<blocks, kWarpSize * kWarpsPerBlock, 0, stream>>>(p);
  check_launch("backward_delta_kernel");
}

template void launch_backward_delta<float>(const DeviceParams&, cudaStream_t);
template void launch_backward_delta<__half>(const DeviceParams&, cudaStream_t);
template void launch_backward_delta<__nv_bfloat16>(const DeviceParams&, cudaStream_t);

}  // namespace memattn::cuda
