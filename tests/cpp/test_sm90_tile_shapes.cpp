// The sm90 forward's tile-shape rules (src/cuda/launch.h): functions of the call's shape and the
// MEMATTN_SM90_D64_TILES override, checked on the host (no GPU needed); the CUDA tests check that
// explain names the shape a call runs and that every shape computes any call.
#include <gtest/gtest.h>

#if MEMATTN_HAVE_CUDA
#include <cstdint>
#include <optional>

#include "cuda/launch.h"
#include "test_support.h"

namespace {

using memattn::ErrorKind;
using memattn::cuda::sm90_d256_narrow_blocks;
using memattn::cuda::sm90_d64_tile_shape;
using memattn::cuda::sm90_tile_shape;
using memattn::cuda::TileShape;
using memattn_test::ScopedEnv;
using memattn_test::ThrowsError;

constexpr const char* kOverride = "MEMATTN_SM90_D64_TILES";

TEST(Sm90TileShapes, D64CausalCallsWithManyTilesOnTheirDiagonalTakeNarrowBlocks) {
  const ScopedEnv none(kOverride, std::nullopt);
  // bh, Lq, Lk, causal: 4096 query tiles of 64 rows and more, Lk <= Lq, below the wide tiles
  EXPECT_EQ(sm90_d64_tile_shape(32 * 32, 512, 512, true), TileShape::narrow);
  EXPECT_EQ(sm90_d64_tile_shape(256, 1024, 1024, true), TileShape::narrow);
  EXPECT_EQ(sm90_d64_tile_shape(256, 1000, 900, true), TileShape::narrow);
  EXPECT_EQ(sm90_d64_tile_shape(255, 1024, 1024, true), TileShape::standard);  // 4080 tiles
  EXPECT_EQ(sm90_d64_tile_shape(1024, 512, 513, true), TileShape::standard);   // Lk > Lq
  EXPECT_EQ(sm90_d64_tile_shape(1024, 512, 512, false), TileShape::standard);
  EXPECT_EQ(sm90_d64_tile_shape(1024, 512, 80, true), TileShape::short_keys);
  EXPECT_EQ(sm90_d64_tile_shape(1024, 1536, 1536, true), TileShape::wide);
  EXPECT_EQ(sm90_d64_tile_shape(2, 1536, 1536, true), TileShape::wide);  // causal: no count
}

TEST(Sm90TileShapes, D64NonCausalWideTilesNeedLengthKeysAndAtLeast256Tiles) {
  const ScopedEnv none(kOverride, std::nullopt);
  EXPECT_EQ(sm90_d64_tile_shape(64, 768, 768, false), TileShape::wide);  // 64 x 4 tiles
  EXPECT_EQ(sm90_d64_tile_shape(63, 768, 768, false), TileShape::standard);
  EXPECT_EQ(sm90_d64_tile_shape(1024, 767, 768, false), TileShape::standard);
  EXPECT_EQ(sm90_d64_tile_shape(1024, 1024, 384, false), TileShape::standard);
  EXPECT_EQ(sm90_d64_tile_shape(1024, 1024, 385, false), TileShape::wide);
  EXPECT_EQ(sm90_d64_tile_shape(8, 4096, 4096, false), TileShape::standard);  // 8 x 22 tiles
  EXPECT_EQ(sm90_d64_tile_shape(32, 16384, 16384, false), TileShape::wide);
}

TEST(Sm90TileShapes, TheOverrideForcesEachShapeAndRejectsOtherValues) {
  for (const char* name : {"standard", "wide", "short_keys", "narrow"}) {
    const ScopedEnv forced(kOverride, name);
    const TileShape shape = sm90_d64_tile_shape(1, 1, 1000, false);
    EXPECT_STREQ(memattn::cuda::kTileShapeNames[static_cast<int>(shape)], name);
  }
  const ScopedEnv empty(kOverride, "");
  EXPECT_EQ(sm90_d64_tile_shape(1, 1, 1000, false), TileShape::standard);  // empty: the rules
  const ScopedEnv bogus(kOverride, "square");
  EXPECT_TRUE(ThrowsError([] { sm90_d64_tile_shape(1, 1, 1000, false); }, ErrorKind::runtime,
                          kOverride, {"square", "expected standard, wide, short_keys or narrow"}));
}

TEST(Sm90TileShapes, D256NarrowBlocksWhereEightyKeyBlocksComputeOver7PercentMoreColumns) {
  for (std::int64_t lk = 1; lk <= 4096; ++lk) {
    const std::int64_t cols64 = (lk + 63) / 64 * 64, cols80 = (lk + 79) / 80 * 80;
    EXPECT_EQ(sm90_d256_narrow_blocks(lk), cols64 < 0.93 * cols80) << "Lk = " << lk;
  }
  EXPECT_TRUE(sm90_d256_narrow_blocks(512));  // seven 80-key blocks, the last with 32 keys
  EXPECT_FALSE(sm90_d256_narrow_blocks(640));
  EXPECT_FALSE(sm90_d256_narrow_blocks(1024));
  for (std::int64_t lk = 577; lk <= 1 << 20; lk += 7) EXPECT_FALSE(sm90_d256_narrow_blocks(lk));
}

TEST(Sm90TileShapes, EachHeadDimBucketTakesItsOwnRules) {
  const ScopedEnv none(kOverride, std::nullopt);
  EXPECT_EQ(sm90_tile_shape(256, 32 * 8, 512, 512, false), TileShape::narrow);
  EXPECT_EQ(sm90_tile_shape(256, 32 * 8, 1024, 1024, false), TileShape::standard);
  EXPECT_EQ(sm90_tile_shape(64, 32 * 32, 512, 512, true), TileShape::narrow);
  EXPECT_EQ(sm90_tile_shape(64, 256, 1024, 1024, false), TileShape::wide);
  for (const std::int64_t lk : {1, 64, 77, 512, 4096})
    EXPECT_EQ(sm90_tile_shape(128, 1024, 1024, lk, true), TileShape::standard);
  const ScopedEnv forced(kOverride, "wide");  // the override is the D = 64 forward's only
  EXPECT_EQ(sm90_tile_shape(128, 1, 1, 1000, false), TileShape::standard);
  EXPECT_EQ(sm90_tile_shape(256, 1, 1, 1000, false), TileShape::standard);
  EXPECT_EQ(sm90_tile_shape(64, 1, 1, 1000, false), TileShape::wide);
}

}  // namespace
#endif  // MEMATTN_HAVE_CUDA
