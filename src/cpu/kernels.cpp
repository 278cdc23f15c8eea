// CPU attention kernels: the FlashAttention-2 schedule on CPU cores.
//
// Forward: one task per (batch, q head, block of Bm queries). The task walks the key blocks
// (Bn keys) its queries may see, keeping a running max and sum per row (online softmax), so
// only a Bm x Bn tile of scores ever exists. Backward: one task per (batch, kv head, chunk
// of key blocks); it recomputes P from the saved log-sum-exp and accumulates dK, dV for its
// keys (all GQA q heads of the group) and dQ for every query block. Masks, padding, causal
// limits and dropout are applied per tile, read with the caller's strides (stride 0 where a
// mask dimension is broadcast), never expanded.
//
// Every matrix product is one register-blocked micro-kernel (C += A * B, A broadcast by
// element, B and C as rows of SIMD vectors) over fp32 tiles (fp64 for fp64 inputs). This file
// is compiled once per instruction set (-DMEMATTN_ISA=base|avx2|avx512); the vector width and
// the micro-tile height follow the target, so the loops are explicit SIMD on every variant.
// Limits: bf16 inputs are widened to fp32 when tiles are packed (no bf16 dot products yet).
#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/errors.h"
#include "cpu/heuristics.h"
#include "cpu/thread_pool.h"
#include "memattn/philox.h"

#ifndef MEMATTN_ISA
#error "kernels.cpp is compiled once per ISA with -DMEMATTN_ISA=<name>"
#endif

namespace memattn::cpu::MEMATTN_ISA {
namespace {

using index_t = std::int64_t;

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---------------------------------------------------------------- element types

struct bf16 {
  std::uint16_t bits;
};

template <class T>
struct AccumulatorOf {
  using type = float;  // bf16 and fp32 accumulate in fp32
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};

inline float widen(bf16 x) {
  const std::uint32_t u = static_cast<std::uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }

inline void narrow(float x, bf16& out) {  // round to nearest even, NaN stays NaN
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // A select, not a branch, so loops of narrow() vectorise.
  out.bits = static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}
inline void narrow(float x, float& out) { out = x; }
inline void narrow(double x, double& out) { out = x; }

// ---------------------------------------------------------------- SIMD

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kMicroRows = 8;  // 32 vector registers: 8 x 2 accumulators + operands
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
constexpr int kMicroRows = 6;  // 16 vector registers: 6 x 2 accumulators + operands
#else
constexpr int kVectorBytes = 16;
constexpr int kMicroRows = 6;
#endif

template <class Acc>
struct Simd {
  static constexpr int kWidth = kVectorBytes / static_cast<int>(sizeof(Acc));
  typedef Acc Vec __attribute__((vector_size(kVectorBytes)));
  static Vec load(const Acc* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(Acc* p, Vec v) { std::memcpy(p, &v, sizeof v); }
  static Vec splat(Acc x) { return Vec{} + x; }
  // Lane indices of the same width, for __builtin_shuffle.
  using Lane = std::conditional_t<sizeof(Acc) == 4, std::int32_t, std::int64_t>;
  typedef Lane LaneVec __attribute__((vector_size(kVectorBytes)));
  // Horizontal reduction by halving (log2(width) shuffles), not a scalar walk over lanes.
  template <class Op>
  static Acc reduce(Vec v, Op op) {
#pragma GCC unroll 8
    for (int half = kWidth / 2; half >= 1; half /= 2) {
      LaneVec rotate;
      for (int l = 0; l < kWidth; ++l) rotate[l] = (l + half) % kWidth;
      v = op(v, __builtin_shuffle(v, rotate));
    }
    return v[0];
  }
  static Acc sum(Vec v) {
    return reduce(v, [](Vec x, Vec y) { return x + y; });
  }
  static Acc max(Vec v) {
    return reduce(v, [](Vec x, Vec y) { return x > y ? x : y; });
  }
};

// Micro-tile: kMicroRows rows x two vectors of columns.
template <class Acc>
constexpr int kMicroCols = 2 * Simd<Acc>::kWidth;

constexpr index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

// C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N], all row-major with leading dims.
// M must be a multiple of kMicroRows and N of kMicroCols (tiles are padded to that).
template <class Acc>
void gemm(index_t M, index_t N, index_t K, const Acc* A, index_t lda, const Acc* B, index_t ldb,
          Acc* C, index_t ldc, bool accumulate) {
  using S = Simd<Acc>;
  constexpr int W = S::kWidth;
  constexpr int MR = kMicroRows;
  for (index_t i = 0; i < M; i += MR) {
    for (index_t j = 0; j < N; j += 2 * W) {
      typename S::Vec c0[MR], c1[MR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        if (accumulate) {
          c0[r] = S::load(C + (i + r) * ldc + j);
          c1[r] = S::load(C + (i + r) * ldc + j + W);
        } else {
          c0[r] = S::splat(0);
          c1[r] = S::splat(0);
        }
      }
      const Acc* a = A + i * lda;
      const Acc* b = B + j;
      for (index_t k = 0; k < K; ++k) {
        const auto b0 = S::load(b + k * ldb);
        const auto b1 = S::load(b + k * ldb + W);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const auto ar = S::splat(a[r * lda + k]);
          c0[r] += ar * b0;
          c1[r] += ar * b1;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        S::store(C + (i + r) * ldc + j, c0[r]);
        S::store(C + (i + r) * ldc + j + W, c1[r]);
      }
    }
  }
}

// 2^x for x <= 0 (and -inf), vectorised: round x to n + f with |f| <= 1/2, 2^f by its
// degree-7 Taylor polynomial (relative error < 1e-8), then add n to the exponent bits.
inline Simd<float>::Vec exp2_vec(Simd<float>::Vec x) {
  using S = Simd<float>;
  typedef std::int32_t IVec __attribute__((vector_size(kVectorBytes)));
  const auto below = x < S::splat(-125.0f);
  x = below ? S::splat(-125.0f) : x;
  const auto magic = S::splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const auto n = (x + magic) - magic;
  const auto f = x - n;
  auto p = S::splat(1.525273380405984e-05f);
  p = p * f + 1.540353039338161e-04f;
  p = p * f + 1.333355814642844e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  IVec bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, IVec) << 23;
  S::Vec r;
  std::memcpy(&r, &bits, sizeof r);
  return below ? S::splat(0.0f) : r;
}

// row[c] = 2^(row[c] * in_scale - offset) for c < n (n a multiple of the vector width);
// returns the sum. in_scale folds the softmax scale into the same pass.
inline float exp2_row(float* row, index_t n, float in_scale, float offset) {
  using S = Simd<float>;
  auto sum = S::splat(0);
  for (index_t c = 0; c < n; c += S::kWidth) {
    const auto p = exp2_vec(S::load(row + c) * in_scale - offset);
    S::store(row + c, p);
    sum += p;
  }
  return S::sum(sum);
}
inline double exp2_row(double* row, index_t n, double in_scale, double offset) {
  double total = 0;
  for (index_t c = 0; c < n; ++c) {
    row[c] = std::exp2(row[c] * in_scale - offset);
    total += row[c];
  }
  return total;
}

template <class Acc>
Acc row_max(const Acc* row, index_t n) {  // n a multiple of the vector width
  using S = Simd<Acc>;
  auto m = S::splat(-std::numeric_limits<Acc>::infinity());
  for (index_t c = 0; c < n; c += S::kWidth) {
    const auto v = S::load(row + c);
    m = m > v ? m : v;
  }
  return S::max(m);
}

// Sum of a[c] * b[c] over n (a multiple of the vector width).
template <class Acc>
Acc dot(const Acc* a, const Acc* b, index_t n) {
  using S = Simd<Acc>;
  auto acc = S::splat(0);
  for (index_t c = 0; c < n; c += S::kWidth) acc += S::load(a + c) * S::load(b + c);
  return S::sum(acc);
}

// y[0, n) = y * y_scale + sum over c < count of p[c] * X[c][0, n), rows of X ld apart; n a
// multiple of the vector width. Chunks of y stay in registers across all rows of X.
template <class Acc>
void gemv_rows(Acc* y, Acc y_scale, const Acc* p, index_t count, const Acc* X, index_t ld,
               index_t n) {
  using S = Simd<Acc>;
  constexpr int W = S::kWidth, kChunk = 4;
  index_t col = 0;
  for (; col + kChunk * W <= n; col += kChunk * W) {
    typename S::Vec acc[kChunk];
#pragma GCC unroll 4
    for (int u = 0; u < kChunk; ++u) acc[u] = S::load(y + col + u * W) * y_scale;
    for (index_t c = 0; c < count; ++c) {
      const auto pc = S::splat(p[c]);
#pragma GCC unroll 4
      for (int u = 0; u < kChunk; ++u) acc[u] += pc * S::load(X + c * ld + col + u * W);
    }
#pragma GCC unroll 4
    for (int u = 0; u < kChunk; ++u) S::store(y + col + u * W, acc[u]);
  }
  for (; col < n; col += W) {
    auto acc = S::load(y + col) * y_scale;
    for (index_t c = 0; c < count; ++c) acc += S::splat(p[c]) * S::load(X + c * ld + col);
    S::store(y + col, acc);
  }
}

// ---------------------------------------------------------------- operands

// A strided 4-D tensor; size-1 dims get stride 0 so broadcast reads need no branches.
struct Strided4 {
  const char* data = nullptr;
  DType dtype = DType::f32;
  index_t stride[4] = {0, 0, 0, 0};  // elements

  static Strided4 of(const TensorView& t) {
    Strided4 s;
    s.data = static_cast<const char*>(t.data);
    s.dtype = t.dtype;
    for (int i = 0; i < t.rank; ++i) s.stride[i] = t.sizes[i] == 1 ? 0 : t.strides[i];
    return s;
  }
  index_t offset(index_t a, index_t b, index_t c) const {
    return a * stride[0] + b * stride[1] + c * stride[2];
  }
};

// Everything a tile step needs to know about masks for one (batch, q head).
template <class Acc>
struct MaskContext {
  bool has_mask = false, has_padding = false, causal = false;
  Strided4 mask;     // attn_mask, [B|1, Hq|1, Lq|1, Lk|1]
  Strided4 padding;  // key_padding_mask [B, Lk] (dims 0 and 1 used)
  index_t causal_offset = 0;

  bool any() const { return has_mask || has_padding || causal; }

  // Applies the masks to one row of scores in log2 units: keys j0 .. j0+n-1 of query i.
  void apply(Acc* row, index_t n, index_t b, index_t h, index_t i, index_t j0) const {
    constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    if (has_mask) {
      const index_t base = mask.offset(b, h, i) + j0 * mask.stride[3];
      const index_t sj = mask.stride[3];
      switch (mask.dtype) {
        case DType::boolean: {
          const auto* m = reinterpret_cast<const std::uint8_t*>(mask.data) + base;
          for (index_t c = 0; c < n; ++c) row[c] = m[c * sj] ? row[c] : kNegInf;
          break;
        }
        case DType::f32: {
          const auto* m = reinterpret_cast<const float*>(mask.data) + base;
          for (index_t c = 0; c < n; ++c) row[c] += static_cast<Acc>(m[c * sj] * kLog2e);
          break;
        }
        case DType::f64: {
          const auto* m = reinterpret_cast<const double*>(mask.data) + base;
          for (index_t c = 0; c < n; ++c) row[c] += static_cast<Acc>(m[c * sj] * kLog2e);
          break;
        }
        case DType::bf16: {
          const auto* m = reinterpret_cast<const bf16*>(mask.data) + base;
          for (index_t c = 0; c < n; ++c) row[c] += static_cast<Acc>(widen(m[c * sj]) * kLog2e);
          break;
        }
        case DType::f16:
          break;  // validation rejects fp16 masks on the CPU path (no fp16 inputs here)
      }
    }
    if (has_padding) {
      const auto* p = reinterpret_cast<const std::uint8_t*>(padding.data) + b * padding.stride[0];
      const index_t sj = padding.stride[1];
      for (index_t c = 0; c < n; ++c) row[c] = p[(j0 + c) * sj] ? kNegInf : row[c];
    }
    if (causal) {
      const index_t first_hidden = std::max<index_t>(0, i + causal_offset + 1 - j0);
      for (index_t c = first_hidden; c < n; ++c) row[c] = kNegInf;
    }
  }
};

template <class Acc>
MaskContext<Acc> mask_context(const ForwardArgs& a, const ProblemShape& s) {
  MaskContext<Acc> m;
  m.has_mask = a.attn_mask.present();
  if (m.has_mask) m.mask = Strided4::of(a.attn_mask);
  m.has_padding = a.key_padding_mask.present();
  if (m.has_padding) {
    m.padding.data = static_cast<const char*>(a.key_padding_mask.data);
    m.padding.stride[0] = a.key_padding_mask.strides[0];
    m.padding.stride[1] = a.key_padding_mask.strides[1];
  }
  m.causal = a.is_causal;
  m.causal_offset = s.causal_offset;
  return m;
}

// Dropout for one row: multiplies row[c] (keys j0 + c) by keep / (1 - p), or by 0.
struct Dropout {
  bool enabled = false;
  std::uint64_t seed = 0;
  std::uint32_t threshold = 0;
  double keep_scale = 1.0;

  template <class Acc>
  void apply(Acc* row, index_t n, index_t bh, index_t i, index_t j0) const {
    const Acc kept = static_cast<Acc>(keep_scale);
    index_t j = j0;
    while (j < j0 + n) {
      const auto draws =
          philox::dropout_draws(seed, static_cast<std::uint64_t>(bh), static_cast<std::uint32_t>(i),
                                static_cast<std::uint32_t>(j >> 2));
      for (index_t e = j & 3; e < 4 && j < j0 + n; ++e, ++j)
        row[j - j0] *= draws.x[e] >= threshold ? kept : Acc(0);
    }
  }
};

Dropout dropout_of(const ForwardArgs& a) {
  Dropout d;
  d.enabled = a.dropout_p > 0.0;
  d.seed = a.dropout_seed;
  d.threshold = philox::dropout_threshold(a.dropout_p);
  d.keep_scale = 1.0 / (1.0 - a.dropout_p);
  return d;
}

// What one online-softmax step did to a row: `empty` when every key so far is masked (the
// row holds no probabilities then), else the factor for the row's earlier output.
template <class Acc>
struct SoftmaxStep {
  bool empty;
  Acc rescale;
};

// One online-softmax step for the scores (log2 units) of query i against keys j0 .. j0+nk-1
// in row[0, n_cols): applies the masks, folds the row into the running max and sum, and
// turns it into probabilities in place (dropped out where dropout is on).
template <class Acc>
SoftmaxStep<Acc> online_softmax_step(Acc* row, index_t nk, index_t n_cols, Acc& running_max,
                                     Acc& row_sum, const MaskContext<Acc>& masks,
                                     const Dropout& dropout, index_t b, index_t h, index_t Hq,
                                     index_t i, index_t j0) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  if (masks.any()) masks.apply(row, nk, b, h, i, j0);
  std::fill(row + nk, row + n_cols, kNegInf);
  const Acc m_new = std::max(running_max, row_max(row, n_cols));
  if (m_new == kNegInf) return {true, Acc(1)};
  const Acc rescale = std::exp2(running_max - m_new);
  row_sum = row_sum * rescale + exp2_row(row, n_cols, Acc(1), m_new);
  running_max = m_new;
  if (dropout.enabled) dropout.apply(row, nk, b * Hq + h, i, j0);
  return {false, rescale};
}

// Host scratch for all workers, 64-byte aligned, zero-filled (padding lanes must be finite).
template <class Acc>
class Scratch {
 public:
  Scratch(index_t per_worker, int workers) : per_worker_(round_up(per_worker, 16)) {
    const std::size_t bytes = static_cast<std::size_t>(per_worker_) * workers * sizeof(Acc);
    if (bytes == 0) return;
    data_ = static_cast<Acc*>(std::aligned_alloc(64, round_up(static_cast<index_t>(bytes), 64)));
    if (!data_) throw_out_of_memory(bytes);
    std::memset(data_, 0, bytes);
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Acc* worker(int w) const { return data_ + static_cast<index_t>(w) * per_worker_; }
  Acc* data() const { return data_; }

 private:
  index_t per_worker_;
  Acc* data_ = nullptr;
};

// Carves consecutive buffers out of one worker's scratch.
template <class Acc>
struct Carver {
  Acc* next;
  Acc* take(index_t n) {
    Acc* p = next;
    next += round_up(n, 16);
    return p;
  }
};

// Copies a rows x cols block (element strides rs, cs) into dst (leading dim ld), times scale.
template <class T, class Acc>
void pack_rows(const T* src, index_t rs, index_t cs, index_t rows, index_t cols, Acc scale,
               Acc* dst, index_t ld) {
  for (index_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    Acc* d = dst + r * ld;
    if (cs == 1) {
      for (index_t c = 0; c < cols; ++c) d[c] = static_cast<Acc>(widen(s[c])) * scale;
    } else {
      for (index_t c = 0; c < cols; ++c) d[c] = static_cast<Acc>(widen(s[c * cs])) * scale;
    }
  }
}

// dst[c][r] = src[r][c]: the transpose of a rows x cols block, as above.
template <class T, class Acc>
void pack_transposed(const T* src, index_t rs, index_t cs, index_t rows, index_t cols, Acc* dst,
                     index_t ld) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c)
      dst[c * ld + r] = static_cast<Acc>(widen(src[r * rs + c * cs]));
}

template <class Acc>
void transpose_tile(const Acc* src, index_t ld_src, index_t rows, index_t cols, Acc* dst,
                    index_t ld_dst) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// Writes rows x cols of an fp32/fp64 tile to a strided T destination, times scale.
template <class T, class Acc>
void store_rows(const Acc* src, index_t ld, index_t rows, index_t cols, Acc scale, T* dst,
                index_t rs, index_t cs) {
  for (index_t r = 0; r < rows; ++r) {
    const Acc* s = src + r * ld;
    T* d = dst + r * rs;
    if (cs == 1) {  // the common layout: a loop the compiler vectorises
      for (index_t c = 0; c < cols; ++c) narrow(s[c] * scale, d[c]);
    } else {
      for (index_t c = 0; c < cols; ++c) narrow(s[c] * scale, d[c * cs]);
    }
  }
}

template <class T>
const T* element(const TensorView& t, index_t a, index_t b, index_t c) {
  return static_cast<const T*>(t.data) + a * t.strides[0] + b * t.strides[1] + c * t.strides[2];
}
template <class T>
T* mutable_element(const TensorView& t, index_t a, index_t b, index_t c) {
  return static_cast<T*>(t.data) + a * t.strides[0] + b * t.strides[1] + c * t.strides[2];
}

// ---------------------------------------------------------------- forward

// Row-wise forward for few query rows (decoding). One task per (batch, kv head, key chunk):
// every query row of every q head in the GQA group shares each K and V row it reads, so K and
// V are read once per call. Each chunk keeps its own unnormalised output, running max and sum
// per row; a final pass merges the chunks (the flash-decoding split) and normalises.
template <class T>
void forward_rowwise(const ForwardArgs& a, const ProblemShape& s, int num_threads) {
  using Acc = typename AccumulatorOf<T>::type;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  constexpr index_t W = Simd<Acc>::kWidth;
  const index_t Bn = forward_tiles(s.D, s.Dv).block_k;
  const index_t group = s.group_size(), rows = s.Lq * group;  // rows of one task
  const index_t d_pad = round_up(s.D, W), dv_pad = round_up(s.Dv, W), n_pad = round_up(Bn, W);
  const index_t k_blocks = (s.Lk + Bn - 1) / Bn, units = s.B * s.Hk;
  int splits = key_splits(units, k_blocks, num_threads);
  const index_t chunk_blocks = k_blocks == 0 ? 0 : (k_blocks + splits - 1) / splits;
  splits = chunk_blocks == 0 ? 1 : static_cast<int>((k_blocks + chunk_blocks - 1) / chunk_blocks);
  const index_t tasks = units * splits;
  if (tasks == 0 || rows == 0) return;
  const int workers = static_cast<int>(std::min<index_t>(std::max(num_threads, 1), tasks));

  // Per task: O [rows][Dv], running max [rows] (log2 units), running sum [rows].
  const index_t partial_size = rows * (dv_pad + 2);
  Scratch<Acc> partial(tasks * partial_size, 1);
  Scratch<Acc> scratch(rows * d_pad + Bn * d_pad + Bn * dv_pad + n_pad + 64, workers);
  const MaskContext<Acc> masks = mask_context<Acc>(a, s);
  const Dropout dropout = dropout_of(a);
  const Acc q_scale = static_cast<Acc>(s.scale * kLog2e);
  // Rows of k and v that already are contiguous Acc vectors (whole vectors, so no read past a
  // row's end) are read where they lie instead of being packed.
  const bool in_place = std::is_same_v<T, Acc> && a.k.strides[3] == 1 && a.v.strides[3] == 1 &&
                        s.D % W == 0 && s.Dv % W == 0;

  parallel_for(tasks, workers, [&](index_t task, int worker) {
    const index_t split = task % splits, unit = task / splits;
    const index_t b = unit / s.Hk, hk = unit % s.Hk;
    Acc* O = partial.data() + task * partial_size;
    Acc* running_max = O + rows * dv_pad;
    Acc* row_sum = running_max + rows;
    Carver<Acc> carve{scratch.worker(worker)};
    Acc* Qs = carve.take(rows * d_pad);  // [group * Lq][D], pre-scaled
    Acc* Ks = carve.take(Bn * d_pad);    // [Bn][D]
    Acc* Vs = carve.take(Bn * dv_pad);   // [Bn][Dv]
    Acc* p = carve.take(n_pad);          // scores, then probabilities, of one row

    for (index_t g = 0; g < group; ++g)
      pack_rows(element<T>(a.q, b, hk * group + g, 0), a.q.strides[2], a.q.strides[3], s.Lq, s.D,
                q_scale, Qs + g * s.Lq * d_pad, d_pad);
    std::fill(O, O + rows * dv_pad, Acc(0));
    std::fill(running_max, running_max + rows, kNegInf);
    std::fill(row_sum, row_sum + rows, Acc(0));

    const index_t kb_end = std::min(k_blocks, (split + 1) * chunk_blocks);
    for (index_t kb = split * chunk_blocks; kb < kb_end; ++kb) {
      const index_t j0 = kb * Bn, nk = std::min(Bn, s.Lk - j0);
      if (a.is_causal && j0 > s.Lq - 1 + s.causal_offset) break;  // hidden from every row
      const Acc *k_rows = Ks, *v_rows = Vs;
      index_t k_ld = d_pad, v_ld = dv_pad;
      if constexpr (std::is_same_v<T, Acc>) {
        if (in_place) {
          k_rows = element<T>(a.k, b, hk, j0);
          v_rows = element<T>(a.v, b, hk, j0);
          k_ld = a.k.strides[2];
          v_ld = a.v.strides[2];
        }
      }
      if (k_rows == Ks) {
        pack_rows(element<T>(a.k, b, hk, j0), a.k.strides[2], a.k.strides[3], nk, s.D, Acc(1), Ks,
                  d_pad);
        pack_rows(element<T>(a.v, b, hk, j0), a.v.strides[2], a.v.strides[3], nk, s.Dv, Acc(1), Vs,
                  dv_pad);
      }
      for (index_t row = 0; row < rows; ++row) {
        const index_t h = hk * group + row / s.Lq, i = row % s.Lq;
        for (index_t c = 0; c < nk; ++c) p[c] = dot(Qs + row * d_pad, k_rows + c * k_ld, d_pad);
        const SoftmaxStep<Acc> step = online_softmax_step(
            p, nk, n_pad, running_max[row], row_sum[row], masks, dropout, b, h, s.Hq, i, j0);
        if (step.empty) continue;
        gemv_rows(O + row * dv_pad, step.rescale, p, nk, v_rows, v_ld, dv_pad);
      }
    }
  });

  // Merge the chunks of each row: rescale each to the common max, add, normalise.
  parallel_for(units, workers, [&](index_t unit, int) {
    const index_t b = unit / s.Hk, hk = unit % s.Hk;
    for (index_t row = 0; row < rows; ++row) {
      const index_t h = hk * group + row / s.Lq, i = row % s.Lq;
      const Acc* first = partial.data() + unit * splits * partial_size;
      Acc m = kNegInf;
      for (int sp = 0; sp < splits; ++sp)
        m = std::max(m, first[sp * partial_size + rows * dv_pad + row]);
      Acc sum = 0;
      for (int sp = 0; sp < splits; ++sp) {
        const Acc* part = first + sp * partial_size;
        if (part[rows * dv_pad + row] != kNegInf)
          sum += part[rows * dv_pad + rows + row] * std::exp2(part[rows * dv_pad + row] - m);
      }
      const bool empty = sum == Acc(0);
      T* out = mutable_element<T>(a.out, b, h, i);
      for (index_t c = 0; c < s.Dv; ++c) {
        Acc v = 0;
        for (int sp = 0; sp < splits; ++sp) {
          const Acc* part = first + sp * partial_size;
          if (part[rows * dv_pad + row] != kNegInf)
            v += part[row * dv_pad + c] * std::exp2(part[rows * dv_pad + row] - m);
        }
        narrow(empty ? Acc(0) : v / sum, out[c * a.out.strides[3]]);
      }
      static_cast<Acc*>(
          a.lse.data)[b * a.lse.strides[0] + h * a.lse.strides[1] + i * a.lse.strides[2]] =
          empty ? kNegInf : static_cast<Acc>((m + std::log2(sum)) * kLn2);
    }
  });
}

template <class T>
void forward_impl(const ForwardArgs& a, const ProblemShape& s, int num_threads) {
  using Acc = typename AccumulatorOf<T>::type;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  constexpr index_t MR = kMicroRows, NR = kMicroCols<Acc>;
  const CpuTiles tiles = forward_tiles(s.D, s.Dv);
  const index_t Bm = tiles.block_q, Bn = tiles.block_k;
  const index_t rows_pad = round_up(Bm, MR), cols_pad = round_up(Bn, NR);
  const index_t dv_pad = round_up(s.Dv, NR);
  const index_t q_blocks = (s.Lq + Bm - 1) / Bm;
  const index_t tasks = s.B * s.Hq * q_blocks;
  if (tasks == 0) return;
  if (forward_is_rowwise(s.Lq)) return forward_rowwise<T>(a, s, num_threads);

  const index_t group = s.group_size();
  const int workers = static_cast<int>(std::min<index_t>(std::max(num_threads, 1), tasks));

  // K^T and V, packed once per call into fp32 (fp64) tiles that every query block reads:
  // per (b, kv head, key block) a [D][Bn] tile of K^T followed by a [Bn][Dv] tile of V. V
  // rows that already are whole Acc vectors are read in place instead (no V tile).
  const bool v_in_place = std::is_same_v<T, Acc> && a.v.strides[3] == 1 && s.Dv % NR == 0;
  const index_t k_blocks = (s.Lk + Bn - 1) / Bn;
  const index_t kt_tile = s.D * cols_pad, v_tile = v_in_place ? 0 : Bn * dv_pad;
  const index_t kv_tile = kt_tile + v_tile;
  Scratch<Acc> packed(s.B * s.Hk * k_blocks * kv_tile, 1);
  parallel_for(s.B * s.Hk * k_blocks, workers, [&](index_t task, int) {
    const index_t bhk = task / k_blocks, j0 = (task % k_blocks) * Bn;
    const index_t b = bhk / s.Hk, hk = bhk % s.Hk, nk = std::min(Bn, s.Lk - j0);
    Acc* tile = packed.data() + task * kv_tile;
    pack_transposed(element<T>(a.k, b, hk, j0), a.k.strides[2], a.k.strides[3], nk, s.D, tile,
                    cols_pad);
    if (!v_in_place)
      pack_rows(element<T>(a.v, b, hk, j0), a.v.strides[2], a.v.strides[3], nk, s.Dv, Acc(1),
                tile + kt_tile, dv_pad);
  });

  const index_t per_worker =
      rows_pad * s.D + rows_pad * cols_pad + rows_pad * dv_pad + 3 * rows_pad + 64;
  Scratch<Acc> scratch(per_worker, workers);
  const MaskContext<Acc> masks = mask_context<Acc>(a, s);
  const Dropout dropout = dropout_of(a);
  // Scores live in log2 units: q is pre-scaled by scale * log2(e), so softmax is exp2.
  const Acc q_scale = static_cast<Acc>(s.scale * kLog2e);

  parallel_for(tasks, workers, [&](index_t task, int worker) {
    index_t block = task % q_blocks;
    if (a.is_causal) block = q_blocks - 1 - block;  // longest rows first
    const index_t bh = task / q_blocks, b = bh / s.Hq, h = bh % s.Hq, hk = h / group;
    const index_t i0 = block * Bm, mq = std::min(Bm, s.Lq - i0);
    const index_t m_rows = round_up(mq, MR);

    Carver<Acc> carve{scratch.worker(worker)};
    Acc* Qs = carve.take(rows_pad * s.D);      // [Bm][D], pre-scaled
    Acc* P = carve.take(rows_pad * cols_pad);  // [Bm][Bn] scores, then probabilities
    Acc* O = carve.take(rows_pad * dv_pad);    // [Bm][Dv] unnormalised output
    Acc* running_max = carve.take(rows_pad);
    Acc* row_sum = carve.take(rows_pad);
    Acc* rescale = carve.take(rows_pad);
    const Acc* kv_tiles = packed.data() + (b * s.Hk + hk) * k_blocks * kv_tile;

    pack_rows(element<T>(a.q, b, h, i0), a.q.strides[2], a.q.strides[3], mq, s.D, q_scale, Qs, s.D);
    std::fill(O, O + m_rows * dv_pad, Acc(0));
    std::fill(running_max, running_max + mq, kNegInf);
    std::fill(row_sum, row_sum + mq, Acc(0));

    // Keys this block may see at all: causal limit of its last row.
    index_t key_end = s.Lk;
    if (a.is_causal) key_end = std::clamp<index_t>(i0 + mq + s.causal_offset, 0, s.Lk);
    for (index_t j0 = 0; j0 < key_end; j0 += Bn) {
      const index_t nk = std::min(Bn, key_end - j0), n_cols = round_up(nk, NR);
      const Acc* Kt = kv_tiles + (j0 / Bn) * kv_tile;  // [D][Bn]
      const Acc* Vs = Kt + kt_tile;                    // [Bn][Dv], ld dv_pad
      index_t v_ld = dv_pad;
      if constexpr (std::is_same_v<T, Acc>) {
        if (v_in_place) {
          Vs = element<T>(a.v, b, hk, j0);
          v_ld = a.v.strides[2];
        }
      }
      gemm<Acc>(m_rows, n_cols, s.D, Qs, s.D, Kt, cols_pad, P, cols_pad, false);

      for (index_t r = 0; r < mq; ++r) {
        Acc* row = P + r * cols_pad;
        const SoftmaxStep<Acc> step = online_softmax_step(
            row, nk, n_cols, running_max[r], row_sum[r], masks, dropout, b, h, s.Hq, i0 + r, j0);
        rescale[r] = step.rescale;
        if (step.empty) std::fill(row, row + n_cols, Acc(0));  // adds nothing to O
      }
      for (index_t r = 0; r < mq; ++r)
        if (rescale[r] != Acc(1))
          for (index_t c = 0; c < dv_pad; ++c) O[r * dv_pad + c] *= rescale[r];
      gemm<Acc>(m_rows, dv_pad, nk, P, cols_pad, Vs, v_ld, O, dv_pad, true);
    }

    // Normalise; a row that saw no key gives 0 and lse = -inf.
    Acc* lse = static_cast<Acc*>(a.lse.data);
    for (index_t r = 0; r < mq; ++r) {
      const bool empty = row_sum[r] == Acc(0);
      const Acc inv = empty ? Acc(0) : Acc(1) / row_sum[r];
      store_rows(O + r * dv_pad, dv_pad, 1, s.Dv, inv, mutable_element<T>(a.out, b, h, i0 + r), 0,
                 a.out.strides[3]);
      lse[b * a.lse.strides[0] + h * a.lse.strides[1] + (i0 + r) * a.lse.strides[2]] =
          empty ? kNegInf : static_cast<Acc>((running_max[r] + std::log2(row_sum[r])) * kLn2);
    }
  });
}

// ---------------------------------------------------------------- backward

template <class T>
void backward_impl(const BackwardArgs& a, const ProblemShape& s, int num_threads) {
  using Acc = typename AccumulatorOf<T>::type;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  constexpr index_t MR = kMicroRows, NR = kMicroCols<Acc>;
  const ForwardArgs& f = a.fwd;
  const CpuTiles tiles = backward_tiles(s.D, s.Dv);
  const index_t Bm = tiles.block_q, Bn = tiles.block_k;
  const index_t q_rows = round_up(Bm, MR), q_cols = round_up(Bm, NR);
  const index_t k_rows = round_up(Bn, MR), k_cols = round_up(Bn, NR);
  const index_t d_pad = round_up(s.D, NR), dv_pad = round_up(s.Dv, NR);
  const index_t q_blocks = (s.Lq + Bm - 1) / Bm, k_blocks = (s.Lk + Bn - 1) / Bn;
  const index_t group = s.group_size();

  // Units of work. Where the mask gradient is broadcast over a dim, all of that dim runs
  // inside one task, so no two tasks ever add into the same mask-gradient element.
  const TensorView& g = a.grad_attn_mask;
  const bool batch_inside = g.present() && g.sizes[0] == 1 && s.B > 1;
  const bool heads_inside = g.present() && g.sizes[1] == 1 && s.Hq > 1;
  const bool keys_together = g.present() && g.sizes[3] == 1 && s.Lk > 1;
  const index_t outer_b = batch_inside ? 1 : s.B, outer_h = heads_inside ? 1 : s.Hk;
  int splits = keys_together ? 1 : key_splits(outer_b * outer_h, k_blocks, num_threads);
  const index_t chunk_blocks = k_blocks == 0 ? 0 : (k_blocks + splits - 1) / splits;
  splits = chunk_blocks == 0 ? 1 : static_cast<int>((k_blocks + chunk_blocks - 1) / chunk_blocks);
  const index_t tasks = outer_b * outer_h * splits;
  if (tasks == 0) return;

  // dQ of a split goes to its own float partial when there are several splits.
  const index_t dq_partial_size = splits > 1 ? splits * s.B * s.Hq * s.Lq * s.D : 0;
  Scratch<Acc> dq_partial(dq_partial_size, 1);

  const index_t per_worker =
      chunk_blocks * (2 * k_rows * d_pad + k_rows * dv_pad + s.D * k_cols + s.Dv * k_cols) +
      q_rows * (2 * d_pad + dv_pad + 2 * k_cols + 2) + 2 * k_rows * q_cols + 16 * 16;
  const int workers = static_cast<int>(std::min<index_t>(std::max(num_threads, 1), tasks));
  Scratch<Acc> scratch(per_worker, workers);
  const MaskContext<Acc> masks = mask_context<Acc>(f, s);
  const Dropout dropout = dropout_of(f);
  // q is packed pre-scaled by scale * log2(e), exactly as in the forward, so P is recomputed
  // from bit-identical scores; dK = scale * dS^T Q then needs a final factor of ln(2).
  const Acc q_scale = static_cast<Acc>(s.scale * kLog2e);
  const Acc scale = static_cast<Acc>(s.scale);
  const Acc dk_scale = static_cast<Acc>(kLn2);
  const Strided4 grad_mask = g.present() ? Strided4::of(g) : Strided4{};
  Acc* const grad_mask_data = static_cast<Acc*>(g.data);

  parallel_for(tasks, workers, [&](index_t task, int worker) {
    const int split = static_cast<int>(task % splits);
    const index_t unit = task / splits;
    const index_t ub = unit / outer_h, uh = unit % outer_h;
    const index_t b_begin = batch_inside ? 0 : ub, b_end = batch_inside ? s.B : ub + 1;
    const index_t h_begin = heads_inside ? 0 : uh, h_end = heads_inside ? s.Hk : uh + 1;
    const index_t kb_begin = split * chunk_blocks;
    const index_t kb_end = std::min(k_blocks, kb_begin + chunk_blocks);
    const index_t chunk_key0 = kb_begin * Bn;

    Carver<Acc> carve{scratch.worker(worker)};
    const index_t nb = chunk_blocks;
    Acc* Ks = carve.take(nb * k_rows * d_pad);   // per block [Bn][D]
    Acc* Kt = carve.take(nb * s.D * k_cols);     // per block [D][Bn]
    Acc* Vt = carve.take(nb * s.Dv * k_cols);    // per block [Dv][Bn]
    Acc* dK = carve.take(nb * k_rows * d_pad);   // per block [Bn][D]
    Acc* dV = carve.take(nb * k_rows * dv_pad);  // per block [Bn][Dv]
    Acc* Qs = carve.take(q_rows * d_pad);        // [Bm][D], pre-scaled
    Acc* dOs = carve.take(q_rows * dv_pad);      // [Bm][Dv]
    Acc* P = carve.take(q_rows * k_cols);        // [Bm][Bn]
    Acc* dS = carve.take(q_rows * k_cols);       // [Bm][Bn] dP, then dS
    Acc* Pt = carve.take(k_rows * q_cols);       // [Bn][Bm]
    Acc* dSt = carve.take(k_rows * q_cols);      // [Bn][Bm]
    Acc* dQ = carve.take(q_rows * d_pad);        // [Bm][D]
    Acc* lse2 = carve.take(q_rows);
    Acc* delta = carve.take(q_rows);

    for (index_t b = b_begin; b < b_end; ++b) {
      for (index_t hk = h_begin; hk < h_end; ++hk) {
        // Pack this chunk of keys once; it serves every query block of every q head.
        for (index_t kb = kb_begin; kb < kb_end; ++kb) {
          const index_t j0 = kb * Bn, nk = std::min(Bn, s.Lk - j0), l = kb - kb_begin;
          pack_rows(element<T>(f.k, b, hk, j0), f.k.strides[2], f.k.strides[3], nk, s.D, Acc(1),
                    Ks + l * k_rows * d_pad, d_pad);
          pack_transposed(element<T>(f.k, b, hk, j0), f.k.strides[2], f.k.strides[3], nk, s.D,
                          Kt + l * s.D * k_cols, k_cols);
          pack_transposed(element<T>(f.v, b, hk, j0), f.v.strides[2], f.v.strides[3], nk, s.Dv,
                          Vt + l * s.Dv * k_cols, k_cols);
        }
        std::fill(dK, dK + nb * k_rows * d_pad, Acc(0));
        std::fill(dV, dV + nb * k_rows * dv_pad, Acc(0));

        for (index_t h = hk * group; h < (hk + 1) * group; ++h) {
          const index_t bh = b * s.Hq + h;
          for (index_t qb = 0; qb < q_blocks; ++qb) {
            const index_t i0 = qb * Bm, mq = std::min(Bm, s.Lq - i0);
            const index_t m_rows = round_up(mq, MR);
            // Causal: the first key block of the chunk is hidden from every row here.
            const bool sees_chunk = !f.is_causal || i0 + mq - 1 + s.causal_offset >= chunk_key0;
            if (!sees_chunk && splits > 1) continue;  // its dQ partial stays zero
            pack_rows(element<T>(f.q, b, h, i0), f.q.strides[2], f.q.strides[3], mq, s.D, q_scale,
                      Qs, d_pad);
            pack_rows(element<T>(a.grad_out, b, h, i0), a.grad_out.strides[2],
                      a.grad_out.strides[3], mq, s.Dv, Acc(1), dOs, dv_pad);
            for (index_t r = 0; r < mq; ++r) {
              const Acc l = *element<Acc>(f.lse, b, h, i0 + r);
              lse2[r] = l == kNegInf ? kNegInf : static_cast<Acc>(l * kLog2e);
              const T* o = element<T>(f.out, b, h, i0 + r);
              Acc dot = 0;
              for (index_t c = 0; c < s.Dv; ++c)
                dot += static_cast<Acc>(widen(o[c * f.out.strides[3]])) * dOs[r * dv_pad + c];
              delta[r] = dot;
            }
            std::fill(dQ, dQ + m_rows * d_pad, Acc(0));

            for (index_t kb = kb_begin; kb < kb_end; ++kb) {
              const index_t j0 = kb * Bn, nk = std::min(Bn, s.Lk - j0), l = kb - kb_begin;
              if (f.is_causal && j0 > i0 + mq - 1 + s.causal_offset) break;
              const index_t n_cols = round_up(nk, NR), n_rows = round_up(nk, MR);
              // P = exp2(S * scale * log2e + mask - lse), recomputed tile by tile.
              gemm<Acc>(m_rows, n_cols, s.D, Qs, d_pad, Kt + l * s.D * k_cols, k_cols, P, k_cols,
                        false);
              for (index_t r = 0; r < mq; ++r) {
                Acc* row = P + r * k_cols;
                if (masks.any()) masks.apply(row, nk, b, h, i0 + r, j0);
                std::fill(row + nk, row + n_cols, kNegInf);
                if (lse2[r] == kNegInf) {
                  std::fill(row, row + n_cols, Acc(0));
                } else {
                  exp2_row(row, n_cols, Acc(1), lse2[r]);
                }
              }
              // dP = dO V^T
              gemm<Acc>(m_rows, n_cols, s.Dv, dOs, dv_pad, Vt + l * s.Dv * k_cols, k_cols, dS,
                        k_cols, false);
              for (index_t r = 0; r < mq; ++r) {
                Acc* p = P + r * k_cols;
                Acc* ds = dS + r * k_cols;
                if (dropout.enabled) dropout.apply(ds, nk, bh, i0 + r, j0);  // dP of kept P
                for (index_t c = 0; c < n_cols; ++c) ds[c] = p[c] * (ds[c] - delta[r]);
                if (dropout.enabled) dropout.apply(p, nk, bh, i0 + r, j0);  // P -> dropped P
              }
              if (g.present()) {
                for (index_t r = 0; r < mq; ++r) {
                  Acc* gm =
                      grad_mask_data + grad_mask.offset(b, h, i0 + r) + j0 * grad_mask.stride[3];
                  for (index_t c = 0; c < nk; ++c)
                    gm[c * grad_mask.stride[3]] += dS[r * k_cols + c];
                }
              }
              // dV += P_dropped^T dO,  dK += dS^T Q,  dQ += dS K
              transpose_tile(P, k_cols, mq, nk, Pt, q_cols);
              transpose_tile(dS, k_cols, mq, nk, dSt, q_cols);
              gemm<Acc>(n_rows, dv_pad, mq, Pt, q_cols, dOs, dv_pad, dV + l * k_rows * dv_pad,
                        dv_pad, true);
              gemm<Acc>(n_rows, d_pad, mq, dSt, q_cols, Qs, d_pad, dK + l * k_rows * d_pad, d_pad,
                        true);
              gemm<Acc>(m_rows, d_pad, nk, dS, k_cols, Ks + l * k_rows * d_pad, d_pad, dQ, d_pad,
                        true);
            }
            if (splits == 1) {
              store_rows(dQ, d_pad, mq, s.D, scale, mutable_element<T>(a.grad_q, b, h, i0),
                         a.grad_q.strides[2], a.grad_q.strides[3]);
            } else {
              Acc* part = dq_partial.data() + ((split * s.B + b) * s.Hq + h) * s.Lq * s.D;
              for (index_t r = 0; r < mq; ++r)
                for (index_t c = 0; c < s.D; ++c) part[(i0 + r) * s.D + c] = dQ[r * d_pad + c];
            }
          }
        }
        for (index_t kb = kb_begin; kb < kb_end; ++kb) {
          const index_t j0 = kb * Bn, nk = std::min(Bn, s.Lk - j0), l = kb - kb_begin;
          store_rows(dK + l * k_rows * d_pad, d_pad, nk, s.D, dk_scale,
                     mutable_element<T>(a.grad_k, b, hk, j0), a.grad_k.strides[2],
                     a.grad_k.strides[3]);
          store_rows(dV + l * k_rows * dv_pad, dv_pad, nk, s.Dv, Acc(1),
                     mutable_element<T>(a.grad_v, b, hk, j0), a.grad_v.strides[2],
                     a.grad_v.strides[3]);
        }
      }
    }
  });

  if (splits > 1) {  // dQ = scale * (sum of the partials)
    const index_t rows = s.B * s.Hq * s.Lq;
    parallel_for((rows + 255) / 256, workers, [&](index_t task, int) {
      for (index_t row = task * 256; row < std::min(rows, (task + 1) * 256); ++row) {
        const index_t b = row / (s.Hq * s.Lq), h = (row / s.Lq) % s.Hq, i = row % s.Lq;
        T* dst = mutable_element<T>(a.grad_q, b, h, i);
        for (index_t c = 0; c < s.D; ++c) {
          Acc sum = 0;
          for (int sp = 0; sp < splits; ++sp)
            sum += dq_partial.data()[(static_cast<index_t>(sp) * rows + row) * s.D + c];
          narrow(sum * scale, dst[c * a.grad_q.strides[3]]);
        }
      }
    });
  }
}

}  // namespace

void forward(const ForwardArgs& args, const ProblemShape& shape, int num_threads) {
  switch (args.q.dtype) {
    case DType::f32:
      return forward_impl<float>(args, shape, num_threads);
    case DType::f64:
      return forward_impl<double>(args, shape, num_threads);
    case DType::bf16:
      return forward_impl<bf16>(args, shape, num_threads);
    case DType::f16:
    case DType::boolean:
      throw_unsupported_dtype(args.q.dtype);
  }
  throw_unsupported_dtype(args.q.dtype);
}

void backward(const BackwardArgs& args, const ProblemShape& shape, int num_threads) {
  switch (args.fwd.q.dtype) {
    case DType::f32:
      return backward_impl<float>(args, shape, num_threads);
    case DType::f64:
      return backward_impl<double>(args, shape, num_threads);
    case DType::bf16:
      return backward_impl<bf16>(args, shape, num_threads);
    case DType::f16:
    case DType::boolean:
      throw_unsupported_dtype(args.fwd.q.dtype);
  }
  throw_unsupported_dtype(args.fwd.q.dtype);
}

}  // namespace memattn::cpu::MEMATTN_ISA
