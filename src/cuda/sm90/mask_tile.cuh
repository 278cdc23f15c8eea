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

// The 16-bit value of q's dtype whose bits are the low half of `bits`.
template <class T>
__device__ __forceinline__ T bit_cast_16(std::uint32_t bits) {
  const auto u = static_cast<unsigned short>(bits & 0xffffu);
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __ushort_as_bfloat16(u);
  else
    return __ushort_as_half(u);
}

// One stage's mask tile: the values of `rows` query rows (the block's, or the single row of a
// mask broadcast along queries) x a block's keys. Stored as the other tiles are (top of
// hopper.cuh): 128-byte rows (128 bool or 64 16-bit keys) in chunks of kRowBytes columns, each
// chunk 1024-byte aligned, 16-byte unit u of row r at unit u ^ (r % 8).
struct MaskTile {
  std::uint32_t base;  // 1024-byte aligned
  int rows;            // 1 or the block's rows
  int elem_bytes;      // 1 (bool) or 2 (q's dtype)

  // Room a tile of kRows x kCols 16-bit values needs (the most any mask takes).
  template <int kRows, int kCols>
  static constexpr std::uint32_t capacity() {
    return (kCols * 2 / kRowBytes) * (kRows * kRowBytes > 1024 ? kRows * kRowBytes : 1024);
  }

  __device__ __forceinline__ std::uint32_t chunk_bytes() const {
    return rows * kRowBytes > 1024 ? rows * kRowBytes : 1024;
  }
  __device__ __forceinline__ int chunk_keys() const { return kRowBytes / elem_bytes; }

  // Bytes one tile of `cols` keys delivers.
  __device__ __forceinline__ std::uint32_t bytes(int cols) const {
    return cols * elem_bytes * rows;
  }

  // Copies the mask values of query rows [i0, i0 + rows) (row 0 when broadcast) x keys
  // [j0, j0 + cols) of mask coordinates (mask_b, mask_h); completion counted on `bar`.
  __device__ __forceinline__ void load(const CUtensorMap& map, std::uint32_t bar, int i0, int j0,
                                       int cols, int mask_h, int mask_b) const {
    for (int c = 0; c * chunk_keys() < cols; ++c)
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

// The general kernels' mask_scores (sm80/scores.cuh) with attn_mask's values from a mask tile:
// a warp's 16 rows of a C tile of query rows x keys, raw dot products in, scores in log2 units
// (or -inf) out. tile_row0: the warp's first row within the tile; row0 / col0: global index of
// its first query and key. The block must not reach between the first padded and the last
// unpadded key (KeyRange): the batch element's key range bounds the keys.
template <bool kBool, class T, int kN>
__device__ __forceinline__ void mask_scores_from_tile(float (&acc)[1][kN][4],
                                                      const ElementMasks<T>& masks,
                                                      const MaskTile& tile, int tile_row0, int row0,
                                                      int col0, int lane) {
  const DeviceParams& p = masks.p;
  constexpr std::uint32_t kElem = kBool ? 1 : 2;
  constexpr int kChunks = kN * 8 * kElem / kRowBytes > 1 ? kN * 8 * kElem / kRowBytes : 1;
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
    const int r = sm80::c_row(0, 2 * half, lane), i = row0 + r;
    const int end = causal_key_end(p, i);
    const int key_end = masks.keys.end;
    row_end[half] = i < p.Lq ? (end < key_end ? end : key_end) : 0;
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
        if constexpr (kBool) {
          x = j < row_end[half] && (values >> (8 * e) & 0xffu) != 0 ? x * p.scale_log2 : -INFINITY;
        } else {
          const float bias = to_float(bit_cast_16<T>(values >> (16 * e)));
          x = j < row_end[half] ? x * p.scale_log2 + bias * kLog2e : -INFINITY;
        }
      }
    }
  }
}

}  // namespace memattn::cuda::sm90
