// Parameters of one attention call, plain structs with no framework types (cf. FA's flash.h).
//
// Shapes (fixed names used everywhere):
//   q:    [B, Hq, Lq, D]       k: [B, Hk, Lk, D]       v: [B, Hk, Lk, Dv]
//   out:  [B, Hq, Lq, Dv]      lse: [B, Hq, Lq] float32, float64 for float64 inputs
//                                   (natural log; -inf for fully masked rows)
//   attn_mask: bool (true = attend) or float (added to scores), each dim 1 or full
//              ([B|1, Hq|1, Lq|1, Lk|1]); size-1 dims are broadcast (read with stride 0)
//   key_padding_mask: bool [B, Lk], true = padding (ignored)
//
// Causal alignment, for Lq = 3 queries and Lk = 5 keys (x = may attend):
//   top_left (PyTorch):        bottom_right (flash-attn, decoding with a cache):
//     x . . . .                  x x x . .
//     x x . . .                  x x x x .
//     x x x . .                  x x x x x
//   query i sees key j when j <= i (top_left) or j <= i + Lk - Lq (bottom_right).
#pragma once

#include <cstdint>

#include "memattn/tensor.h"

namespace memattn {

enum class CausalAlignment : std::uint8_t { top_left, bottom_right };

// What the caller asks for; validate() checks it and derives a ProblemShape.
struct ForwardArgs {
  TensorView q, k, v;
  TensorView attn_mask;         // optional
  TensorView key_padding_mask;  // optional
  bool is_causal = false;
  CausalAlignment causal_alignment = CausalAlignment::top_left;
  double dropout_p = 0.0;
  std::uint64_t dropout_seed = 0;  // Philox key; the same seed reproduces the same mask
  bool has_scale = false;          // false: scale = 1 / sqrt(D)
  double scale = 0.0;
  // Outputs, allocated by the caller.
  TensorView out;  // [B, Hq, Lq, Dv], q's dtype
  TensorView lse;  // [B, Hq, Lq], float32 (float64 when q is float64)
  // CUDA only, optional, used with key_padding_mask: contiguous 4-byte scratch (a float32
  // tensor) of at least 2*B elements, allocated by the caller like grad_scratch. The CUDA
  // backend stores each batch element's key range there (first padded key, last unpadded key
  // + 1) so its kernels skip fully padded key blocks; without it they check every key. Ignored
  // by the CPU backend.
  TensorView key_range_scratch;
  // CUDA only, optional, used with attn_mask: contiguous 4-byte scratch (a float32 tensor) of
  // the size Python's _ops._mask_block_scratch (forward) or _ops._mask_step_scratch (the
  // backward's single pass) gives. The Hopper forward writes there which key blocks of each
  // query tile the mask leaves any key visible in, and the single-pass backward which query
  // blocks of each key block, and they skip the others; without it, they run every block.
  // Ignored elsewhere.
  TensorView mask_block_scratch;
};

struct BackwardArgs {
  ForwardArgs fwd;      // the forward call, including out and lse it produced
  TensorView grad_out;  // [B, Hq, Lq, Dv]
  // Outputs, allocated by the caller. grad_q/k/v have the inputs' shapes (any strides).
  TensorView grad_q, grad_k, grad_v;
  // Optional: float32 (float64 when q is float64), the 4-D shape of attn_mask with any dim
  // allowed to be 1, zero-filled by the caller; the kernel
  // adds the mask gradient into it (size-1 dims receive the sum over that dim).
  TensorView grad_attn_mask;
  // CUDA only: float32 [B, Hq, Lq] contiguous scratch (rowsum(grad_out * out)), allocated by
  // the caller so the core never allocates device memory. Ignored by the CPU backend.
  TensorView grad_scratch;
  // CUDA only, optional: contiguous float32 scratch of at least B*Hq*ceil(Lq/64)*64*Dp
  // elements, Dp = 64 when max(D, Dv) <= 64 else 128. Given it, the Hopper (sm90) backward of
  // calls without attn_mask or dropout runs in one pass (dQ summed there with atomic adds,
  // faster; its last bits vary run to run); without it, or on other GPUs, the atomic-free two
  // passes run (bit-identical run to run). Ignored where unused.
  TensorView grad_q_accum_scratch;
};

// Sizes derived once by validation; backends read these instead of re-deriving them.
struct ProblemShape {
  std::int64_t B = 0, Hq = 0, Hk = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  double scale = 0.0;
  // Last key a query may see is i + causal_offset (causal only): 0 for top_left,
  // Lk - Lq for bottom_right.
  std::int64_t causal_offset = 0;
  std::int64_t group_size() const { return Hq / Hk; }  // q heads per k/v head (GQA)
};

// How the caller wants the work run. The core never allocates device memory; CPU backends
// may use host scratch memory proportional to O(L).
struct ExecContext {
  int num_threads = 1;
  void* stream = nullptr;  // cudaStream_t for CUDA calls; unused on CPU
};

}  // namespace memattn
