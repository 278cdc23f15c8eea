// The lists of key blocks that an attn_mask leaves visible, per query tile (params.h:
// MaskBlockList), written once per call before the sm90 general forward, which then runs only
// the listed blocks and skips the mask reads of the whole ones.
//
// One CTA per query tile of each (b, h) the mask distinguishes, a warp per key block (up to 32
// warps; more blocks are taken in turn). Each warp classifies its block: hidden (every value
// false or -inf), whole (every value true or 0.0) or partial. It reads the block 16 rows at a
// time and stops as soon as the block is partial, so a mask without structure (random values,
// a bias) costs about a 32nd of a read of the mask, and one with structure a read. Then warp 0
// writes the tile's counts and list in key order.
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/launch.h"

namespace memattn::cuda {
namespace {

constexpr int kMaxWarps = 32;
constexpr int kFirstRows = 2;     // rows read before the warp's first vote
constexpr int kRowsPerStep = 16;  // rows read before each later vote
constexpr int kMaxKeyBlocks =
    48 * 1024;  // a byte each in the 48 KB a launch gets without opting in
enum BlockClass : std::uint8_t { kHidden, kPartial, kWhole };

// How a mask value of each kind hides or changes a score, on its bits.
struct BoolValues {
  using Word = std::uint8_t;
  __device__ static bool hides(Word w) { return w == 0; }
  __device__ static bool changes(Word w) { return w == 0; }
};
// Additive masks: -inf hides, anything but +-0.0 changes (NaN too: it is neither).
template <class W, W kNegInf, W kMagnitude>
struct AdditiveValues {
  using Word = W;
  __device__ static bool hides(Word w) { return w == kNegInf; }
  __device__ static bool changes(Word w) { return (w & kMagnitude) != 0; }
};
using HalfValues = AdditiveValues<std::uint16_t, 0xfc00u, 0x7fffu>;
using Bf16Values = AdditiveValues<std::uint16_t, 0xff80u, 0x7fffu>;
using FloatValues = AdditiveValues<std::uint32_t, 0xff800000u, 0x7fffffffu>;

struct Geometry {
  int tile_rows, tiles, heads, key_blocks;  // tiles and heads: those the mask distinguishes
};

template <class Values, int kBlockKeys>
__global__ void __launch_bounds__(32 * kMaxWarps)
    mask_blocks_kernel(const __grid_constant__ DeviceParams p, MaskBlockList list, Geometry g) {
  using Word = typename Values::Word;
  extern __shared__ std::uint8_t classes[];  // [g.key_blocks]
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int m = static_cast<int>(blockIdx.x % g.tiles);
  const int bh = static_cast<int>(blockIdx.x / g.tiles);
  const int h = bh % g.heads, b = bh / g.heads;
  // A mask broadcast along queries has one row for every tile (and g.tiles == 1).
  const int row0 = p.mask_st[2] != 0 ? m * g.tile_rows : 0;
  const int rows = p.mask_st[2] != 0 ? min(g.tile_rows, p.Lq - row0) : 1;
  const Word* tile =
      static_cast<const Word*>(p.mask) + b * p.mask_st[0] + h * p.mask_st[1] + row0 * p.mask_st[2];
  for (int kb = warp; kb < g.key_blocks; kb += warps) {
    const int j0 = kb * kBlockKeys, cols = min(kBlockKeys, p.Lk - j0);
    bool visible = false, changed = false;  // this lane's values so far
    // Reads rows_per_step rows from r0 and says whether the block is partial so far.
    const auto read_rows = [&](auto rows_per_step, int r0) {
#pragma unroll
      for (int r = 0; r < decltype(rows_per_step)::value; ++r) {
#pragma unroll
        for (int c0 = 0; c0 < kBlockKeys; c0 += 32) {
          const int c = c0 + lane;
          if (r0 + r < rows && c < cols) {
            const Word w = tile[(r0 + r) * p.mask_st[2] + (j0 + c) * p.mask_st[3]];
            visible |= !Values::hides(w);
            changed |= Values::changes(w);
          }
        }
      }
      return __any_sync(0xffffffffu, visible) && __any_sync(0xffffffffu, changed);
    };
    // Two rows first: enough to find most blocks of a mask without structure partial.
    if (!read_rows(std::integral_constant<int, kFirstRows>{}, 0))
      for (int r0 = kFirstRows; r0 < rows; r0 += kRowsPerStep)
        if (read_rows(std::integral_constant<int, kRowsPerStep>{}, r0)) break;
    const bool any_visible = __any_sync(0xffffffffu, visible);
    const bool any_changed = __any_sync(0xffffffffu, changed);
    if (lane == 0) classes[kb] = !any_visible ? kHidden : any_changed ? kPartial : kWhole;
  }
  __syncthreads();
  if (warp != 0) return;
  std::int32_t* counts = list.at(b, h, m);
  std::int32_t* entries = list.entries(counts);
  int count = 0;
  bool skips = false;  // a block hidden or whole
  for (int kb0 = 0; kb0 < g.key_blocks; kb0 += 32) {
    const int kb = kb0 + lane;
    const bool block = kb < g.key_blocks;
    const BlockClass c = block ? static_cast<BlockClass>(classes[kb]) : kHidden;
    const std::uint32_t listed = __ballot_sync(0xffffffffu, c != kHidden);
    skips |= __any_sync(0xffffffffu, block && c != kPartial);
    const int before = count + __popc(listed & ((1u << lane) - 1));
    if (block) counts[kb] = before;
    if (c != kHidden) entries[before] = kb << 1 | (c == kWhole ? 1 : 0);
    count += __popc(listed);
  }
  if (lane == 0) {
    counts[g.key_blocks] = count;
    if (skips) *list.skips = 1;
  }
}

template <int kBlockKeys>
void launch_for_keys(const DeviceParams& p, const MaskBlockList& list, const Geometry& g,
                     std::int64_t ctas, bool bf16, cudaStream_t stream) {
  const int warps = g.key_blocks < kMaxWarps ? g.key_blocks : kMaxWarps;
  const auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(ctas), 32 * warps, g.key_blocks, stream>>>(p, list, g);
  };
  switch (p.mask_kind) {
    case MaskKind::boolean:
      launch(mask_blocks_kernel<BoolValues, kBlockKeys>);
      break;
    case MaskKind::additive:
      bf16 ? launch(mask_blocks_kernel<Bf16Values, kBlockKeys>)
           : launch(mask_blocks_kernel<HalfValues, kBlockKeys>);
      break;
    case MaskKind::additive_f32:
      launch(mask_blocks_kernel<FloatValues, kBlockKeys>);
      break;
    case MaskKind::none:
      return;
  }
  check_launch("mask_blocks_kernel");
}

}  // namespace

MaskBlockList launch_mask_blocks(const DeviceParams& p, int tile_rows, int block_keys, bool bf16,
                                 cudaStream_t stream) {
  MaskBlockList list;
  if (p.mask_blocks == nullptr || p.mask_kind == MaskKind::none || p.Lq == 0 || p.Lk == 0)
    return list;
  Geometry g;
  g.tile_rows = tile_rows;
  g.key_blocks = (p.Lk + block_keys - 1) / block_keys;
  if (g.key_blocks > kMaxKeyBlocks) return list;
  g.tiles = p.mask_st[2] != 0 ? (p.Lq + tile_rows - 1) / tile_rows : 1;
  g.heads = p.mask_st[1] != 0 ? p.Hq : 1;
  const int batch = p.mask_st[0] != 0 ? p.B : 1;
  const std::int64_t per_tile = 2 * static_cast<std::int64_t>(g.key_blocks) + 1;
  list.st[2] = p.mask_st[2] != 0 ? per_tile : 0;
  list.st[1] = p.mask_st[1] != 0 ? per_tile * g.tiles : 0;
  list.st[0] = p.mask_st[0] != 0 ? per_tile * g.tiles * g.heads : 0;
  const std::int64_t ctas = static_cast<std::int64_t>(batch) * g.heads * g.tiles;
  if (1 + ctas * per_tile > p.mask_block_words)
    throw Error(ErrorKind::invalid_value, "mask_block_scratch: the mask's key-block lists need " +
                                              std::to_string(1 + ctas * per_tile) +
                                              " 4-byte words, got " +
                                              std::to_string(p.mask_block_words));
  // Word 0 says whether any block is hidden or whole (MaskBlockList::skips), the lists follow.
  list.skips = p.mask_blocks;
  list.words = p.mask_blocks + 1;
  list.key_blocks = g.key_blocks;
  check_cuda(cudaMemsetAsync(list.skips, 0, sizeof(std::int32_t), stream),
             "cudaMemsetAsync(mask block lists)");
  if (block_keys == 128)
    launch_for_keys<128>(p, list, g, ctas, bf16, stream);
  else if (block_keys == 64)
    launch_for_keys<64>(p, list, g, ctas, bf16, stream);
  else
    throw Error(ErrorKind::invalid_value, "launch_mask_blocks: block_keys " +
                                              std::to_string(block_keys) +
                                              " (the kernels' blocks are 64 or 128 keys)");
  return list;
}

}  // namespace memattn::cuda
