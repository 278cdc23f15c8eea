// allow_dynamic_smem (launch_smem.cuh): cudaFuncSetAttribute once per (kernel, device, size).
#include <cuda_runtime.h>

#include <mutex>
#include <tuple>
#include <vector>

#include "cuda/common/check.h"
#include "cuda/common/launch_smem.cuh"

namespace memattn::cuda {

void allow_dynamic_smem(const void* kernel, int smem_bytes, const char* name) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  // A few dozen kernels at most: a linear scan under one lock is cheaper than hashing.
  static std::mutex mutex;
  static std::vector<std::tuple<const void*, int, int>> allowed;
  const std::tuple<const void*, int, int> key{kernel, device, smem_bytes};
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& done : allowed)
    if (done == key) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
             name);
  allowed.push_back(key);
}

}  // namespace memattn::cuda
