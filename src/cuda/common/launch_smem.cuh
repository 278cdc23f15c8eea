// The launch path of the kernels that use more than 48 KB of dynamic shared memory (every
// tensor-core kernel): opt the kernel in to its shared-memory size, skip an empty grid (a
// launch error), launch on the caller's stream and check the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/check.h"

namespace memattn::cuda {

// Opts `kernel` in to `smem_bytes` of dynamic shared memory on the current device. The
// attribute lasts as long as the device's context, so it is set once per (kernel, device,
// size): cudaFuncSetAttribute costs ~3-4 us of host time per call on an H100 host, more than a
// small call's kernel (sm90/NOTES.md, h1).
void allow_dynamic_smem(const void* kernel, int smem_bytes, const char* name);

template <class Kernel, class... Args>
void launch_with_smem(Kernel kernel, const char* name, std::int64_t blocks, int threads,
                      int smem_bytes, cudaStream_t stream, const Args&... args) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes, name);
  if (blocks == 0) return;
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, stream>>>(args...);
  check_launch(name);
}

}  // namespace memattn::cuda
