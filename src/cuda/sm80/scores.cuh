// Turning a warp's tile of raw dot products into masked scores and dropout
// factors: the element coordinates of an mma.sync C tile, shared by forward and backward.
#pragma once

#include <cstdint>

#include "cuda/common/semantics.cuh"
#include "memattn/philox.h"

namespace memattn::cuda::sm80 {

// Row and column (within the warp's tile) of element e of C tile (m, n); see mma.cuh.
__device__ __forceinline__ int c_row(int m, int e, int lane) {
  return 16 * m + (lane >> 2) + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ int c_col(int n, int e, int lane) {
  return 8 * n + 2 * (lane & 3) + (e & 1);
}

// Which operand runs along a tile's rows: queries (forward, dQ: S = Q K^T) or keys (dK/dV:
// S^T = K Q^T).
enum class Rows : std::uint8_t { queries, keys };

// Units of the scores mask_scores leaves: the lean kernels (kMasks false) keep raw dot
// products and fold the scale into the exponent (one FFMA per element, exp2(s * scale_log2 -
// shift)); the general kernels add the mask in log2 units, so their scores are already scaled.
template <bool kMasks>
__device__ __forceinline__ float score_unit(const DeviceParams& p) {
  return kMasks ? 1.f : p.scale_log2;
}

// Whether key j may be attended: read from the padding mask (kReadPadding) or bounded by the
// batch element's key range.
template <bool kReadPadding, class T>
__device__ __forceinline__ bool key_visible(const ElementMasks<T>& masks, int j) {
  return kReadPadding ? masks.key_visible(j) : j < masks.keys.end;
}

// mask_scores' per-element loop. kReadPadding: read the key padding mask per key; otherwise
// the batch element's key range bounds the keys (a register compare: no load, no branch).
template <Rows kRows, bool kMasks, bool kReadPadding, class T, int kM, int kN>
__device__ __forceinline__ void mask_elements(float (&acc)[kM][kN][4], const ElementMasks<T>& masks,
                                              int row0, int col0, int lane) {
  const DeviceParams& p = masks.p;
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = acc[m][n][e];
        const int r = row0 + c_row(m, e, lane), c = col0 + c_col(n, e, lane);
        const int i = kRows == Rows::queries ? r : c, j = kRows == Rows::queries ? c : r;
        if constexpr (kMasks)
          x = (i < p.Lq && key_visible<kReadPadding>(masks, j))
                  ? masks.mask_and_causal(x * p.scale_log2, i, j)
                  : -INFINITY;
        else
          x = (i < p.Lq && causal_allows(p, i, j) && key_visible<kReadPadding>(masks, j))
                  ? x
                  : -INFINITY;
        acc[m][n][e] = x;
      }
}

// Key and query offsets of element e of C tile (m, n) from the warp tile's first key / query.
template <Rows kRows>
__device__ __forceinline__ int key_offset(int m, int n, int e, int lane) {
  return kRows == Rows::queries ? c_col(n, e, lane) : c_row(m, e, lane);
}
template <Rows kRows>
__device__ __forceinline__ int query_offset(int m, int n, int e, int lane) {
  return kRows == Rows::queries ? c_row(m, e, lane) : c_col(n, e, lane);
}

// -inf in every element of a warp's tile for which hidden(m, n, e) holds.
template <int kM, int kN, class Hidden>
__device__ __forceinline__ void hide_elements(float (&acc)[kM][kN][4], Hidden hidden) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (hidden(m, n, e)) acc[m][n][e] = -INFINITY;
}

// Key ends of a warp tile with query rows (forward, dQ) and no holes in the key padding: each
// of the thread's rows sees the keys before min(its causal limit, the range's end), none for
// rows past Lq; `end` holds that bound relative to the tile's first key col0. Bounds and
// causality then cost one compare per element against a per-row value, where mask_elements
// tests each element's bounds (64-bit causal compares among them).
template <int kM>
__device__ __forceinline__ void query_row_key_ends(int (&end)[kM][2], const DeviceParams& p,
                                                   const KeyRange& keys, int row0, int col0,
                                                   int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      end[m][half] = query_key_end(p, keys, row0 + c_row(m, 2 * half, lane)) - col0;
}

// -inf in every element at or past its row's key end (query_row_key_ends).
template <int kM, int kN>
__device__ __forceinline__ void mask_query_row_ends(float (&acc)[kM][kN][4],
                                                    const int (&end)[kM][2], int lane) {
  hide_elements(acc, [&](int m, int n, int e) { return c_col(n, e, lane) >= end[m][e / 2]; });
}

// The two cheap cases of a warp tile whose queries all exist and whose keys need no padding
// read, each one compare per element against a per-thread value instead of mask_elements'
// bounds, causality and range tests (a short-key forward spent as long on those as on its
// softmax: sm90/NOTES.md, "Short key ranges"):
// - mask_key_end: causality hides nothing; keys at offsets >= `end` (past the range's end,
//   e.g. the partial last block of Lk = 77) are hidden.
// - mask_causal_diagonal: every key is in range; key offset - query offset > `limit` (the
//   causal limit, relative to the tile's first query and key) is hidden. Tiles with query rows
//   only (forward, dQ): in the dK/dV kernels it spilled 4 bytes at D = 128.
template <Rows kRows, int kM, int kN>
__device__ __forceinline__ void mask_key_end(float (&acc)[kM][kN][4], int end, int lane) {
  hide_elements(acc, [&](int m, int n, int e) { return key_offset<kRows>(m, n, e, lane) >= end; });
}
// The causal limit of a tile of ni queries from i0 and nj keys from j0, relative to them, kept
// in int range: below -ni every key is hidden, above nj none.
__device__ __forceinline__ int causal_limit(const DeviceParams& p, int i0, int j0, int ni, int nj) {
  const std::int64_t limit = i0 + p.causal_offset - j0;
  return static_cast<int>(limit < -ni ? -ni - 1 : limit > nj ? nj + 1 : limit);
}
template <Rows kRows, int kM, int kN>
__device__ __forceinline__ void mask_causal_diagonal(float (&acc)[kM][kN][4], int limit, int lane) {
  hide_elements(acc, [&](int m, int n, int e) {
    return key_offset<kRows>(m, n, e, lane) - query_offset<kRows>(m, n, e, lane) > limit;
  });
}

// Masks a warp's tile of dot products in place (-inf where (i, j) may not attend; see
// score_unit for the units). row0/col0: global index of the tile's first row/column. `check`
// false promises that every element is attendable and unmasked (block interior). kMasks false
// promises no attn_mask: only bounds, causality and key padding are checked, which keeps the
// common kernels free of the mask code's registers. kRowKeyEnds (query rows, no attn_mask):
// every block whose keys need no padding read takes its rows' key ends (query_row_key_ends),
// one path where the others pick among the cheap cases and the general loop: with those three
// next to its accumulators the wide D = 64 forward spilled 52 bytes; in the D = 128 forward the
// one path measured 3% slower (sm90/NOTES.md, "Spills").
template <Rows kRows, bool kMasks, bool kRowKeyEnds = false, class T, int kM, int kN>
__device__ __forceinline__ void mask_scores(float (&acc)[kM][kN][4], const ElementMasks<T>& masks,
                                            int row0, int col0, bool check, int lane) {
  static_assert(!kRowKeyEnds || (kRows == Rows::queries && !kMasks));
  if (!check) {  // block interior: nothing to mask, one uniform branch for the whole tile
    if constexpr (kMasks)
#pragma unroll
      for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int n = 0; n < kN; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[m][n][e] *= masks.p.scale_log2;
    return;
  }
  // The lean kernels read the padding mask per key only in tiles whose keys reach between the
  // first padded and the last unpadded key (holes in the padding). The general kernels read
  // masks per element anyway, and in the lean dK/dV kernels a second copy of the general loop
  // spilled: one general loop there.
  if constexpr (kMasks) {
    mask_elements<kRows, kMasks, true>(acc, masks, row0, col0, lane);
  } else {
    const KeyRange& keys = masks.keys;
    const DeviceParams& p = masks.p;
    constexpr bool kQueryRows = kRows == Rows::queries;
    const int i0 = kQueryRows ? row0 : col0, j0 = kQueryRows ? col0 : row0;
    const int ni = kQueryRows ? 16 * kM : 8 * kN, nj = kQueryRows ? 8 * kN : 16 * kM;
    // Warp-uniform: keys between the first padded and the last unpadded key need their
    // padding read (holes). Tiles with every query row and no holes take one of the cheap
    // cases; the others (a missing query row, both bounds at once) the general loop.
    const bool holes = keys.dense_end < keys.end && j0 + nj > keys.dense_end && j0 < keys.end;
    const bool cheap = i0 + ni <= p.Lq && !holes;
    if constexpr (kRowKeyEnds) {
      if (!holes) {
        int end[kM][2];
        query_row_key_ends(end, p, keys, row0, col0, lane);
        mask_query_row_ends(acc, end, lane);
      } else {
        mask_elements<kRows, kMasks, true>(acc, masks, row0, col0, lane);
      }
    } else if (cheap && causal_allows(p, i0, j0 + nj - 1)) {
      mask_key_end<kRows>(acc, keys.end - j0, lane);
    } else if (kQueryRows && cheap && j0 + nj <= keys.dense_end) {
      mask_causal_diagonal<kRows>(acc, causal_limit(p, i0, j0, ni, nj), lane);
    } else if (kQueryRows && !holes) {
      mask_elements<kRows, kMasks, false>(acc, masks, row0, col0, lane);
    } else {
      mask_elements<kRows, kMasks, true>(acc, masks, row0, col0, lane);
    }
  }
}

// Whether a block of queries [i0, i0 + ni) x keys [j0, j0 + nj) has elements that bounds or
// causality hide: a partial block, keys past the batch element's dense prefix (padding or Lk),
// or the causal diagonal crossing it.
__device__ __forceinline__ bool block_needs_bounds_check(const DeviceParams& p,
                                                         const KeyRange& keys, int i0, int ni,
                                                         int j0, int nj) {
  return i0 + ni > p.Lq || j0 + nj > keys.dense_end ||
         (p.causal && static_cast<std::int64_t>(j0) + nj - 1 > i0 + p.causal_offset);
}

// Multiplies every score of a C tile by `factor`.
template <int kM, int kN>
__device__ __forceinline__ void scale_scores(float (&acc)[kM][kN][4], float factor) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] *= factor;
}

// Whether a block needs per-element checks: bounds or causality (above), or a mask.
__device__ __forceinline__ bool block_needs_check(const DeviceParams& p, const KeyRange& keys,
                                                  int i0, int ni, int j0, int nj) {
  return block_needs_bounds_check(p, keys, i0, ni, j0, nj) || p.mask_kind != MaskKind::none;
}

// Multiplies each probability by its dropout factor (keep_scale or 0). Columns come in pairs
// (2t, 2t+1) inside one group of four keys, so one Philox call serves both.
template <Rows kRows, int kM, int kN>
__device__ __forceinline__ void apply_dropout(float (&acc)[kM][kN][4], const DeviceParams& p,
                                              std::uint64_t bh, int row0, int col0, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = row0 + c_row(m, 2 * half, lane), c = col0 + c_col(n, 0, lane);
        if (kRows == Rows::queries) {
          const philox::U32x4 d =
              philox::dropout_draws(p.dropout_seed, bh, static_cast<std::uint32_t>(r),
                                    static_cast<std::uint32_t>(c) >> 2);
          acc[m][n][2 * half] *=
              draw_at(d, c & 3) >= p.dropout_threshold ? p.dropout_keep_scale : 0.f;
          acc[m][n][2 * half + 1] *=
              draw_at(d, (c + 1) & 3) >= p.dropout_threshold ? p.dropout_keep_scale : 0.f;
        } else {  // rows are keys r, r (same), columns queries c, c + 1: two Philox calls
          for (int e = 0; e < 2; ++e) {
            acc[m][n][2 * half + e] *= dropout_keeps(p, bh, c + e, r) ? p.dropout_keep_scale : 0.f;
          }
        }
      }
}

}  // namespace memattn::cuda::sm80
