// PTX wrappers for Hopper's asynchronous machinery (sm_90a): mbarriers, bulk tensor copies (TMA),
// wgmma fences, register reallocation between warpgroups (descriptors: smem_desc.h).
//
// Shared-memory tiles of the sm90 kernels use the 128-byte swizzle of TMA and wgmma: a tile of
// R rows x C columns (16-bit elements) is stored as C / 64 column chunks of R rows x 128 bytes,
// each chunk 1024-byte aligned; within a chunk, 16-byte unit u of row r sits at unit u ^ (r % 8).
// TMA writes that layout and wgmma reads it through descriptors (smem_desc.h).
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/sm90/smem_desc.h"

namespace memattn::cuda::sm90 {

inline constexpr int kChunkCols = 64;             // 16-bit columns per 128-byte swizzle chunk
inline constexpr int kRowBytes = 128;             // bytes per row of one chunk
inline constexpr int kMaxSmemBytes = 227 * 1024;  // dynamic shared memory a CTA may opt in to
// A multiprocessor's shared memory, of which each resident CTA also takes kReservedSmemBytes
// for the system (cudaDevAttrReservedSharedMemoryPerBlock).
inline constexpr int kSmemPerSmBytes = 228 * 1024;
inline constexpr int kReservedSmemBytes = 1024;
// Whether kCtas CTAs of kBytes dynamic shared memory each fit on one multiprocessor.
constexpr bool fits_on_sm(int bytes, int ctas) {
  return bytes <= kMaxSmemBytes && ctas * (bytes + kReservedSmemBytes) <= kSmemPerSmBytes;
}

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// The kernel's dynamic shared memory, whose start the 128-byte swizzle's tiles need 1024-byte
// aligned (the swizzle follows the address's bits 7-9). The kernels have no static shared memory,
// so the segment starts right after the CTA's reserved kilobyte, on a 1024-byte boundary
// (FlashAttention-3's and CUTLASS's Hopper kernels lay out their tiles from the start the same
// way), and the layouts have no slack to round it up (the slack left D = 128's single pass 40
// bytes short of a 16-bit mask tile). Each kernel's first thread calls
// trap_unless_smem_aligned, so that a start off the boundary stops the kernel rather than let TMA
// write tiles in another swizzle phase; aligned_dynamic_smem's round-up is then zero. (Spelled
// as a run-time round-up and checked in one thread: with the segment's constant address, or the
// check in every thread, ptxas allocated registers differently and spilled 8-12 bytes in the
// single-pass dK/dV and the general D = 128 forward kernels; so did `__align__(1024)`.)
__device__ __forceinline__ unsigned char* dynamic_smem_segment() {
  extern __shared__ unsigned char dynamic_smem[];
  return dynamic_smem;
}
__device__ __forceinline__ unsigned char* aligned_dynamic_smem() {
  unsigned char* segment = dynamic_smem_segment();
  return segment + ((1024u - smem_u32(segment) % 1024u) % 1024u);
}
__device__ __forceinline__ void trap_unless_smem_aligned() {
  if (smem_u32(dynamic_smem_segment()) % 1024u != 0) __trap();
}

// blockIdx.x read anew (volatile: not merged with earlier reads), for values a kernel would
// otherwise hold in a register across a long loop.
__device__ __forceinline__ unsigned ctaid_x() {
  unsigned x;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(x));
  return x;
}

// ---- mbarriers (shared::cta, 64-bit) ----
__device__ __forceinline__ void mbar_init(std::uint32_t bar, std::uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
// Makes initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` the bulk copies will deliver to this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase with the given parity has completed. A fresh barrier counts its
// phase "before 0" (parity 1) as completed, so producers start waiting with parity 1.
// The suspend-time hint (in ns; CUTLASS's ClusterBarrier::wait passes the same) lets try_wait
// suspend the thread until the phase completes. Without it each try returned after a few
// cycles: the producer warps' retry loops were 20% of the D = 64 forward's issued instructions
// (ncu, NOTES.md "Waiting on mbarriers"), all on the scheduler that also runs a consumer warp.
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  constexpr std::uint32_t kSuspendTimeHintNs = 10000000;
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, %2;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity), "r"(kSuspendTimeHintNs)
      : "memory");
}

// ---- bulk tensor copies ----
// Copies the box at coordinates (c0, c1, c2, c3) (innermost first) of a 4-D tensor map into
// shared memory; completion is counted on `bar` in bytes.
__device__ __forceinline__ void tma_load_4d(std::uint32_t dst, const CUtensorMap& map,
                                            std::uint32_t bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Copies a shared-memory box to coordinates (c0, c1, c2, c3) of a 4-D tensor map; elements
// past the tensor's dims are not written. Tracked in the issuing thread's bulk group
// (bulk_commit, bulk_wait_read); the source must be visible to the async proxy
// (fence_async_shared).
__device__ __forceinline__ void tma_store_4d(const CUtensorMap& map, std::uint32_t src, int c0,
                                             int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<std::uint64_t>(&map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(&map))
               : "memory");
}

// Makes this thread's generic-proxy writes to shared memory (st.shared) visible to the async
// proxy (wgmma, TMA) of the threads that synchronize with it afterwards.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void st_shared_u32(std::uint32_t addr, std::uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ void st_shared_v4(std::uint32_t addr, const float (&v)[4]) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(v[0]), "f"(v[1]),
               "f"(v[2]), "f"(v[3])
               : "memory");
}

// dst[0..3] += v (fp32, 16-byte aligned global memory) as one vector reduction in the L2: no
// return value, so the thread does not wait for it.
__device__ __forceinline__ void red_add_v4(float* dst, const float (&v)[4]) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v[0]), "f"(v[1]),
               "f"(v[2]), "f"(v[3])
               : "memory");
}

// ---- bulk reductions (copy engine) ----
// dst[0 .. bytes / 4) += src[...] (fp32, shared::cta -> global), done by the copy engine; the
// issuing thread tracks it in its bulk group. bytes: a multiple of 16, both addresses 16-byte
// aligned.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, std::uint32_t src,
                                                    std::uint32_t bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
      "r"(src), "r"(bytes)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until at most kPending of this thread's bulk groups still read their shared memory.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Waits until at most kPending of this thread's bulk groups are still running.
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- warpgroup register reallocation ----
template <int kRegs>
__device__ __forceinline__ void warpgroup_reg_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void warpgroup_reg_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Barrier among `threads` threads (a multiple of 32) on hardware barrier `id` (1..15; 0 is
// __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- wgmma ----
// Orders earlier register and shared-memory accesses before the next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most kPending committed groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses to an accumulator across wgmma issue and wait.
template <int kN>
__device__ __forceinline__ void fence_operands(float (&acc)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[n][e])::"memory");
}

}  // namespace memattn::cuda::sm90
