// CUDA error checks that raise memattn::Error (RuntimeError in Python) with the failing call.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "memattn/error.h"

namespace memattn::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::runtime,
                std::string("memattn: CUDA error in ") + what + ": " + cudaGetErrorString(status));
}

// After every kernel launch: catches bad launch configurations at once (kernel faults surface
// at the next synchronizing call, as with any CUDA library).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace memattn::cuda
