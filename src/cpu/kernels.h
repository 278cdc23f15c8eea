// Entry points of the CPU kernels. kernels.cpp is compiled once per instruction set (base,
// avx2, avx512) into its own namespace; cpu_backend.cpp picks one at run time.
#pragma once

#include "memattn/params.h"

#define MEMATTN_DECLARE_CPU_KERNELS(isa)                                               \
  namespace memattn::cpu::isa {                                                        \
  void forward(const ForwardArgs& args, const ProblemShape& shape, int num_threads);   \
  void backward(const BackwardArgs& args, const ProblemShape& shape, int num_threads); \
  }

MEMATTN_DECLARE_CPU_KERNELS(base)
MEMATTN_DECLARE_CPU_KERNELS(avx2)
MEMATTN_DECLARE_CPU_KERNELS(avx512)

#undef MEMATTN_DECLARE_CPU_KERNELS
