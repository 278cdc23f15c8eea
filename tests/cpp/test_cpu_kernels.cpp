// CPU forward and backward against a naive float64 reference (DESIGN.md §2 and §4).
//
// The reference computes every score explicitly: s = scale * q.k + float_mask, a key is
// allowed when no mask excludes it (key_padding_mask true = ignore, bool mask true = attend,
// causal j <= i + offset, a float mask of -inf), then a plain softmax; a row with no allowed
// key gives out = 0, lse = -inf and zero gradients. Inputs are fresh random values read back
// through the views, so the reference sees exactly what the kernel sees (bf16 rounding
// included). Outputs are poisoned with NaN before every call, and the memory a view skips
// (padding between rows, strides of 2) is poisoned too: a kernel that leaves an element
// unwritten, reads a gap or writes outside its view fails. Every case runs with 1 and 3
// threads and for every CPU ISA this machine can run (MEMATTN_CPU_ISA). Dropout is checked
// exactly: the reference predicts the keep mask from the documented Philox4x32-10 layout, and
// a run with v = identity reads the kernel's mask back.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "memattn/api.h"
#include "memattn/philox.h"
#include "test_support.h"

namespace {

using memattn::BackwardArgs;
using memattn::CausalAlignment;
using memattn::DType;
using memattn::ExecContext;
using memattn::ForwardArgs;
using memattn::TensorView;
using memattn_test::ScopedEnv;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// bfloat16 as uint16 storage, round to nearest even.

std::uint16_t float_to_bf16(float f) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if (std::isnan(f)) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

float bf16_to_float(std::uint16_t h) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

TEST(Bf16Helpers, RoundToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(std::numeric_limits<float>::infinity()))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

// ---------------------------------------------------------------------------------------------
// Host tensors with arbitrary strides over a byte buffer; memory a view does not cover is
// poisoned.

// How a tensor is laid out in memory.
struct Layout {
  std::vector<int> order;        // memory order of the dims, outermost first; empty: row-major
  std::int64_t inner_step = 1;   // stride of the innermost memory dim
  std::int64_t pad = 0;          // extra elements after each level above the innermost
  std::vector<int> zero_stride;  // broadcast dims read with stride 0 (torch's expand)
  std::vector<int> negative;     // dims walked backwards (negative stride)
};

Layout with_order(std::vector<int> order) {
  Layout l;
  l.order = std::move(order);
  return l;
}
// [B, L, H, D] memory viewed as [B, H, L, D] (what a linear projection followed by
// view + transpose gives).
Layout blhd() { return with_order({0, 2, 1, 3}); }
Layout padded_rows(std::int64_t pad) {
  Layout l;
  l.pad = pad;
  return l;
}
Layout inner_stride(std::int64_t step) {
  Layout l;
  l.inner_step = step;
  return l;
}

bool contains(const std::vector<int>& v, int x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, const std::vector<std::int64_t>& sizes, const Layout& layout = {})
      : dtype_(dtype), rank_(static_cast<int>(sizes.size())) {
    std::vector<int> order = layout.order;
    if (order.empty()) {
      for (int d = 0; d < rank_; ++d) order.push_back(d);
    }
    std::int64_t step = layout.inner_step;
    bool innermost = true;
    for (int o = rank_ - 1; o >= 0; --o) {
      const int d = order[o];
      sizes_[d] = sizes[d];
      if (contains(layout.zero_stride, d)) {
        strides_[d] = 0;
        continue;
      }
      if (!innermost) step += layout.pad;
      strides_[d] = step;
      step *= std::max<std::int64_t>(sizes[d], 1);
      innermost = false;
    }
    std::int64_t max_offset = 0;
    for (int d = 0; d < rank_; ++d) {
      const std::int64_t extent = std::max<std::int64_t>(sizes_[d] - 1, 0) * strides_[d];
      if (contains(layout.negative, d)) {
        base_ += extent;
        strides_[d] = -strides_[d];
      }
      max_offset += extent;
    }
    elements_ = max_offset + 1 + layout.pad;  // trailing pad: a write past the end shows up
    bytes_.assign(static_cast<std::size_t>(elements_ * esize()), 0);
    covered_.assign(static_cast<std::size_t>(elements_), 0);
    for_each([&](const std::int64_t* idx, std::int64_t) { covered_[offset(idx)] = 1; });
  }

  DType dtype() const { return dtype_; }
  int rank() const { return rank_; }
  std::int64_t size(int d) const { return sizes_[d]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int d = 0; d < rank_; ++d) n *= sizes_[d];
    return n;
  }

  TensorView view() const {
    TensorView v;
    v.data = const_cast<unsigned char*>(bytes_.data()) + base_ * esize();
    v.dtype = dtype_;
    v.rank = rank_;
    for (int d = 0; d < rank_; ++d) {
      v.sizes[d] = sizes_[d];
      v.strides[d] = strides_[d];
    }
    return v;
  }

  // Calls f(idx, linear) for every logical index in row-major order.
  template <class F>
  void for_each(F&& f) const {
    const std::int64_t n = numel();
    std::int64_t idx[4] = {0, 0, 0, 0};
    for (std::int64_t linear = 0; linear < n; ++linear) {
      f(static_cast<const std::int64_t*>(idx), linear);
      for (int d = rank_ - 1; d >= 0; --d) {
        if (++idx[d] < sizes_[d]) break;
        idx[d] = 0;
      }
    }
  }

  double get(const std::int64_t* idx) const { return load(offset(idx)); }
  void set(const std::int64_t* idx, double value) { store(offset(idx), value); }
  double at(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0, std::int64_t i3 = 0) const {
    const std::int64_t idx[4] = {i0, i1, i2, i3};
    return get(idx);
  }

  // Every element of the buffer, gaps included.
  void fill_storage(double value) {
    for (std::int64_t e = 0; e < elements_; ++e) store(e, value);
  }
  // Logical values in row-major order.
  std::vector<double> values() const {
    std::vector<double> out(static_cast<std::size_t>(numel()));
    for_each([&](const std::int64_t* idx, std::int64_t linear) { out[linear] = get(idx); });
    return out;
  }
  std::vector<unsigned char> snapshot() const { return bytes_; }

  // Index of the first buffer element outside the view whose bytes changed since `before`,
  // or -1.
  std::int64_t first_gap_change(const std::vector<unsigned char>& before) const {
    const int es = esize();
    for (std::int64_t e = 0; e < elements_; ++e) {
      if (covered_[e]) continue;
      if (std::memcmp(&bytes_[e * es], &before[e * es], es) != 0) return e;
    }
    return -1;
  }

  std::string index_string(std::int64_t linear) const {
    std::int64_t idx[4] = {0, 0, 0, 0};
    for (int d = rank_ - 1; d >= 0; --d) {
      idx[d] = linear % sizes_[d];
      linear /= sizes_[d];
    }
    std::string s = "[";
    for (int d = 0; d < rank_; ++d) s += (d ? ", " : "") + std::to_string(idx[d]);
    return s + "]";
  }
  std::string layout_string() const {
    const TensorView v = view();
    return v.shape_string() + " strides " + v.stride_string();
  }

 private:
  int esize() const { return memattn::dtype_bytes(dtype_); }
  std::int64_t offset(const std::int64_t* idx) const {
    std::int64_t off = base_;
    for (int d = 0; d < rank_; ++d) off += idx[d] * strides_[d];
    return off;
  }
  double load(std::int64_t e) const {
    const unsigned char* p = &bytes_[e * esize()];
    switch (dtype_) {
      case DType::f32: {
        float f;
        std::memcpy(&f, p, sizeof f);
        return f;
      }
      case DType::f64: {
        double d;
        std::memcpy(&d, p, sizeof d);
        return d;
      }
      case DType::bf16: {
        std::uint16_t h;
        std::memcpy(&h, p, sizeof h);
        return bf16_to_float(h);
      }
      case DType::boolean:
        return *p ? 1.0 : 0.0;
      case DType::f16:
        break;
    }
    ADD_FAILURE() << "HostTensor: unsupported dtype";
    return kNaN;
  }
  void store(std::int64_t e, double value) {
    unsigned char* p = &bytes_[e * esize()];
    switch (dtype_) {
      case DType::f32: {
        const float f = static_cast<float>(value);
        std::memcpy(p, &f, sizeof f);
        return;
      }
      case DType::f64:
        std::memcpy(p, &value, sizeof value);
        return;
      case DType::bf16: {
        const std::uint16_t h = float_to_bf16(static_cast<float>(value));
        std::memcpy(p, &h, sizeof h);
        return;
      }
      case DType::boolean:
        *p = value != 0.0 ? 1 : 0;
        return;
      case DType::f16:
        break;
    }
    ADD_FAILURE() << "HostTensor: unsupported dtype";
  }

  DType dtype_ = DType::f32;
  int rank_ = 0;
  std::int64_t sizes_[4] = {0, 0, 0, 0};
  std::int64_t strides_[4] = {0, 0, 0, 0};
  std::int64_t base_ = 0;      // element offset of logical index 0
  std::int64_t elements_ = 0;  // buffer size in elements
  std::vector<unsigned char> bytes_;
  std::vector<unsigned char> covered_;  // 1 where some logical index lands
};

// ---------------------------------------------------------------------------------------------
// Test cases.

struct MaskSpec {
  enum class Kind { none, boolean, floating } kind = Kind::none;
  bool q_dtype = false;            // float mask in q's dtype (else float32)
  std::array<bool, 4> size1{};     // dims of size 1 (broadcast by shape)
  std::array<bool, 4> expanded{};  // full-size dims read with stride 0
  bool masked_row = false;         // make query row 0 fully masked (bool false / float -inf)
  bool grad = false;               // backward: ask for grad_attn_mask of the mask's shape
};

struct Case {
  std::string name;
  std::int64_t B, Hq, Hk, Lq, Lk, D, Dv;
  bool causal = false;
  CausalAlignment align = CausalAlignment::top_left;
  MaskSpec mask;
  bool key_padding = false;
  Layout q_layout, k_layout, v_layout, out_layout, lse_layout;
  bool has_scale = false;
  double scale = 0.0;
  double sigma = 1.0;  // standard deviation of q, k, v
};

Case make_case(std::string name, std::int64_t B, std::int64_t Hq, std::int64_t Hk, std::int64_t Lq,
               std::int64_t Lk, std::int64_t D, std::int64_t Dv) {
  Case c;
  c.name = std::move(name);
  c.B = B;
  c.Hq = Hq;
  c.Hk = Hk;
  c.Lq = Lq;
  c.Lk = Lk;
  c.D = D;
  c.Dv = Dv;
  return c;
}

Case causal(Case c, CausalAlignment align) {
  c.causal = true;
  c.align = align;
  return c;
}

Case with_mask(Case c, MaskSpec::Kind kind, std::array<bool, 4> size1 = {},
               std::array<bool, 4> expanded = {}) {
  c.mask.kind = kind;
  c.mask.size1 = size1;
  c.mask.expanded = expanded;
  return c;
}

std::vector<Case> all_cases() {
  using K = MaskSpec::Kind;
  constexpr auto TL = CausalAlignment::top_left;
  constexpr auto BR = CausalAlignment::bottom_right;
  std::vector<Case> cs;
  // Sizes.
  cs.push_back(make_case("all_ones", 1, 1, 1, 1, 1, 1, 1));
  cs.push_back(make_case("basic", 2, 4, 4, 17, 17, 64, 64));
  cs.push_back(make_case("lq127_lk17_d17", 1, 2, 2, 127, 17, 17, 17));
  cs.push_back(make_case("lq17_lk127_d128_dv64", 2, 2, 2, 17, 127, 128, 64));
  cs.push_back(make_case("d1_dv17", 1, 3, 3, 17, 33, 1, 17));
  cs.push_back(make_case("d17_dv1", 1, 2, 2, 33, 17, 17, 1));
  cs.push_back(make_case("d64_dv128", 1, 2, 2, 19, 23, 64, 128));
  cs.push_back(make_case("d256_dv256_gqa", 1, 2, 1, 33, 47, 256, 256));
  cs.push_back(make_case("lq1_lk1000", 1, 2, 2, 1, 1000, 64, 64));
  // GQA / MQA.
  cs.push_back(make_case("gqa_8_2", 2, 8, 2, 17, 31, 64, 64));
  cs.push_back(make_case("mqa_4_1", 1, 4, 1, 127, 17, 32, 48));
  // Causal, both alignments, Lq <, =, > Lk (bottom_right with Lq > Lk masks the first rows).
  cs.push_back(causal(make_case("causal_tl_127", 1, 2, 2, 127, 127, 64, 64), TL));
  cs.push_back(causal(make_case("causal_tl_lq17_lk40", 2, 2, 1, 17, 40, 32, 32), TL));
  cs.push_back(causal(make_case("causal_tl_lq40_lk17", 1, 2, 2, 40, 17, 32, 17), TL));
  cs.push_back(causal(make_case("causal_br_127", 1, 2, 2, 127, 127, 17, 64), BR));
  cs.push_back(causal(make_case("causal_br_lq17_lk40", 2, 2, 1, 17, 40, 32, 32), BR));
  cs.push_back(causal(make_case("causal_br_lq40_lk17", 1, 2, 2, 40, 17, 32, 17), BR));
  cs.push_back(causal(make_case("causal_tl_lq1000_lk1000_gqa", 1, 2, 1, 1000, 1000, 32, 32), TL));
  cs.push_back(causal(make_case("causal_br_decode_lq1_lk1000", 1, 4, 2, 1, 1000, 64, 64), BR));
  // Key padding (the last batch is fully padded).
  {
    Case c = make_case("key_padding", 3, 2, 2, 17, 33, 32, 32);
    c.key_padding = true;
    cs.push_back(c);
  }
  // Bool masks: full (with a fully masked row), broadcast by shape and by stride 0.
  {
    Case c = with_mask(make_case("bool_full", 2, 2, 2, 17, 33, 32, 32), K::boolean);
    c.mask.masked_row = true;
    cs.push_back(c);
  }
  cs.push_back(with_mask(make_case("bool_11LqLk", 2, 2, 2, 17, 33, 32, 32), K::boolean,
                         {true, true, false, false}));
  cs.push_back(with_mask(make_case("bool_B11Lk", 3, 2, 2, 17, 33, 32, 32), K::boolean,
                         {false, true, true, false}));
  cs.push_back(with_mask(make_case("bool_expanded_B_H", 2, 4, 2, 17, 33, 32, 32), K::boolean, {},
                         {true, true, false, false}));
  // Float masks: float32 and q's dtype, full, broadcast, expanded, with a -inf row.
  {
    Case c = with_mask(make_case("float_full", 2, 2, 2, 17, 33, 32, 32), K::floating);
    c.mask.grad = true;
    cs.push_back(c);
  }
  {
    Case c = with_mask(make_case("float_full_q_dtype", 2, 4, 2, 17, 33, 32, 32), K::floating);
    c.mask.q_dtype = true;
    cs.push_back(c);
  }
  {
    Case c = with_mask(make_case("float_1HqLqLk", 2, 4, 2, 17, 33, 32, 32), K::floating,
                       {true, false, false, false});
    c.mask.grad = true;
    cs.push_back(c);
  }
  cs.push_back(with_mask(make_case("float_B1Lq1", 2, 2, 2, 17, 33, 32, 32), K::floating,
                         {false, true, false, true}));
  cs.push_back(with_mask(make_case("float_expanded_B_Lq", 2, 2, 2, 17, 33, 32, 32), K::floating, {},
                         {true, false, true, false}));
  {
    Case c = with_mask(make_case("float_neg_inf_row", 2, 2, 2, 17, 33, 32, 32), K::floating);
    c.mask.masked_row = true;
    c.mask.grad = true;
    cs.push_back(c);
  }
  // Few query rows (Lq <= 8) run the row-wise forward: cover it with every mask kind,
  // GQA, a fully masked row and key splits (B * Hk small against the threads).
  {
    Case c = causal(with_mask(make_case("decode_bool_kpm_gqa", 2, 8, 2, 3, 300, 64, 48), K::boolean,
                              {false, true, false, false}),
                    BR);
    c.key_padding = true;
    cs.push_back(c);
  }
  {
    Case c = with_mask(make_case("decode_float_grad_mqa", 1, 4, 1, 8, 333, 17, 64), K::floating);
    c.mask.masked_row = true;
    c.mask.grad = true;
    cs.push_back(c);
  }
  // Everything at once.
  {
    Case c = causal(with_mask(make_case("combo_br_bool_kpm_gqa", 3, 4, 2, 40, 17, 32, 48),
                              K::boolean, {false, true, false, false}),
                    BR);
    c.key_padding = true;
    cs.push_back(c);
  }
  {
    Case c = causal(
        with_mask(make_case("combo_tl_float_kpm_gqa", 2, 6, 3, 33, 47, 17, 64), K::floating), TL);
    c.key_padding = true;
    c.mask.grad = true;
    cs.push_back(c);
  }
  // Layouts: [B, L, H, D] memory, padded rows, a last-dim stride of 2, negative strides.
  {
    Case c = make_case("layout_blhd", 2, 4, 2, 17, 33, 32, 48);
    c.q_layout = c.k_layout = c.v_layout = c.out_layout = blhd();
    c.lse_layout = with_order({0, 2, 1});  // [B, Lq, Hq] memory
    cs.push_back(c);
  }
  {
    Case c = with_mask(make_case("layout_padded_rows", 2, 2, 2, 17, 33, 32, 32), K::floating);
    c.q_layout = c.k_layout = c.v_layout = c.out_layout = padded_rows(3);
    c.lse_layout = padded_rows(2);
    c.mask.grad = true;
    cs.push_back(c);
  }
  {
    Case c = make_case("layout_inner_stride2", 1, 2, 2, 17, 33, 32, 32);
    c.q_layout = c.k_layout = c.v_layout = c.out_layout = c.lse_layout = inner_stride(2);
    cs.push_back(c);
  }
  {
    Case c = make_case("layout_negative_strides", 2, 2, 2, 17, 33, 32, 32);
    c.q_layout.negative = {1};
    c.k_layout.negative = {2};
    c.v_layout.negative = {2, 3};
    c.out_layout.negative = {2};
    cs.push_back(c);
  }
  // Options and values.
  {
    Case c = make_case("explicit_scale", 1, 2, 2, 17, 33, 32, 32);
    c.has_scale = true;
    c.scale = 0.3;
    cs.push_back(c);
  }
  {
    Case c = make_case("large_values", 1, 2, 2, 33, 47, 64, 64);
    c.sigma = 8.0;
    cs.push_back(c);
  }
  // Empty problems.
  cs.push_back(make_case("empty_lk0", 2, 2, 1, 5, 0, 16, 16));
  cs.push_back(make_case("empty_lq0", 2, 2, 2, 0, 7, 16, 16));
  cs.push_back(make_case("empty_b0", 0, 2, 2, 5, 7, 16, 16));
  return cs;
}

// ---------------------------------------------------------------------------------------------
// Inputs and outputs of one case.

struct Problem {
  Case c;
  DType dtype;
  HostTensor q, k, v, mask, kpm, out, lse;
  HostTensor grad_out, grad_q, grad_k, grad_v, grad_mask;
  double dropout_p = 0.0;
  std::uint64_t dropout_seed = 0;

  bool has_mask() const { return c.mask.kind != MaskSpec::Kind::none; }
  bool has_grad_mask() const { return c.mask.kind == MaskSpec::Kind::floating && c.mask.grad; }
  double scale() const { return c.has_scale ? c.scale : 1.0 / std::sqrt(static_cast<double>(c.D)); }
  std::int64_t causal_offset() const {
    return c.align == CausalAlignment::bottom_right ? c.Lk - c.Lq : 0;
  }

  ForwardArgs forward_args() {
    ForwardArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    if (has_mask()) a.attn_mask = mask.view();
    if (c.key_padding) a.key_padding_mask = kpm.view();
    a.is_causal = c.causal;
    a.causal_alignment = c.align;
    a.dropout_p = dropout_p;
    a.dropout_seed = dropout_seed;
    a.has_scale = c.has_scale;
    a.scale = c.scale;
    a.out = out.view();
    a.lse = lse.view();
    return a;
  }
  BackwardArgs backward_args() {
    BackwardArgs b;
    b.fwd = forward_args();
    b.grad_out = grad_out.view();
    b.grad_q = grad_q.view();
    b.grad_k = grad_k.view();
    b.grad_v = grad_v.view();
    if (has_grad_mask()) b.grad_attn_mask = grad_mask.view();
    return b;
  }
};

void fill_normal(HostTensor& t, std::mt19937& rng, double sigma) {
  std::normal_distribution<double> normal(0.0, sigma);
  t.for_each([&](const std::int64_t* idx, std::int64_t) { t.set(idx, normal(rng)); });
}

std::string dtype_str(DType dt) { return memattn::dtype_name(dt); }

Problem make_problem(const Case& c, DType dtype, std::uint32_t seed) {
  using K = MaskSpec::Kind;
  Problem p;
  p.c = c;
  p.dtype = dtype;
  std::mt19937 rng(seed);
  // Inputs: gaps hold NaN, so reading outside a view poisons the result.
  p.q = HostTensor(dtype, {c.B, c.Hq, c.Lq, c.D}, c.q_layout);   // q: [B, Hq, Lq, D]
  p.k = HostTensor(dtype, {c.B, c.Hk, c.Lk, c.D}, c.k_layout);   // k: [B, Hk, Lk, D]
  p.v = HostTensor(dtype, {c.B, c.Hk, c.Lk, c.Dv}, c.v_layout);  // v: [B, Hk, Lk, Dv]
  for (HostTensor* t : {&p.q, &p.k, &p.v}) {
    t->fill_storage(kNaN);
    fill_normal(*t, rng, c.sigma);
  }
  if (c.mask.kind != K::none) {
    const std::array<std::int64_t, 4> full = {c.B, c.Hq, c.Lq, c.Lk};
    std::vector<std::int64_t> shape(4);
    Layout layout;
    for (int d = 0; d < 4; ++d) {
      shape[d] = c.mask.size1[d] ? 1 : full[d];
      if (c.mask.expanded[d]) layout.zero_stride.push_back(d);
    }
    const bool is_bool = c.mask.kind == K::boolean;
    const DType mdt = is_bool ? DType::boolean : (c.mask.q_dtype ? dtype : DType::f32);
    p.mask = HostTensor(mdt, shape, layout);
    p.mask.fill_storage(is_bool ? 0.0 : kNaN);
    std::bernoulli_distribution attend(0.7), neg_inf(0.05);
    std::normal_distribution<double> normal(0.0, 1.0);
    p.mask.for_each([&](const std::int64_t* idx, std::int64_t) {
      double value = is_bool ? (attend(rng) ? 1.0 : 0.0) : normal(rng);
      if (!is_bool && neg_inf(rng)) value = -kInf;  // a float mask excludes keys with -inf too
      if (c.mask.masked_row && idx[2] == 0) value = is_bool ? 0.0 : -kInf;
      p.mask.set(idx, value);
    });
  }
  if (c.key_padding) {
    p.kpm = HostTensor(DType::boolean, {c.B, c.Lk});  // true = padding
    std::bernoulli_distribution pad(0.3);
    p.kpm.for_each([&](const std::int64_t* idx, std::int64_t) {
      p.kpm.set(idx, (c.B > 1 && idx[0] == c.B - 1) ? 1.0 : (pad(rng) ? 1.0 : 0.0));
    });
  }
  p.out = HostTensor(dtype, {c.B, c.Hq, c.Lq, c.Dv}, c.out_layout);
  // lse: [B, Hq, Lq], float32 (float64 for float64 problems).
  p.lse =
      HostTensor(dtype == DType::f64 ? DType::f64 : DType::f32, {c.B, c.Hq, c.Lq}, c.lse_layout);
  // Backward: grad_out like out, grads like their inputs.
  p.grad_out = HostTensor(dtype, {c.B, c.Hq, c.Lq, c.Dv}, c.out_layout);
  p.grad_out.fill_storage(kNaN);
  fill_normal(p.grad_out, rng, 1.0);
  p.grad_q = HostTensor(dtype, {c.B, c.Hq, c.Lq, c.D}, c.q_layout);
  p.grad_k = HostTensor(dtype, {c.B, c.Hk, c.Lk, c.D}, c.k_layout);
  p.grad_v = HostTensor(dtype, {c.B, c.Hk, c.Lk, c.Dv}, c.v_layout);
  if (p.has_grad_mask()) {
    std::vector<std::int64_t> shape(4);
    for (int d = 0; d < 4; ++d) shape[d] = p.mask.size(d);
    // float32, float64 for float64 problems.
    p.grad_mask = HostTensor(dtype == DType::f64 ? DType::f64 : DType::f32, shape);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// The float64 reference.

struct Reference {
  std::vector<double> out, lse;           // [B, Hq, Lq, Dv], [B, Hq, Lq]
  std::vector<double> dq, dk, dv, dmask;  // like q, k, v and grad_attn_mask
};

// Dropout keep decision for (b, h, i, j), from the documented Philox4x32-10 layout
// (include/memattn/philox.h): counter (j / 4, i, b * Hq + h), key = seed, lane j % 4; the key
// is kept when its draw is >= p * 2^32. Written out here rather than shared with the kernels,
// so that a change of layout shows up as a test failure.
bool dropout_keeps(const Problem& p, std::int64_t b, std::int64_t h, std::int64_t i,
                   std::int64_t j) {
  const std::uint64_t bh = static_cast<std::uint64_t>(b * p.c.Hq + h);
  const memattn::philox::U32x4 ctr{{static_cast<std::uint32_t>(j / 4),
                                    static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(bh),
                                    static_cast<std::uint32_t>(bh >> 32)}};
  const memattn::philox::U32x4 draw =
      memattn::philox::philox4x32_10(ctr, static_cast<std::uint32_t>(p.dropout_seed),
                                     static_cast<std::uint32_t>(p.dropout_seed >> 32));
  const double threshold = std::min(p.dropout_p * 4294967296.0, 4294967295.0);
  return static_cast<double>(draw.x[j % 4]) >= std::floor(threshold);
}

// The float64 reference; with p.dropout_p > 0 it applies the predicted dropout mask.
Reference reference(const Problem& p, bool with_backward) {
  const Case& c = p.c;
  const std::int64_t group = c.Hk > 0 ? c.Hq / c.Hk : 1;
  const double scale = p.scale();
  const bool dropout = p.dropout_p > 0.0;
  const double keep_scale = 1.0 / (1.0 - p.dropout_p);
  const std::vector<double> q = p.q.values(), k = p.k.values(), v = p.v.values();
  const std::vector<double> dout = with_backward ? p.grad_out.values() : std::vector<double>{};
  Reference r;
  r.out.assign(static_cast<std::size_t>(c.B * c.Hq * c.Lq * c.Dv), 0.0);
  r.lse.assign(static_cast<std::size_t>(c.B * c.Hq * c.Lq), -kInf);
  if (with_backward) {
    r.dq.assign(q.size(), 0.0);
    r.dk.assign(k.size(), 0.0);
    r.dv.assign(v.size(), 0.0);
    if (p.has_grad_mask()) r.dmask.assign(static_cast<std::size_t>(p.grad_mask.numel()), 0.0);
  }
  auto qi = [&](std::int64_t b, std::int64_t h, std::int64_t i) {
    return ((b * c.Hq + h) * c.Lq + i);
  };
  auto kj = [&](std::int64_t b, std::int64_t h, std::int64_t j) {
    return ((b * c.Hk + h) * c.Lk + j);
  };
  std::vector<double> s(static_cast<std::size_t>(c.Lk)), prob(s.size()), dp(s.size());
  std::vector<char> allowed(s.size());
  for (std::int64_t b = 0; b < c.B; ++b) {
    for (std::int64_t h = 0; h < c.Hq; ++h) {
      const std::int64_t hk = h / group;  // GQA: q heads [hk*group, (hk+1)*group) share hk
      for (std::int64_t i = 0; i < c.Lq; ++i) {
        const std::int64_t row = qi(b, h, i);
        double m = -kInf;
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          bool ok = true;
          if (c.key_padding && p.kpm.at(b, j) != 0.0) ok = false;
          if (c.causal && j > i + p.causal_offset()) ok = false;
          double dot = 0.0;
          for (std::int64_t d = 0; d < c.D; ++d)
            dot += q[row * c.D + d] * k[kj(b, hk, j) * c.D + d];
          double score = scale * dot;
          if (p.has_mask()) {
            const double mv = p.mask.at(p.mask.size(0) == 1 ? 0 : b, p.mask.size(1) == 1 ? 0 : h,
                                        p.mask.size(2) == 1 ? 0 : i, p.mask.size(3) == 1 ? 0 : j);
            if (p.mask.dtype() == DType::boolean) {
              ok = ok && mv != 0.0;
            } else {
              score += mv;
              ok = ok && mv != -kInf;
            }
          }
          allowed[j] = ok;
          s[j] = score;
          if (ok) m = std::max(m, score);
        }
        if (m == -kInf) continue;  // fully masked: out 0, lse -inf, zero grads
        double sum = 0.0;
        for (std::int64_t j = 0; j < c.Lk; ++j) sum += allowed[j] ? std::exp(s[j] - m) : 0.0;
        r.lse[row] = m + std::log(sum);
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          prob[j] = allowed[j] ? std::exp(s[j] - r.lse[row]) : 0.0;
        }
        auto kept = [&](std::int64_t j) {
          return dropout ? (dropout_keeps(p, b, h, i, j) ? keep_scale : 0.0) : 1.0;
        };
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          const double w = prob[j] * kept(j);
          if (w == 0.0) continue;
          for (std::int64_t d = 0; d < c.Dv; ++d) {
            r.out[row * c.Dv + d] += w * v[kj(b, hk, j) * c.Dv + d];
          }
        }
        if (!with_backward) continue;
        // dP = dO . v (through the dropout mask); dS = P * (dP - sum_j P dP).
        double delta = 0.0;
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          double g = 0.0;
          for (std::int64_t d = 0; d < c.Dv; ++d)
            g += dout[row * c.Dv + d] * v[kj(b, hk, j) * c.Dv + d];
          dp[j] = g * kept(j);
          delta += prob[j] * dp[j];
        }
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          if (prob[j] == 0.0) continue;
          const double ds = prob[j] * (dp[j] - delta);
          const double w = prob[j] * kept(j);
          for (std::int64_t d = 0; d < c.D; ++d) {
            r.dq[row * c.D + d] += scale * ds * k[kj(b, hk, j) * c.D + d];
            r.dk[kj(b, hk, j) * c.D + d] += scale * ds * q[row * c.D + d];
          }
          for (std::int64_t d = 0; d < c.Dv; ++d) {
            r.dv[kj(b, hk, j) * c.Dv + d] += w * dout[row * c.Dv + d];
          }
          if (p.has_grad_mask()) {
            const HostTensor& g = p.grad_mask;
            const std::int64_t gi[4] = {g.size(0) == 1 ? 0 : b, g.size(1) == 1 ? 0 : h,
                                        g.size(2) == 1 ? 0 : i, g.size(3) == 1 ? 0 : j};
            const std::int64_t lin =
                ((gi[0] * g.size(1) + gi[1]) * g.size(2) + gi[2]) * g.size(3) + gi[3];
            r.dmask[lin] += ds;
          }
        }
      }
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

struct Tolerance {
  double rel;  // error bound relative to max(max |ref|, 1)
  double lse;  // lse bound relative to max(max |finite lse|, 1)
};

Tolerance tolerance(DType dt) {
  switch (dt) {
    case DType::f64:
      return {1e-10, 1e-10};
    case DType::f32:
      return {2e-5, 2e-5};
    case DType::bf16:
      return {2e-2, 1e-2};
    case DType::f16:
    case DType::boolean:
      break;
  }
  return {0.0, 0.0};
}

// Backward recomputes P = exp(s - lse) from the lse the forward stored (float32, float64 for
// float64 problems): each P then carries a relative error of up to u * |lse|, u the unit
// roundoff of lse's dtype, which no kernel can avoid. Gradient bounds add that term (relative to
// max |ref|, with a factor 8 for the sums over keys); it matters for float32 with large scores.
double grad_tolerance(const Tolerance& tol, DType lse_dtype, const std::vector<double>& ref_lse) {
  double max_lse = 0.0;
  for (double x : ref_lse) {
    if (std::isfinite(x)) max_lse = std::max(max_lse, std::abs(x));
  }
  const double u = lse_dtype == DType::f64 ? 0x1p-53 : 0x1p-24;
  return tol.rel + 8.0 * u * max_lse;
}

// Compares every element of `got` with `ref`: finite and within the bound, and -inf exactly
// where the reference has -inf. Reports the first mismatching index and the largest error.
::testing::AssertionResult matches(const char* what, const HostTensor& got,
                                   const std::vector<double>& ref, double rel) {
  const std::vector<double> g = got.values();
  if (g.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << what << ": size " << g.size() << " vs reference " << ref.size();
  }
  double max_ref = 0.0;
  for (double x : ref) {
    if (std::isfinite(x)) max_ref = std::max(max_ref, std::abs(x));
  }
  const double bound = rel * std::max(max_ref, 1.0);
  std::int64_t first_bad = -1, bad = 0, worst = -1;
  double worst_err = 0.0;
  for (std::size_t e = 0; e < ref.size(); ++e) {
    bool ok;
    double err = 0.0;
    if (std::isinf(ref[e])) {
      ok = g[e] == ref[e];
    } else {
      err = std::abs(g[e] - ref[e]);
      ok = err <= bound;  // false for NaN
      if (!(err <= worst_err)) {
        worst_err = err;
        worst = static_cast<std::int64_t>(e);
      }
    }
    if (!ok) {
      ++bad;
      if (first_bad < 0) first_bad = static_cast<std::int64_t>(e);
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(10);
  os << what << " (" << got.layout_string() << "): " << bad << " of " << ref.size()
     << " elements differ; first at index " << got.index_string(first_bad) << ": got "
     << g[first_bad] << ", expected " << ref[first_bad] << " (bound " << bound << " = " << rel
     << " x max(max|ref| " << max_ref << ", 1))";
  if (worst >= 0) {
    os << "; largest error " << worst_err << " at " << got.index_string(worst) << " (got "
       << g[worst] << ", expected " << ref[worst] << ")";
  }
  return ::testing::AssertionFailure() << os.str();
}

::testing::AssertionResult gaps_untouched(const char* what, const HostTensor& t,
                                          const std::vector<unsigned char>& before) {
  const std::int64_t e = t.first_gap_change(before);
  if (e < 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << " (" << t.layout_string() << "): the kernel wrote buffer element " << e
         << ", which lies outside the view";
}

// ---------------------------------------------------------------------------------------------
// Running the kernels.

std::vector<std::string> usable_isas() { return memattn::build_info().cpu_isas_usable; }

bool run_forward(Problem& p, int threads) {
  p.out.fill_storage(kNaN);
  p.lse.fill_storage(kNaN);
  ExecContext ctx;
  ctx.num_threads = threads;
  try {
    memattn::forward(p.forward_args(), ctx);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "forward threw: " << e.what();
    return false;
  }
  return true;
}

bool run_backward(Problem& p, int threads, double grad_mask_prefill = 0.0) {
  for (HostTensor* t : {&p.grad_q, &p.grad_k, &p.grad_v}) t->fill_storage(kNaN);
  if (p.has_grad_mask()) p.grad_mask.fill_storage(grad_mask_prefill);
  ExecContext ctx;
  ctx.num_threads = threads;
  try {
    memattn::backward(p.backward_args(), ctx);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "backward threw: " << e.what();
    return false;
  }
  return true;
}

std::string trace_name(const Case& c, DType dt, const std::string& isa, int threads,
                       std::uint32_t seed) {
  std::ostringstream os;
  os << "case " << c.name << " [B=" << c.B << " Hq=" << c.Hq << " Hk=" << c.Hk << " Lq=" << c.Lq
     << " Lk=" << c.Lk << " D=" << c.D << " Dv=" << c.Dv << "] " << dtype_str(dt) << " isa=" << isa
     << " threads=" << threads << " seed=" << seed;
  return os.str();
}

// Forward (and optionally backward) of every case against the reference, for every usable ISA
// and 1 and 3 threads; with dropout_p > 0 the reference applies the predicted Philox mask.
void run_suite(DType dtype, bool with_backward, const std::vector<Case>& cases,
               double dropout_p = 0.0) {
  const Tolerance tol = tolerance(dtype);
  const std::vector<std::string> isas = usable_isas();
  ASSERT_FALSE(isas.empty());
  std::uint32_t seed = dtype == DType::f64 ? 1000 : dtype == DType::f32 ? 2000 : 3000;
  if (with_backward) seed += 500;
  if (dropout_p > 0.0) seed += 250;
  for (const Case& c : cases) {
    ++seed;
    Problem p = make_problem(c, dtype, seed);
    p.dropout_p = dropout_p;
    p.dropout_seed = 0x9E3779B97F4A7C15ull * seed;  // uses both 32-bit halves of the key
    const Reference ref = reference(p, with_backward);
    for (const std::string& isa : isas) {
      ScopedEnv env("MEMATTN_CPU_ISA", isa);
      for (int threads : {1, 3}) {
        SCOPED_TRACE(trace_name(c, dtype, isa, threads, seed));
        // Poison, snapshot (to find writes outside the views), run, compare.
        p.out.fill_storage(kNaN);
        p.lse.fill_storage(kNaN);
        const auto out_before = p.out.snapshot(), lse_before = p.lse.snapshot();
        if (!run_forward(p, threads)) continue;
        EXPECT_TRUE(matches("out", p.out, ref.out, tol.rel));
        EXPECT_TRUE(matches("lse", p.lse, ref.lse, tol.lse));
        EXPECT_TRUE(gaps_untouched("out", p.out, out_before));
        EXPECT_TRUE(gaps_untouched("lse", p.lse, lse_before));
        if (!with_backward) continue;
        const double grad_rel = grad_tolerance(tol, p.lse.dtype(), ref.lse);
        for (HostTensor* t : {&p.grad_q, &p.grad_k, &p.grad_v}) t->fill_storage(kNaN);
        const auto dq_before = p.grad_q.snapshot(), dk_before = p.grad_k.snapshot(),
                   dv_before = p.grad_v.snapshot();
        if (!run_backward(p, threads)) continue;
        EXPECT_TRUE(matches("grad_q", p.grad_q, ref.dq, grad_rel));
        EXPECT_TRUE(matches("grad_k", p.grad_k, ref.dk, grad_rel));
        EXPECT_TRUE(matches("grad_v", p.grad_v, ref.dv, grad_rel));
        EXPECT_TRUE(gaps_untouched("grad_q", p.grad_q, dq_before));
        EXPECT_TRUE(gaps_untouched("grad_k", p.grad_k, dk_before));
        EXPECT_TRUE(gaps_untouched("grad_v", p.grad_v, dv_before));
        if (p.has_grad_mask()) {
          EXPECT_TRUE(matches("grad_attn_mask", p.grad_mask, ref.dmask, grad_rel));
        }
      }
    }
  }
}

TEST(CpuForward, Float64) { run_suite(DType::f64, false, all_cases()); }
TEST(CpuForward, Float32) { run_suite(DType::f32, false, all_cases()); }
TEST(CpuForward, Bfloat16) { run_suite(DType::bf16, false, all_cases()); }
TEST(CpuBackward, Float64) { run_suite(DType::f64, true, all_cases()); }
TEST(CpuBackward, Float32) { run_suite(DType::f32, true, all_cases()); }
TEST(CpuBackward, Bfloat16) { run_suite(DType::bf16, true, all_cases()); }

TEST(CpuBackward, GradAttnMaskIsAddedIntoTheBuffer) {
  // The kernel adds dL/dmask: a buffer holding 1 comes back as 1 + grad.
  for (bool broadcast : {false, true}) {
    Case c = with_mask(
        make_case(broadcast ? "prefilled_1HqLqLk" : "prefilled_full", 2, 4, 2, 17, 33, 32, 32),
        MaskSpec::Kind::floating, {broadcast, false, false, false});
    c.mask.grad = true;
    Problem p = make_problem(c, DType::f32, 77);
    Reference ref = reference(p, true);
    for (double& x : ref.dmask) x += 1.0;
    SCOPED_TRACE(trace_name(c, DType::f32, "default", 1, 77));
    ASSERT_TRUE(run_forward(p, 1));
    ASSERT_TRUE(run_backward(p, 1, /*grad_mask_prefill=*/1.0));
    EXPECT_TRUE(matches("grad_attn_mask", p.grad_mask, ref.dmask, 2e-5));
  }
}

// ---------------------------------------------------------------------------------------------
// ISA selection through MEMATTN_CPU_ISA.

TEST(CpuIsa, PlanReportsTheForcedIsa) {
  Problem p = make_problem(make_case("plan", 1, 2, 2, 4, 4, 16, 16), DType::f32, 5);
  const ForwardArgs a = p.forward_args();
  for (const std::string& isa : usable_isas()) {
    ScopedEnv env("MEMATTN_CPU_ISA", isa);
    const memattn::Plan plan = memattn::plan(a, memattn::validate_forward(a), false);
    EXPECT_EQ(plan.backend, "cpu");
    EXPECT_NE(plan.kernel.find("/" + isa + "/"), std::string::npos)
        << "MEMATTN_CPU_ISA=" << isa << " but the kernel is " << plan.kernel;
  }
}

TEST(CpuIsa, UnknownIsaIsARuntimeError) {
  Problem p = make_problem(make_case("bogus_isa", 1, 2, 2, 4, 4, 16, 16), DType::f32, 6);
  ScopedEnv env("MEMATTN_CPU_ISA", "not-an-isa");
  EXPECT_TRUE(memattn_test::ThrowsError([&] { memattn::forward(p.forward_args(), ExecContext{}); },
                                        memattn::ErrorKind::runtime, "", {"not-an-isa"}));
}

// ---------------------------------------------------------------------------------------------
// Dropout.

TEST(Philox, KnownAnswers) {
  // Random123's kat_vectors for Philox4x32-10.
  using memattn::philox::U32x4;
  const struct {
    U32x4 ctr;
    std::uint32_t k0, k1;
    U32x4 expected;
  } kats[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}}},
      {{{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}},
       0xffffffff,
       0xffffffff,
       {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}}},
      {{{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}},
       0xa4093822,
       0x299f31d0,
       {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}},
  };
  for (const auto& kat : kats) {
    const U32x4 got = memattn::philox::philox4x32_10(kat.ctr, kat.k0, kat.k1);
    for (int lane = 0; lane < 4; ++lane) {
      EXPECT_EQ(got.x[lane], kat.expected.x[lane]) << "lane " << lane;
    }
  }
}

// Cases that cross dropout with GQA, causal alignments, masks (and their gradient), layouts and
// odd sizes.
std::vector<Case> dropout_cases() {
  std::vector<Case> picked;
  for (const Case& c : all_cases()) {
    for (const char* name :
         {"all_ones", "basic", "lq127_lk17_d17", "d256_dv256_gqa", "lq1_lk1000", "gqa_8_2",
          "causal_br_lq40_lk17", "key_padding", "float_1HqLqLk", "combo_br_bool_kpm_gqa",
          "combo_tl_float_kpm_gqa", "layout_blhd", "layout_negative_strides", "empty_lk0",
          "decode_bool_kpm_gqa", "decode_float_grad_mqa"}) {
      if (c.name == name) picked.push_back(c);
    }
  }
  return picked;
}

TEST(CpuDropoutForward, Float64) { run_suite(DType::f64, false, dropout_cases(), 0.3); }
TEST(CpuDropoutForward, Float32) { run_suite(DType::f32, false, dropout_cases(), 0.3); }
TEST(CpuDropoutForward, Bfloat16) { run_suite(DType::bf16, false, dropout_cases(), 0.3); }
TEST(CpuDropoutBackward, Float64) { run_suite(DType::f64, true, dropout_cases(), 0.3); }
TEST(CpuDropoutBackward, Float32) { run_suite(DType::f32, true, dropout_cases(), 0.3); }
TEST(CpuDropoutBackward, Bfloat16) { run_suite(DType::bf16, true, dropout_cases(), 0.3); }

Case dropout_case() { return make_case("dropout", 2, 2, 2, 128, 64, 32, 64); }

Problem dropout_problem(double drop_p, std::uint64_t seed) {
  Problem p = make_problem(dropout_case(), DType::f32, 99);
  p.dropout_p = drop_p;
  p.dropout_seed = seed;
  return p;
}

// With v = identity (Dv = Lk), out[b, h, i, j] = P_ij * keep_ij / (1 - p): non-zero exactly where
// key j was kept, so the kernel's mask can be read back.
void set_identity_v(Problem& p) {
  p.v.for_each(
      [&](const std::int64_t* idx, std::int64_t) { p.v.set(idx, idx[2] == idx[3] ? 1.0 : 0.0); });
}

std::vector<char> kernel_keep_mask(const HostTensor& out) {
  const std::vector<double> o = out.values();
  std::vector<char> keep(o.size());
  for (std::size_t e = 0; e < o.size(); ++e) keep[e] = o[e] != 0.0;
  return keep;
}

std::vector<char> predicted_keep_mask(const Problem& p) {
  const Case& c = p.c;
  std::vector<char> keep;
  for (std::int64_t b = 0; b < c.B; ++b) {
    for (std::int64_t h = 0; h < c.Hq; ++h) {
      for (std::int64_t i = 0; i < c.Lq; ++i) {
        for (std::int64_t j = 0; j < c.Lk; ++j) keep.push_back(dropout_keeps(p, b, h, i, j));
      }
    }
  }
  return keep;
}

::testing::AssertionResult same_mask(const std::vector<char>& got,
                                     const std::vector<char>& expected, const Case& c) {
  for (std::size_t e = 0; e < expected.size(); ++e) {
    if (got[e] != expected[e]) {
      const std::int64_t j = e % c.Lk, i = e / c.Lk % c.Lq, h = e / (c.Lk * c.Lq) % c.Hq,
                         b = e / (c.Lk * c.Lq * c.Hq);
      return ::testing::AssertionFailure()
             << "dropout masks differ first at [b=" << b << ", h=" << h << ", i=" << i
             << ", j=" << j << "]: kernel " << (got[e] ? "kept" : "dropped") << ", expected "
             << (expected[e] ? "kept" : "dropped");
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(CpuDropout, MaskIsThePhiloxMaskForEveryIsaAndThreadCount) {
  for (double drop_p : {0.1, 0.5, 0.9}) {
    Problem p = dropout_problem(drop_p, 0x0123456789abcdefull);
    set_identity_v(p);
    const std::vector<char> expected = predicted_keep_mask(p);
    double kept = 0;
    for (char k : expected) kept += k;
    // 32768 Bernoulli draws: standard deviation <= 0.003; allow 5 of them.
    EXPECT_NEAR(kept / static_cast<double>(expected.size()), 1.0 - drop_p, 0.015)
        << "dropout_p=" << drop_p;
    for (const std::string& isa : usable_isas()) {
      ScopedEnv env("MEMATTN_CPU_ISA", isa);
      for (int threads : {1, 3}) {
        SCOPED_TRACE("dropout_p=" + std::to_string(drop_p) + " isa=" + isa +
                     " threads=" + std::to_string(threads));
        ASSERT_TRUE(run_forward(p, threads));
        EXPECT_TRUE(same_mask(kernel_keep_mask(p.out), expected, p.c));
        // Kept values are P / (1 - p); lse is the no-dropout lse.
        const Reference ref = reference(p, false);
        EXPECT_TRUE(matches("out", p.out, ref.out, 2e-5));
        EXPECT_TRUE(matches("lse", p.lse, ref.lse, 2e-5));
      }
    }
  }
}

TEST(CpuDropout, SameSeedIsBitIdentical) {
  for (int threads : {1, 3}) {
    SCOPED_TRACE(threads);
    Problem p = dropout_problem(0.3, 1234);
    ASSERT_TRUE(run_forward(p, threads));
    const auto out1 = p.out.snapshot(), lse1 = p.lse.snapshot();
    ASSERT_TRUE(run_forward(p, threads));
    EXPECT_TRUE(out1 == p.out.snapshot()) << "same seed, different out";
    EXPECT_TRUE(lse1 == p.lse.snapshot()) << "same seed, different lse";
  }
}

TEST(CpuDropout, DifferentSeedDiffers) {
  // Seeds that differ only in the low or only in the high 32 bits of the key.
  for (std::uint64_t other : {std::uint64_t{1235}, (std::uint64_t{1} << 32) | 1234}) {
    Problem a = dropout_problem(0.3, 1234), b = dropout_problem(0.3, other);
    ASSERT_TRUE(run_forward(a, 1));
    ASSERT_TRUE(run_forward(b, 1));
    EXPECT_FALSE(a.out.snapshot() == b.out.snapshot())
        << "seeds 1234 and " << other << " gave the same out";
    // lse is computed before dropout: independent of the seed.
    EXPECT_TRUE(matches("lse", b.lse, a.lse.values(), 0.0));
  }
}

TEST(CpuDropout, ZeroProbabilityIsNoDropout) {
  Problem a = dropout_problem(0.0, 0), b = dropout_problem(0.0, 987654321);
  ASSERT_TRUE(run_forward(a, 1));
  ASSERT_TRUE(run_forward(b, 1));
  EXPECT_TRUE(a.out.snapshot() == b.out.snapshot()) << "dropout_p=0 depends on the seed";
  const Reference ref = reference(a, false);
  EXPECT_TRUE(matches("out", a.out, ref.out, 2e-5));
}

}  // namespace
