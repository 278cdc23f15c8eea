// The sm90 kernels' wgmma shared-memory descriptors (src/cuda/sm90/smem_desc.h), checked on the
// host: the field layout of smem_desc, and desc_advance, which the products use to step along
// K, against smem_desc of the moved address for every 16-byte-aligned shared-memory address.
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/sm90/smem_desc.h"

namespace {

using memattn::cuda::sm90::desc_advance;
using memattn::cuda::sm90::smem_desc;

// Largest dynamic shared memory an sm_90 CTA can use (227 KB) plus the 1 KB the kernels keep
// for aligning their tiles: every tile address lies below it.
constexpr std::uint32_t kSharedBytes = 228 * 1024;

TEST(Sm90Descriptors, FieldsFollowThePtxLayout) {
  const std::uint64_t d = smem_desc(0x12340, 8192, 1024);
  EXPECT_EQ(d & 0x3FFF, 0x1234u);             // bits 0-13: start address / 16
  EXPECT_EQ((d >> 14) & 0x3, 0u);             // bits 14-15: reserved
  EXPECT_EQ((d >> 16) & 0x3FFF, 8192u / 16);  // bits 16-29: leading byte offset / 16
  EXPECT_EQ((d >> 32) & 0x3FFF, 1024u / 16);  // bits 32-45: stride byte offset / 16
  EXPECT_EQ(d >> 62, 1u);                     // bits 62-63: 128-byte swizzle
  EXPECT_EQ(d & 0x3FFFC000C000C000ull, 0u);   // every other bit clear
}

TEST(Sm90Descriptors, AdvanceEqualsTheDescriptorOfTheMovedAddress) {
  // Leading byte offsets of the kernels' operands: unused (16) for K-major tiles, one column
  // chunk of 64 to 256 rows for M/N-major ones; the largest, 256 x 128 bytes, is also checked
  // with the highest addresses, where a carry out of the start field would reach it.
  for (const std::uint32_t leading : {16u, 64u * 128u, 128u * 128u, 256u * 128u}) {
    std::uint64_t mismatches = 0;
    for (std::uint32_t addr = 0; addr < kSharedBytes; addr += 16) {
      const std::uint64_t base = smem_desc(addr, leading, 1024);
      for (std::uint32_t bytes = 0; addr + bytes < kSharedBytes; bytes += 16 * 7)
        mismatches += desc_advance(base, bytes) != smem_desc(addr + bytes, leading, 1024);
    }
    EXPECT_EQ(mismatches, 0u) << "leading byte offset " << leading;
  }
}

TEST(Sm90Descriptors, AdvanceByTheKernelsStepsFromTheLastTile) {
  // The steps the products take (tiles.cuh): 32 bytes within a 128-byte row, a column chunk of
  // 64 to 256 rows (K-major), 16 rows (2048 bytes, M/N-major), from tiles that end at the top
  // of shared memory.
  for (const std::uint32_t step : {32u, 64u * 128u, 128u * 128u, 256u * 128u, 2048u}) {
    for (std::uint32_t steps = 1; steps * step < kSharedBytes; ++steps) {
      const std::uint32_t addr = (kSharedBytes - steps * step - 16) & ~15u;
      const std::uint64_t base = smem_desc(addr, 256 * 128, 1024);
      EXPECT_EQ(desc_advance(base, steps * step), smem_desc(addr + steps * step, 256 * 128, 1024))
          << "address " << addr << ", " << steps << " steps of " << step << " bytes";
    }
  }
}

}  // namespace
