// SIMT attention kernels for float32 (no tensor cores): the correct-but-slow CUDA path, for
// dtypes and head dims the tensor-core kernels do not take. Exactness over speed, fp32 all
// the way, the semantics of DESIGN.md §2 via common/semantics.cuh.
//
// Layout: one warp per row, 4 warps per block. A q/k/v row (D, Dv <= 256) is split over the
// lanes as elements lane, lane + 32, ... (at most kPerLane = 8 per lane, held in registers),
// so every row load of the warp is coalesced and a dot product is a per-lane sum followed by
// a butterfly reduction (__shfl_xor_sync), which leaves the same bits in every lane: branches
// on a score are warp-uniform.
//
// - forward: one warp per query row; online softmax over the keys it may see.
// - backward: delta (common/delta.cu), then a dQ kernel (one warp per query row, which also
//   writes the mask gradient) and a dK/dV kernel (one warp per key row, looping over the GQA
//   group's query heads and all queries). Each output element has exactly one writer: no
//   atomics, deterministic results.
//
// Limits: no shared-memory tiling, so warps share K/V (Q/dO) rows only through the caches, and
// the dK/dV kernel recomputes the scores the dQ kernel already computed. Scores are in log2
// units (dot(q, k) * scale * log2(e)) as in every other kernel.
#include <cstdint>
#include <string>

#include "cuda/common/check.h"
#include "cuda/common/semantics.cuh"
#include "cuda/launch.h"
#include "memattn/error.h"

namespace memattn::cuda {
namespace {

using index_t = std::int64_t;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / kWarpSize;  // row elements per lane
static_assert(kMaxHeadDim % kWarpSize == 0, "a row must split evenly over the lanes");

// A lane's slice of one row: element lane + kWarpSize * e lives in x[e].
struct LaneRow {
  float x[kPerLane];
};

__device__ __forceinline__ LaneRow zero_row() {
  LaneRow r;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) r.x[e] = 0.f;
  return r;
}

// Reads row[0, n) (contiguous); elements past n read as 0 so they add nothing to dot products.
__device__ __forceinline__ LaneRow load_row(const float* row, int n, int lane) {
  LaneRow r;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + kWarpSize * e;
    r.x[e] = d < n ? row[d] : 0.f;
  }
  return r;
}

__device__ __forceinline__ void store_row(float* row, const LaneRow& r, float scale, int n,
                                          int lane) {
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + kWarpSize * e;
    if (d < n) row[d] = r.x[e] * scale;
  }
}

// acc += w * r
__device__ __forceinline__ void add_scaled(LaneRow& acc, float w, const LaneRow& r) {
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc.x[e] += w * r.x[e];
}

// The full dot product, identical in every lane.
__device__ __forceinline__ float warp_dot(const LaneRow& a, const LaneRow& b) {
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) sum += a.x[e] * b.x[e];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

// Row pointers of the [B, H, L, *] tensors (last dim contiguous).
__device__ __forceinline__ const float* row_of(const void* base, const Strides3& st, index_t b,
                                               index_t h, index_t l) {
  return static_cast<const float*>(base) + b * st.b + h * st.h + l * st.l;
}
__device__ __forceinline__ float* row_of(void* base, const Strides3& st, index_t b, index_t h,
                                         index_t l) {
  return static_cast<float*>(base) + b * st.b + h * st.h + l * st.l;
}

// Keys j < key_end(i) are the only ones query i may see (causal); 0 when it sees none.
__device__ __forceinline__ int key_end(const DeviceParams& p, int i) {
  if (!p.causal) return p.Lk;
  const index_t end = static_cast<index_t>(i) + p.causal_offset + 1;
  return static_cast<int>(end < 0 ? 0 : (end > p.Lk ? p.Lk : end));
}

// Queries i >= query_begin(j) are the only ones that may see key j (causal).
__device__ __forceinline__ int query_begin(const DeviceParams& p, int j) {
  if (!p.causal) return 0;
  const index_t begin = static_cast<index_t>(j) - p.causal_offset;
  return static_cast<int>(begin < 0 ? 0 : (begin > p.Lq ? p.Lq : begin));
}

// Dropout factor Z of (bh, i, j): keep_scale where kept, 0 where dropped, 1 without dropout.
__device__ __forceinline__ float dropout_factor(const DeviceParams& p, index_t bh, int i, int j) {
  if (!p.dropout) return 1.f;
  return dropout_keeps(p, static_cast<std::uint64_t>(bh), i, j) ? p.dropout_keep_scale : 0.f;
}

// lse in log2 units, as the scores; -inf stays -inf (fully masked row: P = 0 everywhere).
__device__ __forceinline__ float lse_log2(const DeviceParams& p, index_t b, index_t h, int i) {
  const float lse = p.lse[b * p.lse_st.b + h * p.lse_st.h + i * p.lse_st.l];
  return lse == -INFINITY ? -INFINITY : lse * kLog2e;
}

// Where the mask gradient sums over b (h), one warp walks every b (h) for its query row, so no
// two warps add into one grad_mask element. Without a mask gradient nothing is summed.
__host__ __device__ __forceinline__ bool batch_inside(const DeviceParams& p) {
  return p.grad_mask != nullptr && p.grad_mask_b_outer == 1;
}
__host__ __device__ __forceinline__ bool heads_inside(const DeviceParams& p) {
  return p.grad_mask != nullptr && p.grad_mask_h_outer == 1;
}

// Warp index in the grid; rows are on grid.x, which takes up to 2^31 - 1 blocks.
__device__ __forceinline__ index_t warp_row() {
  return static_cast<index_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarpSize); }

// ---------------------------------------------------------------- forward

// One warp per query row (b, h, i). Online softmax: running max m (log2 units) and running sum
// l of the undropped probabilities; the output accumulator gets the dropped ones. Masked keys
// are skipped, so m is finite after the first visible key.
__global__ void __launch_bounds__(kThreads)
    simt_forward_kernel(const __grid_constant__ DeviceParams p) {
  const index_t row = warp_row();
  if (row >= static_cast<index_t>(p.B) * p.Hq * p.Lq) return;  // whole warp: shuffles stay safe
  const int lane = lane_id();
  const int i = static_cast<int>(row % p.Lq);
  const index_t bh = row / p.Lq, h = bh % p.Hq, b = bh / p.Hq, hk = h / p.group;
  const ElementMasks<float> masks{p, static_cast<int>(b), static_cast<int>(h)};

  const LaneRow q = load_row(row_of(p.q, p.q_st, b, h, i), p.D, lane);  // q: [B, Hq, Lq, D]
  LaneRow acc = zero_row();
  float m = -INFINITY, l = 0.f;
  const int j_end = key_end(p, i);
  for (int j = 0; j < j_end; ++j) {
    const LaneRow k = load_row(row_of(p.k, p.k_st, b, hk, j), p.D, lane);  // k: [B, Hk, Lk, D]
    const float x = masks.apply(warp_dot(q, k) * p.scale_log2, i, j);
    if (x == -INFINITY) continue;
    const float m_new = fmaxf(m, x);
    const float rescale = exp2_shifted(m, m_new);  // 0 while nothing was seen (m = -inf)
    const float prob = exp2f(x - m_new);
    l = l * rescale + prob;
    m = m_new;
    const LaneRow v = load_row(row_of(p.v, p.v_st, b, hk, j), p.Dv, lane);  // v: [B, Hk, Lk, Dv]
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc.x[e] *= rescale;
    add_scaled(acc, prob * dropout_factor(p, bh, i, j), v);
  }

  // A row that saw no key: out = 0, lse = -inf (never NaN).
  const bool empty = l == 0.f;
  store_row(row_of(p.out, p.out_st, b, h, i), acc, empty ? 0.f : 1.f / l, p.Dv, lane);
  if (lane == 0)
    p.lse[b * p.lse_st.b + h * p.lse_st.h + i * p.lse_st.l] =
        empty ? -INFINITY : (m + log2f(l)) * kLn2;
}

// ---------------------------------------------------------------- backward

// One warp per query row: dQ_i = scale * sum_j dS_ij k_j with dS_ij = P_ij (Z_ij dP_ij -
// delta_i), P recomputed from the saved lse. dS is also the mask gradient (natural units). The
// grid covers (b_outer, h_outer, i); where grad_mask sums over b or h the warp loops over them,
// so it alone adds into grad_mask[., ., i, :] (the caller zero-fills grad_mask).
__global__ void __launch_bounds__(kThreads)
    simt_backward_dq_kernel(const __grid_constant__ DeviceParams p) {
  const bool b_inside = batch_inside(p), h_inside = heads_inside(p);
  const index_t outer_h = h_inside ? 1 : p.Hq;
  const index_t outer_b = b_inside ? 1 : p.B;
  const index_t row = warp_row();
  if (row >= outer_b * outer_h * p.Lq) return;
  const int lane = lane_id();
  const int i = static_cast<int>(row % p.Lq);
  const index_t ho = (row / p.Lq) % outer_h, bo = row / p.Lq / outer_h;
  const int j_end = key_end(p, i);

  for (index_t b = b_inside ? 0 : bo; b < (b_inside ? p.B : bo + 1); ++b) {
    for (index_t h = h_inside ? 0 : ho; h < (h_inside ? p.Hq : ho + 1); ++h) {
      const index_t bh = b * p.Hq + h, hk = h / p.group;
      const ElementMasks<float> masks{p, static_cast<int>(b), static_cast<int>(h)};
      const float lse2 = lse_log2(p, b, h, i);
      const float delta = p.delta[bh * p.Lq + i];
      const LaneRow q = load_row(row_of(p.q, p.q_st, b, h, i), p.D, lane);
      const LaneRow dout = load_row(row_of(p.grad_out, p.grad_out_st, b, h, i), p.Dv, lane);
      LaneRow dq = zero_row();
      // A fully masked row has P = 0 everywhere: dQ = 0 and no mask gradient.
      for (int j = 0; lse2 != -INFINITY && j < j_end; ++j) {
        const LaneRow k = load_row(row_of(p.k, p.k_st, b, hk, j), p.D, lane);
        const float x = masks.apply(warp_dot(q, k) * p.scale_log2, i, j);
        if (x == -INFINITY) continue;
        const float prob = exp2f(x - lse2);
        const LaneRow v = load_row(row_of(p.v, p.v_st, b, hk, j), p.Dv, lane);
        const float dp = warp_dot(dout, v) * dropout_factor(p, bh, i, j);
        const float ds = prob * (dp - delta);
        add_scaled(dq, ds, k);
        if (p.grad_mask != nullptr && lane == 0)
          p.grad_mask[b * p.grad_mask_st[0] + h * p.grad_mask_st[1] + i * p.grad_mask_st[2] +
                      j * p.grad_mask_st[3]] += ds;
      }
      store_row(row_of(p.grad_q, p.grad_q_st, b, h, i), dq, p.scale, p.D, lane);
    }
  }
}

// One warp per key row (b, hk, j): dV_j = sum over the group's heads h and queries i of
// Z_ij P_ij dO_i, dK_j = scale * sum dS_ij q_i. Gathering over all (h, i) in one warp instead
// of scattering from the query side is what makes this atomic-free.
__global__ void __launch_bounds__(kThreads)
    simt_backward_dkdv_kernel(const __grid_constant__ DeviceParams p) {
  const index_t row = warp_row();
  if (row >= static_cast<index_t>(p.B) * p.Hk * p.Lk) return;
  const int lane = lane_id();
  const int j = static_cast<int>(row % p.Lk);
  const index_t bhk = row / p.Lk, hk = bhk % p.Hk, b = bhk / p.Hk;
  const int i_begin = query_begin(p, j);

  const LaneRow k = load_row(row_of(p.k, p.k_st, b, hk, j), p.D, lane);
  const LaneRow v = load_row(row_of(p.v, p.v_st, b, hk, j), p.Dv, lane);
  LaneRow dk = zero_row(), dv = zero_row();
  for (index_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    const index_t bh = b * p.Hq + h;
    const ElementMasks<float> masks{p, static_cast<int>(b), static_cast<int>(h)};
    for (int i = i_begin; i < p.Lq; ++i) {
      const float lse2 = lse_log2(p, b, h, i);
      if (lse2 == -INFINITY) continue;  // fully masked row: P = 0
      const LaneRow q = load_row(row_of(p.q, p.q_st, b, h, i), p.D, lane);
      const float x = masks.apply(warp_dot(q, k) * p.scale_log2, i, j);
      if (x == -INFINITY) continue;
      const float prob = exp2f(x - lse2);
      const float z = dropout_factor(p, bh, i, j);
      const LaneRow dout = load_row(row_of(p.grad_out, p.grad_out_st, b, h, i), p.Dv, lane);
      add_scaled(dv, prob * z, dout);
      const float ds = prob * (warp_dot(dout, v) * z - p.delta[bh * p.Lq + i]);
      add_scaled(dk, ds, q);
    }
  }
  store_row(row_of(p.grad_k, p.grad_k_st, b, hk, j), dk, p.scale, p.D, lane);
  store_row(row_of(p.grad_v, p.grad_v_st, b, hk, j), dv, 1.f, p.Dv, lane);
}

// Rows live in registers, kPerLane elements per lane: larger head dims would be cut off.
void check_head_dims(const DeviceParams& p) {
  if (p.D > kMaxHeadDim || p.Dv > kMaxHeadDim)
    throw Error(ErrorKind::not_implemented,
                "memattn: the SIMT CUDA kernels take head dims up to " +
                    std::to_string(kMaxHeadDim) + ", got D = " + std::to_string(p.D) +
                    " and Dv = " + std::to_string(p.Dv) + "; use the CPU backend for larger ones");
}

unsigned blocks_for(index_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void simt_forward(const DeviceParams& p, cudaStream_t stream) {
  check_head_dims(p);
  const index_t rows = static_cast<index_t>(p.B) * p.Hq * p.Lq;
  if (rows == 0) return;  // an empty grid is a launch error
  simt_forward_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(p);
  check_launch("simt_forward_kernel");
}

void simt_backward(const DeviceParams& p, cudaStream_t stream) {
  check_head_dims(p);
  launch_backward_delta<float>(p, stream);
  const index_t dq_rows =
      (batch_inside(p) ? 1 : static_cast<index_t>(p.B)) * (heads_inside(p) ? 1 : p.Hq) * p.Lq;
  if (dq_rows > 0) {
    simt_backward_dq_kernel<<<blocks_for(dq_rows), kThreads, 0, stream>>>(p);
    check_launch("simt_backward_dq_kernel");
  }
  const index_t kv_rows = static_cast<index_t>(p.B) * p.Hk * p.Lk;
  if (kv_rows > 0) {
    simt_backward_dkdv_kernel<<<blocks_for(kv_rows), kThreads, 0, stream>>>(p);
    check_launch("simt_backward_dkdv_kernel");
  }
}

}  // namespace memattn::cuda
