// Facts about a CUDA device that the planner and the launchers need, read from the runtime
// once per device and cached (defined in cuda_backend.cu).
#pragma once

#include <cuda_runtime.h>

namespace memattn::cuda {

struct DeviceCaps {
  bool known = false;
  cudaError_t error = cudaSuccess;  // of the first failing query; the fields below are then 0
  int major = 0, minor = 0;         // compute capability
  int multiprocessors = 0;
};

// Thread-safe; device ids outside [0, 64) give error cudaErrorInvalidDevice.
DeviceCaps device_caps(int device);

}  // namespace memattn::cuda
