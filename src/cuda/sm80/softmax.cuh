// The forward kernels' online softmax over a warp's C tiles (rows g and g + 8 of each m-tile,
// spread over the 4 threads of a quad) and their epilogue; the sm80 and sm90 forward kernels
// share both, so the two produce the same numbers.
#pragma once

#include <cstdint>

#include "cuda/common/params.h"
#include "cuda/common/semantics.cuh"
#include "cuda/sm80/mma.cuh"
#include "cuda/sm80/scores.cuh"

namespace memattn::cuda::sm80 {

// Folds one block of masked scores s (in score_unit units) into the running row maxima and
// sums, turns s into exp2(s * unit - max) and returns in `rescale` the factor the output
// accumulator's rows must be multiplied by (rescale_rows).
template <int kM, int kN>
__device__ __forceinline__ void softmax_update(float (&s)[kM][kN][4], float (&row_max)[kM][2],
                                               float (&row_sum)[kM][2], float (&rescale)[kM][2],
                                               float unit) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[m][r];
#pragma unroll
      for (int n = 0; n < kN; ++n) mx = fmaxf(mx, fmaxf(s[m][n][2 * r], s[m][n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // All keys masked so far: shift by 0 so exp2(-inf - shift) = 0, never NaN.
      const float shift = mx == -INFINITY ? 0.f : mx * unit;
      rescale[m][r] = fast_exp2(row_max[m][r] * unit - shift);
      row_max[m][r] = mx;
      float sum = row_sum[m][r] * rescale[m][r];
#pragma unroll
      for (int n = 0; n < kN; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[m][n][e] = fast_exp2(s[m][n][e] * unit - shift);
          sum += s[m][n][e];
        }
      row_sum[m][r] = sum;
    }
}

template <int kM, int kD>
__device__ __forceinline__ void rescale_rows(float (&acc)[kM][kD][4],
                                             const float (&rescale)[kM][2]) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int d = 0; d < kD; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][d][e] *= rescale[m][e >> 1];
}

// out = acc / sum (0 for fully masked rows) and lse = ln(sum) + max (-inf there) for the
// warp's rows starting at query row0 of (b, h).
template <class T, int kM, int kD>
__device__ __forceinline__ void store_out_lse(const DeviceParams& p, int b, int h, int row0,
                                              const float (&acc)[kM][kD][4],
                                              const float (&row_max)[kM][2],
                                              const float (&row_sum)[kM][2], float unit, int lane) {
  T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h;
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[m][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int i = row0 + c_row(m, 2 * r, lane);
      if (i >= p.Lq) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      T* out_row = out + i * p.out_st.l;
#pragma unroll
      for (int d = 0; d < kD; ++d) {
        const int col = c_col(d, 0, lane);
        if (col < p.Dv)
          *reinterpret_cast<std::uint32_t*>(out_row + col) =
              pack2<T>(acc[m][d][2 * r] * inv, acc[m][d][2 * r + 1] * inv);
      }
      if ((lane & 3) == 0)
        p.lse[b * p.lse_st.b + h * p.lse_st.h + i * p.lse_st.l] =
            sum > 0.f ? (row_max[m][r] * unit + log2f(sum)) * kLn2 : -INFINITY;
    }
}

}  // namespace memattn::cuda::sm80
