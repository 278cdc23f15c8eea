// The sm90 forward's tile orders and the backward's key-block order (src/cuda/sm90/tile_order.h),
// checked on the host: each a bijection (of the snake walk's positions onto the tiles, of the
// dK/dV CTAs onto the key blocks); the paired order's two tiles of each full round's unit on one
// CTA, the light tiles after the full ones, causal key blocks heaviest first within groups of
// CTAs, and the balance of the work that makes each worth having; the two orders of the (b, head)
// pairs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

#include "cuda/sm90/tile_order.h"

namespace {

using memattn::cuda::sm90::batch_head_at;
using memattn::cuda::sm90::bh_of_pair;
using memattn::cuda::sm90::kCausalGroupCtas;
using memattn::cuda::sm90::key_block_of;
using memattn::cuda::sm90::light_tiles_last;
using memattn::cuda::sm90::paired_tile;

// Position of CTA c in round r of the forward's snake walk over g CTAs (forward.cuh,
// snake_tile).
std::uint32_t snake_position(std::uint32_t r, std::uint32_t g, std::uint32_t c) {
  return r * g + (r % 2 == 0 ? c : g - 1 - c);
}

// Query block of tile number t (heavy first within a bh: number j is block M - 1 - j).
int query_block(std::uint32_t t, int m_blocks) {
  return m_blocks - 1 - static_cast<int>(t % static_cast<std::uint32_t>(m_blocks));
}

std::int64_t pairs_of(int bh, int m_blocks) {
  return static_cast<std::int64_t>(bh) * (m_blocks / 2);
}

TEST(Sm90TileOrder, PairedOrderVisitsEveryTileOnce) {
  for (const int bh : {1, 2, 3, 7, 32, 64, 256})
    for (const int m_blocks : {1, 2, 3, 6, 11, 22, 43, 86})
      for (const std::uint32_t g : {1u, 5u, 66u, 132u, 264u}) {
        const auto tiles = static_cast<std::uint32_t>(bh * m_blocks);
        std::vector<int> seen(tiles, 0);
        for (std::uint32_t t = 0; t < tiles; ++t) {
          const std::uint32_t tile = paired_tile(t, g, m_blocks, pairs_of(bh, m_blocks));
          ASSERT_LT(tile, tiles) << "bh " << bh << " M " << m_blocks << " g " << g << " t " << t;
          ++seen[tile];
        }
        EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }))
            << "bh " << bh << " M " << m_blocks << " g " << g;
      }
}

TEST(Sm90TileOrder, WithoutPairsThePositionIsTheTile) {
  for (std::uint32_t t = 0; t < 1000; ++t) EXPECT_EQ(paired_tile(t, 132u, 11, 0), t);
}

TEST(Sm90TileOrder, AFullRoundsUnitGoesToOneCta) {
  // 64 bh of M = 43 query tiles (causal L = 8192 on 192-row tiles), 132 CTAs: 1344 pairs,
  // 10 full rounds of 132 units.
  const int bh = 64, m_blocks = 43;
  const std::uint32_t g = 132;
  const std::int64_t pairs = pairs_of(bh, m_blocks);
  for (std::uint32_t r = 0; r < static_cast<std::uint32_t>(pairs / g); ++r)
    for (std::uint32_t c = 0; c < g; ++c) {
      const std::uint32_t heavy = paired_tile(snake_position(2 * r, g, c), g, m_blocks, pairs);
      const std::uint32_t light = paired_tile(snake_position(2 * r + 1, g, c), g, m_blocks, pairs);
      EXPECT_EQ(heavy / m_blocks, light / m_blocks) << "round " << r << " CTA " << c;
      EXPECT_EQ(query_block(heavy, m_blocks) + query_block(light, m_blocks), m_blocks - 1)
          << "round " << r << " CTA " << c;
      EXPECT_GE(query_block(heavy, m_blocks), query_block(light, m_blocks));
    }
}

// The busiest CTA's work over the mean, tile cost = its causal key blocks (`tile_rows`-row
// tiles, 192-row ones ending at L, 128-row ones starting at 0; `block_keys`-key blocks) plus one
// for its fixed costs, as the order's comment states.
double busiest_over_mean(int bh, int length, std::uint32_t g, bool paired, int tile_rows = 192,
                         int block_keys = 128) {
  const bool end_aligned = tile_rows == 192;  // ForwardTraits::kEndAligned: the wide tiles
  const int m_blocks = (length + tile_rows - 1) / tile_rows;
  const auto tiles = static_cast<std::uint32_t>(bh * m_blocks);
  const std::int64_t pairs = paired ? pairs_of(bh, m_blocks) : 0;
  std::vector<double> work(g, 0.0);
  for (std::uint32_t r = 0; r * g < tiles; ++r)
    for (std::uint32_t c = 0; c < g; ++c) {
      const std::uint32_t t = snake_position(r, g, c);
      if (t >= tiles) continue;
      const int m = query_block(paired_tile(t, g, m_blocks, pairs), m_blocks);
      const int last_row = end_aligned ? length - (m_blocks - m) * tile_rows + tile_rows - 1
                                       : std::min(length, (m + 1) * tile_rows) - 1;
      work[c] += last_row / block_keys + 1 + 1;
    }
  const double total = std::accumulate(work.begin(), work.end(), 0.0);
  return *std::max_element(work.begin(), work.end()) / (total / g);
}

TEST(Sm90TileOrder, PairsBalanceCausalTilesWhereTheSnakeDoesNot) {
  // The sweep's causal rows at L = 8192 (64 bh) and 16384 (32 bh) on 132 CTAs, wide tiles.
  EXPECT_GT(busiest_over_mean(64, 8192, 132, false), 1.15);
  EXPECT_LT(busiest_over_mean(64, 8192, 132, true), 1.06);
  EXPECT_GT(busiest_over_mean(32, 16384, 132, false), 1.2);
  EXPECT_LT(busiest_over_mean(32, 16384, 132, true), 1.06);
  EXPECT_LT(busiest_over_mean(256, 2048, 132, true), 1.04);
  // 128-row tiles: D = 128 at L = 16384 (16 bh), D = 256 (64-key blocks) at L = 8192 (16 bh)
  // and 16384 (8 bh).
  EXPECT_GT(busiest_over_mean(16, 16384, 132, false, 128, 128), 1.5);
  EXPECT_LT(busiest_over_mean(16, 16384, 132, true, 128, 128), 1.04);
  EXPECT_GT(busiest_over_mean(16, 8192, 132, false, 128, 64), 1.5);
  EXPECT_LT(busiest_over_mean(16, 8192, 132, true, 128, 64), 1.04);
  EXPECT_GT(busiest_over_mean(8, 16384, 132, false, 128, 64), 1.7);
  EXPECT_LT(busiest_over_mean(8, 16384, 132, true, 128, 64), 1.1);
}

TEST(Sm90TileOrder, LightTilesLastVisitsEveryTileOnce) {
  for (const int bh : {1, 2, 3, 7, 32, 128, 512})
    for (const int m_blocks : {2, 3, 6, 11, 43}) {
      const auto tiles = static_cast<std::uint32_t>(bh * m_blocks);
      std::vector<int> seen(tiles, 0);
      for (std::uint32_t t = 0; t < tiles; ++t) {
        const std::uint32_t tile = light_tiles_last(t, tiles, m_blocks);
        ASSERT_LT(tile, tiles) << "bh " << bh << " M " << m_blocks << " t " << t;
        ++seen[tile];
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }))
          << "bh " << bh << " M " << m_blocks;
    }
}

TEST(Sm90TileOrder, LightTilesComeLastInReverseBhOrder) {
  const int bh = 128, m_blocks = 6;
  const auto tiles = static_cast<std::uint32_t>(bh * m_blocks);
  const std::uint32_t full = tiles - bh;
  for (std::uint32_t t = 0; t < tiles; ++t) {
    const std::uint32_t tile = light_tiles_last(t, tiles, m_blocks);
    if (t < full) {  // full tiles in bh order, each bh's M - 1 of them together
      EXPECT_NE(query_block(tile, m_blocks), 0) << "t " << t;
      EXPECT_EQ(tile / m_blocks, t / (m_blocks - 1)) << "t " << t;
    } else {
      EXPECT_EQ(query_block(tile, m_blocks), 0) << "t " << t;
      EXPECT_EQ(tile / m_blocks, static_cast<std::uint32_t>(bh) - 1 - (t - full)) << "t " << t;
    }
  }
}

// The busiest CTA's work over the mean for a non-causal call whose first query block is a
// light tile of cost `light` (a full tile: 1).
double busiest_over_mean_light(int bh, int m_blocks, std::uint32_t g, double light, bool last) {
  const auto tiles = static_cast<std::uint32_t>(bh * m_blocks);
  std::vector<double> work(g, 0.0);
  for (std::uint32_t r = 0; r * g < tiles; ++r)
    for (std::uint32_t c = 0; c < g; ++c) {
      const std::uint32_t t = snake_position(r, g, c);
      if (t >= tiles) continue;
      const std::uint32_t tile = last ? light_tiles_last(t, tiles, m_blocks) : t;
      work[c] += query_block(tile, m_blocks) == 0 ? light : 1.0;
    }
  const double total = std::accumulate(work.begin(), work.end(), 0.0);
  return *std::max_element(work.begin(), work.end()) / (total / g);
}

TEST(Sm90TileOrder, LightTilesLastBalanceWhereTheSnakeDoesNot) {
  // Lq = 1024 on 192-row tiles (M = 6, the first tile's 64 rows on one warpgroup of three) for
  // 128 and 512 bh, and Lq = 2048 (M = 11, two of three) for 256 bh, on 132 CTAs.
  for (const double light : {1.0 / 3, 0.5}) {
    EXPECT_GT(busiest_over_mean_light(128, 6, 132, light, false), 1.12);
    EXPECT_LT(busiest_over_mean_light(128, 6, 132, light, true), 1.04);
    EXPECT_GT(busiest_over_mean_light(512, 6, 132, light, false), 1.12);
    EXPECT_LT(busiest_over_mean_light(512, 6, 132, light, true), 1.04);
  }
  EXPECT_GT(busiest_over_mean_light(256, 11, 132, 2.0 / 3, false), 1.06);
  EXPECT_LT(busiest_over_mean_light(256, 11, 132, 2.0 / 3, true), 1.04);
}

// ---- the backward's dK/dV key-block order ----

TEST(Sm90KeyBlockOrder, EveryKeyBlockOnce) {
  for (const bool causal : {false, true})
    for (const int bh : {1, 3, 8, 64, 100, 129})
      for (const int n : {1, 2, 15, 16, 32, 64, 127, 128, 129, 300}) {
        std::vector<int> seen(static_cast<std::size_t>(bh) * n, 0);
        for (unsigned block = 0; block < static_cast<unsigned>(bh * n); ++block) {
          const auto kb = key_block_of(block, n, bh, causal);
          ASSERT_TRUE(kb.n_block >= 0 && kb.n_block < n && kb.bhk >= 0 && kb.bhk < bh)
              << block << " " << bh << " " << n << " " << causal;
          ++seen[static_cast<std::size_t>(kb.bhk) * n + kb.n_block];
        }
        EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }))
            << "bh " << bh << ", blocks " << n << ", causal " << causal;
      }
}

TEST(Sm90KeyBlockOrder, NonCausalTakesOneBhkAfterAnother) {
  for (unsigned block = 0; block < 7u * 33u; ++block) {
    const auto kb = key_block_of(block, 33, 7, false);
    EXPECT_EQ(kb.n_block, static_cast<int>(block % 33));
    EXPECT_EQ(kb.bhk, static_cast<int>(block / 33));
  }
}

TEST(Sm90KeyBlockOrder, CausalGroupsTakeHeavyBlocksFirst) {
  for (const int bh : {1, 5, 64, 100})
    for (const int n : {1, 16, 32, 64, 128, 200}) {
      const int group = std::max(1, kCausalGroupCtas / n);
      const unsigned group_ctas = static_cast<unsigned>(group) * n;
      for (unsigned block = 1; block < static_cast<unsigned>(bh * n); ++block) {
        const auto kb = key_block_of(block, n, bh, true),
                   prev = key_block_of(block - 1, n, bh, true);
        const int first = static_cast<int>(block / group_ctas) * group;
        ASSERT_TRUE(kb.bhk >= first && kb.bhk < first + group) << block;  // the group's bhk
        if (block % group_ctas != 0) {
          EXPECT_GE(kb.n_block, prev.n_block) << block << " " << n;
        }
      }
    }
}

// The hardware's in-order dispatch of the dK/dV CTAs onto 132 multiprocessors, each CTA to the
// first one free; a CTA of a top-left causal call with Lq = Lk costs 87 + 34 per query block it
// sees (the fit of the D = 256 kernel's times, in 0.1 us: 8.7 us per CTA, 3.4 us per step).
long makespan(int bh, int n, bool causal) {
  std::priority_queue<long, std::vector<long>, std::greater<>> free_at;
  for (int sm = 0; sm < 132; ++sm) free_at.push(0);
  long end = 0;
  for (unsigned block = 0; block < static_cast<unsigned>(bh * n); ++block) {
    const auto kb = key_block_of(block, n, bh, causal);
    const long start = free_at.top();
    free_at.pop();
    const long finish = start + 87 + 34L * (n - kb.n_block);
    free_at.push(finish);
    end = std::max(end, finish);
  }
  return end;
}

TEST(Sm90KeyBlockOrder, CausalOrderShortensTheSimulatedDispatch) {
  // (bhk, key blocks): 2k, 4k and 8k queries at D = 256 (64 keys a CTA), 2k at D = 128.
  for (const auto& [bh, n] : {std::pair{64, 32}, {32, 64}, {128, 16}})
    EXPECT_LT(makespan(bh, n, true), 0.97 * makespan(bh, n, false)) << bh << " x " << n;
  EXPECT_LE(makespan(16, 128, true), makespan(16, 128, false));  // one bhk a group: the same
}

}  // namespace

TEST(Sm90BatchHeadOrder, BothOrdersVisitEveryPairOnce) {
  for (const bool batch_inner : {false, true})
    for (const auto& [batch, heads] : {std::pair{1, 1}, {1, 7}, {5, 1}, {3, 4}, {8, 32}}) {
      std::vector<int> seen(static_cast<std::size_t>(batch * heads), 0);
      for (std::uint32_t pair = 0; pair < seen.size(); ++pair) {
        const auto at = batch_head_at(pair, batch, heads, batch_inner);
        ASSERT_GE(at.b, 0);
        ASSERT_LT(at.b, batch);
        ASSERT_GE(at.h, 0);
        ASSERT_LT(at.h, heads);
        ++seen[static_cast<std::size_t>(at.b * heads + at.h)];
        // bh_of_pair names the same pair as a row b heads + h.
        EXPECT_EQ(bh_of_pair(pair, batch, heads, batch_inner),
                  static_cast<std::uint32_t>(at.b * heads + at.h));
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }))
          << batch << " x " << heads << ", batch_inner " << batch_inner;
    }
}

TEST(Sm90BatchHeadOrder, BatchInnerTakesOneHeadsBatchElementsTogether) {
  // b outer: pair = b heads + h (the layouts' order); b inner: pair = h batch + b, so the
  // pairs that run together share a head (and a mask broadcast over b).
  const int batch = 3, heads = 4;
  for (std::int64_t pair = 0; pair < batch * heads; ++pair) {
    const auto outer = batch_head_at(pair, batch, heads, false);
    EXPECT_EQ(outer.b, pair / heads);
    EXPECT_EQ(outer.h, pair % heads);
    const auto inner = batch_head_at(pair, batch, heads, true);
    EXPECT_EQ(inner.b, pair % batch);
    EXPECT_EQ(inner.h, pair / batch);
  }
  EXPECT_EQ(bh_of_pair<std::int64_t>(5, batch, heads, false), 5);
  EXPECT_EQ(bh_of_pair<std::int64_t>(5, batch, heads, true), 2 * heads + 1);  // b 2, h 1
}
