#include "cpu/heuristics.h"

#include <algorithm>

namespace memattn::cpu {

CpuTiles forward_tiles(std::int64_t D, std::int64_t Dv) {
  // Wide heads: halve the key tile so K^T and V tiles (D x block_k each) stay near 64 KB.
  if (std::max(D, Dv) > 128) return {64, 32};
  return {64, 64};
}

CpuTiles backward_tiles(std::int64_t D, std::int64_t Dv) { return forward_tiles(D, Dv); }

int key_splits(std::int64_t units, std::int64_t key_blocks, int num_threads) {
  if (key_blocks <= 1 || units <= 0) return 1;
  // Aim for at least two tasks per thread so dynamic scheduling can balance causal work.
  const std::int64_t want_tasks = 2 * static_cast<std::int64_t>(std::max(num_threads, 1));
  if (units >= want_tasks) return 1;
  const std::int64_t splits = (want_tasks + units - 1) / units;
  return static_cast<int>(std::min(splits, key_blocks));
}

bool forward_is_rowwise(std::int64_t Lq) { return Lq <= 8; }

}  // namespace memattn::cpu
