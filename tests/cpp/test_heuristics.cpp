// The CPU backend's tile and split heuristics are pure functions: check their invariants.
#include <gtest/gtest.h>

#include "cpu/heuristics.h"

namespace memattn::cpu {
namespace {

TEST(Heuristics, TilesArePositiveAndShrinkForWideHeads) {
  for (std::int64_t d : {1, 17, 64, 128, 129, 256}) {
    const CpuTiles f = forward_tiles(d, d), b = backward_tiles(d, d);
    EXPECT_GT(f.block_q, 0);
    EXPECT_GT(f.block_k, 0);
    EXPECT_GT(b.block_q, 0);
    EXPECT_GT(b.block_k, 0);
  }
  EXPECT_LT(forward_tiles(256, 256).block_k, forward_tiles(64, 64).block_k);
}

TEST(Heuristics, NoSplitWhenUnitsFillTheThreads) {
  EXPECT_EQ(key_splits(/*units=*/64, /*key_blocks=*/32, /*num_threads=*/8), 1);
  EXPECT_EQ(key_splits(16, 32, 8), 1);
}

TEST(Heuristics, SplitsGiveEveryThreadWorkButNeverExceedKeyBlocks) {
  EXPECT_EQ(key_splits(1, 64, 8), 16);  // two tasks per thread
  EXPECT_EQ(key_splits(1, 3, 8), 3);    // capped by the key blocks
  EXPECT_EQ(key_splits(3, 100, 2), 2);
  EXPECT_EQ(key_splits(1, 1, 8), 1);
  EXPECT_EQ(key_splits(0, 10, 8), 1);
  EXPECT_EQ(key_splits(1, 10, 0), 2);  // a thread count below 1 counts as 1
}

TEST(Heuristics, RowwiseForwardOnlyForFewQueryRows) {
  EXPECT_TRUE(forward_is_rowwise(1));
  EXPECT_TRUE(forward_is_rowwise(8));
  EXPECT_FALSE(forward_is_rowwise(9));
  EXPECT_FALSE(forward_is_rowwise(4096));
}

}  // namespace
}  // namespace memattn::cpu
