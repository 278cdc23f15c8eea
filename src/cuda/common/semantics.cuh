// The per-element semantics of DESIGN.md §2, shared by every CUDA kernel (tensor-core and
// SIMT): which (query i, key j) pairs may attend, what the mask adds, which keys dropout keeps.
// Every kernel computes scores in log2 units (score * scale * log2(e)) so it can use exp2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/params.h"
#include "memattn/philox.h"

namespace memattn::cuda {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Causal limit and key range: true when query i may see key j before any mask is read.
__device__ __forceinline__ bool causal_allows(const DeviceParams& p, std::int64_t i,
                                              std::int64_t j) {
  return !p.causal || j <= i + p.causal_offset;
}

// Keys [0, end) that queries up to i_last may see (all Lk without causal): block skipping.
__device__ __forceinline__ int causal_key_end(const DeviceParams& p, std::int64_t i_last) {
  if (!p.causal) return p.Lk;
  const std::int64_t end = i_last + p.causal_offset + 1;
  return end <= 0 ? 0 : (end >= p.Lk ? p.Lk : static_cast<int>(end));
}

// First query that may see key j (0 without causal), at most Lq.
__device__ __forceinline__ int causal_query_begin(const DeviceParams& p, std::int64_t j) {
  if (!p.causal) return 0;
  const std::int64_t begin = j - p.causal_offset;
  return begin <= 0 ? 0 : (begin >= p.Lq ? p.Lq : static_cast<int>(begin));
}

// The keys of batch element b that key padding leaves: [0, dense_end) are all unpadded, keys
// >= end are all padded, keys in between are read from the mask one by one. Without key
// padding that is {Lk, Lk}; with key padding but no precomputed ranges (launch_key_ranges)
// {0, Lk}, so every key is read.
struct KeyRange {
  int dense_end, end;
};
__device__ __forceinline__ KeyRange key_range(const DeviceParams& p, int b) {
  if (p.key_padding == nullptr) return {p.Lk, p.Lk};
  if (p.key_ranges == nullptr) return {0, p.Lk};
  return {p.key_ranges[2 * b], p.key_ranges[2 * b + 1]};
}

// Keys [0, end) that query row i may see: its causal limit and b's range end bound them (holes
// in the padding aside); none for rows past Lq.
__device__ __forceinline__ int query_key_end(const DeviceParams& p, const KeyRange& keys, int i) {
  const int causal_end = causal_key_end(p, i);
  return i < p.Lq ? (causal_end < keys.end ? causal_end : keys.end) : 0;
}

// How many blocks of kBlockN keys the queries up to i_last of a batch element with key range
// `keys` loop over: the keys up to the causal limit and the last unpadded key, so the loops skip
// trailing padded blocks as well as causally hidden ones.
template <int kBlockN>
__device__ __forceinline__ int visible_key_blocks(const DeviceParams& p, const KeyRange& keys,
                                                  std::int64_t i_last) {
  const int causal_end = causal_key_end(p, i_last);
  const int end = causal_end < keys.end ? causal_end : keys.end;
  return (end + kBlockN - 1) / kBlockN;
}

// Everything that masks or biases one score, for one (b, h) pair. `T` is the additive mask's
// element type (q's dtype).
template <class T>
struct ElementMasks {
  const DeviceParams& p;
  int b, h;
  KeyRange keys;

  __device__ __forceinline__ ElementMasks(const DeviceParams& params, int b_, int h_)
      : ElementMasks(params, b_, h_, key_range(params, b_)) {}
  __device__ __forceinline__ ElementMasks(const DeviceParams& params, int b_, int h_,
                                          const KeyRange& keys_)
      : p(params), b(b_), h(h_), keys(keys_) {}

  // Whether key j exists (j < Lk) and is not padding; reads the padding mask only between
  // keys.dense_end and keys.end.
  __device__ __forceinline__ bool key_visible(int j) const {
    return j < keys.dense_end ||
           (j < keys.end && p.key_padding[b * p.key_padding_st[0] + j * p.key_padding_st[1]] == 0);
  }

  // Adds the mask to a score in log2 units, or returns -inf where (i, j) may not attend
  // (also for keys j >= Lk). Call only for i < Lq.
  __device__ __forceinline__ float apply(float score_log2, int i, int j) const {
    return key_visible(j) ? mask_and_causal(score_log2, i, j) : -INFINITY;
  }

  // apply() for a key j < Lk known not to be padding.
  __device__ __forceinline__ float mask_and_causal(float score_log2, int i, int j) const {
    if (!causal_allows(p, i, j)) return -INFINITY;
    if (p.mask_kind == MaskKind::none) return score_log2;
    const std::int64_t off =
        b * p.mask_st[0] + h * p.mask_st[1] + i * p.mask_st[2] + j * p.mask_st[3];
    if (p.mask_kind == MaskKind::boolean)
      return static_cast<const std::uint8_t*>(p.mask)[off] != 0 ? score_log2 : -INFINITY;
    const float bias = p.mask_kind == MaskKind::additive_f32
                           ? static_cast<const float*>(p.mask)[off]
                           : to_float(static_cast<const T*>(p.mask)[off]);
    return score_log2 + bias * kLog2e;
  }
};

// draws.x[e] by selects: a run-time index into the array would put it in local memory.
__device__ __forceinline__ std::uint32_t draw_at(const philox::U32x4& draws, int e) {
  const std::uint32_t lo = (e & 1) ? draws.x[1] : draws.x[0];
  const std::uint32_t hi = (e & 1) ? draws.x[3] : draws.x[2];
  return (e & 2) ? hi : lo;
}

// Dropout keep test for (row bh = b * Hq + h, query i, key j); see DeviceParams.
__device__ __forceinline__ bool dropout_keeps(const DeviceParams& p, std::uint64_t bh, int i,
                                              int j) {
  const philox::U32x4 draws = philox::dropout_draws(
      p.dropout_seed, bh, static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(j) >> 2);
  return draw_at(draws, j & 3) >= p.dropout_threshold;
}

// 2^x by the hardware approximation (2 ulp; exp2(-inf) = 0): the softmax's hot instruction.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The backward's row shift: P = exp2(score - lse2) with lse2 = lse * log2(e); +inf marks a
// fully masked row (lse = -inf), whose P is then 0.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// exp2(x - row_max) that is 0 for masked scores, also when the whole row is masked so far
// (row_max = -inf): avoids inf - inf = NaN.
__device__ __forceinline__ float exp2_shifted(float x, float row_max) {
  return fast_exp2(x - (row_max == -INFINITY ? 0.f : row_max));
}

}  // namespace memattn::cuda
