// The order in which the sm90 forward's persistent CTAs take their tiles (forward.cuh): plain
// integer arithmetic, compiled for the host too, so that tests/cpp/test_sm90_tile_order.cpp
// checks it without a GPU.
#pragma once

#include <cstdint>

#include "cuda/sm90/host_device.h"

namespace memattn::cuda::sm90 {

// The tile (Tile::at's number) that a paired order puts at position t of snake_tile's walk
// (ForwardTraits::kPairedTiles, causal calls; num_pairs = 0 elsewhere: t itself). A causal
// tile's cost grows with its query block, and the snake pairs each round's heavy tiles with the
// next round's light ones only where M divides 2 G (G = g, the CTAs of the persistent grid): for
// 192-row tiles at L = 8192 (M = 43) the busiest CTA had 1.2x the mean work (simulated). So here
// unit u of bh = u / (M / 2), k = u mod (M / 2), is the bh's query blocks M - 1 - k and k, whose
// costs add up to about the same for every unit; the positions of rounds 2 r and 2 r + 1 that the
// snake gives one CTA hold the two tiles of one unit (r G + c, c < G). The num_pairs mod G
// units left over and the middle blocks of odd M come last (tail orders simulated: this one
// left the busiest CTA at 1.02-1.06x the mean work where the snake over tiles left 1.03-1.28x).
template <class Index>
MEMATTN_SM90_HOST_DEVICE Index paired_tile(Index t, Index g, int num_m_blocks,
                                           std::int64_t num_pairs) {
  const auto pairs = static_cast<Index>(num_pairs), m_blocks = static_cast<Index>(num_m_blocks);
  if (pairs == 0) return t;
  const Index span = 2 * g, paired = pairs / g * span;  // positions of full rounds
  Index unit;
  bool second;
  if (t < paired) {
    const Index r = t / span, w = t - r * span;
    second = w >= g;
    unit = r * g + (second ? span - 1 - w : w);
  } else {  // the units left over: their heavy tiles, then their light ones in reverse order
    const Index rest = t - paired, left = pairs - paired / 2;
    if (rest >= 2 * left) return (rest - 2 * left) * m_blocks + m_blocks / 2;  // middle blocks
    second = rest >= left;
    unit = paired / 2 + (second ? 2 * left - 1 - rest : rest);
  }
  const Index half = m_blocks / 2, bh = unit / half, k = unit - bh * half;
  return bh * m_blocks + (second ? m_blocks - 1 - k : k);  // number j is block M - 1 - j
}

}  // namespace memattn::cuda::sm90
