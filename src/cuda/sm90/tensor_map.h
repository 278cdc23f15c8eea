// Host side of the sm90 kernels' bulk tensor copies: TMA tensor maps over [B, H, L, D] tensors.
#pragma once

#include <cuda.h>

#include "cuda/common/params.h"

namespace memattn::cuda::sm90 {

// The tensor maps of a forward call and of a backward pass, passed to the kernels by value.
struct ForwardMaps {
  CUtensorMap q, k, v;
};
struct BackwardMaps {
  CUtensorMap q, k, v, grad_out;
};

// A tensor map over a [B, H, L, D] tensor of 16-bit elements (fp16 or bf16; `bf16` picks which)
// with contiguous last dim and 16-byte aligned rows (cuda_backend.cu's layout rules), strides
// in elements. Boxes are `box_rows` rows x 64 columns, stored with the 128-byte swizzle
// (sm90/hopper.cuh); rows and columns past L and D read as zeros. Throws memattn::Error when
// the driver rejects the map.
CUtensorMap make_tile_map(const void* data, bool bf16, int B, int H, int L, int D,
                          const Strides3& strides, int box_rows);

}  // namespace memattn::cuda::sm90
