// Which blocks of the attention an attn_mask hides, written once per call before the sm90
// kernels that skip them (params.h):
// - MaskBlockList (launch_mask_blocks), before the general forward: per query tile, the key
//   blocks with a visible key, each flagged whole where the mask changes no score; the forward
//   runs only those and skips the mask reads of whole ones.
// - MaskStepList (launch_mask_steps), before the single-pass backward: per key block of each
//   (b, k/v head), the steps (query head, query block) with a visible pair.
//
// Both classify rectangles of the mask (a query block x a key block) the same way: hidden
// (every value false or -inf), whole (every value true or 0.0) or partial. A warp reads two
// rows, then 16 rows at a time, and stops as soon as the rectangle is partial, so a mask without
// structure (random values, a bias) costs a small part of a read of the mask, and one with
// structure a read (16 bytes per lane where the mask's rows allow, else one value per lane). A
// CTA's 16 warps take its rectangles in turn, several warps to a rectangle (slices of its rows)
// where there are fewer rectangles than warps. Then warp 0 compacts the CTA's rectangles into
// its list.
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/common/semantics.cuh"
#include "cuda/launch.h"

namespace memattn::cuda {
namespace {

constexpr int kMaxWarps = 16;
constexpr int kFirstRows = 2;     // rows read before the warp's first vote
constexpr int kRowsPerStep = 16;  // rows read before each later vote
constexpr int kMaxRectangles =
    12 * 1024;  // a word each in the 48 KB a launch gets without opting in
enum BlockClass : std::uint8_t { kHidden, kPartial, kWhole };

// How a mask value of each kind hides or changes a score, on its bits: one value (Word), or
// the values packed in a 32-bit word (the 16-byte loads of aligned masks).
struct BoolValues {
  using Word = std::uint8_t;
  __device__ static bool hides(Word w) { return w == 0; }
  __device__ static bool changes(Word w) { return w == 0; }
  __device__ static bool any_visible(std::uint32_t v) { return v != 0; }
  __device__ static bool any_changes(std::uint32_t v) { return __vcmpeq4(v, 0) != 0; }
};
// Additive masks: -inf hides, anything but +-0.0 changes (NaN too: it is neither).
template <class W, W kNegInf, W kMagnitude>
struct AdditiveValues {
  using Word = W;
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(W));
  static constexpr std::uint32_t kNegInfs = kPerWord == 2 ? kNegInf * 0x10001u : kNegInf;
  static constexpr std::uint32_t kMagnitudes = kPerWord == 2 ? kMagnitude * 0x10001u : kMagnitude;
  __device__ static bool hides(Word w) { return w == kNegInf; }
  __device__ static bool changes(Word w) { return (w & kMagnitude) != 0; }
  __device__ static bool any_visible(std::uint32_t v) {
    if constexpr (kPerWord == 2) return __vcmpne2(v, kNegInfs) != 0;
    return v != kNegInfs;
  }
  __device__ static bool any_changes(std::uint32_t v) { return (v & kMagnitudes) != 0; }
};
using HalfValues = AdditiveValues<std::uint16_t, 0xfc00u, 0x7fffu>;
using Bf16Values = AdditiveValues<std::uint16_t, 0xff80u, 0x7fffu>;
using FloatValues = AdditiveValues<std::uint32_t, 0xff800000u, 0x7fffffffu>;

// The class of the mask's rectangle rows [0, rows) x keys [j0, j0 + cols) from `rows0` (the
// mask at its (b, h) and first row), cols <= kBlockKeys, read by one warp (every lane gets it).
// `vector`: the mask's rows start on 16-byte boundaries with contiguous keys
// (mask_rows_16_byte_aligned; rectangles start at multiples of 64 keys), so a full-width
// rectangle is read 16 bytes per lane, several rows per warp instruction; otherwise one value
// per lane.
template <class Values, int kBlockKeys>
__device__ BlockClass classify(const DeviceParams& p, const typename Values::Word* rows0, int rows,
                               int j0, int cols, bool vector, int lane) {
  using Word = typename Values::Word;
  constexpr int kLanesPerRow = kBlockKeys * static_cast<int>(sizeof(Word)) / 16;
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;
  static_assert(kLanesPerRow >= 1 && kLanesPerRow <= 32);
  vector = vector && cols == kBlockKeys;
  bool visible = false, changed = false;  // this lane's values so far
  // Reads rows_per_step rows from r0 and says whether the rectangle is partial so far.
  const auto read_rows = [&](auto rows_per_step, int r0) {
    constexpr int kRows = decltype(rows_per_step)::value;
    if (vector) {
#pragma unroll
      for (int r = lane / kLanesPerRow; r < kRows; r += kRowsPerLoad) {
        if (r0 + r < rows) {
          const uint4 v = *reinterpret_cast<const uint4*>(
              rows0 + (r0 + r) * p.mask_st[2] + j0 + 16 / sizeof(Word) * (lane % kLanesPerRow));
          visible |= Values::any_visible(v.x) || Values::any_visible(v.y) ||
                     Values::any_visible(v.z) || Values::any_visible(v.w);
          changed |= Values::any_changes(v.x) || Values::any_changes(v.y) ||
                     Values::any_changes(v.z) || Values::any_changes(v.w);
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int c0 = 0; c0 < kBlockKeys; c0 += 32) {
          const int c = c0 + lane;
          if (r0 + r < rows && c < cols) {
            const auto w = rows0[(r0 + r) * p.mask_st[2] + (j0 + c) * p.mask_st[3]];
            visible |= !Values::hides(w);
            changed |= Values::changes(w);
          }
        }
      }
    }
    return __any_sync(0xffffffffu, visible) && __any_sync(0xffffffffu, changed);
  };
  // Two rows first: enough to find most rectangles of a mask without structure partial.
  if (!read_rows(std::integral_constant<int, kFirstRows>{}, 0))
    for (int r0 = kFirstRows; r0 < rows; r0 += kRowsPerStep)
      if (read_rows(std::integral_constant<int, kRowsPerStep>{}, r0)) break;
  const bool any_visible = __any_sync(0xffffffffu, visible);
  const bool any_changed = __any_sync(0xffffffffu, changed);
  return !any_visible ? kHidden : any_changed ? kPartial : kWhole;
}

// The mask's rows of (b, h) from row0; a mask broadcast along queries has one row for all.
template <class Word>
__device__ const Word* mask_rows(const DeviceParams& p, int b, int h, int row0) {
  return static_cast<const Word*>(p.mask) + b * p.mask_st[0] + h * p.mask_st[1] +
         row0 * p.mask_st[2];
}

// Rows of the query block of `block_rows` rows from row0 that the mask holds: 1 where it is
// broadcast along queries.
__device__ int mask_block_rows(const DeviceParams& p, int block_rows, int row0) {
  return p.mask_st[2] != 0 ? min(block_rows, p.Lq - row0) : 1;
}

// What the slices of a rectangle saw, or-ed together per rectangle in shared memory.
constexpr std::uint32_t kSeenVisible = 1, kSeenChanged = 2;
__device__ BlockClass class_of(std::uint32_t seen) {
  return (seen & kSeenVisible) == 0 ? kHidden : (seen & kSeenChanged) != 0 ? kPartial : kWhole;
}

// Classifies `count` rectangles with the CTA's warps into seen[0, count) (shared memory, class_of
// reads them), where rectangle r is rows [0, rows) x keys [j0, j0 + cols) of the mask from
// rows0 (rect(r) gives {rows0, rows, j0, cols}). Fewer rectangles than warps: each rectangle's
// rows are split into slices, one warp each, so that small masks do not leave warps idle (a
// [L, L] mask has few CTAs) and whole rectangles are read in parallel.
template <class Values, int kBlockKeys, class Rect>
__device__ void classify_rectangles(const DeviceParams& p, int count, const Rect& rect,
                                    bool vector_rows, std::uint32_t* seen) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warps = static_cast<int>(blockDim.x) / 32;
  for (int r = static_cast<int>(threadIdx.x); r < count; r += static_cast<int>(blockDim.x))
    seen[r] = 0;
  __syncthreads();
  const int slices = count < warps ? warps / count : 1;
  for (int w = warp; w < count * slices; w += warps) {
    const int r = w % count, slice = w / count;
    const auto [rows0, rows, j0, cols] = rect(r);
    const int slice_rows = (rows + slices - 1) / slices, row0 = slice * slice_rows;
    if (row0 >= rows) continue;
    const BlockClass c = classify<Values, kBlockKeys>(
        p, rows0 + row0 * p.mask_st[2], min(slice_rows, rows - row0), j0, cols, vector_rows, lane);
    if (lane == 0)
      atomicOr(seen + r, (c != kHidden ? kSeenVisible : 0u) | (c != kWhole ? kSeenChanged : 0u));
  }
  __syncthreads();
}

template <class Word>
struct Rectangle {
  const Word* rows0;
  int rows, j0, cols;
};

struct Geometry {
  int tile_rows, tiles, heads, key_blocks;  // tiles and heads: those the mask distinguishes
  bool vector_rows;
};

// MaskBlockList: one CTA per query tile of each (b, h) the mask distinguishes; its rectangles
// are the tile's key blocks.
template <class Values, int kBlockKeys>
__global__ void __launch_bounds__(32 * kMaxWarps)
    mask_blocks_kernel(const __grid_constant__ DeviceParams p, MaskBlockList list, Geometry g) {
  using Word = typename Values::Word;
  extern __shared__ std::uint32_t seen[];  // [g.key_blocks]
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int m = static_cast<int>(blockIdx.x % g.tiles);
  const int bh = static_cast<int>(blockIdx.x / g.tiles);
  const int h = bh % g.heads, b = bh / g.heads;
  const int row0 = p.mask_st[2] != 0 ? m * g.tile_rows : 0;
  const Word* rows0 = mask_rows<Word>(p, b, h, row0);
  const int rows = mask_block_rows(p, g.tile_rows, row0);
  classify_rectangles<Values, kBlockKeys>(
      p, g.key_blocks,
      [&](int kb) {
        const int j0 = kb * kBlockKeys;
        return Rectangle<Word>{rows0, rows, j0, min(kBlockKeys, p.Lk - j0)};
      },
      g.vector_rows, seen);
  if (warp != 0) return;
  std::int32_t* counts = list.at(b, h, m);
  std::int32_t* entries = list.entries(counts);
  int count = 0;
  bool skips = false;  // a block hidden or whole
  for (int kb0 = 0; kb0 < g.key_blocks; kb0 += 32) {
    const int kb = kb0 + lane;
    const bool block = kb < g.key_blocks;
    const BlockClass c = block ? class_of(seen[kb]) : kHidden;
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

struct StepGeometry {
  int block_queries, query_blocks;  // of the dK/dV kernel's steps
  int key_blocks;                   // of kBlockKeys keys
  int heads;                        // k/v heads the mask distinguishes (Hk or 1)
  int mask_heads;                   // query heads per k/v head the mask distinguishes (group or 1)
  int mask_query_blocks;            // query blocks the mask distinguishes (query_blocks or 1)
  bool vector_rows;
};

// MaskStepList: one CTA per key block of each (b, k/v head) the mask distinguishes; its
// rectangles are the (query head of the group, query block) pairs that the mask distinguishes.
template <class Values, int kBlockKeys>
__global__ void __launch_bounds__(32 * kMaxWarps)
    mask_steps_kernel(const __grid_constant__ DeviceParams p, MaskStepList list, StepGeometry g) {
  using Word = typename Values::Word;
  extern __shared__ std::uint32_t seen[];  // [mask_heads][mask_query_blocks]
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int n = static_cast<int>(blockIdx.x % g.key_blocks);
  const int bhk = static_cast<int>(blockIdx.x / g.key_blocks);
  const int hk = bhk % g.heads, b = bhk / g.heads;
  const int j0 = n * kBlockKeys, cols = min(kBlockKeys, p.Lk - j0);
  classify_rectangles<Values, kBlockKeys>(
      p, g.mask_heads * g.mask_query_blocks,
      [&](int r) {
        const int hg = r / g.mask_query_blocks, qb = r % g.mask_query_blocks;
        const int row0 = p.mask_st[2] != 0 ? qb * g.block_queries : 0;
        return Rectangle<Word>{mask_rows<Word>(p, b, hk * p.group + hg, row0),
                               mask_block_rows(p, g.block_queries, row0), j0, cols};
      },
      g.vector_rows, seen);
  if (warp != 0) return;
  std::int32_t* length = list.at(b, hk, n);
  std::int32_t* entries = length + 1;
  // The first query block that can see a key of the block (the dK/dV kernel's KeySteps).
  const int qb_begin = causal_query_begin(p, j0) / g.block_queries;
  const int steps = p.group * g.query_blocks;
  int count = 0;
  bool skips = false;  // a step that causality leaves hidden by the mask
  for (int s0 = 0; s0 < steps; s0 += 32) {
    const int s = s0 + lane;
    const int hg = s / g.query_blocks, qb = s % g.query_blocks;
    const bool step = s < steps && qb >= qb_begin;
    const BlockClass c = step ? class_of(seen[(g.mask_heads == 1 ? 0 : hg) * g.mask_query_blocks +
                                              (g.mask_query_blocks == 1 ? 0 : qb)])
                              : kHidden;
    const std::uint32_t listed = __ballot_sync(0xffffffffu, c != kHidden);
    skips |= __any_sync(0xffffffffu, step && c == kHidden);
    if (c != kHidden)
      entries[count + __popc(listed & ((1u << lane) - 1))] = hg << MaskStepList::kHeadShift | qb;
    count += __popc(listed);
  }
  if (lane == 0) {
    *length = count;
    if (skips) *list.skips = 1;
  }
}

// Calls launch(values) with the Values of p's mask kind, as std::type_identity (bf16: a
// 16-bit additive mask is bfloat16, not float16).
template <class Launch>
void for_mask_values(const DeviceParams& p, bool bf16, const Launch& launch) {
  switch (p.mask_kind) {
    case MaskKind::boolean:
      return launch(std::type_identity<BoolValues>{});
    case MaskKind::additive:
      return bf16 ? launch(std::type_identity<Bf16Values>{})
                  : launch(std::type_identity<HalfValues>{});
    case MaskKind::additive_f32:
      return launch(std::type_identity<FloatValues>{});
    case MaskKind::none:
      return;
  }
}

// Checks that p's scratch holds `words` 4-byte words (the skips flag and the lists) and zeroes
// the flag (word 0); returns where the lists start.
std::int32_t* prepare_scratch(const DeviceParams& p, std::int64_t words, const char* lists,
                              cudaStream_t stream) {
  if (words > p.mask_block_words)
    throw Error(ErrorKind::invalid_value, std::string("mask_block_scratch: the mask's ") + lists +
                                              " need " + std::to_string(words) +
                                              " 4-byte words, got " +
                                              std::to_string(p.mask_block_words));
  check_cuda(cudaMemsetAsync(p.mask_blocks, 0, sizeof(std::int32_t), stream),
             "cudaMemsetAsync(mask block lists)");
  return p.mask_blocks + 1;
}

// Whether p asks for lists at all: scratch given, a mask, and attention to classify.
bool wants_lists(const DeviceParams& p) {
  return p.mask_blocks != nullptr && p.mask_kind != MaskKind::none && p.Lq > 0 && p.Lk > 0;
}

template <int kBlockKeys>
void launch_blocks(const DeviceParams& p, const MaskBlockList& list, const Geometry& g,
                   std::int64_t ctas, bool bf16, cudaStream_t stream) {
  for_mask_values(p, bf16, [&](auto values) {
    using Values = typename decltype(values)::type;
    mask_blocks_kernel<Values, kBlockKeys>
        <<<static_cast<unsigned>(ctas), 32 * kMaxWarps, 4 * g.key_blocks, stream>>>(p, list, g);
  });
  check_launch("mask_blocks_kernel");
}

}  // namespace

MaskBlockList launch_mask_blocks(const DeviceParams& p, int tile_rows, int block_keys, bool bf16,
                                 cudaStream_t stream) {
  MaskBlockList list;
  if (!wants_lists(p)) return list;
  if (block_keys != 64 && block_keys != 128)
    throw Error(ErrorKind::invalid_value, "launch_mask_blocks: block_keys " +
                                              std::to_string(block_keys) +
                                              " (the kernels' blocks are 64 or 128 keys)");
  Geometry g;
  g.tile_rows = tile_rows;
  g.vector_rows = mask_rows_16_byte_aligned(p);
  g.key_blocks = (p.Lk + block_keys - 1) / block_keys;
  if (g.key_blocks > kMaxRectangles) return list;
  g.tiles = p.mask_st[2] != 0 ? (p.Lq + tile_rows - 1) / tile_rows : 1;
  g.heads = p.mask_st[1] != 0 ? p.Hq : 1;
  const int batch = p.mask_st[0] != 0 ? p.B : 1;
  const std::int64_t per_tile = 2 * static_cast<std::int64_t>(g.key_blocks) + 1;
  list.st[2] = p.mask_st[2] != 0 ? per_tile : 0;
  list.st[1] = p.mask_st[1] != 0 ? per_tile * g.tiles : 0;
  list.st[0] = p.mask_st[0] != 0 ? per_tile * g.tiles * g.heads : 0;
  const std::int64_t ctas = static_cast<std::int64_t>(batch) * g.heads * g.tiles;
  list.words = prepare_scratch(p, 1 + ctas * per_tile, "key-block lists", stream);
  list.skips = p.mask_blocks;
  list.key_blocks = g.key_blocks;
  if (block_keys == 128)
    launch_blocks<128>(p, list, g, ctas, bf16, stream);
  else
    launch_blocks<64>(p, list, g, ctas, bf16, stream);
  return list;
}

MaskStepList launch_mask_steps(const DeviceParams& p, int block_queries, bool bf16,
                               cudaStream_t stream) {
  constexpr int kBlockKeys = kMaskStepKeys;
  MaskStepList list;
  if (!wants_lists(p)) return list;
  StepGeometry g;
  g.block_queries = block_queries;
  g.vector_rows = mask_rows_16_byte_aligned(p);
  g.query_blocks = (p.Lq + block_queries - 1) / block_queries;
  g.key_blocks = (p.Lk + kBlockKeys - 1) / kBlockKeys;
  g.heads = p.mask_st[1] != 0 ? p.Hk : 1;
  g.mask_heads = p.mask_st[1] != 0 ? p.group : 1;
  g.mask_query_blocks = p.mask_st[2] != 0 ? g.query_blocks : 1;
  // Entries hold the query block in kHeadShift bits; the classes take a word each.
  if (g.query_blocks >= (1 << MaskStepList::kHeadShift) ||
      static_cast<std::int64_t>(g.mask_heads) * g.mask_query_blocks > kMaxRectangles)
    return list;
  const int batch = p.mask_st[0] != 0 ? p.B : 1;
  const std::int64_t per_list = 1 + static_cast<std::int64_t>(p.group) * g.query_blocks;
  list.st[2] = per_list;
  list.st[1] = p.mask_st[1] != 0 ? per_list * g.key_blocks : 0;
  list.st[0] = p.mask_st[0] != 0 ? per_list * g.key_blocks * g.heads : 0;
  const std::int64_t ctas = static_cast<std::int64_t>(batch) * g.heads * g.key_blocks;
  list.words = prepare_scratch(p, 1 + ctas * per_list, "step lists", stream);
  list.skips = p.mask_blocks;
  const int rectangles = g.mask_heads * g.mask_query_blocks;
  for_mask_values(p, bf16, [&](auto values) {
    using Values = typename decltype(values)::type;
    mask_steps_kernel<Values, kBlockKeys>
        <<<static_cast<unsigned>(ctas), 32 * kMaxWarps, 4 * rectangles, stream>>>(p, list, g);
  });
  check_launch("mask_steps_kernel");
  return list;
}

}  // namespace memattn::cuda
