// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so any (seed, position) gives the same bits on any backend and in
// any order. Dropout keeps element (bh, i, j) when its 32-bit draw is >= p * 2^32; forward
// and backward regenerate identical masks from the seed alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEMATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Always inlined: the header is compiled into several ISA variants of the CPU kernels, and
// an out-of-line copy built for AVX-512 must never be shared with the baseline variant.
#define MEMATTN_HOST_DEVICE [[gnu::always_inline]] inline
#endif

namespace memattn::philox {

struct U32x4 {
  std::uint32_t x[4];
};

MEMATTN_HOST_DEVICE void mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi,
                                 std::uint32_t& lo) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
}

MEMATTN_HOST_DEVICE U32x4 philox4x32_10(U32x4 ctr, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, ctr.x[0], hi0, lo0);
    mulhilo(kMul1, ctr.x[2], hi1, lo1);
    ctr = U32x4{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return ctr;
}

// The four draws for keys j = 4*j_quad .. 4*j_quad+3 of query row i of (batch*Hq + head) bh.
MEMATTN_HOST_DEVICE U32x4 dropout_draws(std::uint64_t seed, std::uint64_t bh, std::uint32_t i,
                                        std::uint32_t j_quad) {
  return philox4x32_10(
      U32x4{{j_quad, i, static_cast<std::uint32_t>(bh), static_cast<std::uint32_t>(bh >> 32)}},
      static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
}

// Draws below this are dropped: p * 2^32, saturated.
MEMATTN_HOST_DEVICE std::uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<std::uint32_t>(t);
}

}  // namespace memattn::philox
