// Host side of the sm90 kernels' bulk tensor copies: TMA tensor maps over [B, H, L, D] tensors.
#pragma once

#include <cuda.h>

#include "cuda/common/params.h"

namespace memattn::cuda::sm90 {

// attn_mask as TMA tiles of query rows x key columns (sm90/mask_tile.cuh), or `rows` 0 where
// the mask cannot be copied by tiles and the kernels read it per element.
struct MaskTileMap {
  CUtensorMap map;
  int rows = 0;  // rows per tile: the kernel's block rows, 1 for a mask broadcast along queries
};

// The tensor maps of a forward call and of a backward pass, passed to the kernels by value.
// ForwardMaps::out: only for kernels that stage their output for TMA stores (ForwardTraits::kOut
// other than registers; empty otherwise). ForwardMaps::blocks: the mask's key blocks per query
// tile, for the general kernel (empty otherwise).
struct ForwardMaps {
  CUtensorMap q, k, v;
  MaskTileMap mask;
  CUtensorMap out;
  MaskBlockList blocks;
};
// BackwardMaps::grad_k, grad_v: 64-row boxes for the dK/dV kernel's output stores (empty in
// the dQ kernel's maps).
struct BackwardMaps {
  CUtensorMap q, k, v, grad_out;
  MaskTileMap mask;
  CUtensorMap grad_k, grad_v;
  MaskStepList steps;  // the dK/dV kernel's steps that the mask leaves (launch_mask_steps)
};

// A tensor map over a [B, H, L, D] tensor of 16-bit elements (fp16 or bf16; `bf16` picks which)
// with contiguous last dim and 16-byte aligned rows (cuda_backend.cu's layout rules), strides
// in elements. Boxes are `box_rows` rows x 64 columns, stored with the 128-byte swizzle
// (sm90/hopper.cuh); rows and columns past L and D read as zeros. Throws memattn::Error when
// the driver rejects the map.
CUtensorMap make_tile_map(const void* data, bool bf16, int B, int H, int L, int D,
                          const Strides3& strides, int box_rows);

// The mask of DeviceParams `p` as tiles of `block_rows` queries x 128-byte boxes of keys (128
// bool or 64 16-bit values; mask_tile.cuh), with the 128-byte swizzle. Tiles need a bool or
// q-dtype mask (not float32 with fp16/bf16 inputs) with contiguous keys, a 16-byte aligned
// start and strides of whole 16-byte units; any other mask gets rows = 0.
MaskTileMap make_mask_map(const DeviceParams& p, int block_rows);

}  // namespace memattn::cuda::sm90
