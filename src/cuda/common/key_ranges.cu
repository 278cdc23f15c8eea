// key_ranges[b] = (first padded key, last unpadded key + 1) of key_padding_mask row b: computed
// once per call before the attention kernels, so each tile reads two ints instead of scanning
// Lk mask bytes, skips the blocks after the last unpadded key and reads the mask per key only
// between the two (semantics.cuh: KeyRange). Right-padded batches, the usual case, have no key
// in between.
//
// One block per batch element; threads stride over the keys, CUB reduces the block.
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "cuda/common/check.h"
#include "cuda/launch.h"

namespace memattn::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    key_ranges_kernel(const __grid_constant__ DeviceParams p) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage first_storage, last_storage;
  const int b = static_cast<int>(blockIdx.x);
  const std::uint8_t* row = p.key_padding + b * p.key_padding_st[0];
  int first_padded = p.Lk, last_unpadded = -1;
  for (int j = static_cast<int>(threadIdx.x); j < p.Lk; j += kThreads) {
    if (row[j * p.key_padding_st[1]] != 0)
      first_padded = j < first_padded ? j : first_padded;
    else
      last_unpadded = j;
  }
  // Two storages: the second reduction may start before every thread has read the first's.
  // Lambdas rather than cub::Min / cuda::minimum: those moved between CCCL versions.
  first_padded =
      Reduce(first_storage).Reduce(first_padded, [](int x, int y) { return x < y ? x : y; });
  last_unpadded =
      Reduce(last_storage).Reduce(last_unpadded, [](int x, int y) { return x > y ? x : y; });
  if (threadIdx.x == 0) {
    p.key_ranges[2 * b] = first_padded;
    p.key_ranges[2 * b + 1] = last_unpadded + 1;
  }
}

}  // namespace

void launch_key_ranges(const DeviceParams& p, cudaStream_t stream) {
  if (p.key_padding == nullptr || p.key_ranges == nullptr || p.B == 0) return;
  key_ranges_kernel<<<p.B, kThreads, 0, stream>>>(p);
  check_launch("key_ranges_kernel");
}

}  // namespace memattn::cuda
