// The core's entry points: validate -> plan -> dispatch.
#pragma once

#include <string>
#include <vector>

#include "memattn/error.h"
#include "memattn/params.h"

namespace memattn {

// Checks every argument of a forward call (outputs included when present) and returns the
// derived sizes. Throws memattn::Error naming the argument, what it got and what it needs.
// Works on views whose data pointers are null, so Python can validate from metadata alone
// (e.g. while torch.compile traces with fake tensors).
ProblemShape validate_forward(const ForwardArgs& args);
ProblemShape validate_backward(const BackwardArgs& args);

// Why a backend was or was not chosen. Every failing check is listed, not only the first.
struct BackendVerdict {
  std::string backend;               // "cpu", "cuda"
  std::vector<std::string> reasons;  // empty when the backend can run the call
};

struct Plan {
  std::string backend;                   // the chosen backend; empty when none can run the call
  std::string kernel;                    // e.g. "cpu/avx512/f32"
  std::string reason;                    // one line: why this backend
  std::vector<BackendVerdict> verdicts;  // every backend considered, in priority order
};

// Picks a backend for a validated call. Never throws for "no backend": the returned plan
// then has an empty `backend` and the verdicts say why; forward()/backward() raise.
// grad_q_accum_scratch (backward plans): whether the call gives
// BackwardArgs::grad_q_accum_scratch, which the Hopper backward's single pass needs at head dims
// over 128 (without it those calls run the sm80 backward).
Plan plan(const ForwardArgs& args, const ProblemShape& shape, bool backward,
          bool grad_q_accum_scratch = false);

// Validates, plans and runs. Throws memattn::Error on bad input or when no backend applies.
void forward(const ForwardArgs& args, const ExecContext& ctx);
void backward(const BackwardArgs& args, const ExecContext& ctx);

// Build facts for `memattn doctor`: compiled CPU ISAs, the one chosen at run time and why,
// whether a CUDA backend was built.
struct BuildInfo {
  std::string version;
  std::vector<std::string> cpu_isas_built;
  std::vector<std::string> cpu_isas_usable;  // built and supported by this CPU
  std::string cpu_isa_selected;
  std::string cpu_isa_reason;
  bool cuda_built = false;
  std::string cuda_reason;   // why not built (empty when built)
  std::string cuda_summary;  // what it was built for (empty when not built)
};
BuildInfo build_info();

}  // namespace memattn
