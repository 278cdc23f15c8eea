// The CUDA backend as the core sees it (cf. cpu/cpu_backend.h): capability checks that list
// every failing reason, the kernel that would run, and the entry points. Plain C++ header:
// the core includes it without nvcc.
#pragma once

#include <string>
#include <vector>

#include "memattn/params.h"

namespace memattn::cuda {

// Every reason this backend cannot run the call; empty when it can. Reads the device's compute
// capability (cached) only when the tensors are on a CUDA device.
std::vector<std::string> unsupported_reasons(const ForwardArgs& args, const ProblemShape& shape);
// "cuda/sm90/bf16/d128" (Hopper kernels; "cuda/sm90/bf16/d64/wide", ".../short_keys",
// ".../narrow": the forward on another tile shape, launch.h's sm90_tile_shape),
// "cuda/sm80/bf16/d128" (tensor cores) or "cuda/simt/f32": the kernel of the forward pass, or
// of the backward pass if `backward` (grad_q_accum_scratch: whether that call gives the dQ
// scratch; memattn::plan). Throws Error for an unknown MEMATTN_SM90_D64_TILES.
std::string kernel_name(const ForwardArgs& args, const ProblemShape& shape, bool backward,
                        bool grad_q_accum_scratch);

// Launch on ctx.stream (the caller's current stream) and return without synchronizing.
void forward(const ForwardArgs& args, const ProblemShape& shape, const ExecContext& ctx);
// Needs args.grad_scratch: float32 [B, Hq, Lq] contiguous on the same device.
void backward(const BackwardArgs& args, const ProblemShape& shape, const ExecContext& ctx);

// "kernels for sm_80, sm_90, PTX 90 (CUDA runtime 13.0, linked statically)": what the
// module's kernels were built for.
std::string build_summary();

}  // namespace memattn::cuda
