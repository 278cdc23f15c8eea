// The CPU backend as the core sees it: capability checks (every failing one), the kernel
// variant for this machine, and the entry points.
#pragma once

#include <string>
#include <vector>

#include "memattn/params.h"

namespace memattn::cpu {

// Every reason this backend cannot run the call; empty when it can.
std::vector<std::string> unsupported_reasons(const ForwardArgs& args, const ProblemShape& shape);
// "cpu/avx512/f32": the kernel variant that would run.
std::string kernel_name(const ForwardArgs& args);

void forward(const ForwardArgs& args, const ProblemShape& shape, int num_threads);
void backward(const BackwardArgs& args, const ProblemShape& shape, int num_threads);

struct IsaReport {
  std::vector<std::string> built;   // compiled into this module
  std::vector<std::string> usable;  // built and supported by this CPU
  std::string selected;             // what calls use now
  std::string reason;               // why
};
// Reads MEMATTN_CPU_ISA each time, so tests can switch variants inside one process.
IsaReport isa_report();

}  // namespace memattn::cpu
