// The orders in which the sm90 forward's persistent CTAs take their tiles (forward.cuh) and the
// backward's dK/dV CTAs their key blocks (backward.cuh): plain integer arithmetic, compiled for
// the host too, so that tests/cpp/test_sm90_tile_order.cpp checks it without a GPU.
#pragma once

#include <cstdint>

#include "cuda/sm90/host_device.h"

namespace memattn::cuda::sm90 {

// The tile (Tile::at's number) that a paired order puts at position t of snake_tile's walk
// (causal calls where launch_forward chooses it; num_pairs = 0 elsewhere: t itself). A causal
// tile's cost grows with its query block, and the snake pairs each round's heavy tiles with the
// next round's light ones only where M divides 2 G (G = g, the CTAs of the persistent grid): the
// busiest CTA had 1.2x the mean work for 192-row tiles at L = 8192 (M = 43), 1.54x for D = 128's
// 128-row tiles at L = 16384 (M = 128), 1.53x / 1.79x for D = 256 at L = 8192 / 16384 (simulated).
// So here unit u of bh = u / (M / 2), k = u mod (M / 2), is the bh's query blocks M - 1 - k and k,
// whose costs add up to about the same for every unit; the positions of rounds 2 r and 2 r + 1 that
// the snake gives one CTA hold the two tiles of one unit (r G + c, c < G). The num_pairs mod G
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

// The tile that a non-causal call on tiles that end at Lq (kEndAligned) takes at position t when
// its first query block is partial (Lq not a multiple of the tile's rows): that block, a bh's
// light tile (some warpgroups have no rows), comes after every full tile. In Tile::at's own order
// each bh's light tile is its last, and with M = 6 (Lq = 1024 on 192-row tiles) the snake gives
// the light tiles of every round to the same CTAs, so the CTAs without them end up with the most
// work (1.13-1.16x the mean at 128 bh, a light tile costing 1/3 to 1/2 of a full one; simulated).
// Here the full tiles come first in bh order, so concurrent CTAs still share a bh's K/V in L2,
// then the light ones, the last bh's first: its K/V is the one most likely still in L2 (about
// 1.03x the mean). The caller passes positions t < num_tiles, and num_m_blocks >= 2.
template <class Index>
MEMATTN_SM90_HOST_DEVICE Index light_tiles_last(Index t, Index num_tiles, int num_m_blocks) {
  const auto m_blocks = static_cast<Index>(num_m_blocks);
  const Index full = num_tiles - num_tiles / m_blocks;  // M - 1 per bh
  if (t < full) return t + t / (m_blocks - 1);          // bh t / (M - 1), numbers 0 .. M - 2
  return num_tiles - 1 - (t - full) * m_blocks;         // bh B Hq - 1 - (t - full), number M - 1
}

// The (b, head) pair at position `pair` of a grid's walk over the batch x heads pairs: b outer
// (pair = b heads + h), or b inner (pair = h batch + b) for calls whose attn_mask is broadcast
// over b but not over the heads (params.h, batch_inner). A [1, H, L, L] additive mask in 16 bits
// is L / (2 D) times the bytes of the K and V it is read with, and no bh's tiles reread it;
// with b outer, the bh that run together are one b's heads, and every b read its heads' masks
// from DRAM again (B x the mask's bytes; 2.1 GB at 8 x 32 x 2048 x 64).
struct BatchHead {
  int b;
  int h;
};
template <class Index>
MEMATTN_SM90_HOST_DEVICE BatchHead batch_head_at(Index pair, int batch, int heads,
                                                 bool batch_inner) {
  if (batch_inner) {
    const Index h = pair / static_cast<Index>(batch);
    return {static_cast<int>(pair - h * static_cast<Index>(batch)), static_cast<int>(h)};
  }
  const Index b = pair / static_cast<Index>(heads);
  return {static_cast<int>(b), static_cast<int>(pair - b * static_cast<Index>(heads))};
}

// batch_head_at's pair as a row bh = b heads + h.
template <class Index>
MEMATTN_SM90_HOST_DEVICE Index bh_of_pair(Index pair, int batch, int heads, bool batch_inner) {
  if (!batch_inner) return pair;
  const Index h = pair / static_cast<Index>(batch);
  return (pair - h * static_cast<Index>(batch)) * static_cast<Index>(heads) + h;
}

// The key block (n_block) and (b, k/v head) index (bhk) of the dK/dV CTA with block index
// `block` (< num_n_blocks x bh_count). Other calls take one bhk's blocks after another, so the
// CTAs that run together read the same Q and dO from the L2. Causal calls instead take groups of
// kCausalGroupCtas / num_n_blocks bhk (about one wave of CTAs; the last group may be smaller)
// and, inside a group, every bhk's block 0 before any block 1 and so on: a key block sees the
// queries from its first key on, so the heavy blocks start first and the multiprocessors finish
// together (a simulation of the hardware's in-order dispatch: 5-6% shorter at 2k-4k queries with
// 16-64 key blocks a bhk), while the CTAs that run together still read a few bhk's Q and dO.
// (Every bhk's block 0 first, without groups, made the D = 256 causal backward 1.9x slower at
// 8 x 8 x 2048: L2 misses; NOTES.md, k1.)
struct KeyBlockIndex {
  int n_block;
  int bhk;
};
inline constexpr int kCausalGroupCtas = 128;  // about a wave on an H100's 132 multiprocessors
MEMATTN_SM90_HOST_DEVICE KeyBlockIndex key_block_of(unsigned block, int num_n_blocks, int bh_count,
                                                    bool causal) {
  if (!causal)
    return {static_cast<int>(block % num_n_blocks), static_cast<int>(block / num_n_blocks)};
  const int quotient = kCausalGroupCtas / num_n_blocks;
  const int group = quotient > 1 ? quotient : 1;
  const unsigned group_ctas = static_cast<unsigned>(group) * num_n_blocks;
  const int first = static_cast<int>(block / group_ctas) * group;
  const int size = group < bh_count - first ? group : bh_count - first;
  const int r = static_cast<int>(block % group_ctas);
  return {r / size, first + r % size};
}

}  // namespace memattn::cuda::sm90
