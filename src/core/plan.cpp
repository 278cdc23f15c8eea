#include <string>

#include "core/registry.h"
#include "cpu/cpu_backend.h"
#include "memattn/api.h"
#if MEMATTN_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace memattn {
namespace core {
namespace {

#if MEMATTN_HAVE_CUDA
constexpr Backend kCuda = {"cuda", &cuda::unsupported_reasons, &cuda::kernel_name, &cuda::forward,
                           &cuda::backward};
#else
// A build without nvcc: CUDA calls get a verdict instead of a kernel.
std::vector<std::string> cuda_reasons(const ForwardArgs& args, const ProblemShape&) {
  std::vector<std::string> reasons{cuda_unavailable_reason()};
  if (args.q.device != DeviceType::cuda)
    reasons.push_back(std::string("tensors are on ") + device_name(args.q.device) + ", not cuda");
  return reasons;
}
std::string no_kernel(const ForwardArgs&, const ProblemShape&, bool, bool) { return ""; }
constexpr Backend kCuda = {"cuda", &cuda_reasons, &no_kernel, nullptr, nullptr};
#endif

std::string cpu_kernel_name(const ForwardArgs& a, const ProblemShape&, bool, bool) {
  return cpu::kernel_name(a);
}
void cpu_forward(const ForwardArgs& a, const ProblemShape& s, const ExecContext& ctx) {
  cpu::forward(a, s, ctx.num_threads);
}
void cpu_backward(const BackwardArgs& a, const ProblemShape& s, const ExecContext& ctx) {
  cpu::backward(a, s, ctx.num_threads);
}

constexpr Backend kBackends[] = {
    kCuda,
    {"cpu", &cpu::unsupported_reasons, &cpu_kernel_name, &cpu_forward, &cpu_backward},
};

}  // namespace

std::span<const Backend> backends() { return kBackends; }

#if MEMATTN_HAVE_CUDA
const char* cuda_unavailable_reason() { return ""; }
std::string cuda_build_summary() { return cuda::build_summary(); }
#else
const char* cuda_unavailable_reason() {
  return "memattn was built without CUDA (no nvcc was found when it was built, or "
         "MEMATTN_CUDA=OFF)";
}
std::string cuda_build_summary() { return ""; }
#endif

}  // namespace core

Plan plan(const ForwardArgs& args, const ProblemShape& shape, bool backward,
          bool grad_q_accum_scratch) {
  Plan p;
  for (const core::Backend& b : core::backends()) {
    BackendVerdict verdict{b.name, b.unsupported_reasons(args, shape)};
    const bool has_kernel = backward ? b.backward != nullptr : b.forward != nullptr;
    if (!has_kernel && verdict.reasons.empty())
      verdict.reasons.push_back("no kernel for this pass");
    if (verdict.reasons.empty() && p.backend.empty()) {
      p.backend = b.name;
      p.kernel = b.kernel_name(args, shape, backward, grad_q_accum_scratch);
      p.reason = std::string("first backend in priority order that supports this call (") +
                 device_name(args.q.device) + ", " + dtype_name(args.q.dtype) + ")";
    }
    p.verdicts.push_back(std::move(verdict));
  }
  return p;
}

}  // namespace memattn
