// wgmma shared-memory matrix descriptors (sm_90a) for the 128-byte-swizzled tiles of the sm90
// kernels (layout: the top of hopper.cuh). Plain integer arithmetic, compiled for the host too,
// so tests/cpp/test_sm90_descriptors.cpp checks it without a GPU.
//
// Fields (PTX ISA, "Matrix Descriptor Format"): bits 0-13 the start address / 16, 16-29 the
// leading dimension byte offset / 16, 32-45 the stride dimension byte offset / 16, 62-63 the
// swizzle mode (1: 128 bytes).
#pragma once

#include <cstdint>

#include "cuda/sm90/host_device.h"

namespace memattn::cuda::sm90 {

// Shared-memory matrix descriptor for a 128-byte-swizzled operand (hopper.cuh).
// K-major operands (rows of the tile along M/N, e.g. Q or K for Q K^T): 8-row groups are
// `stride_bytes` (1024) apart, `leading_bytes` is unused. N-major operands (V for P V, read
// transposed): `leading_bytes` steps to the next 64-column chunk, `stride_bytes` to the next
// 8 rows (1024).
MEMATTN_SM90_HOST_DEVICE std::uint64_t smem_desc(std::uint32_t addr, std::uint32_t leading_bytes,
                                                 std::uint32_t stride_bytes) {
  return static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<std::uint64_t>(leading_bytes >> 4) << 16 |
         static_cast<std::uint64_t>(stride_bytes >> 4) << 32 | 1ull << 62;  // 1: 128-byte swizzle
}

// `desc` moved `bytes` (a multiple of 16) further into shared memory: smem_desc(addr + bytes,
// ...) for desc = smem_desc(addr, ...). Only the start-address field changes, and as long as
// addr + bytes is a shared-memory address (below 2^18) it fits the field's 14 bits, so the sum
// never carries into the leading byte offset above it. A wgmma step's descriptor is thus one
// 32-bit add from its product's first, where rebuilding it from the address put four dependent
// uniform-datapath instructions before every wgmma (NOTES.md, d3).
MEMATTN_SM90_HOST_DEVICE std::uint64_t desc_advance(std::uint64_t desc, std::uint32_t bytes) {
  const std::uint32_t low = static_cast<std::uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | low;
}

}  // namespace memattn::cuda::sm90
