#include "cpu/cpu_backend.h"

#include <cstdlib>
#include <string>

#include "cpu/kernels.h"
#include "memattn/error.h"

namespace memattn::cpu {
namespace {

using KernelFn = void (*)(const ForwardArgs&, const ProblemShape&, int);
using BackwardFn = void (*)(const BackwardArgs&, const ProblemShape&, int);

struct Variant {
  const char* name;
  KernelFn forward;
  BackwardFn backward;
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Best first.
constexpr Variant kVariants[] = {
#if defined(MEMATTN_HAVE_ISA_avx512)
    {"avx512", &avx512::forward, &avx512::backward, &has_avx512},
#endif
#if defined(MEMATTN_HAVE_ISA_avx2)
    {"avx2", &avx2::forward, &avx2::backward, &has_avx2},
#endif
    {"base", &base::forward, &base::backward, &always},
};

struct Selection {
  const Variant* variant;
  std::string reason;
};

Selection select_variant() {
  if (const char* forced = std::getenv("MEMATTN_CPU_ISA"); forced && *forced) {
    for (const Variant& v : kVariants) {
      if (std::string(forced) != v.name) continue;
      if (!v.supported())
        throw Error(ErrorKind::runtime, std::string("MEMATTN_CPU_ISA=") + forced +
                                            ": this CPU does not support that instruction set");
      return {&v, std::string("forced by MEMATTN_CPU_ISA=") + forced};
    }
    throw Error(ErrorKind::runtime, std::string("MEMATTN_CPU_ISA=") + forced +
                                        ": not built into this module (built: " MEMATTN_CPU_ISAS
                                        ")");
  }
  for (const Variant& v : kVariants)
    if (v.supported()) return {&v, "best instruction set this CPU supports"};
  return {&kVariants[0], "fallback"};  // unreachable: base is always supported
}

}  // namespace

std::vector<std::string> unsupported_reasons(const ForwardArgs& args, const ProblemShape&) {
  std::vector<std::string> reasons;
  if (args.q.device != DeviceType::cpu)
    reasons.push_back(std::string("tensors are on ") + device_name(args.q.device) + ", not cpu");
  if (args.q.dtype != DType::f32 && args.q.dtype != DType::f64 && args.q.dtype != DType::bf16)
    reasons.push_back(std::string("dtype ") + dtype_name(args.q.dtype) +
                      " is not supported on CPU (float32, float64, bfloat16)");
  if (args.attn_mask.present() && args.attn_mask.dtype == DType::f16)
    reasons.push_back("a float16 attn_mask is not supported on CPU");
  return reasons;
}

std::string kernel_name(const ForwardArgs& args) {
  return std::string("cpu/") + select_variant().variant->name + "/" +
         dtype_short_name(args.q.dtype);
}

void forward(const ForwardArgs& args, const ProblemShape& shape, int num_threads) {
  select_variant().variant->forward(args, shape, num_threads);
}

void backward(const BackwardArgs& args, const ProblemShape& shape, int num_threads) {
  select_variant().variant->backward(args, shape, num_threads);
}

IsaReport isa_report() {
  IsaReport report;
  for (const Variant& v : kVariants) {
    report.built.emplace_back(v.name);
    if (v.supported()) report.usable.emplace_back(v.name);
  }
  try {
    const Selection s = select_variant();
    report.selected = s.variant->name;
    report.reason = s.reason;
  } catch (const Error& e) {
    report.reason = e.what();
  }
  return report;
}

}  // namespace memattn::cpu
