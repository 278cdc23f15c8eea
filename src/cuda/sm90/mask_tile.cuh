// attn_mask tiles in shared memory. The producer copies each key block's mask values with TMA
// next to K and V (tensor_map.h: make_mask_map), and the consumers read them from shared
// memory instead of per element from global memory. The per-element global reads had made
// masked calls 5-10x slower than unmasked ones (NOTES.md, masked calls): each thread's loads
// waited on L2 one after another.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common/params.h"
#include "cuda/common/semantics.cuh"
#include "cuda/sm80/scores.cuh"
#include "cuda/sm90/hopper.cuh"

namespace memattn::cuda::sm90 {

__device__ __forceinline__ std::uint32_t ld_shared_u8(std::uint32_t addr) {
  std::uint16_t v;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ std::uint32_t ld_shared_u16(std::uint32_t addr) {
  std::uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ std::uint32_t ld_shared_u32(std::uint32_t addr) {
  std::uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// The 16-bit value of q's dtype in half `e` of `bits` (0: bits 0-15), as a float. kDirect: a
// bf16 is the top half of its float, so one AND (e = 1) or shift (e = 0) converts it (the
// forward: 32 instructions less per thread and block of an additive mask); otherwise through
// the 16-bit type, a shift more for the high half, which the backward keeps (with the direct
// conversion its general D = 64 dQ kernel spilled 8 bytes).
template <class T, bool kDirect>
__device__ __forceinline__ float mask_value(std::uint32_t bits, int e) {
  const std::uint32_t half = e ? bits >> 16 : bits & 0xffffu;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return kDirect ? __uint_as_float(e ? bits & 0xffff0000u : bits << 16)
                   : __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(half)));
  else
    return __half2float(__ushort_as_half(static_cast<unsigned short>(half)));
}

// One stage's mask tile: the values of `rows` query rows (the block's, or the single row of a
// mask broadcast along queries) x a block's keys. Stored as the other tiles are (top of
// hopper.cuh): chunks of 128-byte rows (128 bool or 64 16-bit keys), each chunk 1024-byte
// aligned, 16-byte unit u of row r at unit u ^ (r % 8). A block narrower than a chunk (64 bool
// keys) still gets a whole chunk; the kernels read only its keys.
struct MaskTile {
  std::uint32_t base;  // 1024-byte aligned
  int rows;            // 1 or the block's rows
  int elem_bytes;      // 1 (bool) or 2 (q's dtype)

  // Chunks of a block of `cols` keys.
  __host__ __device__ static constexpr int chunks(int cols, int elem_bytes) {
    return (cols * elem_bytes + kRowBytes - 1) / kRowBytes;
  }
  // Room a tile of kRows x kCols keys needs for masks of up to kElem bytes per value (2: any
  // mask).
  template <int kRows, int kCols, int kElem = 2>
  static constexpr std::uint32_t capacity() {
    return chunks(kCols, kElem) * (kRows * kRowBytes > 1024 ? kRows * kRowBytes : 1024);
  }

  __device__ __forceinline__ std::uint32_t chunk_bytes() const {
    return rows * kRowBytes > 1024 ? rows * kRowBytes : 1024;
  }
  __device__ __forceinline__ int chunk_keys() const { return kRowBytes / elem_bytes; }

  // Chunks of a block of kCols keys: constants picked by the element size (the producer
  // thread has few registers to spare).
  template <int kCols>
  __device__ __forceinline__ int block_chunks() const {
    return elem_bytes == 1 ? chunks(kCols, 1) : chunks(kCols, 2);
  }

  // Bytes one tile of kCols keys delivers (whole chunks; zeros past the mask's end count).
  template <int kCols>
  __device__ __forceinline__ std::uint32_t bytes() const {
    return block_chunks<kCols>() * rows * kRowBytes;
  }

  // Copies the mask values of query rows [i0, i0 + rows) (row 0 when broadcast) x keys
  // [j0, j0 + kCols) of mask coordinates (mask_b, mask_h); completion counted on `bar`.
  template <int kCols>
  __device__ __forceinline__ void load(const CUtensorMap& map, std::uint32_t bar, int i0, int j0,
                                       int mask_h, int mask_b) const {
#pragma unroll
    for (int c = 0; c < chunks(kCols, 2); ++c)
      if (c < block_chunks<kCols>())
        tma_load_4d(base + c * chunk_bytes(), map, bar, j0 + c * chunk_keys(), rows == 1 ? 0 : i0,
                    mask_h, mask_b);
  }
};

// Mask coordinates of (b, h): 0 along dims the mask broadcasts (MaskTileMap's size-1 dims).
__device__ __forceinline__ int mask_b(const DeviceParams& p, int b) {
  return p.mask_st[0] != 0 ? b : 0;
}
__device__ __forceinline__ int mask_h(const DeviceParams& p, int h) {
  return p.mask_st[1] != 0 ? h : 0;
}

// Whether batch element b's key padding has holes: padded keys before its last unpadded key
// (KeyRange: dense_end < end; rare). Its blocks read the padding per key, and with it the
// attn_mask per element (sm80::mask_scores), so the tile loops need only the key range.
__device__ __forceinline__ bool has_padding_holes(const KeyRange& keys) {
  return keys.dense_end < keys.end;
}

// Calls f(kBool, kCheck) with the mask kind (bool or not) and whether the block needs the
// per-element checks as std::bool_constant flags: the tile loops are instantiated per
// combination, so no per-element branch picks among them.
template <class F>
__device__ __forceinline__ void with_tile_flags(bool is_bool, bool check, F&& f) {
  if (is_bool && check)
    f(std::true_type{}, std::true_type{});
  else if (is_bool)
    f(std::true_type{}, std::false_type{});
  else if (check)
    f(std::false_type{}, std::true_type{});
  else
    f(std::false_type{}, std::false_type{});
}

// Units of tile-masked scores. kDeferred (the forward): bool masks leave the raw
// dot product x, additive ones give x * scale + bias, and the softmax's exponent multiplies by
// deferred_unit (as the lean kernels fold the scale into it): one multiply less per element.
// Otherwise log2 units, x * scale_log2 (+ bias * log2 e). Raw maxima need scale > 0, so bool
// masks defer only then (defers_units); the kernels send other calls to the per-element path.
__device__ __forceinline__ float deferred_unit(const DeviceParams& p) {
  return p.mask_kind == MaskKind::boolean ? p.scale_log2 : kLog2e;
}
__device__ __forceinline__ bool defers_units(const DeviceParams& p) {
  return p.mask_kind != MaskKind::boolean || p.scale_log2 > 0.f;
}

// A raw dot product x with mask value e of `values` (bool bytes or 16-bit values of q's dtype,
// e = 0 the lowest) applied, in the units above, or -inf where (i, j) is not visible.
template <bool kBool, bool kDeferred, class T>
__device__ __forceinline__ float masked_score(float x, std::uint32_t values, int e, bool visible,
                                              float scale, float scale_log2) {
  if constexpr (kBool)
    return visible && ((values >> (8 * e)) & 0xffu) != 0 ? (kDeferred ? x : x * scale_log2)
                                                         : -INFINITY;
  else if constexpr (kDeferred)
    return visible ? x * scale + mask_value<T, true>(values, e) : -INFINITY;
  else
    return visible ? x * scale_log2 + mask_value<T, false>(values, e) * kLog2e : -INFINITY;
}

// The general kernels' mask_scores (sm80/scores.cuh) with attn_mask's values from a mask tile,
// for a warp's 16 rows of a C tile whose rows are queries (forward, dQ): raw dot products in,
// scores (masked_score; kDeferred: deferred units) or -inf out. tile_row0: the warp's first row
// within the tile; row0 / col0: global index of its first query and key. The batch element's key
// padding must have no holes (has_padding_holes): its key range bounds the keys. kCheck false
// promises a block that bounds and causality leave whole (sm80::block_needs_bounds_check): no
// per-element compare.
template <bool kBool, bool kDeferred, bool kCheck, class T, int kN>
__device__ __forceinline__ void mask_query_rows_from_tile(float (&acc)[1][kN][4],
                                                          const ElementMasks<T>& masks,
                                                          const MaskTile& tile, int tile_row0,
                                                          int row0, int col0, int lane) {
  const DeviceParams& p = masks.p;
  constexpr std::uint32_t kElem = kBool ? 1 : 2;
  constexpr int kChunks = MaskTile::chunks(kN * 8, kElem);
  // Per row of the thread (two): keys [0, row_end) pass the bounds and the causal limit. The
  // pair of keys (8n + 2 (lane % 4), +1) of a row lies at byte b = 8n kElem + the lane's byte of
  // its chunk: unit b / 16 ^ (row % 8), byte b % 16. The row's chunk address (bits 4-6 zero:
  // 1024-byte aligned chunk, 128-byte rows, lane byte < 16) with the swizzle ORed in is
  // row_key, so a pair's address is row_key ^ (16 * unit) + byte % 16: one XOR, the byte an
  // immediate offset.
  int row_end[2];
  std::uint32_t row_key[2][kChunks];
  const std::uint32_t lane_byte = 2u * static_cast<std::uint32_t>(lane % 4) * kElem;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = sm80::c_row(0, 2 * half, lane);
    row_end[half] = query_key_end(p, masks.keys, row0 + r);
    const std::uint32_t row = tile.rows == 1 ? 0u : static_cast<std::uint32_t>(tile_row0 + r);
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
      row_key[half][c] =
          (tile.base + c * tile.chunk_bytes() + row * kRowBytes + lane_byte) | (row % 8u) * 16u;
  }
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    constexpr std::uint32_t kPerChunk = kRowBytes / (8 * kElem);  // n per chunk
    const std::uint32_t byte = (n % kPerChunk) * 8 * kElem;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const std::uint32_t addr = (row_key[half][n / kPerChunk] ^ (byte & 0x70u)) + byte % 16;
      const std::uint32_t values = kBool ? ld_shared_u16(addr) : ld_shared_u32(addr);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = col0 + sm80::c_col(n, e, lane);
        float& x = acc[0][n][2 * half + e];
        const bool visible = !kCheck || j < row_end[half];
        x = masked_score<kBool, kDeferred, T>(x, values, e, visible, p.scale, p.scale_log2);
      }
    }
  }
}

// mask_query_rows_from_tile for a C tile whose rows are keys (dK/dV: S^T): a warp's 16 keys
// from tile_key0 within the tile (global key_row0) x the step's queries from col0. A thread's
// elements (key r, queries c and c + 1) lie in two tile rows; with 128-byte rows and the
// swizzle depending on the row only through c % 8 = 2 (lane % 4) + {0, 1}, the four addresses
// of n = 0 serve every n, 8n rows (1024n bytes) further. A thread's two keys are its rows,
// so the key padding (holes included) is read once per key, not per element. kCheck as for
// query rows.
template <bool kBool, bool kCheck, class T, int kQ>
__device__ __forceinline__ void mask_key_rows_from_tile(float (&acc)[1][kQ][4],
                                                        const ElementMasks<T>& masks,
                                                        const MaskTile& tile, int tile_key0,
                                                        int key_row0, int col0, int lane) {
  const DeviceParams& p = masks.p;
  constexpr std::uint32_t kElem = kBool ? 1 : 2;
  int query_begin[2];         // queries [query_begin, Lq) see the thread's key of each row half
  std::uint32_t addr0[2][2];  // [row half][query parity]
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = sm80::c_row(0, 2 * half, lane), j = key_row0 + r;
    query_begin[half] = masks.key_visible(j) ? causal_query_begin(p, j) : p.Lq;
    const std::uint32_t key_byte = static_cast<std::uint32_t>(tile_key0 + r) * kElem;
#pragma unroll
    for (int odd = 0; odd < 2; ++odd) {
      const std::uint32_t row =
          tile.rows == 1 ? 0u : 2u * static_cast<std::uint32_t>(lane % 4) + odd;
      addr0[half][odd] = tile.base + key_byte / kRowBytes * tile.chunk_bytes() + row * kRowBytes +
                         ((key_byte % kRowBytes) ^ (row % 8u) * 16u);
    }
  }
  const std::uint32_t n_step = tile.rows == 1 ? 0u : 8u * kRowBytes;
#pragma unroll
  for (int n = 0; n < kQ; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int half = e / 2, odd = e % 2;
      const std::uint32_t addr = addr0[half][odd] + n * n_step;
      const std::uint32_t value = kBool ? ld_shared_u8(addr) : ld_shared_u16(addr);
      const int i = col0 + sm80::c_col(n, e, lane);
      float& x = acc[0][n][e];
      const bool visible = !kCheck || (i >= query_begin[half] && i < p.Lq);
      x = masked_score<kBool, false, T>(x, value, 0, visible, p.scale, p.scale_log2);
    }
}

}  // namespace memattn::cuda::sm90
