// Warp-level tensor-core building blocks for sm_80+: cp.async tile copies into padded shared
// memory, ldmatrix fragment loads and mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate).
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), lane = 4 * g + t:
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8  (fp32):      c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Two neighbouring C tiles (n 0..7 and 8..15) hold exactly an A fragment's elements, so a
// score tile turns into the A operand of the next product without touching shared memory.
//
// Shared-memory tiles are row-major with rows padded by 8 elements (16 bytes): the 8 row
// addresses of one ldmatrix then fall into 8 different 16-byte bank groups (no conflicts).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace memattn::cuda::sm80 {

inline constexpr int kPad = 8;  // elements of padding per shared-memory row

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; writes zeros when `valid` is false (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async_16(std::uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

template <class T>
struct MmaInstr;
template <>
struct MmaInstr<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const std::uint32_t (&a)[4],
                                             std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaInstr<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const std::uint32_t (&a)[4],
                                             std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// c += a * b for one 16x8x16 tile.
template <class T>
__device__ __forceinline__ void mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                    std::uint32_t b1) {
  MmaInstr<T>::run(c, a, b0, b1);
}

// Two fp32 values as one register of two T (low half = first).
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

// A fragment (16 x 16) from two neighbouring fp32 C tiles: columns 0..7 in c_lo, 8..15 in c_hi.
template <class T>
__device__ __forceinline__ void a_from_c(std::uint32_t (&a)[4], const float (&c_lo)[4],
                                         const float (&c_hi)[4]) {
  a[0] = pack2<T>(c_lo[0], c_lo[1]);
  a[1] = pack2<T>(c_lo[2], c_lo[3]);
  a[2] = pack2<T>(c_hi[0], c_hi[1]);
  a[3] = pack2<T>(c_hi[2], c_hi[3]);
}

// A shared-memory tile of kRows x kCols elements of T with padded rows, addressed by its
// 32-bit shared-state-space address so that fragment addresses are a base plus constants.
template <class T, int kRows, int kCols>
struct SmemTile {
  static constexpr int kStride = kCols + kPad;
  static constexpr int kElems = kRows * kStride;
  std::uint32_t base;
  __device__ __forceinline__ explicit SmemTile(const T* data) : base(smem_addr(data)) {}
  __device__ __forceinline__ std::uint32_t at(int row, int col) const {
    return base + static_cast<std::uint32_t>((row * kStride + col) * sizeof(T));
  }
};

// Copies rows [0, rows_valid) x cols [0, cols_valid) of a global tile (row stride in elements,
// contiguous columns, 16-byte aligned rows) into `tile` with all kThreads threads; the rest of
// the tile is zero-filled so it contributes nothing to the products.
template <int kThreads, class T, int kRows, int kCols>
__device__ __forceinline__ void load_tile_async(const SmemTile<T, kRows, kCols>& tile,
                                                const T* gmem, std::int64_t row_stride,
                                                int rows_valid, int cols_valid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool valid = row < rows_valid && col < cols_valid;
    cp_async_16(tile.at(row, col), valid ? gmem + row * row_stride + col : gmem, valid);
  }
}

// Fragment loads; `lane` is the thread's lane. Each covers a 16 x 16 block at (row0, col0).
// A operand from a row-major [m][k] tile.
template <class T, int R, int C>
__device__ __forceinline__ void load_a(std::uint32_t (&a)[4], const SmemTile<T, R, C>& tile,
                                       int row0, int col0, int lane) {
  const int mi = lane >> 3;
  ldmatrix_x4(a, tile.at(row0 + (lane & 7) + (mi & 1) * 8, col0 + (mi >> 1) * 8));
}
// B operands of two n8 tiles (n0..n0+7 -> b[0], b[1]; n0+8.. -> b[2], b[3]) from a row-major
// [n][k] tile (e.g. K for Q K^T).
template <class T, int R, int C>
__device__ __forceinline__ void load_b_nk(std::uint32_t (&b)[4], const SmemTile<T, R, C>& tile,
                                          int n0, int k0, int lane) {
  const int mi = lane >> 3;
  ldmatrix_x4(b, tile.at(n0 + (lane & 7) + (mi >> 1) * 8, k0 + (mi & 1) * 8));
}
// The same from a row-major [k][n] tile (e.g. V for P V), transposed by ldmatrix.
template <class T, int R, int C>
__device__ __forceinline__ void load_b_kn(std::uint32_t (&b)[4], const SmemTile<T, R, C>& tile,
                                          int k0, int n0, int lane) {
  const int mi = lane >> 3;
  ldmatrix_x4_trans(b, tile.at(k0 + (lane & 7) + (mi & 1) * 8, n0 + (mi >> 1) * 8));
}

}  // namespace memattn::cuda::sm80
