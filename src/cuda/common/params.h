// Device-side parameters of one attention call: plain data, filled on the host from the core's
// ForwardArgs/BackwardArgs (cuda_backend.cu) and passed by value to every CUDA kernel.
//
// Conventions: strides are in elements; the last dim of q/k/v/out/grad_* is contiguous
// (stride 1) and not stored. Sizes that index memory are int64 (int64 offsets everywhere).
#pragma once

#include <cstdint>

namespace memattn::cuda {

// additive: q's dtype; additive_f32: a float32 mask with fp16/bf16 inputs.
enum class MaskKind : std::uint8_t { none, boolean, additive, additive_f32 };

// Strides of a [B, H, L, D] tensor whose last dim is contiguous.
struct Strides3 {
  std::int64_t b = 0, h = 0, l = 0;
};

struct DeviceParams {
  // ---- forward ----
  const void* q = nullptr;  // [B, Hq, Lq, D]
  const void* k = nullptr;  // [B, Hk, Lk, D]
  const void* v = nullptr;  // [B, Hk, Lk, Dv]
  void* out = nullptr;      // [B, Hq, Lq, Dv]
  float* lse = nullptr;     // [B, Hq, Lq], natural log, -inf for fully masked rows
  Strides3 q_st, k_st, v_st, out_st, lse_st;  // lse_st.l is its last stride

  int B = 0, Hq = 0, Hk = 0, group = 1;  // group = Hq / Hk (GQA)
  int Lq = 0, Lk = 0, D = 0, Dv = 0;
  float scale = 0.f;       // softmax scale (natural units)
  float scale_log2 = 0.f;  // scale * log2(e): scores are kept in log2 units

  bool causal = false;
  std::int64_t causal_offset = 0;  // query i sees key j iff j <= i + causal_offset

  // attn_mask: bool (true = attend) or additive in q's dtype, read with stride 0 on broadcast
  // dims; index order [b, h, i, j].
  MaskKind mask_kind = MaskKind::none;
  const void* mask = nullptr;
  std::int64_t mask_st[4] = {0, 0, 0, 0};
  // The order in which the sm90 grids walk the (b, head) pairs (tile_order.h, batch_head_at):
  // b outer, or with batch_inner (an attn_mask broadcast over b but not over heads) b inner, so
  // that the CTAs running together read one head's mask tiles from the L2 rather than each
  // batch element reading that head's whole mask from DRAM again. Layouts (lse, dropout's bh,
  // scratch) keep bh = b * Hq + h either way. The sm80 kernels ignore it.
  bool batch_inner = false;

  const std::uint8_t* key_padding = nullptr;  // bool [B, Lk], true = padding
  std::int64_t key_padding_st[2] = {0, 0};
  // Optional, with key_padding: [B][2] = (first padded key, last unpadded key + 1) of each
  // batch element, written by launch_key_ranges before the attention kernels (semantics.cuh:
  // KeyRange). Lets the kernels skip trailing padded key blocks and the per-key mask reads of
  // blocks before the first padded key.
  int* key_ranges = nullptr;

  // Optional, with attn_mask: 4-byte words of scratch (mask_block_words of them) for the lists
  // of key blocks that launch_mask_blocks writes before the sm90 general forward
  // (MaskBlockList), or of steps that launch_mask_steps writes before the sm90 single-pass
  // backward (MaskStepList). Without it those kernels run every block the bounds leave.
  std::int32_t* mask_blocks = nullptr;
  std::int64_t mask_block_words = 0;

  // Dropout: key (i, j) of row bh = b * Hq + h is kept iff
  // philox::dropout_draws(seed, bh, i, j >> 2).x[j & 3] >= dropout_threshold.
  bool dropout = false;
  std::uint64_t dropout_seed = 0;
  std::uint32_t dropout_threshold = 0;
  float dropout_keep_scale = 1.f;  // 1 / (1 - p)

  // ---- backward ----
  const void* grad_out = nullptr;  // [B, Hq, Lq, Dv]
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  Strides3 grad_out_st, grad_q_st, grad_k_st, grad_v_st;
  float* delta = nullptr;  // [B, Hq, Lq] contiguous scratch: rowsum(grad_out * out)
  // Optional fp32 scratch (BackwardArgs::grad_q_accum_scratch) where the sm90 single-pass
  // backward sums dQ across key blocks with atomic adds; null: the atomic-free two passes.
  float* dq_accum = nullptr;

  // Mask gradient, float32, attn_mask's 4-D shape with full Lq and Lk dims; its b/h dims may be
  // size 1 (mask broadcast there), then that dim receives the sum. Kernels that write it loop
  // over the summed (b, h) combinations inside one block, so no two blocks touch one element
  // and no atomics are needed.
  float* grad_mask = nullptr;
  std::int64_t grad_mask_st[4] = {0, 0, 0, 0};
  int grad_mask_b_outer = 0;  // B, or 1 when grad_mask's b dim is summed
  int grad_mask_h_outer = 0;  // Hq, or 1 when grad_mask's h dim is summed
};

// Which key blocks of each query tile an attn_mask leaves any key visible in (launch_mask_blocks,
// mask_blocks.cu), for the sm90 general forward to skip the others: attention that a structured
// mask (a causal, sliding-window or block-diagonal mask, padding given as a mask) hides costs
// nothing, as with is_causal or key_padding_mask. The list of tile (b, h, m) starts at
// at(b, h, m) = words + b st[0] + h st[1] + m st[2] (0 along the dims the mask broadcasts, as
// mask_st): key_blocks + 1 counts, the c-th of them how many listed blocks come before key block
// c (so the last is the list's length, and a tile that runs only the blocks before n runs the
// first at(..)[n] entries), then the entries in increasing key order, key block << 1 | whole,
// where whole says that the mask leaves every key of the block as it is (all true, or all 0.0),
// so the block needs no mask read. Empty (words null): every block runs.
// skips: whether any block is hidden or whole, else the kernels run every block as without
// the list (a mask without structure, where reading the list would only cost).
struct MaskBlockList {
  std::int32_t* skips = nullptr;
  std::int32_t* words = nullptr;
  std::int64_t st[3] = {0, 0, 0};
  int key_blocks = 0;
  // The counts of tile (b, h, m) (mask_blocks.cu writes them, the forward reads them).
  __host__ __device__ std::int32_t* at(int b, int h, int m) const {
    return words + b * st[0] + h * st[1] + m * st[2];
  }
  // The entries of the tile whose counts start at `counts` (at(b, h, m)).
  __host__ __device__ std::int32_t* entries(std::int32_t* counts) const {
    return counts + key_blocks + 1;
  }
};

// The backward's counterpart of MaskBlockList (launch_mask_steps, mask_blocks.cu): for each
// block of `block_keys` keys of each (b, k/v head), the steps of the sm90 dK/dV kernel (query
// head of the k/v head's group, block of `block_queries` queries) in which the attn_mask leaves
// a key of the block visible to a query and causality leaves a pair, in the order that kernel
// walks them (heads, then query blocks). The list of key block n of (b, hk) starts at
// at(b, hk, n) = words + b st[0] + hk st[1] + n st[2] (0 along the dims the mask broadcasts):
// its length, then the entries, (head - hk group) << 16 | query block. skips: whether the mask
// hides any step that causality leaves, else the kernel walks every step as without the list.
struct MaskStepList {
  std::int32_t* skips = nullptr;
  std::int32_t* words = nullptr;
  std::int64_t st[3] = {0, 0, 0};
  __host__ __device__ std::int32_t* at(int b, int hk, int n) const {
    return words + b * st[0] + hk * st[1] + n * st[2];
  }
  static constexpr int kHeadShift = 16;  // entry bits of the query block, below the head's
};

// Whether a call needs the general kernels (masks, dropout, mask gradient, or a scale <= 0,
// which the lean kernels' raw-score maxima cannot take) rather than the lean ones that check
// only bounds, causality and key padding (per key, and only in blocks that key_ranges says
// hold padding). features_of states the rule on the call's own terms, for callers that have no
// DeviceParams (the CUDA backend's kernel_name).
inline bool features_of(bool has_mask, bool dropout, float scale_log2) {
  return has_mask || dropout || !(scale_log2 > 0.f);
}
inline bool has_features(const DeviceParams& p) {
  return features_of(p.mask_kind != MaskKind::none, p.dropout, p.scale_log2) ||
         p.grad_mask != nullptr;
}

// Bytes per value of a mask kind (0 without a mask).
inline int mask_value_bytes(MaskKind kind) {
  switch (kind) {
    case MaskKind::boolean:
      return 1;
    case MaskKind::additive:
      return 2;
    case MaskKind::additive_f32:
      return 4;
    case MaskKind::none:
      break;
  }
  return 0;
}
// Whether every row of p's attn_mask starts on a 16-byte boundary with contiguous keys (base
// aligned, strides of dims 0-2 whole 16-byte units; broadcast dims have stride 0): what the
// sm90 mask tiles' TMA copies and the classification's 16-byte loads need.
inline bool mask_rows_16_byte_aligned(const DeviceParams& p) {
  const int bytes = mask_value_bytes(p.mask_kind);
  if (bytes == 0 || p.mask_st[3] != 1 || reinterpret_cast<std::uintptr_t>(p.mask) % 16 != 0)
    return false;
  for (int d = 0; d < 3; ++d)
    if (p.mask_st[d] * bytes % 16 != 0) return false;
  return true;
}

}  // namespace memattn::cuda
