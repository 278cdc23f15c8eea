// Hopper (sm_90a) forward, FlashAttention-3 style: a producer warpgroup streams Q once and K, V
// tiles through a kStages-deep ring of shared-memory buffers with bulk tensor copies (TMA) on
// mbarriers; two consumer warpgroups of 64 query rows each compute S = Q K^T with wgmma from
// shared memory, the online softmax in registers (shared with sm80, softmax.cuh) and
// O += P V with P straight from registers. setmaxnreg moves registers from the producer to
// the consumers. Semantics (masks, padding, causal, dropout, fully masked rows) come from the
// same helpers as the sm80 kernels, applied to wgmma accumulators, whose per-warp layout is
// that of mma.sync C tiles.
#pragma once

#include <cuda.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/common/device.h"
#include "cuda/common/launch_smem.cuh"
#include "cuda/common/params.h"
#include "cuda/common/semantics.cuh"
#include "cuda/launch.h"
#include "cuda/sm80/scores.cuh"
#include "cuda/sm80/softmax.cuh"
#include "cuda/sm80/warp_gemm.cuh"
#include "cuda/sm90/hopper.cuh"
#include "cuda/sm90/mask_tile.cuh"
#include "cuda/sm90/tensor_map.h"
#include "cuda/sm90/tile_order.h"
#include "cuda/sm90/tiles.cuh"
#include "memattn/error.h"

namespace memattn::cuda::sm90 {

// Where the forward stages a tile's output for TMA stores (ForwardTraits::kOut).
enum class OutStaging : std::uint8_t { registers, own_tile, q_half };

// kHeadDim: head-dim bucket (64, 128, 256) for both Q/K and V columns.
// D = 128, 256: two consumer warpgroups at 240 registers hold S, P and O of their 64 rows of a
// 128-row tile with no spill, and take turns on the tensor cores (PingPong).
// D = 64: 64-row tiles, one consumer warpgroup and two CTAs per multiprocessor: two
// independent tiles per multiprocessor overlapped better than two warpgroups of one tile on
// every D = 64 row measured (2-9%, NOTES.md s7), most on short chains (decoding, a single key
// block), where a 64-row tile also wastes half as much on Lq = 1. Not at D = 128 / 256: two
// CTAs of 256 threads get 128 registers per thread, which spilled at D = 128 and could not
// hold D = 256's accumulators.
// TileShape::wide (D = 64 without features only; launch.h's sm90_wide_tiles picks it per call):
// 192-row tiles of three consumer warpgroups at 160 registers taking turns, one CTA per
// multiprocessor (FlashAttention-3's D = 64 shape): three chains per multiprocessor where two
// CTAs give two, and each K/V tile read by 192 query rows instead of 64. 2-17% faster than the
// 64-row tiles on long non-causal calls (NOTES.md, w3), 5-15% on causal ones from Lq = 1536 on
// (w4: tiles that end at Lq, taken in pairs, each warpgroup computing only its rows' blocks);
// slower where a tile's fixed costs, which no second CTA hides, weigh more (short queries,
// decoding, few key blocks). 160 registers hold it without spills since the blocks that bounds
// or causality cut take one masking path (kRowKeyEnds; 52 bytes of spills before).
// TileShape::short_keys (D = 64 without features, every key in one block of 80:
// sm90_short_keys): the 64-row tiles with 80-key blocks, so that the scores, the softmax and
// P V of a call such as cross-attention to CLIP's 77 text tokens cover 80 columns instead of
// 128, and three CTAs per multiprocessor (136 registers per consumer thread) where the other
// shapes fit two: there a tile is one block, a chain of Q K^T, softmax, P V and the output
// whose latency more independent chains hide. (128-key blocks at three CTAs did not compile:
// ptxas ran out of the 80 registers per thread of the launch allocation, C7602.)
// TileShape::narrow (D = 64 causal calls without features too short for the wide tiles:
// sm90_narrow_blocks): the 64-row tiles with 64-key blocks on three CTAs per multiprocessor. A
// 64-row tile's causal limit ends its last 128-key block halfway on every other tile, so half
// of that block was scores of -inf; 64-key blocks end at the limit, and their accumulators fit
// three CTAs' 136 registers: 4-10% faster than the 64 x 128 tiles at Lq = 512-1024 with many
// tiles (NOTES.md, n1), slower with few (a tile's chain of twice as many blocks) and on
// non-causal calls, whose blocks are all whole. At D = 256 (sm90_d256_narrow_blocks) the
// standard 128-row tiles with 64-key blocks, for keys that would leave the last 80-key block
// mostly empty (n2).
// kFeatures: the general kernel (masks, dropout), which at D <= 128 also has room for attn_mask
// tiles (mask_tile.cuh). Not at D = 256: next to its accumulators, the tile path and the
// per-element path the kernel keeps for other masks spilled 44 bytes.
template <int kHeadDim, bool kFeatures, TileShape kTileShape = TileShape::standard>
struct ForwardTraits {
  static constexpr TileShape kShape = kTileShape;
  static constexpr bool kWide = kShape == TileShape::wide;
  static_assert(kShape == TileShape::standard ||
                (!kFeatures &&
                 (kHeadDim == 64 || (kHeadDim == 256 && kShape == TileShape::narrow))));
  static constexpr int kHead = kHeadDim;
  static constexpr int kConsumers = kWide ? 3 : kHeadDim <= 64 ? 1 : 2;  // warpgroups of 64 rows
  // Wide tiles end at Lq (Tile::at): where 192 does not divide Lq, a bh's first tile starts
  // before row 0 instead of its last running past Lq. The rows with no output (TMA's zero Q
  // rows) then sit in a causal call's lightest tile of the bh (a key block or two), not in its
  // heaviest (all of them).
  static constexpr bool kEndAligned = kWide;
  // CTAs per multiprocessor: independent chains of tiles. Three for the short-key and narrow
  // tiles, whose accumulators fit 136 registers (NOTES.md, k80: 8% faster than two at Lk = 77).
  static constexpr int kCtasPerSm = kConsumers > 1 ? 1
                                    : kShape == TileShape::short_keys || kShape == TileShape::narrow
                                        ? 3
                                        : 2;
  static constexpr int kBlockM = 64 * kConsumers;
  // Keys per stage. D = 256 without features: 80 (FA3's choice at hdim 256; m64n80 products of
  // Q K^T, and two stages of K and V still fit next to the 64 KB Q tile), 64 on the narrow
  // tiles; with features 64 (at 80 the mask and dropout code spilled 24 bytes).
  static constexpr int kBlockN = kShape == TileShape::short_keys ? 80
                                 : kShape == TileShape::narrow   ? 64
                                 : kHeadDim <= 128               ? 128
                                 : kFeatures                     ? 64
                                                                 : 80;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  // Tile coordinates (Tile::at) in 32-bit arithmetic, a few instructions per division where
  // 64-bit ones call a division routine every tile, which calls with one key block per tile
  // feel (NOTES.md, "Short key ranges"); launch_forward checks that the tiles fit. Not in the
  // general D = 128 kernel: there it changed register allocation and spilled 16 bytes.
  using TileIndex = std::conditional_t<kFeatures && kHeadDim == 128, std::int64_t, std::uint32_t>;
  // Register budget per CTA: 128 * producer + 128 * kConsumers * consumer <= the CTA's launch
  // allocation, kThreads x the registers per thread that __launch_bounds__ leaves (65536 /
  // (kThreads kCtasPerSm), rounded down to a multiple of 8): setmaxnreg only moves registers
  // within it.
  static constexpr int kProducerRegs = 24;
  // The consumers take what the launch allocation leaves them, up to setmaxnreg's 240 in steps
  // of 8: 232 (D = 64, two CTAs), 240 (D = 128 / 256), 160 (wide), 136 (three CTAs).
  static constexpr int kLaunchRegs = 65536 / (kThreads * kCtasPerSm) / 8 * 8;
  static constexpr int kConsumerRegs =
      std::min(240, (kLaunchRegs * kThreads - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8);
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= kLaunchRegs * kThreads);
  static constexpr int kChunks = kHeadDim / kChunkCols;  // 64-column swizzle chunks per row
  static constexpr std::uint32_t kQBytes = kBlockM * kHeadDim * 2;
  // Row sums on the tensor cores (D = 64 without features): each V stage is followed by a
  // 64-column chunk of ones, read as V's columns 64-71, so P V also writes each row's sum of P
  // into 8 more accumulator columns (an m64n72 product), and the softmax drops its 64 adds per
  // thread and block (about a sixth of its instructions) for 6% more tensor-core work:
  // 1-1.4% faster on most D = 64 rows, the rest unchanged (NOTES.md, r1). The sums are of the
  // 16-bit P that P V weighs V with. Not on the short-key tiles (8 bytes of spills at their 136
  // registers, 3% slower at Lk = 77); not with features, whose mask tiles leave no room for the
  // ones next to two CTAs per multiprocessor; not at D = 128 / 256, whose shared memory is full.
  static constexpr bool kSumsOnTensorCores =
      kHeadDim == 64 && !kFeatures && kTileShape != TileShape::short_keys;
  static constexpr int kSumTiles = kSumsOnTensorCores ? 1 : 0;  // 8-column accumulator tiles
  static constexpr std::uint32_t kKVBytes = kBlockN * kHeadDim * 2;
  // A V stage and, with kSumsOnTensorCores, its chunk of ones (the chunk stride of V's
  // N-major reads, gemm_rs)
  static constexpr std::uint32_t kOnesBytes = kSumsOnTensorCores ? kBlockN * kRowBytes : 0;
  static constexpr std::uint32_t kVStageBytes = kKVBytes + kOnesBytes;
  static constexpr bool kMaskTiles = kFeatures && kHeadDim <= 128;
  // Conditional rescaling of the output (sm80::softmax_update) where it is widest: at D = 256 a
  // rescale is 128 multiplies per thread and block. Measured (NOTES.md, o6): D = 256 5% faster,
  // D = 128 unchanged, D = 64 3-6% slower.
  static constexpr bool kLazyRescale = kHeadDim == 256;
  // Blocks that bounds or causality cut hide keys past each row's key end (sm80::mask_scores'
  // kRowKeyEnds), one path for every such block: the wide tiles, where the three paths of the
  // other kernels spilled 52 bytes next to the accumulators (NOTES.md, "Spills").
  static constexpr bool kRowKeyEnds = kWide;
  static constexpr std::uint32_t kMaskBytes =
      kMaskTiles ? MaskTile::capacity<kBlockM, kBlockN>() : 0;
  // Where a tile's output waits for its TMA stores (forward_kernel's store_output; NOTES.md,
  // "Output by TMA stores"): a tile of its own without mask tiles at D <= 128; the warpgroup's
  // half of the tile's Q buffer where that does not fit (D = 256: a 64 KB tile; D = 128 next to
  // mask tiles), which holds the Q buffer until the stores have read it. At D = 64 only on the
  // standard 64-row tiles (2% faster at L = 512, NOTES.md, o7); the others store from registers:
  // the general kernel (its mask tiles leave no room next to two CTAs per multiprocessor), the
  // three-CTA tiles (narrow, short_keys: staging spilled 28-40 bytes at their 136 registers) and
  // the wide tiles (staged, 1-2% slower on their rows; and their first tile of a bh starts
  // before row 0, where a TMA store faults with an illegal instruction).
  static constexpr bool kOutFromRegisters =
      kHeadDim == 64 && (kFeatures || kShape != TileShape::standard);
  static constexpr OutStaging kOut = kOutFromRegisters                ? OutStaging::registers
                                     : kHeadDim <= 128 && !kMaskTiles ? OutStaging::own_tile
                                                                      : OutStaging::q_half;
  static constexpr bool kStageOut = kOut == OutStaging::own_tile;
  // TMA stores take no rows before row 0 (tiles that end at Lq store from registers).
  static_assert(!kEndAligned || kOut == OutStaging::registers);
  static constexpr std::uint32_t kOutBytes = kStageOut ? kBlockM * kHeadDim * 2 : 0;
  // Q buffers: with two, the producer loads the next tile's Q while the consumers still read
  // this one's, so a tile's first product need not wait for its Q. At D = 128 where the output
  // is staged (it fits there: 224 KB); not at D = 64, which more shared memory per CTA has made
  // slower every time (NOTES.md, s7, s13, s14), nor for the wide tiles, where two Q buffers and
  // turns across tiles measured 1-4% slower (NOTES.md, w3).
  static constexpr int kQStages = kStageOut && kHeadDim == 128 ? 2 : 1;
  // Layout: Q[kQStages] | K[kStages] | (V | ones)[kStages] | mask[kStages] | out | mbarriers;
  // every tile 1024-byte aligned.
  static constexpr std::uint32_t kKVOffset = kQStages * kQBytes;
  static constexpr std::uint32_t kVOffset = kKVOffset + kStages * kKVBytes;
  static constexpr std::uint32_t kMaskOffset = kVOffset + kStages * kVStageBytes;
  static constexpr std::uint32_t kOutOffset = kMaskOffset + kStages * kMaskBytes;
  static constexpr std::uint32_t kBarrierOffset = kOutOffset + kOutBytes;
  // per Q buffer q full and q empty, then per K/V stage k/v/mask full and k/v/mask empty
  static constexpr int kBarriers = 2 * kQStages + 6 * kStages;
  // The general kernel runs the key blocks an attn_mask leaves visible (MaskBlockList), and
  // skips the mask reads of whole ones; of whole bool blocks not at D = 128
  // (kSkipsWholeBoolBlocks), where that branch made ptxas spill 52-56 bytes (NOTES.md,
  // "Structured masks").
  static constexpr bool kListedBlocks = kFeatures;
  static constexpr bool kSkipsWholeBoolBlocks = kListedBlocks && kHeadDim != 128;
  // With kListedBlocks, the producer publishes each block's entry of the list (its key block)
  // in a ring of kEntries words after the barriers, written with the block's K (k_full). Twice
  // the K/V stages, so that the consumers may read an entry until they release the K of the
  // block two later, which the producer waits for before it writes the entry's word again.
  static constexpr int kEntries = kListedBlocks ? 2 * kStages : 0;
  static constexpr std::uint32_t kEntryOffset = kBarrierOffset + 8 * kBarriers;
  static constexpr int kSmemBytes = kEntryOffset + 4 * kEntries;
  static_assert(fits_on_sm(kSmemBytes, kCtasPerSm));
  static_assert(kHeadDim % kChunkCols == 0 && kBlockN % 16 == 0);
};

// Shared-memory addresses of one CTA's tiles and barriers.
template <class Tr>
struct ForwardSmem {
  std::uint32_t base;
  __device__ __forceinline__ std::uint32_t q(int qs) const { return base + qs * Tr::kQBytes; }
  __device__ __forceinline__ std::uint32_t k(int s) const {
    return base + Tr::kKVOffset + s * Tr::kKVBytes;
  }
  __device__ __forceinline__ std::uint32_t v(int s) const {
    return base + Tr::kVOffset + s * Tr::kVStageBytes;
  }
  __device__ __forceinline__ std::uint32_t ones(int s) const { return v(s) + Tr::kKVBytes; }
  __device__ __forceinline__ std::uint32_t mask(int s) const {
    return base + Tr::kMaskOffset + s * Tr::kMaskBytes;
  }
  // Consumer warpgroup wg's 64 rows of the staged output (64-column chunks of 64 rows).
  __device__ __forceinline__ std::uint32_t out(int wg) const {
    return base + Tr::kOutOffset + wg * 64 * Tr::kHead * 2;
  }
  __device__ __forceinline__ std::uint32_t bar(int i) const {
    return base + Tr::kBarrierOffset + 8 * i;
  }
  // The entry of the it-th block of the K/V ring (ForwardTraits::kEntries).
  __device__ __forceinline__ std::uint32_t entry(int it) const {
    return base + Tr::kEntryOffset + 4 * (it % Tr::kEntries);
  }
  static constexpr int kKV = 2 * Tr::kQStages;  // the first K/V barrier
  __device__ __forceinline__ std::uint32_t q_full(int qs) const { return bar(qs); }
  __device__ __forceinline__ std::uint32_t q_empty(int qs) const { return bar(Tr::kQStages + qs); }
  __device__ __forceinline__ std::uint32_t k_full(int s) const { return bar(kKV + s); }
  __device__ __forceinline__ std::uint32_t v_full(int s) const {
    return bar(kKV + Tr::kStages + s);
  }
  __device__ __forceinline__ std::uint32_t k_empty(int s) const {
    return bar(kKV + 2 * Tr::kStages + s);
  }
  __device__ __forceinline__ std::uint32_t v_empty(int s) const {
    return bar(kKV + 3 * Tr::kStages + s);
  }
  __device__ __forceinline__ std::uint32_t mask_full(int s) const {
    return bar(kKV + 4 * Tr::kStages + s);
  }
  __device__ __forceinline__ std::uint32_t mask_empty(int s) const {
    return bar(kKV + 5 * Tr::kStages + s);
  }
};

// The two products of a consumer warpgroup `wg`, issued asynchronously (wgmma_commit'ed;
// the caller waits).
template <class T, class Tr>
struct GemmIssue {
  static constexpr int kHeadDim = Tr::kHead;
  static constexpr int kN = Tr::kBlockN / 8, kD = kHeadDim / 8 + Tr::kSumTiles;
  ForwardSmem<Tr> sm;
  int wg;

  // S = Q K^T with Q buffer qs and K stage s.
  __device__ __forceinline__ void scores(float (&sc)[1][kN][4], int qs, int s) const {
    gemm_ss<T, Tr::kBlockN, kHeadDim, Tr::kBlockM>(sc[0], sm.q(qs), 64 * wg, sm.k(s), false);
    wgmma_commit();
  }

  // O += P V over stage s (with kSumsOnTensorCores, V's columns past kHeadDim are its ones).
  __device__ __forceinline__ void values(float (&acc_o)[1][kD][4],
                                         const std::uint32_t (&pf)[1][kN / 2][4], int s) const {
    gemm_rs<T, 8 * kD, Tr::kBlockN>(acc_o[0], pf, sm.v(s));
    wgmma_commit();
  }
};

// Turn-taking of the consumer warpgroups when issuing products (FA3's ping-pong): named
// barrier 1 + g is warpgroup g's turn, and g passes it to g + 1 (the last to 0) after issuing.
// The last warpgroup lets warpgroup 0 go first (start) and does not pass after its last block,
// so every barrier sees as many arrivals as waits (all run the same blocks).
// kAcrossTiles: the turns run on across tiles, as in FA3: warpgroup 0 may issue the next tile's
// first product as soon as the last warpgroup has issued its last one, while that one still
// finishes its softmax and output; start() runs once per CTA, the last pass skipped is the
// CTA's last block's, and where the CTA's last tile has no block, finish() takes the arrival no
// block waited for. Otherwise start() runs at each tile's first block and the last pass of each
// tile is skipped.
template <int kConsumers, bool kAcrossTiles>
struct PingPong {
  static_assert(kConsumers > 1);
  int wg;
  static constexpr int kThreads = 256;  // the waiting and the passing warpgroup
  __device__ __forceinline__ void start() const {
    if (wg == kConsumers - 1) named_barrier_arrive(1, kThreads);
  }
  __device__ __forceinline__ void start_cta() const {
    if constexpr (kAcrossTiles) start();
  }
  __device__ __forceinline__ void start_tile() const {
    if constexpr (!kAcrossTiles) start();
  }
  __device__ __forceinline__ void wait() const { named_barrier_sync(1 + wg, kThreads); }
  // last: the tile's last block; final_tile: the CTA's last tile.
  __device__ __forceinline__ void pass(bool last, bool final_tile) const {
    if (!(last && (final_tile || !kAcrossTiles) && wg == kConsumers - 1))
      named_barrier_arrive(1 + (wg + 1) % kConsumers, kThreads);
  }
  // balanced: the CTA's last tile had blocks (so its last pass was skipped).
  __device__ __forceinline__ void finish(bool balanced) const {
    if constexpr (kAcrossTiles)
      if (!balanced && wg == 0) wait();
  }
};
template <bool kAcrossTiles>
struct PingPong<1, kAcrossTiles> {  // a single consumer warpgroup has no one to take turns with
  int wg;
  __device__ __forceinline__ void start_cta() const {}
  __device__ __forceinline__ void start_tile() const {}
  __device__ __forceinline__ void wait() const {}
  __device__ __forceinline__ void pass(bool, bool) const {}
  __device__ __forceinline__ void finish(bool) const {}
};

// Key blocks that the query rows before row_end see: up to the causal limit of row
// min(row_end, Lq) - 1 (rows past Lq have no output, so they do not move the limit) and b's last
// unpadded key.
template <int kBlockN>
__device__ __forceinline__ int key_blocks_before_row(const DeviceParams& p, const KeyRange& keys,
                                                     int row_end) {
  return visible_key_blocks<kBlockN>(p, keys, min(row_end, p.Lq) - 1);
}

// Tile t of a call is query block m of the (b, h) pair t / M in batch_head_at's order
// (tile_order.h; row bh = b * Hq + h): heavy (late, for causal) query blocks first within each bh,
// consecutive tiles on one bh so concurrent CTAs share its K/V in L2. Its key blocks stop at the
// causal limit and at b's last unpadded key. Query block m holds rows [m kBlockM, +kBlockM), or
// with kEndAligned those that end (M - m) kBlockM rows before Lq (M query blocks per bh; the first
// may start before row 0).
struct Tile {
  int b, h, hk, i0, num_n_blocks;
  std::int64_t bh;
  KeyRange keys;
  // Index: the type of the tile arithmetic (ForwardTraits::TileIndex).
  template <int kBlockM, int kBlockN, bool kEndAligned, class Index>
  // batch_inner: the pairs' order (p.batch_inner where the kernel can take masks; else false).
  __device__ __forceinline__ static Tile at(const DeviceParams& p, Index t, int num_m_blocks,
                                            bool batch_inner) {
    Tile tile;
    const auto m_blocks = static_cast<Index>(num_m_blocks);
    const Index pair = t / m_blocks, heads = static_cast<Index>(p.Hq);
    const int m_block = num_m_blocks - 1 - static_cast<int>(t - pair * m_blocks);
    const Index bh = bh_of_pair(pair, p.B, p.Hq, batch_inner);
    tile.bh = static_cast<std::int64_t>(bh);
    tile.b = static_cast<int>(bh / heads);
    tile.h = static_cast<int>(bh - static_cast<Index>(tile.b) * heads);
    tile.hk = tile.h / p.group;
    tile.i0 = kEndAligned ? p.Lq - (num_m_blocks - m_block) * kBlockM : m_block * kBlockM;
    tile.keys = key_range(p, tile.b);
    tile.num_n_blocks = key_blocks_before_row<kBlockN>(p, tile.keys, tile.i0 + kBlockM);
    return tile;
  }
};

// Tile of a persistent CTA in round r (gridDim.x CTAs take tiles [r G, r G + G) per round), in
// snake order: CTA c takes r G + c in even rounds and r G + G - 1 - c in odd ones. Causal tiles
// shrink along each bh (heavy first), so a plain stride gives some CTAs the heavy tiles of
// every round; the snake pairs each round's heavy share with the next round's light one.
// Past the last tile: >= num_tiles (every later round too).
__device__ __forceinline__ std::int64_t snake_tile(std::int64_t round) {
  const std::int64_t first = round * gridDim.x;
  return round % 2 == 0 ? first + blockIdx.x : first + gridDim.x - 1 - blockIdx.x;
}

// Persistent: each CTA runs the tiles that paired_tile (causal calls) or light_tiles_last
// (tile_order.h) put at positions snake_tile(0), snake_tile(1), ... The K/V ring's stage and
// phase continue across tiles (block counter `it`), and Q has its own ring of Tr::kQStages
// buffers (tile counter `q_round`), so the producer loads the next tile's Q and K/V while the
// consumers finish the current one.
// kFeatures: the general kernel (masks, dropout); with a tiled mask (maps.mask.rows > 0) the
// producer also streams the mask values of each K/V block into the stage's mask tile.
// kOrdered: positions map to tiles through tile_order.h (paired_tile, light_tiles_last); else
// each position is its tile (launch_forward picks one; the mapping's code costs the kernels that
// do not need it 1-4%, NOTES.md, p1).
template <class T, class Tr, bool kFeatures, bool kOrdered>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kCtasPerSm)
    forward_kernel(const __grid_constant__ DeviceParams p, const __grid_constant__ ForwardMaps maps,
                   int num_m_blocks, std::int64_t num_tiles, std::int64_t num_pairs,
                   bool light_last) {
  // kD: O's 8-column accumulator tiles, and the row sums' (kSumsOnTensorCores)
  constexpr int kN = Tr::kBlockN / 8, kD = Tr::kHead / 8 + Tr::kSumTiles;
  const ForwardSmem<Tr> sm{smem_u32(aligned_dynamic_smem())};
  const auto tile_at = [&](std::int64_t t) {
    using Index = typename Tr::TileIndex;
    auto index = static_cast<Index>(t);
    if constexpr (kOrdered)
      index = light_last
                  ? light_tiles_last(index, static_cast<Index>(num_tiles), num_m_blocks)
                  : paired_tile(index, static_cast<Index>(gridDim.x), num_m_blocks, num_pairs);
    return Tile::at<Tr::kBlockM, Tr::kBlockN, Tr::kEndAligned>(p, index, num_m_blocks,
                                                               kFeatures && p.batch_inner);
  };
  // The general kernel with an attn_mask's block list runs the listed blocks (MaskBlockList):
  // of those the bounds leave, the list's first listed_count(tile), the tile's block nb being
  // key block listed_entry(tile, nb) >> 1, whole if its low bit is set. The producer reads the
  // entries and publishes each block's in shared memory (ForwardSmem::entry) for the consumers.
  const bool listed =
      Tr::kListedBlocks && maps.blocks.words != nullptr && __ldg(maps.blocks.skips) != 0;
  const auto listed_counts = [&](const Tile& tile) {
    return maps.blocks.at(tile.b, tile.h, tile.i0 / Tr::kBlockM);
  };
  const auto listed_count = [&](const Tile& tile) {
    return __ldg(listed_counts(tile) + tile.num_n_blocks);
  };
  const auto listed_entry = [&](const Tile& tile, int nb) {
    return __ldg(maps.blocks.entries(listed_counts(tile)) + nb);
  };
  const bool mask_tiles = Tr::kMaskTiles && maps.mask.rows > 0;
  const auto mask_tile = [&](int s) {
    return MaskTile{sm.mask(s), maps.mask.rows, p.mask_kind == MaskKind::boolean ? 1 : 2};
  };

  if (threadIdx.x == 0) {
    trap_unless_smem_aligned();
    for (int qs = 0; qs < Tr::kQStages; ++qs) {
      mbar_init(sm.q_full(qs), 1);
      mbar_init(sm.q_empty(qs), Tr::kConsumers * 4);  // one arrival per consumer warp
    }
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(sm.k_full(s), 1);
      mbar_init(sm.v_full(s), 1);
      mbar_init(sm.k_empty(s), Tr::kConsumers * 4);
      mbar_init(sm.v_empty(s), Tr::kConsumers * 4);
      mbar_init(sm.mask_full(s), 1);
      mbar_init(sm.mask_empty(s), Tr::kConsumers * 4);
    }
    mbar_init_fence();
  }
  if constexpr (Tr::kSumsOnTensorCores) {  // the ones, for the wgmmas (async proxy) to read
    const float two_ones =                 // the bits of two 16-bit ones of T
        __uint_as_float(std::is_same_v<T, __nv_bfloat16> ? 0x3f803f80u : 0x3c003c00u);
    const float units[4] = {two_ones, two_ones, two_ones, two_ones};
    for (std::uint32_t i = 16 * threadIdx.x; i < Tr::kOnesBytes; i += 16 * Tr::kThreads)
      for (int s = 0; s < Tr::kStages; ++s) st_shared_v4(sm.ones(s) + i, units);
    fence_async_shared();
  }
  __syncthreads();

  // The D = 64 wide, short-key and narrow kernels (consumers at 160 and 136 registers) read their
  // warp's number through a shuffle, which ptxas knows to be the same in every lane: it then keeps
  // what derives from it (the warpgroup's rows and own blocks, the drain's loop) in uniform
  // registers. With the plain read the wide kernel spilled 116 bytes (56 with only the
  // warpgroup shuffled, 48 with both, 52 since r1's row sums) and the short-key one 8 (its K/V
  // block counter); the other kernels keep the plain read, with which they have no spill (the
  // shuffle gave the general D = 128 kernel 60 bytes).
  constexpr bool kUniformWarp = Tr::kShape != TileShape::standard && Tr::kHead == 64;
  const int warp_id = kUniformWarp ? __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 32), 0)
                                   : static_cast<int>(threadIdx.x / 32);
  const int warp_group = warp_id / 4;
  if (warp_group == 0) {  // producer: one thread issues every copy
    warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x != 0) return;
    prefetch_tensor_map(maps.q);
    prefetch_tensor_map(maps.k);
    prefetch_tensor_map(maps.v);
    if (mask_tiles) prefetch_tensor_map(maps.mask.map);
    // Whole blocks whose consumers read no mask (kSkipsWholeBoolBlocks for bool masks) where
    // neither causality nor key padding may cut them.
    const bool skips_whole_tiles =
        (Tr::kSkipsWholeBoolBlocks || p.mask_kind != MaskKind::boolean) && !p.causal &&
        p.key_padding == nullptr;
    int it = 0, q_round = 0;  // K/V blocks and Q tiles loaded so far
    for (std::int64_t round = 0, t = snake_tile(0); t < num_tiles; t = snake_tile(++round)) {
      Tile tile = tile_at(t);
      if (listed) tile.num_n_blocks = listed_count(tile);
      // With a block list, each block's entry is read a block ahead: once a stage is free, its
      // copies wait for no load from the list.
      int entry = listed && tile.num_n_blocks > 0 ? listed_entry(tile, 0) : 0;
      for (int nb = 0; nb < tile.num_n_blocks; ++nb, ++it) {
        const int s = stage_of<Tr>(it);
        const int next = listed && nb + 1 < tile.num_n_blocks ? listed_entry(tile, nb + 1) : 0;
        const int row = (listed ? entry >> 1 : nb) * Tr::kBlockN;
        mbar_wait(sm.k_empty(s), parity_of<Tr>(it) ^ 1);
        if constexpr (Tr::kListedBlocks)  // k_full publishes it
          st_shared_u32(sm.entry(it), listed ? entry : nb << 1);
        mbar_arrive_expect_tx(sm.k_full(s), Tr::kKVBytes);
        load_tile<Tr::kChunks, Tr::kBlockN>(sm.k(s), maps.k, sm.k_full(s), row, tile.hk, tile.b);
        if (nb == 0) {  // Q after K(0): K(0) streams in while the last tile's Q is still read
          const int qs = ring_stage<Tr::kQStages>(q_round);
          mbar_wait(sm.q_empty(qs), ring_parity<Tr::kQStages>(q_round) ^ 1);
          mbar_arrive_expect_tx(sm.q_full(qs), Tr::kQBytes);
          load_tile<Tr::kChunks, Tr::kBlockM>(sm.q(qs), maps.q, sm.q_full(qs), tile.i0, tile.h,
                                              tile.b);
          ++q_round;
        }
        if (mask_tiles) {
          const MaskTile mt = mask_tile(s);
          mbar_wait(sm.mask_empty(s), parity_of<Tr>(it) ^ 1);
          // A whole block's tile is not read where no bound or causality cuts the tile (the
          // consumers' checks then hold for both warpgroups' rows): its stage only completes.
          if (listed && (entry & 1) != 0 && skips_whole_tiles && tile.i0 + Tr::kBlockM <= p.Lq &&
              row + Tr::kBlockN <= p.Lk) {
            mbar_arrive(sm.mask_full(s));
          } else {
            mbar_arrive_expect_tx(sm.mask_full(s), mt.bytes<Tr::kBlockN>());
            mt.load<Tr::kBlockN>(maps.mask.map, sm.mask_full(s), tile.i0, row, mask_h(p, tile.h),
                                 mask_b(p, tile.b));
          }
        }
        mbar_wait(sm.v_empty(s), parity_of<Tr>(it) ^ 1);
        mbar_arrive_expect_tx(sm.v_full(s), Tr::kKVBytes);
        load_tile<Tr::kChunks, Tr::kBlockN>(sm.v(s), maps.v, sm.v_full(s), row, tile.hk, tile.b);
        entry = next;
      }
    }
    return;
  }

  // Consumers: warpgroup wg owns query rows [i0 + 64 wg, +64) of a tile; warp w of it +16 w.
  warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int wg = warp_group - 1, warp = warp_id % 4, lane = threadIdx.x % 32;
  const GemmIssue<T, Tr> gemm{sm, wg};
  // Turns across tiles where the next tile's Q has a buffer of its own: with one, its load
  // waits for this tile's last output stores anyway, and running the turns on measured 3-5%
  // slower at D = 256 (NOTES.md, o5).
  const PingPong<Tr::kConsumers, (Tr::kQStages > 1)> turn{wg};
  constexpr bool kQHalf = Tr::kOut == OutStaging::q_half;
  // Staged output: thread 0 of each warpgroup issues its TMA stores.
  const bool out_issuer = Tr::kOut != OutStaging::registers && threadIdx.x % 128 == 0;
  // A tile's output (O / row sum) and lse. Staged (Tr::kOut): the warpgroup writes its 64 rows
  // of O to shared memory in the swizzled layout TMA reads and one thread stores them with
  // TMA, so the warps issue a few shared-memory stores where the 4-byte global stores from
  // registers cost the D = 128 forward 2-17% (NOTES.md, "Output by TMA stores"). Rows past Lq
  // and columns past Dv are not written (the tensor map's bounds). q_half: the rows go to the
  // warpgroup's half of the tile's Q buffer qs, which only this warpgroup's products read, and
  // the warpgroup releases the buffer once the stores have read it; tiles with no key block
  // (no Q loaded) take the register path.
  const auto store_output = [&](const Tile& tile, int warp_row0, int qs, float(&acc_o)[1][kD][4],
                                const float(&row_max)[1][2], const float(&row_sum)[1][2],
                                float unit) {
    if (Tr::kOut == OutStaging::registers || (kQHalf && tile.num_n_blocks == 0)) {
      sm80::store_out_lse<T, Tr::kSumsOnTensorCores>(p, tile.b, tile.h, warp_row0, acc_o, row_max,
                                                     row_sum, unit, lane);
      return;
    }
    float inv[1][2];
    sm80::store_lse<Tr::kSumsOnTensorCores>(p, tile.b, tile.h, warp_row0, acc_o, row_max, row_sum,
                                            unit, lane, inv);
    sm80::rescale_rows(acc_o, inv);
    std::uint32_t of[1][kD / 2][4];
    sm80::c_to_a<T>(of, acc_o);
    // The staging rows: 64-column chunks of kRows rows, this warpgroup's from row `row0`.
    constexpr int kRows = kQHalf ? Tr::kBlockM : 64;
    const std::uint32_t staging = kQHalf ? sm.q(qs) : sm.out(wg);
    const int row0 = kQHalf ? 64 * wg : 0;
    const int barrier = 1 + Tr::kConsumers + wg;  // after PingPong's
    // own_tile: the previous tile's stores read it (q_half: this Q buffer was refilled since)
    if (!kQHalf && out_issuer) bulk_wait_read<0>();
    named_barrier_sync(barrier, 128);
    store_a_fragments<kRows, Tr::kHead>(staging, row0 + 16 * warp, of, lane);
    fence_async_shared();
    named_barrier_sync(barrier, 128);
    if (out_issuer) {
      store_tile_rows<Tr::kChunks, kRows>(maps.out, staging, row0, p.Dv, tile.i0 + 64 * wg, tile.h,
                                          tile.b);
      bulk_commit();
      if constexpr (kQHalf) bulk_wait_read<0>();
    }
    if constexpr (kQHalf) release(sm.q_empty(qs), lane);  // warp 0's arrival after the wait
  };
  int it = 0, q_round = 0;
  bool turns_balanced = false;  // PingPong::finish
  turn.start_cta();
  // With a block list, the next tile's list length is loaded before this tile's output is
  // stored: a tile that waited for that load first ran 7% slower on random masks.
  int next_count = 0;
  if (listed && snake_tile(0) < num_tiles) next_count = listed_count(tile_at(snake_tile(0)));
  for (std::int64_t round = 0, t = snake_tile(0); t < num_tiles; t = snake_tile(++round)) {
    Tile tile = tile_at(t);
    if (listed) tile.num_n_blocks = next_count;
    const int n = tile.num_n_blocks;
    const bool final_tile = snake_tile(round + 1) >= num_tiles;  // the CTA's last
    turns_balanced = n > 0;
    const int wg_row0 = tile.i0 + 64 * wg, warp_row0 = wg_row0 + 16 * warp;
    float acc_o[1][kD][4];
    sm80::zero(acc_o);
    float row_max[1][2] = {{-INFINITY, -INFINITY}}, row_sum[1][2] = {{0.f, 0.f}};
    const ElementMasks<T> masks{p, tile.b, tile.h, tile.keys};
    // Mask tiles serve batch elements whose key padding has no holes, in deferred units
    // (mask_tile.cuh; bool masks with scale <= 0 take the per-element path).
    const bool from_tiles = mask_tiles && !has_padding_holes(tile.keys) && defers_units(p);
    const float unit = from_tiles ? deferred_unit(p) : sm80::score_unit<kFeatures>(p);

    float sc[1][kN][4];              // S of the current block, then its probabilities
    std::uint32_t pf[1][kN / 2][4];  // P of the previous block as wgmma A fragments
    // The key block of the tile's block nb, the it-th block of the K/V ring, and whether it is
    // whole (MaskBlockList), from the entry the producer published with its K: read once K
    // landed, so that the softmax does not wait for it.
    struct KeyBlock {
      int index;
      bool whole;
    };
    const auto key_block = [&](int nb, int it) {
      if constexpr (!Tr::kListedBlocks) {
        return KeyBlock{nb, false};
      } else {
        const std::uint32_t entry = ld_shared_u32(sm.entry(it));
        return KeyBlock{static_cast<int>(entry >> 1), (entry & 1) != 0};
      }
    };
    // Masks key block kb (the it-th block of the ring: `use`) and folds it into the running
    // softmax; rescale is the factor for acc_o once the previous P V is in.
    const auto softmax = [&](KeyBlock kb, int use, float(&rescale)[1][2]) {
      const int j0 = kb.index * Tr::kBlockN;
      const KeyRange& keys = tile.keys;
      // Rows past Lq need no -inf: their Q rows are TMA's zeros and their output is never
      // stored, and rows are independent. So only the warpgroup's rows before Lq count for the
      // checks: a tile that ends past Lq (every last tile of a bh when Lq is not a multiple of
      // kBlockM) runs the unchecked path on its interior blocks.
      const int live_rows = min(64, p.Lq - wg_row0);
      if (mask_tiles) {
        const int s = stage_of<Tr>(use), tile_row0 = 64 * wg + 16 * warp;
        const MaskTile mt = mask_tile(s);
        mbar_wait(sm.mask_full(s), parity_of<Tr>(use));
        if (from_tiles) {
          // Blocks that bounds and causality leave whole skip the per-element compare.
          const bool check =
              sm80::block_needs_bounds_check(p, keys, wg_row0, live_rows, j0, Tr::kBlockN);
          // A whole block needs no mask read unless bounds or causality cut it: an additive
          // mask's scores only take the scale (deferred units), a bool one's stay raw dot
          // products.
          const bool is_bool = p.mask_kind == MaskKind::boolean;
          if (check || !kb.whole || (is_bool && !Tr::kSkipsWholeBoolBlocks))
            with_tile_flags(is_bool, check, [&](auto bool_mask, auto checked) {
              mask_query_rows_from_tile<bool_mask.value, true, checked.value>(
                  sc, masks, mt, tile_row0, warp_row0, j0, lane);
            });
          else if (!is_bool)
            sm80::scale_scores(sc, p.scale);
        } else {
          sm80::mask_scores<sm80::Rows::queries, kFeatures>(sc, masks, warp_row0, j0, true, lane);
        }
        release(sm.mask_empty(s), lane);
      } else {
        const bool check = sm80::block_needs_check(p, keys, wg_row0, live_rows, j0, Tr::kBlockN);
        sm80::mask_scores<sm80::Rows::queries, kFeatures, Tr::kRowKeyEnds>(sc, masks, warp_row0, j0,
                                                                           check, lane);
      }
      sm80::softmax_update<Tr::kLazyRescale, !Tr::kSumsOnTensorCores>(sc, row_max, row_sum, rescale,
                                                                      unit);
    };
    // Dropout on the probabilities, then P as the A operand of the next P V.
    const auto to_operand = [&](KeyBlock kb) {
      if constexpr (kFeatures)
        if (p.dropout)
          sm80::apply_dropout<sm80::Rows::queries>(sc, p, tile.bh, warp_row0,
                                                   kb.index * Tr::kBlockN, lane);
      sm80::c_to_a<T>(pf, sc);
    };

    const int qs = ring_stage<Tr::kQStages>(q_round);  // the tile's Q buffer
    // The warpgroup's own blocks, the tile's first `own`: on wide tiles those with keys its rows
    // see. A causal tile's key blocks end at its last row's keys, which its first warpgroups'
    // rows do not see (up to two blocks of -inf), and a tile's first warpgroups may have no row
    // at or after row 0 (Tile::at, kEndAligned). The other blocks' turns and buffer releases
    // follow in the drain.
    const int own = !Tr::kWide ? n
                    : wg_row0 + 64 <= 0
                        ? 0
                        : min(n, key_blocks_before_row<Tr::kBlockN>(p, tile.keys, wg_row0 + 64));
    if (n > 0) {
      mbar_wait(sm.q_full(qs), ring_parity<Tr::kQStages>(q_round));
      turn.start_tile();
    }
    if (own > 0) {  // block 0: S(0) alone
      mbar_wait(sm.k_full(stage_of<Tr>(it)), parity_of<Tr>(it));
      const KeyBlock kb = key_block(0, it);
      turn.wait();
      wgmma_fence();
      gemm.scores(sc, qs, stage_of<Tr>(it));
      turn.pass(/*last=*/own == 1 && own == n, final_tile);
      wgmma_wait<0>();
      fence_operands(sc[0]);
      release(sm.k_empty(stage_of<Tr>(it)), lane);
      if (own == 1 && !kQHalf) release(sm.q_empty(qs), lane);
      float rescale[1][2];  // acc_o is still 0: nothing to rescale
      softmax(kb, it, rescale);
      to_operand(kb);
      // Block nb issues S(nb) = Q K(nb)^T and O += P(nb - 1) V(nb - 1) back to back, then runs
      // block nb's softmax while the second product is still on the tensor cores (FA3's
      // intra-warpgroup overlap); the warpgroups take turns issuing (PingPong), so one's
      // softmax also overlaps the others' products. No branch around the wgmmas in the loop:
      // ptxas serializes wgmmas on divergent paths.
      for (int nb = 1; nb < own; ++nb) {
        const int cur = it + nb;
        mbar_wait(sm.k_full(stage_of<Tr>(cur)), parity_of<Tr>(cur));
        const KeyBlock kb = key_block(nb, cur);
        mbar_wait(sm.v_full(stage_of<Tr>(cur - 1)), parity_of<Tr>(cur - 1));
        turn.wait();
        wgmma_fence();
        gemm.scores(sc, qs, stage_of<Tr>(cur));
        gemm.values(acc_o, pf, stage_of<Tr>(cur - 1));
        turn.pass(/*last=*/nb + 1 == n, final_tile);
        wgmma_wait<1>();
        fence_operands(sc[0]);
        release(sm.k_empty(stage_of<Tr>(cur)), lane);
        // The tile's last read of Q is done (q_half: the output's stores still use the buffer).
        if (nb + 1 == own && !kQHalf) release(sm.q_empty(qs), lane);
        float rescale[1][2];
        softmax(kb, cur, rescale);
        wgmma_wait<0>();
        fence_operands(acc_o[0]);
        release(sm.v_empty(stage_of<Tr>(cur - 1)), lane);
        if (!Tr::kLazyRescale || sm80::warp_needs_rescale(rescale))
          sm80::rescale_rows(acc_o, rescale);
        to_operand(kb);
      }
      {  // the last block's P V
        const int last = it + own - 1;
        mbar_wait(sm.v_full(stage_of<Tr>(last)), parity_of<Tr>(last));
        wgmma_fence();
        gemm.values(acc_o, pf, stage_of<Tr>(last));
        wgmma_wait<0>();
        fence_operands(acc_o[0]);
        release(sm.v_empty(stage_of<Tr>(last)), lane);
      }
    }
    // The drain of blocks own..n - 1: each block's turn and releases once its copy landed (a
    // release before that could complete the stage's "empty" phase of the block two uses
    // later). No product, so no wgmma behind a branch; after the loop's, so the accumulators
    // stay where they are (walked first, in reverse key order, this drain cost 80-110 bytes of
    // spills).
    if (n > 0) {
      // A warpgroup without blocks of its own never reads Q (own < n: wide tiles, not kQHalf).
      if (own == 0) release(sm.q_empty(qs), lane);
#pragma unroll 1
      for (int nb = own; nb < n; ++nb) {
        const int cur = it + nb;
        mbar_wait(sm.k_full(stage_of<Tr>(cur)), parity_of<Tr>(cur));
        turn.wait();
        turn.pass(/*last=*/nb + 1 == n, final_tile);
        release(sm.k_empty(stage_of<Tr>(cur)), lane);
        mbar_wait(sm.v_full(stage_of<Tr>(cur)), parity_of<Tr>(cur));
        release(sm.v_empty(stage_of<Tr>(cur)), lane);
      }
      it += n;
      ++q_round;
    }
    if (listed && !final_tile) next_count = listed_count(tile_at(snake_tile(round + 1)));
    store_output(tile, warp_row0, qs, acc_o, row_max, row_sum, unit);
  }
  turn.finish(turns_balanced);
  if (out_issuer) bulk_wait_read<0>();  // the staging tiles stay until the stores read them
}

// Multiprocessors of the current device (the persistent grid has Tr::kCtasPerSm CTAs on each).
inline int multiprocessors() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const DeviceCaps caps = device_caps(device);
  check_cuda(caps.error, "cudaDeviceGetAttribute(multiprocessor count)");
  return caps.multiprocessors;
}

template <class T, int kHeadDim, bool kFeatures, TileShape kShape = TileShape::standard>
void launch_forward(const DeviceParams& p, cudaStream_t stream) {
  using Tr = ForwardTraits<kHeadDim, kFeatures, kShape>;
  const int num_m_blocks = (p.Lq + Tr::kBlockM - 1) / Tr::kBlockM;
  const std::int64_t num_tiles = static_cast<std::int64_t>(num_m_blocks) * p.B * p.Hq;
  if (num_tiles == 0) return;
  // Tile::at's and paired_tile's 32-bit arithmetic (TileIndex; paired_tile's positions reach
  // 2 gridDim.x past num_tiles); 2^31 tiles of 64 query rows would not fit a GPU's memory.
  if (num_tiles > 0x7fffffffLL)
    throw Error(ErrorKind::not_implemented,
                "memattn sm90 forward: B * Hq * ceil(Lq / " + std::to_string(Tr::kBlockM) +
                    ") = " + std::to_string(num_tiles) + " query tiles, more than 2^31");
  // The tile order (tile_order.h): causal calls on wide tiles, and lean causal calls on the
  // 64- and 128-row tiles with fewer than 64 bh, take their tiles in pairs of equal cost
  // (paired_tile's units of two tiles: M / 2 per bh). The snake alone left the busiest CTA at
  // 1.5-1.8x the mean work with 8 or 16 bh (simulated; D = 128 at L = 16384 and D = 256 at 8192
  // and 16384 ran 1.36-1.47x the time of pairs); with 64 bh and more it mostly balanced as well
  // (NOTES.md, p1). Non-causal calls on wide tiles whose first tiles are partial (the bh's
  // first, where kBlockM does not divide Lq) take those last.
  const std::int64_t num_bh = num_tiles / num_m_blocks;
  constexpr bool kMayPair = Tr::kWide || (!kFeatures && Tr::kShape == TileShape::standard);
  const bool paired = kMayPair && p.causal && (Tr::kWide || num_bh < 64);
  const std::int64_t num_pairs = paired ? num_bh * (num_m_blocks / 2) : 0;
  const bool light_last =
      Tr::kEndAligned && !p.causal && num_m_blocks >= 2 && p.Lq % Tr::kBlockM != 0;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  // The general kernel runs the key blocks the mask leaves visible (MaskBlockList); the lists
  // are written on the stream before it.
  const MaskBlockList blocks = Tr::kListedBlocks
                                   ? launch_mask_blocks(p, Tr::kBlockM, Tr::kBlockN, kBf16, stream)
                                   : MaskBlockList{};
  const ForwardMaps maps{make_tile_map(p.q, kBf16, p.B, p.Hq, p.Lq, p.D, p.q_st, Tr::kBlockM),
                         make_tile_map(p.k, kBf16, p.B, p.Hk, p.Lk, p.D, p.k_st, Tr::kBlockN),
                         make_tile_map(p.v, kBf16, p.B, p.Hk, p.Lk, p.Dv, p.v_st, Tr::kBlockN),
                         Tr::kMaskTiles ? make_mask_map(p, Tr::kBlockM) : MaskTileMap{},
                         Tr::kOut != OutStaging::registers
                             ? make_tile_map(p.out, kBf16, p.B, p.Hq, p.Lq, p.Dv, p.out_st, 64)
                             : CUtensorMap{},
                         blocks};
  const std::int64_t grid = std::min<std::int64_t>(
      num_tiles, static_cast<std::int64_t>(multiprocessors()) * Tr::kCtasPerSm);
  const auto launch = [&](auto ordered) {
    launch_with_smem(&forward_kernel<T, Tr, kFeatures, decltype(ordered)::value>,
                     "memattn sm90 forward kernel", grid, Tr::kThreads, Tr::kSmemBytes, stream, p,
                     maps, num_m_blocks, num_tiles, num_pairs, light_last);
  };
  if constexpr (Tr::kWide)
    launch(std::true_type{});
  else if constexpr (kMayPair)
    paired ? launch(std::true_type{}) : launch(std::false_type{});
  else
    launch(std::false_type{});
}

}  // namespace memattn::cuda::sm90

namespace memattn::cuda {
template <class T, int kHeadDim>
void sm90_forward(const DeviceParams& p, cudaStream_t stream) {
  if (has_features(p)) {
    sm90::launch_forward<T, kHeadDim, true>(p, stream);
    return;
  }
  // D = 128 has the standard tiles only; every path launches a kernel.
  const TileShape shape =
      sm90_tile_shape(kHeadDim, static_cast<std::int64_t>(p.B) * p.Hq, p.Lq, p.Lk, p.causal);
  if constexpr (kHeadDim == 64) {
    switch (shape) {
      case TileShape::wide:
        sm90::launch_forward<T, 64, false, TileShape::wide>(p, stream);
        break;
      case TileShape::short_keys:
        sm90::launch_forward<T, 64, false, TileShape::short_keys>(p, stream);
        break;
      case TileShape::narrow:
        sm90::launch_forward<T, 64, false, TileShape::narrow>(p, stream);
        break;
      case TileShape::standard:
        sm90::launch_forward<T, 64, false>(p, stream);
        break;
    }
  } else if constexpr (kHeadDim == 256) {
    if (shape == TileShape::narrow)
      sm90::launch_forward<T, 256, false, TileShape::narrow>(p, stream);
    else
      sm90::launch_forward<T, 256, false>(p, stream);
  } else {
    sm90::launch_forward<T, kHeadDim, false>(p, stream);
  }
}
}  // namespace memattn::cuda
