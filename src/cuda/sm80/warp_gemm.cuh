// Warp-level GEMMs over shared-memory tiles; every kernel's products are one of these two.
#pragma once

#include "cuda/sm80/mma.cuh"

namespace memattn::cuda::sm80 {

// acc[m][n] += A[a_row0 + 16m .., 0:kK] * B[n_base + 8n .., 0:kK]^T
// (A row-major [m][k], B row-major [n][k]; e.g. S = Q K^T).
template <int kM, int kN, int kK, class T, int AR, int AC, int BR, int BC>
__device__ __forceinline__ void gemm_ss(float (&acc)[kM][kN][4], const SmemTile<T, AR, AC>& a,
                                        int a_row0, const SmemTile<T, BR, BC>& b, int n_base,
                                        int lane) {
  static_assert(kN % 2 == 0, "B fragments are loaded for pairs of n8 tiles");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    std::uint32_t af[kM][4];
#pragma unroll
    for (int m = 0; m < kM; ++m) load_a(af[m], a, a_row0 + 16 * m, 16 * kk, lane);
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      std::uint32_t bf[4];
      load_b_nk(bf, b, n_base + 8 * n, 16 * kk, lane);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma<T>(acc[m][n], af[m], bf[0], bf[1]);
        mma<T>(acc[m][n + 1], af[m], bf[2], bf[3]);
      }
    }
  }
}

// acc[m][n] += A[m][0:kK] * B[0:kK, n_base + 8n ..] with A already in registers as fragments
// a[m][kk] (16 x 16 each) and B row-major [k][n] in shared memory (e.g. O += P V).
template <int kM, int kN, int kK, class T, int BR, int BC>
__device__ __forceinline__ void gemm_rs(float (&acc)[kM][kN][4],
                                        const std::uint32_t (&a)[kM][kK / 16][4],
                                        const SmemTile<T, BR, BC>& b, int n_base, int lane) {
  static_assert(kN % 2 == 0, "B fragments are loaded for pairs of n8 tiles");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      std::uint32_t bf[4];
      load_b_kn(bf, b, 16 * kk, n_base + 8 * n, lane);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma<T>(acc[m][n], a[m][kk], bf[0], bf[1]);
        mma<T>(acc[m][n + 1], a[m][kk], bf[2], bf[3]);
      }
    }
  }
}

// Fragments of a C tile set acc[m][0 .. 2*kK/16) as A operands a[m][kk] (see mma.cuh).
template <class T, int kM, int kN>
__device__ __forceinline__ void c_to_a(std::uint32_t (&a)[kM][kN / 2][4],
                                       const float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int kk = 0; kk < kN / 2; ++kk) a_from_c<T>(a[m][kk], acc[m][2 * kk], acc[m][2 * kk + 1]);
}

template <int kM, int kN>
__device__ __forceinline__ void zero(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;
}

}  // namespace memattn::cuda::sm80
