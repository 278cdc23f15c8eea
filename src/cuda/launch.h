// Kernel launchers of the CUDA backend. Each takes filled DeviceParams (common/params.h) and the
// caller's stream, launches asynchronously and checks the launch (common/check.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>

#include "cuda/common/params.h"
#include "memattn/error.h"

namespace memattn::cuda {

// delta[b, h, i] = sum_d grad_out[b, h, i, d] * out[b, h, i, d] in fp32: the row term of the
// softmax gradient, computed once before the backward kernels. T = float, __half or
// __nv_bfloat16.
template <class T>
void launch_backward_delta(const DeviceParams& p, cudaStream_t stream);

// p.key_ranges[b] = (first padded key, last unpadded key + 1) of key_padding row b, for the
// attention kernels' block skipping (semantics.cuh: KeyRange). No-op without key padding or
// without p.key_ranges.
void launch_key_ranges(const DeviceParams& p, cudaStream_t stream);

// Fills p.mask_blocks with the lists of key blocks (MaskBlockList) of query tiles of
// `tile_rows` rows and key blocks of `block_keys` keys (64 or 128) of p's attn_mask (bf16: a
// 16-bit additive mask is bfloat16, not float16), and returns where they are; returns an empty
// list (every block runs) without p.mask_blocks or with more key blocks than one CTA's shared
// memory holds a word each of. Throws memattn::Error where p.mask_block_words are fewer than
// the lists need.
MaskBlockList launch_mask_blocks(const DeviceParams& p, int tile_rows, int block_keys, bool bf16,
                                 cudaStream_t stream);

// Keys per block of a MaskStepList: the sm90 dK/dV kernel's keys per CTA.
inline constexpr int kMaskStepKeys = 128;

// Fills p.mask_blocks with the lists of steps (MaskStepList) of the sm90 dK/dV kernel over
// blocks of kMaskStepKeys keys and `block_queries` queries, as launch_mask_blocks does; an
// empty list (every step runs) also where the query blocks do not fit an entry's 16 bits.
MaskStepList launch_mask_steps(const DeviceParams& p, int block_queries, bool bf16,
                               cudaStream_t stream);

// SIMT kernels (no tensor cores) for float32 inputs: any D, Dv <= 256, exact fp32 accumulation.
// Backward computes delta itself and writes grad_q, grad_k, grad_v (and grad_mask if set).
void simt_forward(const DeviceParams& p, cudaStream_t stream);
void simt_backward(const DeviceParams& p, cudaStream_t stream);

// Tensor-core kernels (mma.sync m16n8k16, ldmatrix, cp.async; sm_80 and newer) for fp16/bf16.
// kHeadDim is the head-dim bucket (64, 96, 128, 256): any D, Dv <= kHeadDim that are multiples
// of 8, with 16-byte aligned rows.
template <class T, int kHeadDim>
void sm80_forward(const DeviceParams& p, cudaStream_t stream);
template <class T, int kHeadDim>
void sm80_backward(const DeviceParams& p, cudaStream_t stream);

// Hopper kernels (wgmma, TMA, warp-specialized; sm_90a only, built when MEMATTN_HAVE_SM90) for
// fp16/bf16. kHeadDim is 64, 128 or 256: any D, Dv <= kHeadDim that are multiples of 8, with
// 16-byte aligned rows and data (TMA's rules). sm90_backward<T, 256> serves calls without
// features given the dQ scratch (DeviceParams::dq_accum) and runs sm80_backward for the others.
template <class T, int kHeadDim>
void sm90_forward(const DeviceParams& p, cudaStream_t stream);

// Whether sm90_forward runs a D = 64 call without features (has_features) of bh = B * Hq heads
// on its wide tiles (sm90/forward.cuh, ForwardTraits::kWide, 192 query rows of three consumer
// warpgroups): long calls, where they measured faster (sm90/NOTES.md, w3: 4-17% from four
// 128-key blocks on; w4: causal calls from Lq = 1536 on, once tiles end at Lq and are taken in
// pairs; n1: non-causal calls from Lq = 768 on, 8% faster there, where four tiles of 192 rows
// cover the queries). Short queries (non-causal: below 768, 5% slower at 512; causal: below
// 1536, where a tile has few blocks) and up to three key blocks keep the 64-row tiles, whose
// second CTA per multiprocessor hides the fixed costs of each tile (its first block alone, its
// last P V, the output; with two key blocks the wide tiles measured 3-11% slower; causal at
// Lq = 1024 / 1200 1% / 3% slower, at 1536 5% faster) and which waste less on Lq = 1. So do
// non-causal calls of fewer than 256 wide tiles (about two per multiprocessor): there a CTA's
// one or two tiles set the time, and with one CTA per multiprocessor the wide tiles ran up to
// 1.7x the time of the 64-row ones (n1; causal calls take their wide tiles in pairs).
inline bool sm90_wide_tiles(std::int64_t bh, std::int64_t Lq, std::int64_t Lk, bool causal) {
  if (causal) return Lq >= 1536 && Lk > 384;
  return Lq >= 768 && Lk > 384 && bh * ((Lq + 191) / 192) >= 256;
}
// Whether sm90_forward runs a D = 64 call without features on 64-row tiles with 80-key blocks
// (sm90/forward.cuh, TileShape::short_keys): every key fits one such block, as in
// cross-attention to the 77 tokens of CLIP's text encoder. (Lk <= 384 never takes the wide
// tiles.)
inline bool sm90_short_keys(std::int64_t Lk) { return Lk <= 80; }
// Whether sm90_forward runs a D = 64 causal call without features that neither of the above
// takes on 64-row tiles with 64-key blocks (TileShape::narrow): where the keys a row sees end at
// its diagonal (no more keys than queries), a tile's last 128-key block was half -inf on every
// other tile (sm90/NOTES.md, n1: 4-10% faster at Lq = Lk = 512-1024 with 8192 tiles). Only with
// at least 4096 tiles of 64 rows (about ten per CTA on 132 multiprocessors): with 256-2048 the
// longer chain of a tile's twice as many blocks ran 2-17% slower. Calls whose rows see more keys
// than there are queries keep the 64 x 128 tiles, which run whole blocks faster.
inline bool sm90_narrow_blocks(std::int64_t bh, std::int64_t Lq, std::int64_t Lk, bool causal) {
  return causal && Lk <= Lq && bh * ((Lq + 63) / 64) >= 4096;
}

// Whether sm90_forward runs a D = 256 call without features on 64-key blocks (TileShape::narrow,
// 128-row tiles as the standard ones) instead of 80-key ones: where the 80-key blocks' keys past
// Lk (zeros from TMA, -inf scores) cost more than the 7% per key they save (sm90/NOTES.md, f80:
// 0.92-0.94x of the time of 64-key blocks at L = 2k-16k, where at most one block is partial;
// n2: 64-key blocks 0.97-0.99x of the time at Lk = 512, whose seventh 80-key block holds 32
// keys, 0.95x at 256). The key columns computed, weighted 0.93 for 80-key blocks, decide.
inline bool sm90_d256_narrow_blocks(std::int64_t Lk) {
  return 100 * 64 * ((Lk + 63) / 64) < 93 * 80 * ((Lk + 79) / 80);
}

// The sm90 forward's tile shapes without features (sm90/forward.cuh, ForwardTraits), at D = 64:
// 64 query rows x 128 keys (standard), 192 x 128 (wide), 64 x 80 (short_keys), 64 x 64 (narrow);
// at D = 256: 128 x 80 (standard), 128 x 64 (narrow).
enum class TileShape : std::uint8_t { standard, wide, short_keys, narrow };
// Indexed by TileShape: explain's kernel-name suffixes and MEMATTN_SM90_D64_TILES's values.
inline constexpr const char* kTileShapeNames[] = {"standard", "wide", "short_keys", "narrow"};
static_assert(std::size(kTileShapeNames) == static_cast<std::size_t>(TileShape::narrow) + 1);
// The shape sm90_forward runs a D = 64 call of bh = B * Hq heads without features on (and
// explain names). MEMATTN_SM90_D64_TILES=standard|wide|short_keys|narrow in the environment
// (read per call) runs every such call on that shape instead, to test or time a shape on calls
// the rules above give another: each shape computes any call.
inline TileShape sm90_d64_tile_shape(std::int64_t bh, std::int64_t Lq, std::int64_t Lk,
                                     bool causal) {
  if (const char* forced = std::getenv("MEMATTN_SM90_D64_TILES"); forced && *forced) {
    for (std::size_t i = 0; i < std::size(kTileShapeNames); ++i)
      if (std::strcmp(forced, kTileShapeNames[i]) == 0) return static_cast<TileShape>(i);
    throw Error(ErrorKind::runtime, std::string("MEMATTN_SM90_D64_TILES=") + forced +
                                        ": expected standard, wide, short_keys or narrow");
  }
  return sm90_wide_tiles(bh, Lq, Lk, causal)      ? TileShape::wide
         : sm90_short_keys(Lk)                    ? TileShape::short_keys
         : sm90_narrow_blocks(bh, Lq, Lk, causal) ? TileShape::narrow
                                                  : TileShape::standard;
}
// The shape sm90_forward runs a call without features of head-dim bucket `bucket` (64, 128,
// 256) and bh = B * Hq heads on, and explain names: the D = 64 rules above, the D = 256 64-key
// blocks, the standard tiles otherwise.
inline TileShape sm90_tile_shape(int bucket, std::int64_t bh, std::int64_t Lq, std::int64_t Lk,
                                 bool causal) {
  if (bucket == 64) return sm90_d64_tile_shape(bh, Lq, Lk, causal);
  return bucket == 256 && sm90_d256_narrow_blocks(Lk) ? TileShape::narrow : TileShape::standard;
}
template <class T, int kHeadDim>
void sm90_backward(const DeviceParams& p, cudaStream_t stream);

}  // namespace memattn::cuda
