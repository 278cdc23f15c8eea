// FlashAttention-2-style backward for sm_80+, without atomics (deterministic):
//   delta = rowsum(dO * O)                          (common/delta.cu)
//   dK/dV kernel: one CTA per block of keys and (b, k/v head); loops over the group's query
//     heads and the query blocks that can see its keys, recomputing S^T = K Q^T and
//     P^T = exp(S^T - lse); dV += (P o Z)^T dO, dK += dS^T Q with dS = P o (dP o Z - delta).
//   dQ kernel:    one CTA per block of queries; loops over key blocks; dQ += dS K. It also
//     writes the float mask's gradient dS, looping over the (b, h) pairs that a broadcast mask
//     sums so that no two CTAs touch one element.
// Computing dQ in its own pass costs two more products than FA2's atomic dQ accumulation but
// needs no fp32 dQ scratch and gives bit-identical gradients run to run.
#pragma once

#include <cstdint>

#include "cuda/common/launch_smem.cuh"
#include "cuda/common/params.h"
#include "cuda/common/semantics.cuh"
#include "cuda/launch.h"
#include "cuda/sm80/scores.cuh"
#include "cuda/sm80/softmax.cuh"
#include "cuda/sm80/warp_gemm.cuh"

namespace memattn::cuda::sm80 {

// ------------------------------------------------------------------------------------------
// dQ (+ mask gradient)

template <int kHeadDim>
struct DqTraits {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = kWarps * 16;                // queries per CTA, 16 per warp
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // keys per iteration
  static constexpr int kThreads = kWarps * 32;
};

template <class T, int kHeadDim>
struct DqSmem {
  using Tr = DqTraits<kHeadDim>;
  using QTile = SmemTile<T, Tr::kBlockM, kHeadDim>;
  using KVTile = SmemTile<T, Tr::kBlockN, kHeadDim>;
  // Q, dO, then two stages of K and V.
  static constexpr int kBytes =
      static_cast<int>(sizeof(T)) * (2 * QTile::kElems + 4 * KVTile::kElems);
};

// kFeatures: see forward_kernel; here it also covers the mask gradient.
template <class T, int kHeadDim, bool kFeatures>
__global__ void __launch_bounds__(DqTraits<kHeadDim>::kThreads)
    backward_dq_kernel(const __grid_constant__ DeviceParams p, int num_m_blocks) {
  using Tr = DqTraits<kHeadDim>;
  using Smem = DqSmem<T, kHeadDim>;
  constexpr int kN = Tr::kBlockN / 8, kD = kHeadDim / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const typename Smem::QTile q_tile(smem), do_tile(smem + Smem::QTile::kElems);
  // Stage s of K is at kv_base + s * KVTile::kElems, of V two tiles further.
  T* kv_base = smem + 2 * Smem::QTile::kElems;
  auto k_stage = [&](int s) { return typename Smem::KVTile(kv_base + s * Smem::KVTile::kElems); };
  auto v_stage = [&](int s) {
    return typename Smem::KVTile(kv_base + (2 + s) * Smem::KVTile::kElems);
  };

  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const std::int64_t outer = blockIdx.x / num_m_blocks;
  const int b_outer = static_cast<int>(outer / p.grad_mask_h_outer);
  const int h_outer = static_cast<int>(outer % p.grad_mask_h_outer);
  const int b_inner_count = p.B / p.grad_mask_b_outer, h_inner_count = p.Hq / p.grad_mask_h_outer;
  const int i0 = m_block * Tr::kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = warp * 16;

  for (int bi = 0; bi < b_inner_count; ++bi)
    for (int hi = 0; hi < h_inner_count; ++hi) {
      // Outer index varies fastest over the kept dims; summed dims are walked here.
      const int b = p.grad_mask_b_outer == 1 ? bi : b_outer;
      const int h = p.grad_mask_h_outer == 1 ? hi : h_outer;
      const int hk = h / p.group;
      const std::uint64_t bh = static_cast<std::uint64_t>(b) * p.Hq + h;
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + i0 * p.q_st.l;
      const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_st.b +
                      h * p.grad_out_st.h + i0 * p.grad_out_st.l;
      const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
      const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;

      float lse2[2], delta[2];
      thread_row_stats(p, b, h, i0 + warp_row0, lse2, delta, lane);
      const ElementMasks<T> masks{p, b, h};
      const float unit = score_unit<kFeatures>(p);
      const int num_n_blocks = visible_key_blocks<Tr::kBlockN>(p, masks.keys, i0 + Tr::kBlockM - 1);

      float acc_dq[1][kD][4];
      zero(acc_dq);
      if (num_n_blocks > 0) {
        load_tile_async<Tr::kThreads>(q_tile, q, p.q_st.l, p.Lq - i0, p.D);
        load_tile_async<Tr::kThreads>(do_tile, dout, p.grad_out_st.l, p.Lq - i0, p.Dv);
        load_tile_async<Tr::kThreads>(k_stage(0), k, p.k_st.l, p.Lk, p.D);
        load_tile_async<Tr::kThreads>(v_stage(0), v, p.v_st.l, p.Lk, p.Dv);
        cp_async_commit();
      }
      for (int nb = 0; nb < num_n_blocks; ++nb) {
        const int j0 = nb * Tr::kBlockN, stage = nb & 1;
        cp_async_wait<0>();
        __syncthreads();  // stage nb landed; every warp is done with the other stage
        if (nb + 1 < num_n_blocks) {
          const int j1 = j0 + Tr::kBlockN;
          load_tile_async<Tr::kThreads>(k_stage(stage ^ 1), k + j1 * p.k_st.l, p.k_st.l, p.Lk - j1,
                                        p.D);
          load_tile_async<Tr::kThreads>(v_stage(stage ^ 1), v + j1 * p.v_st.l, p.v_st.l, p.Lk - j1,
                                        p.Dv);
          cp_async_commit();
        }
        float s[1][kN][4], dp[1][kN][4];
        zero(s);
        zero(dp);
        gemm_ss<1, kN, kHeadDim>(s, q_tile, warp_row0, k_stage(stage), 0, lane);
        gemm_ss<1, kN, kHeadDim>(dp, do_tile, warp_row0, v_stage(stage), 0, lane);
        const bool check = block_needs_check(p, masks.keys, i0, Tr::kBlockM, j0, Tr::kBlockN);
        mask_scores<Rows::queries, kFeatures>(s, masks, i0 + warp_row0, j0, check, lane);
        if constexpr (kFeatures)
          if (p.dropout) apply_dropout<Rows::queries>(dp, p, bh, i0 + warp_row0, j0, lane);
        score_grad_of_query_rows(s, dp, lse2, delta, unit);  // s now holds dS
        if (kFeatures && p.grad_mask != nullptr)
          add_mask_grad(p, b, h, i0 + warp_row0, j0, s, lane);
        std::uint32_t dsf[1][kN / 2][4];
        c_to_a<T>(dsf, s);
        gemm_rs<1, kD, Tr::kBlockN>(acc_dq, dsf, k_stage(stage), 0, lane);
      }

      store_rows<T>(static_cast<T*>(p.grad_q) + b * p.grad_q_st.b + h * p.grad_q_st.h,
                    p.grad_q_st.l, i0 + warp_row0, p.Lq, 0, p.D, acc_dq, p.scale, lane);
      __syncthreads();  // the next (b, h) reloads Q and dO
    }
}

// ------------------------------------------------------------------------------------------
// dK, dV

template <int kHeadDim>
struct DkvTraits {
  // Above 128 columns a warp's dK and dV accumulators would not fit in registers: pairs of
  // warps share 16 keys, each recomputing the scores and owning half of the columns.
  static constexpr int kDSplit = kHeadDim <= 128 ? 1 : 2;
  static constexpr int kWarps = 4 * kDSplit;
  static constexpr int kBlockN = 64;                        // keys per CTA, 16 per warp (pair)
  static constexpr int kBlockQ = kHeadDim <= 64 ? 64 : 32;  // queries per iteration
  static constexpr int kOutCols = kHeadDim / kDSplit;
  static constexpr int kThreads = kWarps * 32;
};

template <class T, int kHeadDim>
struct DkvSmem {
  using Tr = DkvTraits<kHeadDim>;
  using KVTile = SmemTile<T, Tr::kBlockN, kHeadDim>;
  using QTile = SmemTile<T, Tr::kBlockQ, kHeadDim>;
  // K, V, two stages of Q and dO, then two stages of lse2 and delta (floats).
  static constexpr int kTileBytes =
      static_cast<int>(sizeof(T)) * (2 * KVTile::kElems + 4 * QTile::kElems);
  static constexpr int kBytes = kTileBytes + 4 * Tr::kBlockQ * static_cast<int>(sizeof(float));
};

template <class T, int kHeadDim, bool kFeatures>
__global__ void __launch_bounds__(DkvTraits<kHeadDim>::kThreads)
    backward_dkdv_kernel(const __grid_constant__ DeviceParams p, int num_n_blocks) {
  using Tr = DkvTraits<kHeadDim>;
  using Smem = DkvSmem<T, kHeadDim>;
  constexpr int kQ = Tr::kBlockQ / 8, kOut = Tr::kOutCols / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const typename Smem::KVTile k_tile(smem), v_tile(smem + Smem::KVTile::kElems);
  // Stage s of Q is at q_base + s * QTile::kElems, of dO two tiles further.
  T* q_base = smem + 2 * Smem::KVTile::kElems;
  auto q_stage = [&](int s) { return typename Smem::QTile(q_base + s * Smem::QTile::kElems); };
  auto do_stage = [&](int s) {
    return typename Smem::QTile(q_base + (2 + s) * Smem::QTile::kElems);
  };
  float* stats_smem = reinterpret_cast<float*>(smem_raw + Smem::kTileBytes);  // [stage][2][kBlockQ]

  const int n_block = static_cast<int>(blockIdx.x % num_n_blocks);
  const std::int64_t bhk = blockIdx.x / num_n_blocks;
  const int b = static_cast<int>(bhk / p.Hk), hk = static_cast<int>(bhk % p.Hk);
  const int j0 = n_block * Tr::kBlockN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_row0 = (warp / Tr::kDSplit) * 16;
  const int col_base = (warp % Tr::kDSplit) * Tr::kOutCols;

  // Queries that can see a key of this block: i >= j0 - causal_offset; none when every key of
  // the block is padding.
  const KeyRange keys = key_range(p, b);
  const int q_block_begin = causal_query_begin(p, j0) / Tr::kBlockQ;
  const int q_blocks = j0 >= keys.end ? 0 : (p.Lq + Tr::kBlockQ - 1) / Tr::kBlockQ - q_block_begin;
  const int steps = q_blocks * p.group;  // (query head, query block) pairs, head-major

  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h + j0 * p.k_st.l;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h + j0 * p.v_st.l;

  // Issues the loads of step `it` into `stage`: Q and dO tiles by cp.async, row stats by
  // plain loads (visible after the next __syncthreads).
  auto load_step = [&](int it, int stage) {
    const int h = hk * p.group + it / q_blocks;
    const int i0 = (q_block_begin + it % q_blocks) * Tr::kBlockQ;
    const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + i0 * p.q_st.l;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_st.b + h * p.grad_out_st.h +
                    i0 * p.grad_out_st.l;
    load_tile_async<Tr::kThreads>(q_stage(stage), q, p.q_st.l, p.Lq - i0, p.D);
    load_tile_async<Tr::kThreads>(do_stage(stage), dout, p.grad_out_st.l, p.Lq - i0, p.Dv);
    cp_async_commit();
    float* stats = stats_smem + stage * 2 * Tr::kBlockQ;
    for (int r = threadIdx.x; r < Tr::kBlockQ; r += Tr::kThreads) {
      const RowStats row = row_stats(p, b, h, i0 + r);
      stats[r] = row.lse2;
      stats[Tr::kBlockQ + r] = row.delta;
    }
  };

  const float unit = score_unit<kFeatures>(p);
  float acc_dk[1][kOut][4], acc_dv[1][kOut][4];
  zero(acc_dk);
  zero(acc_dv);
  if (steps > 0) {
    load_tile_async<Tr::kThreads>(k_tile, k, p.k_st.l, p.Lk - j0, p.D);
    load_tile_async<Tr::kThreads>(v_tile, v, p.v_st.l, p.Lk - j0, p.Dv);
    load_step(0, 0);
  }
  for (int it = 0; it < steps; ++it) {
    const int stage = it & 1;
    const int h = hk * p.group + it / q_blocks;
    const int i0 = (q_block_begin + it % q_blocks) * Tr::kBlockQ;
    const std::uint64_t bh = static_cast<std::uint64_t>(b) * p.Hq + h;
    cp_async_wait<0>();
    __syncthreads();  // step it landed; every warp is done with the other stage
    if (it + 1 < steps) load_step(it + 1, stage ^ 1);
    const float* lse2 = stats_smem + stage * 2 * Tr::kBlockQ;
    const float* delta = lse2 + Tr::kBlockQ;

    // P^T for this warp's 16 keys x kBlockQ queries.
    float pt[1][kQ][4];
    zero(pt);
    gemm_ss<1, kQ, kHeadDim>(pt, k_tile, key_row0, q_stage(stage), 0, lane);
    const bool check = block_needs_check(p, keys, i0, Tr::kBlockQ, j0, Tr::kBlockN);
    mask_scores<Rows::keys, kFeatures>(pt, ElementMasks<T>{p, b, h, keys}, j0 + key_row0, i0, check,
                                       lane);
#pragma unroll
    for (int n = 0; n < kQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        pt[0][n][e] = fast_exp2(pt[0][n][e] * unit - lse2[c_col(n, e, lane)]);

    // dV += (P o Z)^T dO
    {
      float pz[1][kQ][4];
#pragma unroll
      for (int n = 0; n < kQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) pz[0][n][e] = pt[0][n][e];
      if constexpr (kFeatures)
        if (p.dropout) apply_dropout<Rows::keys>(pz, p, bh, j0 + key_row0, i0, lane);
      std::uint32_t pf[1][kQ / 2][4];
      c_to_a<T>(pf, pz);
      gemm_rs<1, kOut, Tr::kBlockQ>(acc_dv, pf, do_stage(stage), col_base, lane);
    }
    // dK += dS^T Q with dS^T = P^T o (dP^T o Z - delta), dP^T = V dO^T
    {
      float dpt[1][kQ][4];
      zero(dpt);
      gemm_ss<1, kQ, kHeadDim>(dpt, v_tile, key_row0, do_stage(stage), 0, lane);
      if constexpr (kFeatures)
        if (p.dropout) apply_dropout<Rows::keys>(dpt, p, bh, j0 + key_row0, i0, lane);
#pragma unroll
      for (int n = 0; n < kQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          dpt[0][n][e] = pt[0][n][e] * (dpt[0][n][e] - delta[c_col(n, e, lane)]);
      std::uint32_t dsf[1][kQ / 2][4];
      c_to_a<T>(dsf, dpt);
      gemm_rs<1, kOut, Tr::kBlockQ>(acc_dk, dsf, q_stage(stage), col_base, lane);
    }
  }

  store_rows<T>(static_cast<T*>(p.grad_k) + b * p.grad_k_st.b + hk * p.grad_k_st.h, p.grad_k_st.l,
                j0 + key_row0, p.Lk, col_base, p.D, acc_dk, p.scale, lane);
  store_rows<T>(static_cast<T*>(p.grad_v) + b * p.grad_v_st.b + hk * p.grad_v_st.h, p.grad_v_st.l,
                j0 + key_row0, p.Lk, col_base, p.Dv, acc_dv, 1.f, lane);
}

template <class T, int kHeadDim, bool kFeatures>
void launch_backward(const DeviceParams& p, cudaStream_t stream) {
  using Kv = DkvTraits<kHeadDim>;
  const int num_n_blocks = (p.Lk + Kv::kBlockN - 1) / Kv::kBlockN;
  launch_with_smem(&backward_dkdv_kernel<T, kHeadDim, kFeatures>,
                   "memattn sm80 backward dK/dV kernel",
                   static_cast<std::int64_t>(num_n_blocks) * p.B * p.Hk, Kv::kThreads,
                   DkvSmem<T, kHeadDim>::kBytes, stream, p, num_n_blocks);
  using Dq = DqTraits<kHeadDim>;
  const int num_m_blocks = (p.Lq + Dq::kBlockM - 1) / Dq::kBlockM;
  launch_with_smem(
      &backward_dq_kernel<T, kHeadDim, kFeatures>, "memattn sm80 backward dQ kernel",
      static_cast<std::int64_t>(num_m_blocks) * p.grad_mask_b_outer * p.grad_mask_h_outer,
      Dq::kThreads, DqSmem<T, kHeadDim>::kBytes, stream, p, num_m_blocks);
}

}  // namespace memattn::cuda::sm80

namespace memattn::cuda {
// Explicitly instantiated per (dtype, head-dim bucket) in generated files (CMakeLists.txt).
template <class T, int kHeadDim>
void sm80_backward(const DeviceParams& p, cudaStream_t stream) {
  launch_backward_delta<T>(p, stream);
  if (has_features(p))
    sm80::launch_backward<T, kHeadDim, true>(p, stream);
  else
    sm80::launch_backward<T, kHeadDim, false>(p, stream);
}
}  // namespace memattn::cuda
