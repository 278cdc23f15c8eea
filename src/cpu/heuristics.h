// Tile sizes and work splits for the CPU kernels: pure functions with their own unit tests.
#pragma once

#include <cstdint>

namespace memattn::cpu {

struct CpuTiles {
  int block_q;  // query rows per tile
  int block_k;  // keys per tile
};

// Forward: 64 queries x 64 keys keeps the Q, K^T, V, S and O tiles (fp32) within ~160 KB at
// D = 128, inside a 1-2 MB L2, while S (16 KB) stays in L1 between the two GEMMs.
CpuTiles forward_tiles(std::int64_t D, std::int64_t Dv);
// Backward: same tile shape; the key chunk of a task is packed once and reused for every
// query block.
CpuTiles backward_tiles(std::int64_t D, std::int64_t Dv);

// How many key chunks each independent unit of work is split into. Splitting gives idle
// threads work when units are scarce (decoding one sequence, few heads), at the price of a
// partial result per split that is merged at the end (dQ in the backward; O, max and sum in
// the row-wise forward). `key_blocks` is ceil(Lk / block_k).
int key_splits(std::int64_t units, std::int64_t key_blocks, int num_threads);

// Few query rows (decoding): the GEMM forward would pad each tile to a full micro-tile of
// rows and pack K^T for reuse that never comes, so a row-wise kernel that reads K and V once
// (dot products and axpys, memory-bound like the problem itself) is faster.
bool forward_is_rowwise(std::int64_t Lq);

}  // namespace memattn::cpu
