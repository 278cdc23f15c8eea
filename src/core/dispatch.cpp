#include <algorithm>
#include <string>

#include "core/registry.h"
#include "cpu/cpu_backend.h"
#include "memattn/api.h"

#ifndef MEMATTN_VERSION
#error "MEMATTN_VERSION must be defined by the build"
#endif

namespace memattn {
namespace {

[[noreturn]] void no_backend(const Plan& p) {
  std::string message = "memattn: no backend can run this call:";
  for (const BackendVerdict& v : p.verdicts) {
    message += " [" + v.backend + "] ";
    for (std::size_t i = 0; i < v.reasons.size(); ++i) message += (i ? "; " : "") + v.reasons[i];
  }
  throw Error(ErrorKind::not_implemented, message);
}

const core::Backend& chosen(const Plan& p) {
  for (const core::Backend& b : core::backends())
    if (p.backend == b.name) return b;
  no_backend(p);
}

// The caller's context with at least one thread (backends may assume num_threads >= 1).
ExecContext normalized(const ExecContext& ctx) {
  ExecContext run = ctx;
  run.num_threads = std::max(ctx.num_threads, 1);
  return run;
}

void require_outputs(const ForwardArgs& args) {
  if (!args.out.present()) throw Error(ErrorKind::invalid_value, "out: is required");
  if (!args.lse.present()) throw Error(ErrorKind::invalid_value, "lse: is required");
}

}  // namespace

void forward(const ForwardArgs& args, const ExecContext& ctx) {
  const ProblemShape shape = validate_forward(args);
  require_outputs(args);
  const Plan p = plan(args, shape, /*backward=*/false);
  chosen(p).forward(args, shape, normalized(ctx));
}

void backward(const BackwardArgs& args, const ExecContext& ctx) {
  const ProblemShape shape = validate_backward(args);
  const Plan p = plan(args.fwd, shape, /*backward=*/true, args.grad_q_accum_scratch.present());
  chosen(p).backward(args, shape, normalized(ctx));
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = MEMATTN_VERSION;
  const cpu::IsaReport isa = cpu::isa_report();
  info.cpu_isas_built = isa.built;
  info.cpu_isas_usable = isa.usable;
  info.cpu_isa_selected = isa.selected;
  info.cpu_isa_reason = isa.reason;
  info.cuda_reason = core::cuda_unavailable_reason();
  info.cuda_built = info.cuda_reason.empty();
  info.cuda_summary = core::cuda_build_summary();
  return info;
}

}  // namespace memattn
