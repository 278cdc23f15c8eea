// The forward kernels' online softmax over a warp's C tiles (rows g and g + 8 of each m-tile,
// spread over the 4 threads of a quad) and the epilogues; the sm80 and sm90 kernels share
// them, so the two compute the same function (the sm90 D = 64 forward sums its rows' 16-bit P
// in P V: softmax_update's kRowSums, store_out_lse's kSumsInAcc).
#pragma once

#include <cstdint>

#include "cuda/common/params.h"
#include "cuda/common/semantics.cuh"
#include "cuda/sm80/mma.cuh"
#include "cuda/sm80/scores.cuh"

namespace memattn::cuda::sm80 {

// kLazyRescale (FlashAttention-4's conditional rescaling): a row's reference maximum moves only
// where a block's maximum exceeds it by more than kRescaleThreshold (log2 units), so the
// probabilities reach at most 2^8, which fp16/bf16 P and the fp32 sums hold as precisely as
// values up to 1; most blocks after the first keep the reference, and the output rows' rescale
// factor is then exactly 1 (warp_needs_rescale lets whole warps skip rescale_rows). out / sum
// and lse = reference + log2(sum) are exact for any reference.
inline constexpr float kRescaleThreshold = 8.f;

// Folds one block of masked scores s (in score_unit units, unit > 0) into the running row
// maxima (kLazyRescale: reference maxima) and sums, turns s into exp2(s * unit - max) and returns
// in `rescale` the factor the output accumulator's rows must be multiplied by (rescale_rows).
// kRowSums false: row_sum is left alone, for kernels whose P V product sums the rows (the sm90
// D = 64 forward's column of ones, forward.cuh).
template <bool kLazyRescale, bool kRowSums, int kM, int kN>
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
      float shift;
      if constexpr (kLazyRescale) {
        // NaN (false) while every key so far is masked: mx = row_max = -inf.
        if ((mx - row_max[m][r]) * unit > kRescaleThreshold) {
          rescale[m][r] = fast_exp2((row_max[m][r] - mx) * unit);  // 0 from a -inf reference
          row_max[m][r] = mx;
        } else {
          rescale[m][r] = 1.f;
        }
        // All keys masked so far: shift by 0 so exp2(-inf - shift) = 0, never NaN.
        shift = row_max[m][r] == -INFINITY ? 0.f : row_max[m][r] * unit;
      } else {
        shift = mx == -INFINITY ? 0.f : mx * unit;  // as above
        rescale[m][r] = fast_exp2(row_max[m][r] * unit - shift);
        row_max[m][r] = mx;
      }
      float sum = row_sum[m][r] * rescale[m][r];
#pragma unroll
      for (int n = 0; n < kN; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[m][n][e] = fast_exp2(s[m][n][e] * unit - shift);
          if constexpr (kRowSums) sum += s[m][n][e];
        }
      if constexpr (kRowSums) row_sum[m][r] = sum;
    }
}

// Whether any row of the warp's accumulators needs rescaling (softmax_update's factors not all
// 1): a warp-uniform test, so warps whose references all stayed skip rescale_rows.
template <int kM>
__device__ __forceinline__ bool warp_needs_rescale(const float (&rescale)[kM][2]) {
  bool any = false;
#pragma unroll
  for (int m = 0; m < kM; ++m) any = any || rescale[m][0] != 1.f || rescale[m][1] != 1.f;
  return __any_sync(0xffffffffu, any);
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

// A row's sum from the partial sums of the four lanes that hold it.
__device__ __forceinline__ float quad_sum(float partial) {
  partial += __shfl_xor_sync(0xffffffffu, partial, 1);
  return partial + __shfl_xor_sync(0xffffffffu, partial, 2);
}
// The output's scale 1 / sum, 0 for a fully masked row (sum 0).
__device__ __forceinline__ float out_scale(float sum) { return sum > 0.f ? 1.f / sum : 0.f; }
// lse = ln(sum) + max (max in score units), -inf for a fully masked row.
__device__ __forceinline__ float row_lse(float sum, float max, float unit) {
  return sum > 0.f ? (max * unit + log2f(sum)) * kLn2 : -INFINITY;
}
__device__ __forceinline__ float& lse_at(const DeviceParams& p, int b, int h, int i) {
  return p.lse[b * p.lse_st.b + h * p.lse_st.h + i * p.lse_st.l];
}

// The sum of row (m, r) of the thread's rows: from the quad's partial sums row_sum, or with
// kSumsInAcc from acc's last 8 columns, which then hold the rows' whole sums (the P V product
// summed them; forward.cuh).
template <bool kSumsInAcc, int kM, int kD>
__device__ __forceinline__ float row_total(const float (&acc)[kM][kD][4],
                                           const float (&row_sum)[kM][2], int m, int r) {
  if constexpr (kSumsInAcc) return acc[m][kD - 1][2 * r];
  return quad_sum(row_sum[m][r]);
}

// out = acc / sum (0 for fully masked rows) and lse for the warp's rows starting at query row0
// of (b, h). row_sum: the partial sums of the thread's rows, unused with kSumsInAcc (row_total).
template <class T, bool kSumsInAcc, int kM, int kD>
__device__ __forceinline__ void store_out_lse(const DeviceParams& p, int b, int h, int row0,
                                              const float (&acc)[kM][kD][4],
                                              const float (&row_max)[kM][2],
                                              const float (&row_sum)[kM][2], float unit, int lane) {
  T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h;
  constexpr int kOutD = kSumsInAcc ? kD - 1 : kD;
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = row_total<kSumsInAcc>(acc, row_sum, m, r);
      const int i = row0 + c_row(m, 2 * r, lane);
      // rows before 0 (the sm90 forward's tiles that end at Lq) or past Lq: no output
      if (static_cast<unsigned>(i) >= static_cast<unsigned>(p.Lq)) continue;
      const float inv = out_scale(sum);
      T* out_row = out + i * p.out_st.l;
#pragma unroll
      for (int d = 0; d < kOutD; ++d) {
        const int col = c_col(d, 0, lane);
        if (col < p.Dv)
          *reinterpret_cast<std::uint32_t*>(out_row + col) =
              pack2<T>(acc[m][d][2 * r] * inv, acc[m][d][2 * r + 1] * inv);
      }
      if ((lane & 3) == 0) lse_at(p, b, h, i) = row_lse(sum, row_max[m][r], unit);
    }
}

// store_out_lse's lse, with the output's scale 1 / sum per thread row returned in inv, for
// kernels that write the output themselves.
template <bool kSumsInAcc, int kM, int kD>
__device__ __forceinline__ void store_lse(const DeviceParams& p, int b, int h, int row0,
                                          const float (&acc)[kM][kD][4],
                                          const float (&row_max)[kM][2],
                                          const float (&row_sum)[kM][2], float unit, int lane,
                                          float (&inv)[kM][2]) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = row_total<kSumsInAcc>(acc, row_sum, m, r);
      inv[m][r] = out_scale(sum);
      const int i = row0 + c_row(m, 2 * r, lane);
      if (static_cast<unsigned>(i) < static_cast<unsigned>(p.Lq) && (lane & 3) == 0)  // as above
        lse_at(p, b, h, i) = row_lse(sum, row_max[m][r], unit);
    }
}

// What the backward needs of query row i of (b, h): lse2 (lse_log2; +inf past Lq, so P = 0
// there) and delta (0 past Lq).
struct RowStats {
  float lse2, delta;
};
__device__ __forceinline__ RowStats row_stats(const DeviceParams& p, int b, int h, int i) {
  if (i >= p.Lq) return {INFINITY, 0.f};
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.Hq + h;
  return {lse_log2(p.lse[b * p.lse_st.b + h * p.lse_st.h + i * p.lse_st.l]),
          p.delta[bh * p.Lq + i]};
}

// row_stats of the thread's two rows row0 + c_row(0, 0) and row0 + c_row(0, 2) of a warp's
// tile of query rows (dQ passes): what score_grad_of_query_rows takes.
__device__ __forceinline__ void thread_row_stats(const DeviceParams& p, int b, int h, int row0,
                                                 float (&lse2)[2], float (&delta)[2], int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const RowStats stats = row_stats(p, b, h, row0 + c_row(0, 2 * r, lane));
    lse2[r] = stats.lse2;
    delta[r] = stats.delta;
  }
}

// dS = P o (dP - delta) with P = exp2(s * unit - lse2) on a warp's tile of query rows (dQ
// passes): s holds the masked scores (score_unit units) and becomes dS; dP has dropout applied;
// lse2 and delta belong to the thread's rows c_row(0, 0) and c_row(0, 2).
template <int kN>
__device__ __forceinline__ void score_grad_of_query_rows(float (&s)[1][kN][4],
                                                         const float (&dp)[1][kN][4],
                                                         const float (&lse2)[2],
                                                         const float (&delta)[2], float unit) {
#pragma unroll
  for (int n = 0; n < kN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s[0][n][e] = fast_exp2(s[0][n][e] * unit - lse2[e / 2]) * (dp[0][n][e] - delta[e / 2]);
}

// Adds a warp's dS tile (query rows from row0, key columns from col0) to the mask gradient of
// (b, h). The dQ grids give every element a single writing thread (params.h), so += is safe.
template <int kN>
__device__ __forceinline__ void add_mask_grad(const DeviceParams& p, int b, int h, int row0,
                                              int col0, const float (&ds)[1][kN][4], int lane) {
  float* grad = p.grad_mask + b * p.grad_mask_st[0] + h * p.grad_mask_st[1];
#pragma unroll
  for (int n = 0; n < kN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = row0 + c_row(0, e, lane), j = col0 + c_col(n, e, lane);
      if (i < p.Lq && j < p.Lk) grad[i * p.grad_mask_st[2] + j * p.grad_mask_st[3]] += ds[0][n][e];
    }
}

// Writes a warp's 16-row accumulator tile times `mul` as T: element (r, c) to
// dst[(row0 + r) * row_stride + col0 + c], skipping rows >= row_end and columns >= col_end
// (col0 + c is compared). The backward kernels' dQ, dK and dV epilogues.
template <class T, int kD>
__device__ __forceinline__ void store_rows(T* dst, std::int64_t row_stride, int row0, int row_end,
                                           int col0, int col_end, const float (&acc)[1][kD][4],
                                           float mul, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + c_row(0, 2 * r, lane);
    if (i >= row_end) continue;
#pragma unroll
    for (int d = 0; d < kD; ++d) {
      const int col = col0 + c_col(d, 0, lane);
      if (col < col_end)
        *reinterpret_cast<std::uint32_t*>(dst + i * row_stride + col) =
            pack2<T>(acc[0][d][2 * r] * mul, acc[0][d][2 * r + 1] * mul);
    }
  }
}

}  // namespace memattn::cuda::sm80
