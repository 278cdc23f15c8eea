// The launch path of the kernels that use more than 48 KB of dynamic shared memory (every
// tensor-core kernel): opt the kernel in to its shared-memory size, skip an empty grid (a
// launch error), launch on the caller's stream and check the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/check.h"

namespace memattn::cuda {

template <class Kernel, class... Args>
void launch_with_smem(Kernel kernel, const char* name, std::int64_t blocks, int threads,
                      int smem_bytes, cudaStream_t stream, const Args&... args) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
             name);
  if (blocks == 0) return;
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, stream>>>(args...);
  check_launch(name);
}

}  // namespace memattn::cuda
