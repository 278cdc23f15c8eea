// Hopper (sm_90a) backward, every product on wgmma from TMA-loaded shared memory with a
// producer warpgroup feeding two consumer warpgroups through mbarrier rings. Two schemes:
// - single pass (lean calls given DeviceParams::dq_accum): the dK/dV kernel below also computes
//   dQ = dS K per step and adds it to fp32 scratch by bulk reductions of the copy engine (its
//   atomics); a small kernel then scales it into grad_q. Five products per (query, key) block
//   instead of seven, but dQ's sum order varies run to run (last bits).
// - two passes (the atomic-free scheme of sm80/backward.cuh: the same results run to run, no
//   fp32 dQ scratch; masks, dropout and the mask gradient):
//   dK/dV kernel: one CTA per 128 keys of one (b, k/v head); consumer warpgroup g owns keys
//     [64 g, 64 g + 64). K and V are loaded once; (Q, dO) blocks of kBlockQ queries stream in
//     for every query head of the GQA group and every query block that sees the keys; the
//     consumer warpgroups stage the blocks' lse2/delta rows in shared memory (a copy each, or
//     one shared copy in the lean single pass). Per block:
//     S^T = K Q^T and dP^T = V dO^T (wgmma SS), P^T and dS^T in registers, then
//     dV += (P o Z)^T dO and dK += dS^T Q (wgmma RS: P and dS straight from registers); in the
//     single pass, dS^T also goes to shared memory and each warpgroup computes a 64 x 64 part of
//     the block's dQ = dS K (wgmma SS, both operands transposed), stages it in shared memory
//     and a dQ writer warp of the producer warpgroup adds it to dq_accum with one bulk
//     reduction. (Per-thread vector atomics instead made the kernel 1.3x slower: the L2's
//     atomic units were the bottleneck.)
//   dQ kernel: one CTA per 128 queries of one (b, h), or of every (b, h) that a broadcast mask's
//     gradient sums (the CTA walks them, as in sm80); Q and dO are loaded once per (b, h), K/V
//     blocks stream in. S = Q K^T and dP = dO V^T (SS), dS, dQ += dS K (RS); also writes the
//     mask gradient.
// Head-dim buckets 64 and 128 for both schemes. At 256 columns the dK and dV accumulators of 64
// keys would not fit a warpgroup's registers: there lean calls take the single pass of
// backward_split_d_kernel (both consumer warpgroups on one CTA's 64 keys, the head dim split
// between them; below), and the others the sm80 backward (sm90_backward<T, 256>).
#pragma once

#include <cuda.h>

#include <cstdint>
#include <type_traits>
#include <utility>

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

namespace memattn::cuda::sm90 {

// Shapes shared by both passes: a producer warpgroup and two consumer warpgroups of 64 rows.
struct BackwardShape {
  static constexpr int kConsumers = 2;
  static constexpr int kRows = 64 * kConsumers;  // keys (dK/dV) or queries (dQ) per CTA
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  // setmaxnreg only moves registers within the CTA's launch allocation, 168 per thread for
  // 384 threads (ptxas's share): 128 * 24 + 256 * 240 <= 168 * 384. (A 32 / 240 split asked
  // for more than that: the consumers' setmaxnreg.inc waited forever.)
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static constexpr int kConsumerWarps = 4 * kConsumers;  // arrivals on an "empty" barrier
  // Named barriers of the single pass's staged dQ parts (hand_dq_parts): consumer warpgroup
  // g's part is full (kDqFull + g) or free (kDqEmpty + g), between its 128 threads and the dQ
  // writer warp; after the stats' 1 + g and the pair's 3.
  static constexpr int kDqFull = 4, kDqEmpty = kDqFull + kConsumers, kDqSync = 128 + 32;
};

// The producer's load of one ring stage in both kernels: waits until the consumers freed the
// stage, announces its bytes, and copies the step's attn_mask tile (`mask`, where with_mask:
// query rows from q0 of head h, kMaskKeys keys from k0) and two tiles of kRows rows (Q and dO,
// or K and V) from row `row` of (head, b). (The mask tile as a pointer that may be null put it
// in local memory: 16 bytes of stack, LDL / STL in the producer's loop.)
template <int kChunks, int kRows, int kMaskKeys>
__device__ __forceinline__ void load_stage(const DeviceParams& p, std::uint32_t empty,
                                           std::uint32_t full, std::uint32_t parity,
                                           const MaskTile& mask, bool with_mask,
                                           const CUtensorMap& mask_map, int q0, int k0, int h,
                                           std::uint32_t dst0, const CUtensorMap& map0,
                                           std::uint32_t dst1, const CUtensorMap& map1, int row,
                                           int head, int b) {
  constexpr std::uint32_t kTileBytes = kRows * kChunks * kChunkCols * 2;
  mbar_wait(empty, parity);
  mbar_arrive_expect_tx(full, 2 * kTileBytes + (with_mask ? mask.bytes<kMaskKeys>() : 0));
  if (with_mask) mask.load<kMaskKeys>(mask_map, full, q0, k0, mask_h(p, h), mask_b(p, b));
  load_tile<kChunks, kRows>(dst0, map0, full, row, head, b);
  load_tile<kChunks, kRows>(dst1, map1, full, row, head, b);
}

// ------------------------------------------------------------------------------------------
// dK, dV

// dq_accum (single pass) holds dQ / scale as 64 x 64 fp32 tiles, tile ((b Hq + h) ceil(Lq / 64)
// + i / 64) (D_bucket / 64) + d / 64, each in the order of a warpgroup's wgmma accumulators:
// float4 n 128 + t holds accumulators [n][0..3] of warpgroup thread t. So a warpgroup stages its
// part with conflict-free 16-byte stores, one bulk reduction adds the whole staged tile, and
// dq_from_accum_kernel reads tiles the same way.
inline constexpr int kDqTileElems = 64 * 64;

// Tiles of 64 query rows per (b, h) in dq_accum.
__host__ __device__ __forceinline__ int dq_row_tiles(int Lq) { return (Lq + 63) / 64; }

template <int kHeadDim>
__device__ __forceinline__ float* dq_accum_tile(const DeviceParams& p, std::uint64_t bh, int i0,
                                                int col0) {
  const std::uint64_t q_tiles = dq_row_tiles(p.Lq);
  return p.dq_accum +
         ((bh * q_tiles + i0 / 64) * (kHeadDim / kChunkCols) + col0 / kChunkCols) * kDqTileElems;
}

// One round of a dQ writer warp of the single pass (a warp of the producer warpgroup, FA3's):
// for consumer warpgroups g = kFirst, ..., kFirst + kParts - 1 in turn it waits until g's part
// is staged (BackwardShape::kDqFull + g) and hands it to the copy engine, one bulk reduction (a
// bulk group of its own) of kBytes from staged(g) into dst(g) (nullptr: rows past Lq, nothing
// to add); then it frees each staging buffer once its reduction has read it (kDqEmpty + g), in
// issue order: the i-th part's read is done when at most kParts - 1 - i bulk groups still read.
// Not after the writer's last round (`last`): every consumer wait meets one arrival, the first
// from the writer's start.
template <int kFirst, int kParts, std::uint32_t kBytes, class Dst, class Staged>
__device__ __forceinline__ void hand_dq_parts(const Dst& dst, const Staged& staged, bool last,
                                              int lane) {
  using S = BackwardShape;
#pragma unroll
  for (int g = kFirst; g < kFirst + kParts; ++g) {
    named_barrier_sync(S::kDqFull + g, S::kDqSync);
    if (lane == 0) {
      if (float* const d = dst(g)) bulk_reduce_add_f32(d, staged(g), kBytes);
      bulk_commit();
    }
  }
  const auto free_part = [&]<int i>() {
    if (lane == 0) bulk_wait_read<kParts - 1 - i>();
    __syncwarp();
    if (!last) named_barrier_arrive(S::kDqEmpty + kFirst + i, S::kDqSync);
  };
  [&]<int... i>(std::integer_sequence<int, i...>) {
    (free_part.template operator()<i>(), ...);
  }(std::make_integer_sequence<int, kParts>{});
}

// What the dK/dV kernel does with S^T besides bounds, causality and key padding: nothing (lean
// calls), attn_mask from mask tiles only (masked calls without dropout whose mask TMA can copy),
// or anything (the general kernel: masks read either way, dropout).
enum class DkvMasking : std::uint8_t { lean, tiles, general };

// Queries per pipeline step: as many as S^T, dP^T, both accumulators and both operand copies
// leave registers for next to the mask/dropout code (the general kernel spilled 656 bytes at
// D = 64 with 128 queries, 208 bytes at D = 128 with 64; the mask tile reads fit at full size).
template <int kHeadDim, DkvMasking kMasking, bool kFusedDq>
struct DkvTraits : BackwardShape {
  static_assert(kMasking != DkvMasking::general || !kFusedDq,
                "the single pass serves lean calls and mask tiles only");
  static constexpr int kBlockQ =
      (kHeadDim <= 64 ? 128 : 64) / (kMasking == DkvMasking::general ? 2 : 1);
  static constexpr int kChunks = kHeadDim / kChunkCols;
  static constexpr std::uint32_t kKVBytes = kRows * kHeadDim * 2;
  static constexpr std::uint32_t kQBytes = kBlockQ * kHeadDim * 2;
  // Single pass: a step's dQ (kBlockQ x kHeadDim) is split into 64 x 64 parts, one per
  // consumer warpgroup: part g covers query chunk g % kQParts and column chunk g / kQParts.
  static constexpr int kQParts = kBlockQ / kChunkCols;
  static_assert(!kFusedDq || kQParts * kChunks == kConsumers, "one dQ part per warpgroup");
  // dS^T of a step (kRows keys x kBlockQ queries), double-buffered (single pass only).
  static constexpr std::uint32_t kDsBytes = kFusedDq ? kRows * kBlockQ * 2 : 0;
  // Each consumer warpgroup's staged dQ part, fp32 (single pass only).
  static constexpr std::uint32_t kDqBytes = kFusedDq ? kDqTileElems * 4 : 0;
  // A step's attn_mask tile, kBlockQ queries x the CTA's keys, of any mask the tiles take. Next
  // to the single pass's dS^T and dQ buffers at D = 128, 16-bit tiles fit with 984 bytes to
  // spare since the layout needs no alignment slack (aligned_dynamic_smem).
  static constexpr std::uint32_t kMaskBytes =
      kMasking == DkvMasking::lean ? 0 : MaskTile::capacity<kBlockQ, kRows>();
  // Mask tiles: one per stage, counted on the step's barriers; in the single pass at D = 64,
  // where two do not fit (16-bit tiles of 128 queries take 32 KB), one with barriers of its own
  // (kOwnMaskBarriers): the consumers free it once S^T is masked, early in the step, and the
  // producer loads the next step's tile while the rest of the step runs.
  static constexpr bool kOwnMaskBarriers =
      kFusedDq && kMasking != DkvMasking::lean && kHeadDim <= 64;
  static constexpr int kMaskStages = kOwnMaskBarriers ? 1 : kStages;
  // The row stats (backward_dkdv_kernel): one copy for both warpgroups where the single pass
  // runs without masks; else a copy per warpgroup, in one buffer instead of one per stage where
  // the single pass's mask tile at D = 64 leaves no room for two (one copy for both warpgroups
  // spilled 12 bytes there).
  static constexpr bool kSharedStats = kFusedDq && kMasking == DkvMasking::lean;
  // The steps an attn_mask leaves, listed (MaskStepList): in the single pass with mask tiles.
  static constexpr bool kListedSteps = kFusedDq && kMasking == DkvMasking::tiles;
  static_assert(kRows == kMaskStepKeys, "MaskStepList's key blocks are the CTA's keys");
  static constexpr int kStatsBuffers = kOwnMaskBarriers ? 1 : kStages;
  // Layout: K | V | Q[kStages] | dO[kStages] | dS^T[2] | dQ[kConsumers] | mask[kMaskStages] |
  // stats[kConsumers or 1][kStatsBuffers][lse2, delta][kBlockQ] | mbarriers.
  static constexpr std::uint32_t kDsOffset = 2 * kKVBytes + 2 * kStages * kQBytes;
  static constexpr std::uint32_t kDqOffset = kDsOffset + 2 * kDsBytes;
  static constexpr std::uint32_t kMaskOffset = kDqOffset + kConsumers * kDqBytes;
  static constexpr std::uint32_t kStatsOffset = kMaskOffset + kMaskStages * kMaskBytes;
  static constexpr std::uint32_t kBarrierOffset =
      kStatsOffset + (kSharedStats ? 1 : kConsumers) * kStatsBuffers * 2 * kBlockQ * 4;
  // K/V full, step full, step empty (, mask full, mask empty)
  static constexpr int kBarriers = 1 + 2 * kStages + (kOwnMaskBarriers ? 2 : 0);
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kBarriers;
  static_assert(fits_on_sm(kSmemBytes, 1));
};

template <class Tr>
struct DkvSmem {
  unsigned char* raw;  // 1024-byte aligned
  __device__ __forceinline__ std::uint32_t base() const { return smem_u32(raw); }
  __device__ __forceinline__ std::uint32_t k() const { return base(); }
  __device__ __forceinline__ std::uint32_t v() const { return base() + Tr::kKVBytes; }
  __device__ __forceinline__ std::uint32_t q(int s) const {
    return base() + 2 * Tr::kKVBytes + s * Tr::kQBytes;
  }
  __device__ __forceinline__ std::uint32_t grad_out(int s) const {
    return base() + 2 * Tr::kKVBytes + (Tr::kStages + s) * Tr::kQBytes;
  }
  __device__ __forceinline__ std::uint32_t ds_t(int buffer) const {
    return base() + Tr::kDsOffset + buffer * Tr::kDsBytes;
  }
  __device__ __forceinline__ std::uint32_t dq(int wg) const {
    return base() + Tr::kDqOffset + wg * Tr::kDqBytes;
  }
  __device__ __forceinline__ std::uint32_t mask(int s) const {
    return base() + Tr::kMaskOffset + (Tr::kMaskStages == 1 ? 0 : s) * Tr::kMaskBytes;
  }
  // Consumer warpgroup wg's copy of the row stats of the step in stage s.
  __device__ __forceinline__ float* lse2(int wg, int s) const {
    return reinterpret_cast<float*>(raw + Tr::kStatsOffset) +
           (wg * Tr::kStatsBuffers + (Tr::kStatsBuffers == 1 ? 0 : s)) * 2 * Tr::kBlockQ;
  }
  __device__ __forceinline__ float* delta(int wg, int s) const { return lse2(wg, s) + Tr::kBlockQ; }
  __device__ __forceinline__ std::uint32_t bar(int i) const {
    return base() + Tr::kBarrierOffset + 8 * i;
  }
  __device__ __forceinline__ std::uint32_t kv_full() const { return bar(0); }
  __device__ __forceinline__ std::uint32_t step_full(int s) const { return bar(1 + s); }
  __device__ __forceinline__ std::uint32_t step_empty(int s) const {
    return bar(1 + Tr::kStages + s);
  }
  __device__ __forceinline__ std::uint32_t mask_full() const { return bar(1 + 2 * Tr::kStages); }
  __device__ __forceinline__ std::uint32_t mask_empty() const { return bar(2 + 2 * Tr::kStages); }
};

// A warp's 16 rows of dK or dV accumulators (acc, scaled by mul) written as 16-bit values into
// rows [row0, row0 + 16) of a swizzled tile of kTileRows rows (the K or V tile, which the TMA
// stores of the epilogue then read).
template <class T, int kTileRows, int kD>
__device__ __forceinline__ void stage_key_rows(std::uint32_t tile, int row0, float (&acc)[1][kD][4],
                                               float mul, int lane) {
#pragma unroll
  for (int d = 0; d < kD; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][d][e] *= mul;
  std::uint32_t rows[1][kD / 2][4];
  sm80::c_to_a<T>(rows, acc);
  store_a_fragments<kTileRows, 8 * kD>(tile, row0, rows, lane);
}

// The key block and (b, k/v head) index of a dK/dV CTA, in the order of key_block_of
// (tile_order.h: causal calls take their heaviest blocks first within groups of CTAs).
// bhk counts the (b, k/v head) pairs in batch_head_at's order: p.batch_inner's in kernels that
// take masks (kMasked), b outer in the others (their code stays as it was).
struct KeyBlock : KeyBlockIndex {
  __device__ __forceinline__ KeyBlock(const DeviceParams& p, unsigned block, int num_n_blocks)
      : KeyBlockIndex(key_block_of(block, num_n_blocks, p.B * p.Hk, p.causal)) {}
  template <bool kMasked>
  __device__ __forceinline__ BatchHead batch_head(const DeviceParams& p) const {
    return batch_head_at(bhk, p.B, p.Hk, kMasked && p.batch_inner);
  }
};

// A dK/dV CTA's keys and steps: key block `block` of (b, k/v head hk), its kRows keys from j0;
// the steps are the group's query heads h_begin .. h_end, and for each the query blocks of
// kBlockQ rows from i_begin, the first that can see a key of the block (i >= j0 -
// causal_offset). Every role walks them in the same order, counting steps (ring stage and
// phase). A block whose keys are all padding has no steps (dK = dV = 0). Given a list of the
// steps an attn_mask leaves (MaskStepList, `listed`), the CTA walks only those: `list` then
// points at its entries, and `steps` counts them.
template <int kRows, int kBlockQ>
struct KeySteps {
  int b, hk, j0, h_begin, h_end;
  KeyRange keys;
  int i_begin;
  const std::int32_t* list = nullptr;
  int steps;
  // at: block.batch_head<kMasked>(p).
  __device__ __forceinline__ KeySteps(const DeviceParams& p, const KeyBlock& block, BatchHead at,
                                      const MaskStepList& listed_steps = {}, bool listed = false)
      : b(at.b),
        hk(at.h),
        j0(block.n_block * kRows),
        h_begin(hk * p.group),
        h_end(h_begin + p.group),
        keys(key_range(p, b)),
        i_begin(j0 < keys.end ? causal_query_begin(p, j0) / kBlockQ * kBlockQ : p.Lq),
        steps(p.group * ((p.Lq - i_begin + kBlockQ - 1) / kBlockQ)) {
    if (listed) {
      const std::int32_t* length = listed_steps.at(b, hk, block.n_block);
      list = length + 1;
      steps = i_begin < p.Lq ? __ldg(length) : 0;
    }
  }
  struct Step {
    int h, i0;
  };
  // The step of list entry e.
  __device__ __forceinline__ Step listed_step(int e) const {
    return {h_begin + (e >> MaskStepList::kHeadShift),
            (e & ((1 << MaskStepList::kHeadShift) - 1)) * kBlockQ};
  }
  __device__ __forceinline__ int entry(int index) const { return __ldg(list + index); }
  // The first step (where steps > 0) and, without a list, the step after s.
  __device__ __forceinline__ Step first() const {
    return list != nullptr ? listed_step(entry(0)) : Step{h_begin, i_begin};
  }
  __device__ __forceinline__ Step after(const DeviceParams& p, Step s) const {
    return s.i0 + kBlockQ < p.Lq ? Step{s.h, s.i0 + kBlockQ} : Step{s.h + 1, i_begin};
  }
  // Runs step(h, i0, last) for the steps in that order (last: the CTA's last step). Not
  // unrolled: unrolled, the producer thread's and the dQ writers' loops spilled at their 24
  // registers. (The consumers spell the loop out: as the body of a lambda their step compiled
  // differently and spilled 28 bytes in the D = 64 single pass.) A list's entries are read a
  // step ahead.
  template <class StepFn>
  __device__ __forceinline__ void for_each(const DeviceParams& p, StepFn&& step) const {
    if (list != nullptr) {
      int e = steps > 0 ? entry(0) : 0;
#pragma unroll 1
      for (int index = 0; index < steps; ++index) {
        const Step s = listed_step(e);
        if (index + 1 < steps) e = entry(index + 1);
        step(s.h, s.i0, index + 1 == steps);
      }
      return;
    }
#pragma unroll 1
    for (int h = h_begin; h < h_end; ++h)
#pragma unroll 1
      for (int i0 = i_begin; i0 < p.Lq; i0 += kBlockQ)
        step(h, i0, i0 + kBlockQ >= p.Lq && h + 1 == h_end);
  }
};

// P^T = exp2(S^T unit - lse2) on a warp's key rows of masked scores st (score_unit units),
// lse2 holding the row stats of the tile's query columns.
template <int kQ>
__device__ __forceinline__ void key_row_probabilities(float (&st)[1][kQ][4], const float* lse2,
                                                      float unit, int lane) {
#pragma unroll
  for (int n = 0; n < kQ; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      st[0][n][e] = fast_exp2(st[0][n][e] * unit - lse2[sm80::c_col(n, e, lane)]);
}

template <class T, int kHeadDim, DkvMasking kMasking, bool kFusedDq>
__global__ void __launch_bounds__(BackwardShape::kThreads, 1)
    backward_dkdv_kernel(const __grid_constant__ DeviceParams p,
                         const __grid_constant__ BackwardMaps maps, int num_n_blocks) {
  using Tr = DkvTraits<kHeadDim, kMasking, kFusedDq>;
  constexpr bool kFeatures = kMasking == DkvMasking::general;
  constexpr int kQ = Tr::kBlockQ / 8, kD = kHeadDim / 8;
  const DkvSmem<Tr> sm{aligned_dynamic_smem()};

  constexpr bool kMasked = kMasking != DkvMasking::lean;
  const KeyBlock block(p, blockIdx.x, num_n_blocks);
  // The single pass with mask tiles walks only the steps its mask leaves (MaskStepList) where
  // the mask hides any: not without dq_accum (direct_dq_backward), whose steps write each
  // query row's dQ once, skipped rows included.
  const bool listed = Tr::kListedSteps && maps.steps.words != nullptr && p.dq_accum != nullptr &&
                      __ldg(maps.steps.skips) != 0;
  using Steps = KeySteps<Tr::kRows, Tr::kBlockQ>;
  const Steps cta(p, block, block.batch_head<kMasked>(p), maps.steps, listed);
  // attn_mask tiles (a mask TMA can copy; always in the tiles kernel) come with each step's Q
  // and dO.
  const bool mask_tiles = kMasked && maps.mask.rows > 0;
  const auto mask_tile = [&](int s) {
    return MaskTile{sm.mask(s), maps.mask.rows, p.mask_kind == MaskKind::boolean ? 1 : 2};
  };

  if (threadIdx.x == 0) {
    trap_unless_smem_aligned();
    mbar_init(sm.kv_full(), 1);
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(sm.step_full(s), 1);
      mbar_init(sm.step_empty(s), Tr::kConsumerWarps);
    }
    if constexpr (Tr::kOwnMaskBarriers) {
      mbar_init(sm.mask_full(), 1);
      mbar_init(sm.mask_empty(), Tr::kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int warp_group = threadIdx.x / 128, lane = threadIdx.x % 32;
  // Single pass with dq_accum: warp 1 of the producer warpgroup hands each consumer
  // warpgroup's staged dQ part of every step to the copy engine (one bulk reduction) and frees
  // the staging buffer once the copy has read it, so the consumers neither wait for the copy
  // nor issue it (FA3's dQ writer). Named barriers DqFull / DqEmpty + g (consumer warpgroup g's
  // 128 threads and this warp) hand the buffer back and forth; every wait meets one arrival.
  const auto write_dq_parts = [&] {
    if constexpr (kFusedDq) {  // (the two passes' kernels have no dQ parts: kQParts = 0 there)
      for (int g = 0; g < Tr::kConsumers; ++g) named_barrier_arrive(Tr::kDqEmpty + g, Tr::kDqSync);
      cta.for_each(p, [&](int h, int i0, bool last) {
        const std::uint64_t bh = static_cast<std::uint64_t>(cta.b) * p.Hq + h;
        const auto dst = [&](int g) -> float* {
          const int row0 = i0 + kChunkCols * (g % Tr::kQParts);
          // dq_accum has ceil(Lq / 64) tiles of rows
          return row0 < p.Lq ? dq_accum_tile<kHeadDim>(p, bh, row0, kChunkCols * (g / Tr::kQParts))
                             : nullptr;
        };
        hand_dq_parts<0, Tr::kConsumers, Tr::kDqBytes>(
            dst, [&](int g) { return sm.dq(g); }, last, lane);
      });
      if (lane == 0) bulk_wait<0>();  // the last reduction, before the CTA's memory goes
    }
  };

  if (warp_group == 0) {  // producer: one thread issues every copy; warp 1: the dQ writer
    warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(maps.q);
      prefetch_tensor_map(maps.grad_out);
      if (mask_tiles) prefetch_tensor_map(maps.mask.map);
      mbar_arrive_expect_tx(sm.kv_full(), 2 * Tr::kKVBytes);
      load_tile<Tr::kChunks, Tr::kRows>(sm.k(), maps.k, sm.kv_full(), cta.j0, cta.hk, cta.b);
      load_tile<Tr::kChunks, Tr::kRows>(sm.v(), maps.v, sm.kv_full(), cta.j0, cta.hk, cta.b);
      int it = 0;
      cta.for_each(p, [&](int h, int i0, bool) {
        const int s = stage_of<Tr>(it);
        load_stage<Tr::kChunks, Tr::kBlockQ, Tr::kRows>(
            p, sm.step_empty(s), sm.step_full(s), parity_of<Tr>(it) ^ 1, mask_tile(s),
            mask_tiles && !Tr::kOwnMaskBarriers, maps.mask.map, i0, cta.j0, h, sm.q(s), maps.q,
            sm.grad_out(s), maps.grad_out, i0, h, cta.b);
        if constexpr (Tr::kOwnMaskBarriers) {  // (the tiles kernel: mask_tiles holds)
          const MaskTile tile = mask_tile(s);
          mbar_wait(sm.mask_empty(), (it & 1) ^ 1);
          mbar_arrive_expect_tx(sm.mask_full(), tile.bytes<Tr::kRows>());
          tile.load<Tr::kRows>(maps.mask.map, sm.mask_full(), i0, cta.j0, mask_h(p, h),
                               mask_b(p, cta.b));
        }
        ++it;
      });
    } else if (kFusedDq && threadIdx.x / 32 == 1 && p.dq_accum != nullptr) {
      write_dq_parts();
    }
    return;
  }

  // Consumers: warpgroup wg owns keys [j0 + 64 wg, +64), warp w of it +16 w.
  warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int wg = warp_group - 1, warp = (threadIdx.x / 32) % 4;
  const int key_row0 = cta.j0 + 64 * wg + 16 * warp;
  const float unit = sm80::score_unit<kMasking != DkvMasking::lean>(p);
  float acc_dk[1][kD][4], acc_dv[1][kD][4];
  sm80::zero(acc_dk);
  sm80::zero(acc_dv);
  // Row stats (lse2, delta) of a step's queries, loaded a step ahead into registers (the load's
  // latency hides behind a step). Two passes: thread t of each warpgroup loads row t, stores it
  // into the warpgroup's buffer of the step's stage at the step's start, and a warpgroup barrier
  // publishes it; with two buffers the same barrier also orders the reads of two steps back
  // before the overwrite. Single pass without masks (kSharedStats): one copy for both
  // warpgroups, each loading half of the rows, stored during the step before (ahead of the
  // pair's barrier 3, which publishes it; the buffer's readers of two steps back have passed
  // that barrier of the step before), so no warpgroup barrier per step. (Next to mask tiles
  // at D = 128 that spilled 12 bytes.)
  constexpr bool kSharedStats = Tr::kSharedStats;
  const int wg_thread = threadIdx.x % 128;
  constexpr int kStatsRows = kSharedStats ? Tr::kBlockQ / 2 : Tr::kBlockQ;  // per warpgroup
  const bool stats_row = wg_thread < kStatsRows;
  const int stats_row0 = kSharedStats ? kStatsRows * wg : 0;  // the step's first row loaded here
  const int stats_wg = kSharedStats ? 0 : wg;                 // whose buffers hold them
  // The step ahead (whose row stats are loaded) and, with a list, the entry of the one after.
  typename Steps::Step next = cta.steps > 0 ? cta.first() : typename Steps::Step{};
  sm80::RowStats next_stats{};
  if (stats_row && cta.steps > 0)
    next_stats = sm80::row_stats(p, cta.b, next.h, next.i0 + stats_row0 + wg_thread);
  const auto store_stats = [&](int s) {
    if (stats_row) {
      sm.lse2(stats_wg, s)[stats_row0 + wg_thread] = next_stats.lse2;
      sm.delta(stats_wg, s)[stats_row0 + wg_thread] = next_stats.delta;
    }
  };
  if constexpr (kSharedStats) {
    store_stats(0);
    named_barrier_sync(3, 256);
  }
  mbar_wait(sm.kv_full(), 0);
  // The steps of KeySteps::for_each, spelled out here (why: there).
#pragma unroll 1
  for (int it = 0; it < cta.steps; ++it) {
    const int s = stage_of<Tr>(it);
    const int h = next.h, i0 = next.i0;
    const std::uint64_t bh = static_cast<std::uint64_t>(cta.b) * p.Hq + h;
    if constexpr (!kSharedStats) {
      // One buffer: the warpgroup's reads of the step before come first.
      if constexpr (Tr::kStatsBuffers == 1) named_barrier_sync(1 + wg, 128);
      store_stats(s);
      named_barrier_sync(1 + wg, 128);
    }
    // The next step, and its row stats loaded. A listed step's entry is loaded here and used
    // once this step's first products are issued, which hide the load's latency.
    const bool more = it + 1 < cta.steps;
    const int next_entry = cta.list != nullptr && more ? cta.entry(it + 1) : 0;
    const auto advance = [&](typename Steps::Step step) {
      next = step;
      if (stats_row)
        next_stats = sm80::row_stats(p, cta.b, next.h, next.i0 + stats_row0 + wg_thread);
    };
    if (cta.list == nullptr && more) advance(cta.after(p, next));
    mbar_wait(sm.step_full(s), parity_of<Tr>(it));

    // S^T and dP^T in two groups. Single pass: P^T's exponentials run while dP^T is on the
    // tensor cores (not in the two passes' kernel: at D = 64 next to mask tiles the split
    // spilled 72 bytes; nor in the single pass with D = 64 mask tiles: 4 bytes).
    constexpr bool kOverlapP = kFusedDq && !(kMasked && kHeadDim <= 64);
    float st[1][kQ][4], dpt[1][kQ][4];  // S^T, dP^T for this warp's 16 keys x kBlockQ queries
    wgmma_fence();
    gemm_ss<T, Tr::kBlockQ, kHeadDim, Tr::kRows>(st[0], sm.k(), 64 * wg, sm.q(s), false);
    wgmma_commit();
    gemm_ss<T, Tr::kBlockQ, kHeadDim, Tr::kRows>(dpt[0], sm.v(), 64 * wg, sm.grad_out(s), false);
    wgmma_commit();
    if (cta.list != nullptr && more) advance(cta.listed_step(next_entry));
    constexpr int kPendingDp = kOverlapP ? 1 : 0;
    wgmma_wait<kPendingDp>();
    fence_operands(st[0]);
    if constexpr (!kOverlapP) fence_operands(dpt[0]);

    const ElementMasks<T> masks{p, cta.b, h, cta.keys};
    const auto mask_from_tile = [&] {
      // Blocks that bounds and causality leave whole skip the per-element compares.
      const bool check =
          sm80::block_needs_bounds_check(p, cta.keys, i0, Tr::kBlockQ, cta.j0, Tr::kRows);
      const MaskTile mt = mask_tile(s);
      const int tile_key0 = key_row0 - cta.j0;
      // Spelled out rather than through with_tile_flags (mask_tile.cuh, as the forward does):
      // with the helper here and in the dQ kernel ptxas allocated registers differently and
      // the D = 64 dQ kernel spilled 8 bytes; spelled out, the machine code is what was
      // measured on the GPU.
      if (p.mask_kind == MaskKind::boolean && check)
        mask_key_rows_from_tile<true, true>(st, masks, mt, tile_key0, key_row0, i0, lane);
      else if (p.mask_kind == MaskKind::boolean)
        mask_key_rows_from_tile<true, false>(st, masks, mt, tile_key0, key_row0, i0, lane);
      else if (check)
        mask_key_rows_from_tile<false, true>(st, masks, mt, tile_key0, key_row0, i0, lane);
      else
        mask_key_rows_from_tile<false, false>(st, masks, mt, tile_key0, key_row0, i0, lane);
    };
    if constexpr (kMasking == DkvMasking::tiles) {
      if constexpr (Tr::kOwnMaskBarriers) mbar_wait(sm.mask_full(), it & 1);
      mask_from_tile();
      if constexpr (Tr::kOwnMaskBarriers) release(sm.mask_empty(), lane);
    } else if (mask_tiles) {
      mask_from_tile();
    } else {
      const bool check = sm80::block_needs_check(p, cta.keys, i0, Tr::kBlockQ, cta.j0, Tr::kRows);
      sm80::mask_scores<sm80::Rows::keys, kFeatures>(st, masks, key_row0, i0, check, lane);
    }
    // P^T, then dS^T = P^T o (dP^T o Z - delta) and, for dV, P^T o Z (Z: dropout factors).
    const float* lse2 = sm.lse2(stats_wg, s);
    const float* delta = sm.delta(stats_wg, s);
    if constexpr (kOverlapP) {
      key_row_probabilities(st, lse2, unit, lane);
      wgmma_wait<0>();
      fence_operands(dpt[0]);
    }
#pragma unroll
    for (int n = 0; n < kQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = sm80::c_col(n, e, lane);
        const float prob = kOverlapP ? st[0][n][e] : fast_exp2(st[0][n][e] * unit - lse2[col]);
        float keep = 1.f;
        if constexpr (kFeatures)
          if (p.dropout)
            keep = dropout_keeps(p, bh, i0 + col, key_row0 + sm80::c_row(0, e, lane))
                       ? p.dropout_keep_scale
                       : 0.f;
        dpt[0][n][e] = prob * (dpt[0][n][e] * keep - delta[col]);
        st[0][n][e] = prob * keep;
      }
    std::uint32_t pf[1][kQ / 2][4], dsf[1][kQ / 2][4];
    sm80::c_to_a<T>(dsf, dpt);
    sm80::c_to_a<T>(pf, st);
    if constexpr (kFusedDq) {
      store_a_fragments<Tr::kRows, Tr::kBlockQ>(sm.ds_t(it % 2), 64 * wg + 16 * warp, dsf, lane);
      fence_async_shared();  // the stores, before the barrier, for the other's dQ wgmma
    }

    wgmma_fence();
    gemm_rs<T, kHeadDim, Tr::kBlockQ>(acc_dv[0], pf, sm.grad_out(s));
    wgmma_commit();
    if constexpr (kFusedDq) {
      // dQ = dS K sums over all 128 keys, half of them from the other warpgroup's dS^T: wait
      // for both halves (the same barrier tells a warpgroup that the other one finished its
      // dQ product of two steps back, which read the buffer about to be overwritten, and
      // publishes the next step's row stats). dK's product goes last, so the dQ part is
      // written out while it runs (FA3's order).
      if constexpr (kSharedStats) store_stats(stage_of<Tr>(it + 1));
      named_barrier_sync(3, 256);
      const int q_part = wg % Tr::kQParts, col_part = wg / Tr::kQParts;
      float acc_dq[1][kChunkCols / 8][4];
      wgmma_fence();
      gemm_ss_mn<T, Tr::kRows>(acc_dq[0], sm.ds_t(it % 2) + q_part * Tr::kRows * kRowBytes,
                               sm.k() + col_part * Tr::kRows * kRowBytes);
      wgmma_commit();
      gemm_rs<T, kHeadDim, Tr::kBlockQ>(acc_dk[0], dsf, sm.q(s));
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(acc_dq[0]);
      fence_operands(acc_dv[0]);
      const int dq_row0 = i0 + kChunkCols * q_part;
      if (p.dq_accum == nullptr) {
        // One key block (direct_dq_backward): this part is the whole dQ of its rows; written
        // once, no scratch, no atomics.
        sm80::store_rows<T>(static_cast<T*>(p.grad_q) + cta.b * p.grad_q_st.b + h * p.grad_q_st.h,
                            p.grad_q_st.l, dq_row0 + 16 * warp, p.Lq, kChunkCols * col_part, p.D,
                            acc_dq, p.scale, lane);
      } else {
        // Stage the part (the layout of dq_accum_tile: conflict-free 16-byte stores) once the
        // writer warp has handed the previous one to the copy engine.
        named_barrier_sync(Tr::kDqEmpty + wg, Tr::kDqSync);
#pragma unroll
        for (int n = 0; n < kChunkCols / 8; ++n)
          st_shared_v4(sm.dq(wg) + 16 * (128 * n + wg_thread), acc_dq[0][n]);
        fence_async_shared();
        named_barrier_arrive(Tr::kDqFull + wg, Tr::kDqSync);
      }
    } else {
      gemm_rs<T, kHeadDim, Tr::kBlockQ>(acc_dk[0], dsf, sm.q(s));
      wgmma_commit();
    }
    wgmma_wait<0>();
    fence_operands(acc_dv[0]);
    fence_operands(acc_dk[0]);
    release(sm.step_empty(s), lane);
  }

  // dK and dV go out through shared memory, as the forward's output does (NOTES.md, "Output by
  // TMA stores"): each warpgroup writes its 64 keys' rows as 16-bit values into the K and V
  // tiles, which no product reads once its own last step is done (and, in the single pass,
  // the other warpgroup's: its dQ product reads all of K), and one of its threads stores them
  // with TMA. Rows past Lk and columns past D / Dv are not written (the tensor maps' bounds).
  if constexpr (kFusedDq) named_barrier_sync(3, 256);
  stage_key_rows<T, Tr::kRows>(sm.k(), 64 * wg + 16 * warp, acc_dk, p.scale, lane);
  stage_key_rows<T, Tr::kRows>(sm.v(), 64 * wg + 16 * warp, acc_dv, 1.f, lane);
  fence_async_shared();
  named_barrier_sync(1 + wg, 128);
  if (wg_thread == 0) {
    // The CTA's (b, k/v head) and key rows read again from the block index: held across the
    // loop, one of them spilled in the D = 64 single pass.
    const KeyBlock out(p, ctaid_x(), num_n_blocks);
    const int out_row0 = out.n_block * Tr::kRows + 64 * wg;
    const auto [out_b, out_hk] = out.batch_head<kMasked>(p);
    store_tile_rows<Tr::kChunks, Tr::kRows>(maps.grad_k, sm.k(), 64 * wg, p.D, out_row0, out_hk,
                                            out_b);
    store_tile_rows<Tr::kChunks, Tr::kRows>(maps.grad_v, sm.v(), 64 * wg, p.Dv, out_row0, out_hk,
                                            out_b);
    bulk_commit();
    // The tiles stay until the stores have read them; the writes complete before the grid
    // does, so the CTA need not wait for them (its successor on the multiprocessor starts
    // sooner).
    bulk_wait_read<0>();
  }
}

// grad_q = scale * dq_accum (layout: dq_accum_tile), after the single pass: one warpgroup per
// 64-row tile and all its 64-column parts (loaded first, then stored), warp w writing rows
// [16 w, 16 w + 16) as a consumer warp would. One CTA per part, which wrote each 256-byte row of
// D = 128 in halves from two multiprocessors, took 99 us at 8x16x2048x128 against 73 us for the
// same bytes at D = 64 (H100).
template <class T, int kHeadDim>
__global__ void __launch_bounds__(128)
    dq_from_accum_kernel(const __grid_constant__ DeviceParams p) {
  constexpr int kColParts = kHeadDim / kChunkCols;
  const int q_tiles = dq_row_tiles(p.Lq);
  const std::int64_t bh = blockIdx.x / q_tiles;
  const int b = static_cast<int>(bh / p.Hq), h = static_cast<int>(bh % p.Hq);
  const int i0 = static_cast<int>(blockIdx.x % q_tiles) * 64;
  float acc[kColParts][1][kChunkCols / 8][4];
#pragma unroll
  for (int part = 0; part < kColParts; ++part) {
    const float4* tile =
        reinterpret_cast<const float4*>(dq_accum_tile<kHeadDim>(p, bh, i0, kChunkCols * part));
#pragma unroll
    for (int n = 0; n < kChunkCols / 8; ++n) {
      const float4 v = tile[128 * n + threadIdx.x];
      acc[part][0][n][0] = v.x;
      acc[part][0][n][1] = v.y;
      acc[part][0][n][2] = v.z;
      acc[part][0][n][3] = v.w;
    }
  }
#pragma unroll
  for (int part = 0; part < kColParts; ++part)
    sm80::store_rows<T>(static_cast<T*>(p.grad_q) + b * p.grad_q_st.b + h * p.grad_q_st.h,
                        p.grad_q_st.l, i0 + 16 * static_cast<int>(threadIdx.x / 32), p.Lq,
                        kChunkCols * part, p.D, acc[part], p.scale, threadIdx.x % 32);
}

// ------------------------------------------------------------------------------------------
// dQ (+ mask gradient)

template <int kHeadDim, bool kFeatures>
struct DqTraits : BackwardShape {
  // Keys per step: at D = 128 the S, dP and dQ tiles of 128 keys would not fit in registers.
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : 64;
  static constexpr int kChunks = kHeadDim / kChunkCols;
  static constexpr std::uint32_t kQBytes = kRows * kHeadDim * 2;
  static constexpr std::uint32_t kKVBytes = kBlockN * kHeadDim * 2;
  // A step's attn_mask tile, the CTA's queries x kBlockN keys (general kernels only).
  static constexpr std::uint32_t kMaskBytes = kFeatures ? MaskTile::capacity<kRows, kBlockN>() : 0;
  // Layout: Q | dO | K[kStages] | V[kStages] | mask[kStages] | mbarriers.
  static constexpr std::uint32_t kMaskOffset = 2 * kQBytes + 2 * kStages * kKVBytes;
  static constexpr std::uint32_t kBarrierOffset = kMaskOffset + kStages * kMaskBytes;
  static constexpr int kBarriers = 2 + 2 * kStages;  // Q/dO full, empty; K/V full, empty
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kBarriers;
  static_assert(fits_on_sm(kSmemBytes, 1));
};

template <class Tr>
struct DqSmem {
  std::uint32_t base;  // 1024-byte aligned
  __device__ __forceinline__ std::uint32_t q() const { return base; }
  __device__ __forceinline__ std::uint32_t grad_out() const { return base + Tr::kQBytes; }
  __device__ __forceinline__ std::uint32_t k(int s) const {
    return base + 2 * Tr::kQBytes + s * Tr::kKVBytes;
  }
  __device__ __forceinline__ std::uint32_t v(int s) const {
    return base + 2 * Tr::kQBytes + (Tr::kStages + s) * Tr::kKVBytes;
  }
  __device__ __forceinline__ std::uint32_t mask(int s) const {
    return base + Tr::kMaskOffset + s * Tr::kMaskBytes;
  }
  __device__ __forceinline__ std::uint32_t bar(int i) const {
    return base + Tr::kBarrierOffset + 8 * i;
  }
  __device__ __forceinline__ std::uint32_t q_full() const { return bar(0); }
  __device__ __forceinline__ std::uint32_t q_empty() const { return bar(1); }
  __device__ __forceinline__ std::uint32_t kv_full(int s) const { return bar(2 + s); }
  __device__ __forceinline__ std::uint32_t kv_empty(int s) const {
    return bar(2 + Tr::kStages + s);
  }
};

// The (b, h) pairs of a dQ CTA: one, or every pair whose mask gradient lands on the same
// broadcast element (params.h: grad_mask_b_outer / grad_mask_h_outer). `outer` counts the
// (b_outer, h_outer) pairs in batch_head_at's order (batch_inner: p.batch_inner in kernels that
// take masks, else false).
struct DqRows {
  int b_outer, h_outer, b_count, h_count;
  __device__ __forceinline__ DqRows(const DeviceParams& p, std::int64_t outer, bool batch_inner)
      : DqRows(p, batch_head_at(outer, p.grad_mask_b_outer, p.grad_mask_h_outer, batch_inner)) {}
  __device__ __forceinline__ DqRows(const DeviceParams& p, BatchHead at)
      : b_outer(at.b),
        h_outer(at.h),
        b_count(p.B / p.grad_mask_b_outer),
        h_count(p.Hq / p.grad_mask_h_outer) {}
  __device__ __forceinline__ int pairs() const { return b_count * h_count; }
  __device__ __forceinline__ int b(const DeviceParams& p, int pair) const {
    return p.grad_mask_b_outer == 1 ? pair / h_count : b_outer;
  }
  __device__ __forceinline__ int h(const DeviceParams& p, int pair) const {
    return p.grad_mask_h_outer == 1 ? pair % h_count : h_outer;
  }
};

template <class T, int kHeadDim, bool kFeatures>
__global__ void __launch_bounds__(BackwardShape::kThreads, 1)
    backward_dq_kernel(const __grid_constant__ DeviceParams p,
                       const __grid_constant__ BackwardMaps maps, int num_m_blocks) {
  using Tr = DqTraits<kHeadDim, kFeatures>;
  constexpr int kN = Tr::kBlockN / 8, kD = kHeadDim / 8;
  const DqSmem<Tr> sm{smem_u32(aligned_dynamic_smem())};
  // attn_mask tiles (general kernel, a mask TMA can copy) come with each step's K and V.
  const bool mask_tiles = kFeatures && maps.mask.rows > 0;
  const auto mask_tile = [&](int s) {
    return MaskTile{sm.mask(s), maps.mask.rows, p.mask_kind == MaskKind::boolean ? 1 : 2};
  };

  // Heavy (late, for causal) query blocks first.
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const DqRows rows(p, blockIdx.x / num_m_blocks, kFeatures && p.batch_inner);
  const int i0 = m_block * Tr::kRows;

  if (threadIdx.x == 0) {
    trap_unless_smem_aligned();
    mbar_init(sm.q_full(), 1);
    mbar_init(sm.q_empty(), Tr::kConsumerWarps);
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(sm.kv_full(s), 1);
      mbar_init(sm.kv_empty(s), Tr::kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int warp_group = threadIdx.x / 128, lane = threadIdx.x % 32;
  if (warp_group == 0) {  // producer: one thread issues every copy
    warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x != 0) return;
    prefetch_tensor_map(maps.k);
    prefetch_tensor_map(maps.v);
    if (mask_tiles) prefetch_tensor_map(maps.mask.map);
    int it = 0;  // K/V blocks loaded so far; the ring continues across (b, h) pairs
    for (int pair = 0; pair < rows.pairs(); ++pair) {
      const int b = rows.b(p, pair), h = rows.h(p, pair), hk = h / p.group;
      const int n = visible_key_blocks<Tr::kBlockN>(p, key_range(p, b), i0 + Tr::kRows - 1);
      mbar_wait(sm.q_empty(), (pair & 1) ^ 1);
      mbar_arrive_expect_tx(sm.q_full(), 2 * Tr::kQBytes);
      load_tile<Tr::kChunks, Tr::kRows>(sm.q(), maps.q, sm.q_full(), i0, h, b);
      load_tile<Tr::kChunks, Tr::kRows>(sm.grad_out(), maps.grad_out, sm.q_full(), i0, h, b);
      for (int nb = 0; nb < n; ++nb, ++it) {
        const int s = stage_of<Tr>(it), j0 = nb * Tr::kBlockN;
        load_stage<Tr::kChunks, Tr::kBlockN, Tr::kBlockN>(
            p, sm.kv_empty(s), sm.kv_full(s), parity_of<Tr>(it) ^ 1, mask_tile(s), mask_tiles,
            maps.mask.map, i0, j0, h, sm.k(s), maps.k, sm.v(s), maps.v, j0, hk, b);
      }
    }
    return;
  }

  // Consumers: warpgroup wg owns queries [i0 + 64 wg, +64), warp w of it +16 w.
  warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int wg = warp_group - 1, warp = (threadIdx.x / 32) % 4;
  const int warp_row0 = i0 + 64 * wg + 16 * warp;
  const float unit = sm80::score_unit<kFeatures>(p);
  int it = 0;
  for (int pair = 0; pair < rows.pairs(); ++pair) {
    const int b = rows.b(p, pair), h = rows.h(p, pair);
    const std::uint64_t bh = static_cast<std::uint64_t>(b) * p.Hq + h;
    float lse2[2], delta[2];
    sm80::thread_row_stats(p, b, h, warp_row0, lse2, delta, lane);
    const ElementMasks<T> masks{p, b, h};
    // Mask tiles serve batch elements whose key padding has no holes (mask_tile.cuh).
    const bool tiles = mask_tiles && !has_padding_holes(masks.keys);
    const int n = visible_key_blocks<Tr::kBlockN>(p, masks.keys, i0 + Tr::kRows - 1);
    float acc_dq[1][kD][4];
    sm80::zero(acc_dq);
    mbar_wait(sm.q_full(), pair & 1);
    for (int nb = 0; nb < n; ++nb, ++it) {
      const int s = stage_of<Tr>(it), j0 = nb * Tr::kBlockN;
      mbar_wait(sm.kv_full(s), parity_of<Tr>(it));
      float sc[1][kN][4], dp[1][kN][4];
      wgmma_fence();
      gemm_ss<T, Tr::kBlockN, kHeadDim, Tr::kRows>(sc[0], sm.q(), 64 * wg, sm.k(s), false);
      gemm_ss<T, Tr::kBlockN, kHeadDim, Tr::kRows>(dp[0], sm.grad_out(), 64 * wg, sm.v(s), false);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(sc[0]);
      fence_operands(dp[0]);

      if (tiles) {
        const int tile_row0 = 64 * wg + 16 * warp;
        const MaskTile mt = mask_tile(s);
        const bool check =
            sm80::block_needs_bounds_check(p, masks.keys, i0, Tr::kRows, j0, Tr::kBlockN);
        // Spelled out, as in the dK/dV kernel (there: why).
        if (p.mask_kind == MaskKind::boolean && check)
          mask_query_rows_from_tile<true, false, true>(sc, masks, mt, tile_row0, warp_row0, j0,
                                                       lane);
        else if (p.mask_kind == MaskKind::boolean)
          mask_query_rows_from_tile<true, false, false>(sc, masks, mt, tile_row0, warp_row0, j0,
                                                        lane);
        else if (check)
          mask_query_rows_from_tile<false, false, true>(sc, masks, mt, tile_row0, warp_row0, j0,
                                                        lane);
        else
          mask_query_rows_from_tile<false, false, false>(sc, masks, mt, tile_row0, warp_row0, j0,
                                                         lane);
      } else {
        const bool check = sm80::block_needs_check(p, masks.keys, i0, Tr::kRows, j0, Tr::kBlockN);
        sm80::mask_scores<sm80::Rows::queries, kFeatures>(sc, masks, warp_row0, j0, check, lane);
      }
      if constexpr (kFeatures)
        if (p.dropout) sm80::apply_dropout<sm80::Rows::queries>(dp, p, bh, warp_row0, j0, lane);
      sm80::score_grad_of_query_rows(sc, dp, lse2, delta, unit);  // sc now holds dS
      if constexpr (kFeatures)
        if (p.grad_mask != nullptr) sm80::add_mask_grad(p, b, h, warp_row0, j0, sc, lane);
      std::uint32_t dsf[1][kN / 2][4];
      sm80::c_to_a<T>(dsf, sc);

      wgmma_fence();
      gemm_rs<T, kHeadDim, Tr::kBlockN>(acc_dq[0], dsf, sm.k(s));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_dq[0]);
      release(sm.kv_empty(s), lane);
    }
    release(sm.q_empty(), lane);
    sm80::store_rows<T>(static_cast<T*>(p.grad_q) + b * p.grad_q_st.b + h * p.grad_q_st.h,
                        p.grad_q_st.l, warp_row0, p.Lq, 0, p.D, acc_dq, p.scale, lane);
  }
}

// ------------------------------------------------------------------------------------------
// dK, dV and dQ with the head dim split over the consumer warpgroups (D = 256, lean single pass)
//
// At D = 256 the dK and dV accumulators of 64 keys would take 256 registers a thread, so the two
// consumer warpgroups share the CTA's 64 keys and split each step's work instead (the scheme of
// FA3's hdim-256 backward). Per step of 64 queries, warpgroup g computes S^T and dP^T of the
// step's queries [32 g, 32 g + 32) (m64n32 from shared memory), P^T and dS^T of them, and
// writes those to shared memory; after a barrier of both it computes columns [128 g, 128 g +
// 128) of dV += P^T dO, dK += dS^T Q (m64n128) and of the step's dQ = dS K (two m64n64 parts,
// both operands from shared memory). Each dQ part is staged in shared memory and added to
// dq_accum by a bulk reduction that its warpgroup's dQ writer warp issues (hand_dq_parts), as in
// backward_dkdv_kernel: per-thread vector reductions (red.global.add.v4.f32) from registers
// instead made the kernel 1.09-1.13x slower (NOTES.md, d1 / d2). Room for the two 16 KB staging
// buffers comes from dO, which has one stage (FA3's choice at this head dim): it is freed once
// dV's product has read it, early in the step, so its next load still overlaps the step's dQ
// and dK.
struct SplitDTraits : BackwardShape {
  static constexpr int kHeadDim = 256;
  static constexpr int kRows = 64;    // keys per CTA (hides BackwardShape's 128)
  static constexpr int kBlockQ = 64;  // queries per step
  static constexpr int kGradOutStages = 1;
  static constexpr int kChunks = kHeadDim / kChunkCols;
  static constexpr int kQueries = kBlockQ / kConsumers;  // S^T / dP^T queries per warpgroup
  static constexpr int kCols = kHeadDim / kConsumers;    // dK / dV / dQ columns per warpgroup
  static constexpr int kDqParts = kCols / kChunkCols;    // staged dQ parts per warpgroup, step
  // Byte offset of warpgroup g's first column chunk in a tile of 64 rows (K, V, Q, dO).
  static constexpr std::uint32_t kColsBytes = kDqParts * 64 * kRowBytes;
  static_assert(kRows == 64 && kBlockQ == 64, "kColsBytes: tiles of 64 rows");
  static constexpr std::uint32_t kKVBytes = kRows * kHeadDim * 2;
  static constexpr std::uint32_t kQBytes = kBlockQ * kHeadDim * 2;
  static constexpr std::uint32_t kScoreBytes = kRows * kBlockQ * 2;  // P^T or dS^T, 16-bit
  static constexpr std::uint32_t kDqBytes = kDqTileElems * 4;        // one staged dQ part
  // Layout: K | V | Q[kStages] | dO | P^T[2] | dS^T[2] | dQ[kConsumers] |
  // stats[kStages][lse2, delta][kBlockQ] | mbarriers.
  static constexpr std::uint32_t kGradOutOffset = 2 * kKVBytes + kStages * kQBytes;
  static constexpr std::uint32_t kScoreOffset = kGradOutOffset + kGradOutStages * kQBytes;
  static constexpr std::uint32_t kDqOffset = kScoreOffset + 4 * kScoreBytes;
  static constexpr std::uint32_t kStatsOffset = kDqOffset + kConsumers * kDqBytes;
  static constexpr std::uint32_t kBarrierOffset = kStatsOffset + kStages * 2 * kBlockQ * 4;
  static constexpr int kBarriers = 1 + 2 * kStages + 2;  // K/V full, Q full / empty, dO
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kBarriers;
  static_assert(fits_on_sm(kSmemBytes, 1));
};

struct SplitDSmem {
  using Tr = SplitDTraits;
  unsigned char* raw;  // 1024-byte aligned
  __device__ __forceinline__ std::uint32_t base() const { return smem_u32(raw); }
  __device__ __forceinline__ std::uint32_t k() const { return base(); }
  __device__ __forceinline__ std::uint32_t v() const { return base() + Tr::kKVBytes; }
  __device__ __forceinline__ std::uint32_t q(int s) const {
    return base() + 2 * Tr::kKVBytes + s * Tr::kQBytes;
  }
  __device__ __forceinline__ std::uint32_t grad_out() const { return base() + Tr::kGradOutOffset; }
  __device__ __forceinline__ std::uint32_t p_t(int buffer) const {
    return base() + Tr::kScoreOffset + buffer * Tr::kScoreBytes;
  }
  __device__ __forceinline__ std::uint32_t ds_t(int buffer) const {
    return base() + Tr::kScoreOffset + (2 + buffer) * Tr::kScoreBytes;
  }
  __device__ __forceinline__ std::uint32_t dq(int wg) const {
    return base() + Tr::kDqOffset + wg * Tr::kDqBytes;
  }
  __device__ __forceinline__ float* lse2(int s) const {
    return reinterpret_cast<float*>(raw + Tr::kStatsOffset) + s * 2 * Tr::kBlockQ;
  }
  __device__ __forceinline__ float* delta(int s) const { return lse2(s) + Tr::kBlockQ; }
  __device__ __forceinline__ std::uint32_t bar(int i) const {
    return base() + Tr::kBarrierOffset + 8 * i;
  }
  __device__ __forceinline__ std::uint32_t kv_full() const { return bar(0); }
  __device__ __forceinline__ std::uint32_t q_full(int s) const { return bar(1 + s); }
  __device__ __forceinline__ std::uint32_t q_empty(int s) const { return bar(1 + Tr::kStages + s); }
  __device__ __forceinline__ std::uint32_t grad_out_full() const {
    return bar(1 + 2 * Tr::kStages);
  }
  __device__ __forceinline__ std::uint32_t grad_out_empty() const {
    return bar(2 + 2 * Tr::kStages);
  }
};

template <class T>
__global__ void __launch_bounds__(BackwardShape::kThreads, 1)
    backward_split_d_kernel(const __grid_constant__ DeviceParams p,
                            const __grid_constant__ BackwardMaps maps, int num_n_blocks) {
  using Tr = SplitDTraits;
  constexpr int kQ = Tr::kQueries / 8, kC = kChunkCols / 8;
  const SplitDSmem sm{aligned_dynamic_smem()};

  const KeyBlock block(p, blockIdx.x, num_n_blocks);
  const KeySteps<Tr::kRows, Tr::kBlockQ> cta(p, block, block.batch_head<false>(p));

  if (threadIdx.x == 0) {
    trap_unless_smem_aligned();
    mbar_init(sm.kv_full(), 1);
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(sm.q_full(s), 1);
      mbar_init(sm.q_empty(s), Tr::kConsumerWarps);
    }
    mbar_init(sm.grad_out_full(), 1);
    mbar_init(sm.grad_out_empty(), Tr::kConsumerWarps);
    mbar_init_fence();
  }
  __syncthreads();

  const int warp_group = threadIdx.x / 128, lane = threadIdx.x % 32;
  if (warp_group == 0) {  // producer: one thread issues every copy; warps 1, 2: the dQ writers
    warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(maps.q);
      prefetch_tensor_map(maps.grad_out);
      mbar_arrive_expect_tx(sm.kv_full(), 2 * Tr::kKVBytes);
      load_tile<Tr::kChunks, Tr::kRows>(sm.k(), maps.k, sm.kv_full(), cta.j0, cta.hk, cta.b);
      load_tile<Tr::kChunks, Tr::kRows>(sm.v(), maps.v, sm.kv_full(), cta.j0, cta.hk, cta.b);
      // Q of a step once its stage is free (the end of the step two back), then dO once the
      // step before has read it (its dV product).
      int it = 0;
      cta.for_each(p, [&](int h, int i0, bool) {
        const int s = stage_of<Tr>(it);
        mbar_wait(sm.q_empty(s), parity_of<Tr>(it) ^ 1);
        mbar_arrive_expect_tx(sm.q_full(s), Tr::kQBytes);
        load_tile<Tr::kChunks, Tr::kBlockQ>(sm.q(s), maps.q, sm.q_full(s), i0, h, cta.b);
        mbar_wait(sm.grad_out_empty(), ring_parity<Tr::kGradOutStages>(it) ^ 1);
        mbar_arrive_expect_tx(sm.grad_out_full(), Tr::kQBytes);
        load_tile<Tr::kChunks, Tr::kBlockQ>(sm.grad_out(), maps.grad_out, sm.grad_out_full(), i0, h,
                                            cta.b);
        ++it;
      });
    } else if (const int writer = threadIdx.x / 32 - 1; writer >= 0 && writer < Tr::kConsumers) {
      // Warp 1 + g writes consumer warpgroup g's dQ parts, kDqParts rounds per step (round c:
      // column chunk c of g's columns): one writer per warpgroup, so neither waits for the
      // other's part before its buffer is freed (each stages kDqParts parts a step into one
      // buffer).
      const auto write = [&]<int g>() {
        named_barrier_arrive(Tr::kDqEmpty + g, Tr::kDqSync);
        cta.for_each(p, [&](int h, int i0, bool last_step) {
          const std::uint64_t bh = static_cast<std::uint64_t>(cta.b) * p.Hq + h;
#pragma unroll
          for (int c = 0; c < Tr::kDqParts; ++c)
            hand_dq_parts<g, 1, Tr::kDqBytes>(
                [&](int) {
                  return dq_accum_tile<Tr::kHeadDim>(p, bh, i0, Tr::kCols * g + kChunkCols * c);
                },
                [&](int) { return sm.dq(g); }, last_step && c + 1 == Tr::kDqParts, lane);
        });
        // The last reductions must have read their part before the CTA's memory goes (their
        // writes complete before the grid does).
        if (lane == 0) bulk_wait_read<0>();
      };
      static_assert(Tr::kConsumers == 2);
      if (writer == 0)
        write.template operator()<0>();
      else
        write.template operator()<1>();
    }
    return;
  }

  // Consumers: both warpgroups hold the CTA's 64 keys (warp w: keys j0 + 16 w, +16); warpgroup
  // wg computes the step's queries [query0, query0 + 32) of S^T / dP^T and columns [128 wg,
  // +128) of dK, dV and dQ.
  warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int wg = warp_group - 1, warp = (threadIdx.x / 32) % 4, wg_thread = threadIdx.x % 128;
  const int key_row0 = cta.j0 + 16 * warp, query0 = Tr::kQueries * wg;
  const std::uint32_t cols = Tr::kColsBytes * wg;
  const float unit = sm80::score_unit<false>(p);
  float acc_dk[1][2 * kC][4], acc_dv[1][2 * kC][4];
  sm80::zero(acc_dk);
  sm80::zero(acc_dv);
  // Row stats (lse2, delta) of the next step's queries: thread t < 32 of warpgroup wg loads
  // row query0 + t a step ahead and stores it during the step before into the stage's buffer,
  // ahead of the pair's barrier, which publishes it (as kSharedStats in backward_dkdv_kernel:
  // the buffer's readers of two steps back have passed that barrier of the step before).
  const bool stats_row = wg_thread < Tr::kQueries;
  sm80::RowStats next_stats{};
  if (stats_row && cta.i_begin < p.Lq)
    next_stats = sm80::row_stats(p, cta.b, cta.h_begin, cta.i_begin + query0 + wg_thread);
  const auto store_stats = [&](int s) {
    if (stats_row) {
      sm.lse2(s)[query0 + wg_thread] = next_stats.lse2;
      sm.delta(s)[query0 + wg_thread] = next_stats.delta;
    }
  };
  store_stats(0);
  named_barrier_sync(3, 256);
  mbar_wait(sm.kv_full(), 0);
  int it = 0;
  for (int h = cta.h_begin; h < cta.h_end; ++h)
    for (int i0 = cta.i_begin; i0 < p.Lq; i0 += Tr::kBlockQ, ++it) {
      const int s = stage_of<Tr>(it), buffer = it % 2;
      const bool last_block = i0 + Tr::kBlockQ >= p.Lq;
      if (stats_row && !(last_block && h + 1 == cta.h_end))
        next_stats =
            sm80::row_stats(p, cta.b, last_block ? h + 1 : h,
                            (last_block ? cta.i_begin : i0 + Tr::kBlockQ) + query0 + wg_thread);

      // S^T and dP^T of this warpgroup's queries in two groups; P^T's exponentials run while
      // dP^T is on the tensor cores.
      float st[1][kQ][4], dpt[1][kQ][4];
      mbar_wait(sm.q_full(s), parity_of<Tr>(it));
      mbar_wait(sm.grad_out_full(), ring_parity<Tr::kGradOutStages>(it));
      wgmma_fence();
      gemm_ss<T, Tr::kQueries, Tr::kHeadDim, Tr::kRows, Tr::kBlockQ>(
          st[0], sm.k(), 0, sm.q(s) + query0 * kRowBytes, false);
      wgmma_commit();
      gemm_ss<T, Tr::kQueries, Tr::kHeadDim, Tr::kRows, Tr::kBlockQ>(
          dpt[0], sm.v(), 0, sm.grad_out() + query0 * kRowBytes, false);
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(st[0]);
      const ElementMasks<T> masks{p, cta.b, h, cta.keys};
      const bool check =
          sm80::block_needs_check(p, cta.keys, i0 + query0, Tr::kQueries, cta.j0, Tr::kRows);
      sm80::mask_scores<sm80::Rows::keys, false>(st, masks, key_row0, i0 + query0, check, lane);
      const float* lse2 = sm.lse2(s) + query0;
      const float* delta = sm.delta(s) + query0;
      key_row_probabilities(st, lse2, unit, lane);
      wgmma_wait<0>();
      fence_operands(dpt[0]);
#pragma unroll
      for (int n = 0; n < kQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          dpt[0][n][e] = st[0][n][e] * (dpt[0][n][e] - delta[sm80::c_col(n, e, lane)]);
      std::uint32_t pf[1][kQ / 2][4], dsf[1][kQ / 2][4];
      sm80::c_to_a<T>(pf, st);
      sm80::c_to_a<T>(dsf, dpt);
      store_a_fragments<Tr::kRows, Tr::kQueries>(sm.p_t(buffer), 16 * warp, pf, lane, query0);
      store_a_fragments<Tr::kRows, Tr::kQueries>(sm.ds_t(buffer), 16 * warp, dsf, lane, query0);
      fence_async_shared();  // the stores, before the barrier, for both warpgroups' wgmmas
      // Both halves of P^T and dS^T are written once both warpgroups pass (which also tells
      // each that the other finished the products of two steps back, which read the buffers
      // about to be overwritten, and publishes the next step's row stats).
      store_stats(stage_of<Tr>(it + 1));
      named_barrier_sync(3, 256);

      // dV, the two dQ parts, dK, each its own group: dO is freed once dV has read it, and each
      // dQ part is staged while the later products run.
      float acc_dq[Tr::kDqParts][1][kC][4];
      wgmma_fence();
      gemm_ss_bt<T, Tr::kCols, Tr::kBlockQ>(acc_dv[0], sm.p_t(buffer), sm.grad_out() + cols);
      wgmma_commit();
#pragma unroll
      for (int c = 0; c < Tr::kDqParts; ++c) {
        gemm_ss_mn<T, Tr::kRows>(acc_dq[c][0], sm.ds_t(buffer),
                                 sm.k() + cols + c * Tr::kRows * kRowBytes);
        wgmma_commit();
      }
      gemm_ss_bt<T, Tr::kCols, Tr::kBlockQ>(acc_dk[0], sm.ds_t(buffer), sm.q(s) + cols);
      wgmma_commit();
      wgmma_wait<Tr::kDqParts + 1>();
      release(sm.grad_out_empty(), lane);
      // Stages part c (the layout of dq_accum_tile: conflict-free 16-byte stores) once the
      // writer warp has handed the previous one to the copy engine.
      const auto stage_dq = [&](float(&part)[1][kC][4]) {
        named_barrier_sync(Tr::kDqEmpty + wg, Tr::kDqSync);
#pragma unroll
        for (int n = 0; n < kC; ++n)
          st_shared_v4(sm.dq(wg) + 16 * (128 * n + wg_thread), part[0][n]);
        fence_async_shared();
        named_barrier_arrive(Tr::kDqFull + wg, Tr::kDqSync);
      };
      wgmma_wait<2>();
      fence_operands(acc_dq[0][0]);
      stage_dq(acc_dq[0]);
      wgmma_wait<1>();
      fence_operands(acc_dq[1][0]);
      stage_dq(acc_dq[1]);
      wgmma_wait<0>();
      fence_operands(acc_dv[0]);
      fence_operands(acc_dk[0]);
      release(sm.q_empty(s), lane);
    }

  // dK and dV out through the K and V tiles (as backward_dkdv_kernel), once every product of
  // both warpgroups has read them: each warpgroup writes its columns, one thread stores.
  named_barrier_sync(3, 256);
  stage_key_rows<T, Tr::kRows>(sm.k() + cols, 16 * warp, acc_dk, p.scale, lane);
  stage_key_rows<T, Tr::kRows>(sm.v() + cols, 16 * warp, acc_dv, 1.f, lane);
  fence_async_shared();
  named_barrier_sync(3, 256);
  if (threadIdx.x == 128) {
    // The CTA's (b, k/v head) and key rows read again from the block index (not held across
    // the loop).
    const KeyBlock out(p, ctaid_x(), num_n_blocks);
    const int out_row0 = out.n_block * Tr::kRows;
    const auto [out_b, out_hk] = out.batch_head<false>(p);
    store_tile_rows<Tr::kChunks, Tr::kRows>(maps.grad_k, sm.k(), 0, p.D, out_row0, out_hk, out_b);
    store_tile_rows<Tr::kChunks, Tr::kRows>(maps.grad_v, sm.v(), 0, p.Dv, out_row0, out_hk, out_b);
    bulk_commit();
    bulk_wait_read<0>();
  }
}

// The D = 256 single pass: dK, dV and the dQ sums (backward_split_d_kernel), then grad_q from
// them (dq_from_accum_kernel).
template <class T>
void launch_backward_split_d(const DeviceParams& p, cudaStream_t stream) {
  using Tr = SplitDTraits;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const BackwardMaps maps{
      make_tile_map(p.q, kBf16, p.B, p.Hq, p.Lq, p.D, p.q_st, Tr::kBlockQ),
      make_tile_map(p.k, kBf16, p.B, p.Hk, p.Lk, p.D, p.k_st, Tr::kRows),
      make_tile_map(p.v, kBf16, p.B, p.Hk, p.Lk, p.Dv, p.v_st, Tr::kRows),
      make_tile_map(p.grad_out, kBf16, p.B, p.Hq, p.Lq, p.Dv, p.grad_out_st, Tr::kBlockQ),
      MaskTileMap{},
      make_tile_map(p.grad_k, kBf16, p.B, p.Hk, p.Lk, p.D, p.grad_k_st, Tr::kRows),
      make_tile_map(p.grad_v, kBf16, p.B, p.Hk, p.Lk, p.Dv, p.grad_v_st, Tr::kRows),
      MaskStepList{}};
  const std::int64_t q_tiles = static_cast<std::int64_t>(p.B) * p.Hq * dq_row_tiles(p.Lq);
  check_cuda(
      cudaMemsetAsync(p.dq_accum, 0,
                      q_tiles * (Tr::kHeadDim / kChunkCols) * kDqTileElems * sizeof(float), stream),
      "cudaMemsetAsync(dq_accum)");
  const int num_n_blocks = (p.Lk + Tr::kRows - 1) / Tr::kRows;
  launch_with_smem(&backward_split_d_kernel<T>, "memattn sm90 backward dK/dV/dQ kernel (D = 256)",
                   static_cast<std::int64_t>(num_n_blocks) * p.B * p.Hk, Tr::kThreads,
                   Tr::kSmemBytes, stream, p, maps, num_n_blocks);
  launch_with_smem(&dq_from_accum_kernel<T, Tr::kHeadDim>, "memattn sm90 dQ conversion kernel",
                   q_tiles, 128, 0, stream, p);
}

template <class T, int kHeadDim, bool kFeatures, bool kFusedDq>
void launch_backward(const DeviceParams& p, cudaStream_t stream) {
  using Dq = DqTraits<kHeadDim, kFeatures>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  // Box rows differ between the passes (the dK/dV kernel streams Q/dO in kBlockQ-row blocks and
  // holds 128 keys; the dQ kernel the reverse), so each pass gets its own maps.
  // outputs: the dK/dV kernel's maps of grad_k and grad_v.
  const auto maps = [&](int q_rows, int kv_rows, bool outputs) {
    return BackwardMaps{
        make_tile_map(p.q, kBf16, p.B, p.Hq, p.Lq, p.D, p.q_st, q_rows),
        make_tile_map(p.k, kBf16, p.B, p.Hk, p.Lk, p.D, p.k_st, kv_rows),
        make_tile_map(p.v, kBf16, p.B, p.Hk, p.Lk, p.Dv, p.v_st, kv_rows),
        make_tile_map(p.grad_out, kBf16, p.B, p.Hq, p.Lq, p.Dv, p.grad_out_st, q_rows),
        kFeatures ? make_mask_map(p, q_rows) : MaskTileMap{},
        outputs ? make_tile_map(p.grad_k, kBf16, p.B, p.Hk, p.Lk, p.D, p.grad_k_st, 64)
                : CUtensorMap{},
        outputs ? make_tile_map(p.grad_v, kBf16, p.B, p.Hk, p.Lk, p.Dv, p.grad_v_st, 64)
                : CUtensorMap{},
        MaskStepList{}};
  };
  const std::int64_t q_tiles = static_cast<std::int64_t>(p.B) * p.Hq * dq_row_tiles(p.Lq);
  // The single pass sums dQ in the zeroed scratch, or without one (direct_dq_backward) writes
  // grad_q itself.
  const bool dq_scratch = kFusedDq && p.dq_accum != nullptr;
  if (dq_scratch)
    check_cuda(
        cudaMemsetAsync(p.dq_accum, 0,
                        q_tiles * (kHeadDim / kChunkCols) * kDqTileElems * sizeof(float), stream),
        "cudaMemsetAsync(dq_accum)");
  const auto launch_dkdv = [&](auto masking) {
    constexpr DkvMasking kMasking = decltype(masking)::value;
    using Kv = DkvTraits<kHeadDim, kMasking, kFusedDq>;
    const int num_n_blocks = (p.Lk + Kv::kRows - 1) / Kv::kRows;
    BackwardMaps dkdv_maps = maps(Kv::kBlockQ, Kv::kRows, true);
    if constexpr (Kv::kListedSteps)
      if (dq_scratch) dkdv_maps.steps = launch_mask_steps(p, Kv::kBlockQ, kBf16, stream);
    launch_with_smem(
        &backward_dkdv_kernel<T, kHeadDim, kMasking, kFusedDq>,
        kFusedDq ? "memattn sm90 backward dK/dV/dQ kernel" : "memattn sm90 backward dK/dV kernel",
        static_cast<std::int64_t>(num_n_blocks) * p.B * p.Hk, Kv::kThreads, Kv::kSmemBytes, stream,
        p, dkdv_maps, num_n_blocks);
  };
  using Tiles = std::integral_constant<DkvMasking, DkvMasking::tiles>;
  if constexpr (!kFeatures)
    launch_dkdv(std::integral_constant<DkvMasking, DkvMasking::lean>{});
  else if constexpr (kFusedDq)
    launch_dkdv(Tiles{});  // sm90_backward checked single_pass_serves_mask
  else if (!p.dropout &&
           make_mask_map(p, DkvTraits<kHeadDim, Tiles::value, false>::kBlockQ).rows > 0)
    launch_dkdv(Tiles{});  // masked calls the mask tiles serve: the lean kernel's step size
  else
    launch_dkdv(std::integral_constant<DkvMasking, DkvMasking::general>{});
  if constexpr (kFusedDq) {
    if (dq_scratch)
      launch_with_smem(&dq_from_accum_kernel<T, kHeadDim>, "memattn sm90 dQ conversion kernel",
                       q_tiles, 128, 0, stream, p);
    return;
  }
  const int num_m_blocks = (p.Lq + Dq::kRows - 1) / Dq::kRows;
  launch_with_smem(
      &backward_dq_kernel<T, kHeadDim, kFeatures>, "memattn sm90 backward dQ kernel",
      static_cast<std::int64_t>(num_m_blocks) * p.grad_mask_b_outer * p.grad_mask_h_outer,
      Dq::kThreads, Dq::kSmemBytes, stream, p, maps(Dq::kRows, Dq::kBlockN, false), num_m_blocks);
}

}  // namespace memattn::cuda::sm90

namespace memattn::cuda {
namespace sm90 {
// Whether a lean call's single pass can write dQ directly, without scratch or atomics: every
// query row gets its dQ from exactly one step of one CTA when the keys fit one CTA's block and
// no row is skipped (no causal limit, no key padding, Lk > 0). Deterministic, so it runs under
// torch.use_deterministic_algorithms too. _ops.direct_dq_backward (Python) states the same rules.
inline bool direct_dq(const DeviceParams& p) {
  return p.Lk > 0 && p.Lk <= BackwardShape::kRows && !p.causal && p.key_padding == nullptr;
}

// Whether the single pass serves a masked call (its dQ scratch given): a mask that mask tiles
// can copy (bool or q's dtype), no dropout, no mask gradient. _ops.single_pass_backward (Python)
// states the same rules for the scratch.
template <int kHeadDim>
bool single_pass_serves_mask(const DeviceParams& p) {
  return !p.dropout && p.grad_mask == nullptr &&
         make_mask_map(p, DkvTraits<kHeadDim, DkvMasking::tiles, true>::kBlockQ).rows > 0;
}
}  // namespace sm90

template <class T, int kHeadDim>
void sm90_backward(const DeviceParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim == 256) {
    // The head-dim-split single pass serves lean calls given the dQ scratch; use_sm90
    // (cuda_backend.cu) sends the others to the sm80 backward.
    if (has_features(p) || p.dq_accum == nullptr)
      throw Error(ErrorKind::runtime,
                  "memattn sm90 backward at head dims over 128: called for a call with masks, "
                  "dropout or no dQ scratch, which the sm80 backward runs");
    launch_backward_delta<T>(p, stream);
    sm90::launch_backward_split_d<T>(p, stream);
  } else {
    launch_backward_delta<T>(p, stream);
    if (has_features(p)) {
      if (p.dq_accum != nullptr && sm90::single_pass_serves_mask<kHeadDim>(p))
        return sm90::launch_backward<T, kHeadDim, true, true>(p, stream);
      sm90::launch_backward<T, kHeadDim, true, false>(p, stream);
    } else if (p.dq_accum != nullptr || sm90::direct_dq(p)) {
      sm90::launch_backward<T, kHeadDim, false, true>(p, stream);
    } else {
      sm90::launch_backward<T, kHeadDim, false, false>(p, stream);
    }
  }
}
}  // namespace memattn::cuda
