// The backends the core can dispatch to, in priority order. Capabilities are code that
// returns every failing check, so plans can say why each backend was not taken.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "memattn/params.h"

namespace memattn::core {

struct Backend {
  const char* name;
  std::vector<std::string> (*unsupported_reasons)(const ForwardArgs&, const ProblemShape&);
  // for explain(); grad_q_accum_scratch as for plan()
  std::string (*kernel_name)(const ForwardArgs&, const ProblemShape&, bool backward,
                             bool grad_q_accum_scratch);
  void (*forward)(const ForwardArgs&, const ProblemShape&, const ExecContext&);
  void (*backward)(const BackwardArgs&, const ProblemShape&, const ExecContext&);
};

std::span<const Backend> backends();

// Why the CUDA backend is absent from this build (empty when it is built).
const char* cuda_unavailable_reason();
// What the CUDA backend was built for (empty when it is not built).
std::string cuda_build_summary();

}  // namespace memattn::core
