// Tile copies and warpgroup products on the sm90 kernels' 128-byte-swizzled shared-memory tiles
// (layout: top of hopper.cuh), shared by the forward and backward kernels.
#pragma once

#include <cstdint>

#include "cuda/sm90/hopper.cuh"
#include "cuda/sm90/wgmma_ops.cuh"

namespace memattn::cuda::sm90 {

// The it-th use of a ring of kStages buffers (stage_of, parity_of: Tr::kStages): its stage, and
// the parity of the phase in which the stage's "full" barrier completes (its "empty" barrier:
// parity ^ 1).
template <int kStages>
__device__ __forceinline__ int ring_stage(int it) {
  return it % kStages;
}
template <int kStages>
__device__ __forceinline__ std::uint32_t ring_parity(int it) {
  return static_cast<std::uint32_t>((it / kStages) & 1);
}
template <class Tr>
__device__ __forceinline__ int stage_of(int it) {
  return ring_stage<Tr::kStages>(it);
}
template <class Tr>
__device__ __forceinline__ std::uint32_t parity_of(int it) {
  return ring_parity<Tr::kStages>(it);
}

// One TMA copy per 64-column chunk of a tile of kRows rows starting at row `row` of (head,
// batch); completion is counted in bytes on `bar`.
template <int kChunks, int kRows>
__device__ __forceinline__ void load_tile(std::uint32_t dst, const CUtensorMap& map,
                                          std::uint32_t bar, int row, int head, int batch) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
    tma_load_4d(dst + c * kRows * kRowBytes, map, bar, c * kChunkCols, row, head, batch);
}

// load_tile's reverse for the 64 rows of a swizzled tile (64-column chunks of kTileRows rows)
// that start at tile row `tile_row0` (a multiple of 8): one TMA store per chunk to row `row` of
// (head, batch), chunks up to `cols` columns; tracked in the caller's bulk group (bulk_commit).
// The rows must be visible to the async proxy (fence_async_shared).
template <int kChunks, int kTileRows>
__device__ __forceinline__ void store_tile_rows(const CUtensorMap& map, std::uint32_t tile,
                                                int tile_row0, int cols, int row, int head,
                                                int batch) {
#pragma unroll
  for (int c = 0; c < kChunks && c * kChunkCols < cols; ++c)
    tma_store_4d(map, tile + (c * kTileRows + tile_row0) * kRowBytes, c * kChunkCols, row, head,
                 batch);
}

// A consumer warp is done reading a buffer (its wgmma waited): one arrival per warp.
__device__ __forceinline__ void release(std::uint32_t empty_bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(empty_bar);
}

// acc (=|+=) A B^T for one warpgroup, issued asynchronously (the caller commits and waits).
// A: rows [a_row0, a_row0 + 64) of a tile of kARows rows, B: kN rows of a tile of kBRows rows
// from b_tile (which may point at a row of it that is a multiple of 8), both K-major (rows along
// M/N, the kCols contracted columns contiguous). Step kk covers columns [16 kk, 16 kk + 16):
// chunk kk / 4, byte 32 (kk % 4) of each 128-byte row.
template <class T, int kN, int kCols, int kARows, int kBRows = kN>
__device__ __forceinline__ void gemm_ss(float (&acc)[kN / 8][4], std::uint32_t a_tile, int a_row0,
                                        std::uint32_t b_tile, bool accumulate) {
  const std::uint64_t a0 = smem_desc(a_tile + a_row0 * kRowBytes, 16, 1024);
  const std::uint64_t b0 = smem_desc(b_tile, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    const std::uint32_t col_bytes = (kk % 4) * 32;
    Wgmma<T, kN>::ss(acc, desc_advance(a0, (kk / 4) * kARows * kRowBytes + col_bytes),
                     desc_advance(b0, (kk / 4) * kBRows * kRowBytes + col_bytes),
                     accumulate || kk > 0);
  }
}

// Descriptor of k-step kk (rows [16 kk, 16 kk + 16): two groups of 8 rows, 2048 bytes) of an
// operand read M/N-major from a tile of kK rows whose 64-column chunks lie kK rows apart.
template <int kK>
__device__ __forceinline__ std::uint64_t mn_major_step(std::uint32_t tile, int kk) {
  return desc_advance(smem_desc(tile, kK * kRowBytes, 1024), kk * 16 * kRowBytes);
}

// acc += A B for one warpgroup, issued asynchronously. A (64 x kK): mma.sync A fragments in
// registers (sm80::c_to_a of a C tile), B (kK x kN): a tile of kK rows of kN columns, read
// N-major (mn_major_step).
template <class T, int kN, int kK>
__device__ __forceinline__ void gemm_rs(float (&acc)[kN / 8][4],
                                        const std::uint32_t (&a)[1][kK / 16][4],
                                        std::uint32_t b_tile) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    Wgmma<T, kN>::rs(acc, a[0][kk], mn_major_step<kK>(b_tile, kk), 1);
}

// acc = A B for one warpgroup with both operands transposed in shared memory (rows of the
// stored tiles along K): A (64 x kK) is a 64-column chunk of a tile of kK rows, B (kK x kN) kN
// columns of a tile of kK rows from the chunk at b_chunk on (as gemm_rs reads B).
template <class T, int kK, int kN = kChunkCols>
__device__ __forceinline__ void gemm_ss_mn(float (&acc)[kN / 8][4], std::uint32_t a_chunk,
                                           std::uint32_t b_chunk) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    Wgmma<T, kN>::ss_mn(acc, mn_major_step<kK>(a_chunk, kk), mn_major_step<kK>(b_chunk, kk),
                        kk > 0);
}

// acc += A B for one warpgroup from shared memory: A (64 x kK, kK <= 64) K-major, the first 64
// rows of a one-chunk tile (as store_a_fragments writes it); B (kK x kN) kN columns of a tile
// of kK rows from the chunk at b_chunk on, read N-major (as gemm_rs reads B).
template <class T, int kN, int kK>
__device__ __forceinline__ void gemm_ss_bt(float (&acc)[kN / 8][4], std::uint32_t a_tile,
                                           std::uint32_t b_chunk) {
  static_assert(kK <= kChunkCols, "A's contracted columns fit one chunk");
  const std::uint64_t a0 = smem_desc(a_tile, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    Wgmma<T, kN>::ss_bt(acc, desc_advance(a0, kk * 32), mn_major_step<kK>(b_chunk, kk), 1);
}

// Stores a warp's 16 rows of A fragments (sm80::c_to_a of a C tile of kCols columns) into rows
// [row0, row0 + 16) and columns [col0, col0 + kCols) (col0 a multiple of 16) of a swizzled tile
// of kTileRows rows (layout: top of hopper.cuh), for a wgmma to read. Fragment register r of
// a[kk] holds row 8 (r % 2) and columns 16 kk + 8 (r / 2) + 2 (lane % 4) + {0, 1}; each
// warp-wide store covers 8 rows x 16 bytes in distinct banks.
template <int kTileRows, int kCols>
__device__ __forceinline__ void store_a_fragments(std::uint32_t tile, int row0,
                                                  const std::uint32_t (&a)[1][kCols / 16][4],
                                                  int lane, int col0 = 0) {
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = row0 + lane / 4 + 8 * (r % 2);
      const int col = col0 + 16 * kk + 8 * (r / 2);  // first column of the 16-byte unit
      const std::uint32_t unit = (col % kChunkCols) / 8 ^ static_cast<std::uint32_t>(row % 8);
      const std::uint32_t addr = tile + (col / kChunkCols) * kTileRows * kRowBytes +
                                 row * kRowBytes + unit * 16 + 4 * (lane % 4);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(a[0][kk][r]) : "memory");
    }
}

}  // namespace memattn::cuda::sm90
