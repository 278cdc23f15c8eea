// FlashAttention-2-style forward for sm_80+: one block of kBlockM queries per CTA, looping over
// key blocks with an online softmax held in registers; K and V tiles arrive by cp.async while
// the previous product runs. Saves only out and lse.
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

// Tile shape per head-dim bucket. Each warp owns kMTiles x 16 query rows.
// Measured on H100 (bf16, L 2k-8k): for D = 64, 8 warps x 16 rows beat 4 warps x 32 rows by
// 7%; for D = 128, 4 warps x 16 rows beat 8 x 16 by 25% and matched 4 x 32 rows with 32-key
// blocks. Two m-tiles per warp also spill in the general (masked) kernel.
template <int kHeadDim>
struct ForwardTraits {
  static constexpr int kWarps = kHeadDim <= 64 ? 8 : kHeadDim <= 128 ? 4 : 8;
  static constexpr int kMTiles = 1;
  static constexpr int kBlockM = kWarps * 16 * kMTiles;
  static constexpr int kBlockN = 64;  // keys per iteration
  static constexpr int kThreads = kWarps * 32;
};

template <class T, int kHeadDim>
struct ForwardSmem {
  using Tr = ForwardTraits<kHeadDim>;
  using QTile = SmemTile<T, Tr::kBlockM, kHeadDim>;
  using KVTile = SmemTile<T, Tr::kBlockN, kHeadDim>;
  static constexpr int kBytes = static_cast<int>(sizeof(T)) * (QTile::kElems + 2 * KVTile::kElems);
};

// kFeatures: attn_mask, key padding or dropout present (the general kernel); without them a
// leaner kernel runs (bounds and causal checks only).
template <class T, int kHeadDim, bool kFeatures>
__global__ void __launch_bounds__(ForwardTraits<kHeadDim>::kThreads)
    forward_kernel(const __grid_constant__ DeviceParams p, int num_m_blocks) {
  using Tr = ForwardTraits<kHeadDim>;
  using Smem = ForwardSmem<T, kHeadDim>;
  constexpr int kM = Tr::kMTiles, kN = Tr::kBlockN / 8, kD = kHeadDim / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const typename Smem::QTile q_tile(smem);
  const typename Smem::KVTile k_tile(smem + Smem::QTile::kElems);
  const typename Smem::KVTile v_tile(smem + Smem::QTile::kElems + Smem::KVTile::kElems);

  // Heavy (late, for causal) query blocks first; consecutive CTAs share a head's K/V in L2.
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const std::int64_t bh = blockIdx.x / num_m_blocks;
  const int b = static_cast<int>(bh / p.Hq), h = static_cast<int>(bh % p.Hq), hk = h / p.group;
  const int i0 = m_block * Tr::kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = warp * kM * 16;

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + i0 * p.q_st.l;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;

  // Keys this block can see: up to the causal limit of its last query and the last unpadded key.
  const ElementMasks<T> masks{p, b, h};
  const int num_n_blocks = visible_key_blocks<Tr::kBlockN>(p, masks.keys, i0 + Tr::kBlockM - 1);

  float acc_o[kM][kD][4];
  zero(acc_o);
  float row_max[kM][2], row_sum[kM][2];
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) row_max[m][r] = -INFINITY, row_sum[m][r] = 0.f;

  const float unit = score_unit<kFeatures>(p);
  if (num_n_blocks > 0) {
    load_tile_async<Tr::kThreads>(q_tile, q, p.q_st.l, p.Lq - i0, p.D);
    load_tile_async<Tr::kThreads>(k_tile, k, p.k_st.l, p.Lk, p.D);
    cp_async_commit();
  }
  for (int nb = 0; nb < num_n_blocks; ++nb) {
    const int j0 = nb * Tr::kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K(nb) (and Q) landed; every warp is done with V(nb - 1)
    load_tile_async<Tr::kThreads>(v_tile, v + j0 * p.v_st.l, p.v_st.l, p.Lk - j0, p.Dv);
    cp_async_commit();

    float s[kM][kN][4];
    zero(s);
    gemm_ss<kM, kN, kHeadDim>(s, q_tile, warp_row0, k_tile, 0, lane);
    const bool check = block_needs_check(p, masks.keys, i0, Tr::kBlockM, j0, Tr::kBlockN);
    mask_scores<Rows::queries, kFeatures>(s, masks, i0 + warp_row0, j0, check, lane);
    // As in FA2: K(nb + 1) streams in while this block's softmax runs.
    cp_async_wait<0>();
    __syncthreads();  // V(nb) landed; every warp is done with K(nb)
    if (nb + 1 < num_n_blocks) {
      const int j1 = j0 + Tr::kBlockN;
      load_tile_async<Tr::kThreads>(k_tile, k + j1 * p.k_st.l, p.k_st.l, p.Lk - j1, p.D);
      cp_async_commit();
    }

    float rescale[kM][2];
    softmax_update<false, true>(s, row_max, row_sum, rescale, unit);
    rescale_rows(acc_o, rescale);
    if constexpr (kFeatures)
      if (p.dropout) apply_dropout<Rows::queries>(s, p, bh, i0 + warp_row0, j0, lane);

    std::uint32_t pf[kM][kN / 2][4];
    c_to_a<T>(pf, s);
    gemm_rs<kM, kD, Tr::kBlockN>(acc_o, pf, v_tile, 0, lane);
  }

  store_out_lse<T, false>(p, b, h, i0 + warp_row0, acc_o, row_max, row_sum, unit, lane);
}

template <class T, int kHeadDim, bool kFeatures>
void launch_forward(const DeviceParams& p, cudaStream_t stream) {
  using Tr = ForwardTraits<kHeadDim>;
  const int num_m_blocks = (p.Lq + Tr::kBlockM - 1) / Tr::kBlockM;
  launch_with_smem(&forward_kernel<T, kHeadDim, kFeatures>, "memattn sm80 forward kernel",
                   static_cast<std::int64_t>(num_m_blocks) * p.B * p.Hq, Tr::kThreads,
                   ForwardSmem<T, kHeadDim>::kBytes, stream, p, num_m_blocks);
}

}  // namespace memattn::cuda::sm80

namespace memattn::cuda {
// Explicitly instantiated per (dtype, head-dim bucket) in generated files (CMakeLists.txt).
template <class T, int kHeadDim>
void sm80_forward(const DeviceParams& p, cudaStream_t stream) {
  if (has_features(p))
    sm80::launch_forward<T, kHeadDim, true>(p, stream);
  else
    sm80::launch_forward<T, kHeadDim, false>(p, stream);
}
}  // namespace memattn::cuda
