// Functions of the sm90 kernels written as plain integer arithmetic, compiled for the host too
// so that tests/cpp checks them without a GPU (smem_desc.h, tile_order.h).
#pragma once

#if defined(__CUDACC__)
#define MEMATTN_SM90_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MEMATTN_SM90_HOST_DEVICE inline
#endif
