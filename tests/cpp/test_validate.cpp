// Validation and planning from metadata alone (null data pointers): one test per rule of
// docs/CONTRACT.md "Rules", checking the error kind (-> ValueError / TypeError /
// NotImplementedError in Python) and that the message names the argument and shows what it got.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "memattn/api.h"
#include "test_support.h"

namespace {

using memattn::BackwardArgs;
using memattn::CausalAlignment;
using memattn::DeviceType;
using memattn::DType;
using memattn::ErrorKind;
using memattn::ForwardArgs;
using memattn::ProblemShape;
using memattn::TensorView;
using memattn_test::meta_view;
using memattn_test::ThrowsError;

// B = 2, Hq = 8, Hk = 4, Lq = 16, Lk = 24, D = 32, Dv = 48.
constexpr std::int64_t kB = 2, kHq = 8, kHk = 4, kLq = 16, kLk = 24, kD = 32, kDv = 48;

ForwardArgs valid_forward(DType dtype = DType::f32, DeviceType device = DeviceType::cpu) {
  ForwardArgs a;
  a.q = meta_view(dtype, {kB, kHq, kLq, kD}, device);   // q: [B, Hq, Lq, D]
  a.k = meta_view(dtype, {kB, kHk, kLk, kD}, device);   // k: [B, Hk, Lk, D]
  a.v = meta_view(dtype, {kB, kHk, kLk, kDv}, device);  // v: [B, Hk, Lk, Dv]
  a.out = meta_view(dtype, {kB, kHq, kLq, kDv}, device);
  // lse: [B, Hq, Lq], float32 (float64 for float64 problems).
  a.lse = meta_view(dtype == DType::f64 ? DType::f64 : DType::f32, {kB, kHq, kLq}, device);
  return a;
}

BackwardArgs valid_backward(DType dtype = DType::f32) {
  BackwardArgs b;
  b.fwd = valid_forward(dtype);
  b.grad_out = meta_view(dtype, {kB, kHq, kLq, kDv});
  b.grad_q = meta_view(dtype, {kB, kHq, kLq, kD});
  b.grad_k = meta_view(dtype, {kB, kHk, kLk, kD});
  b.grad_v = meta_view(dtype, {kB, kHk, kLk, kDv});
  return b;
}

auto fwd_call(const ForwardArgs& a) {
  return [a] { (void)memattn::validate_forward(a); };
}
auto bwd_call(const BackwardArgs& b) {
  return [b] { (void)memattn::validate_backward(b); };
}

// ---------------------------------------------------------------------------------------------
// Happy paths: the derived ProblemShape.

TEST(ValidateForward, DerivesProblemShape) {
  const ProblemShape s = memattn::validate_forward(valid_forward());
  EXPECT_EQ(s.B, kB);
  EXPECT_EQ(s.Hq, kHq);
  EXPECT_EQ(s.Hk, kHk);
  EXPECT_EQ(s.Lq, kLq);
  EXPECT_EQ(s.Lk, kLk);
  EXPECT_EQ(s.D, kD);
  EXPECT_EQ(s.Dv, kDv);
  EXPECT_EQ(s.group_size(), kHq / kHk);
  EXPECT_DOUBLE_EQ(s.scale, 1.0 / std::sqrt(static_cast<double>(kD)));
}

TEST(ValidateForward, OutputsAreOptionalForValidation) {
  ForwardArgs a = valid_forward();
  a.out = TensorView{};
  a.lse = TensorView{};
  const ProblemShape s = memattn::validate_forward(a);
  EXPECT_EQ(s.Dv, kDv);
}

TEST(ValidateForward, ExplicitScaleIsKept) {
  ForwardArgs a = valid_forward();
  a.has_scale = true;
  a.scale = 0.375;
  EXPECT_DOUBLE_EQ(memattn::validate_forward(a).scale, 0.375);
  a.scale = -2.0;  // any finite value, negative and zero included
  EXPECT_DOUBLE_EQ(memattn::validate_forward(a).scale, -2.0);
  a.scale = 0.0;
  EXPECT_DOUBLE_EQ(memattn::validate_forward(a).scale, 0.0);
}

TEST(ValidateForward, CausalOffsetTopLeftIsZero) {
  ForwardArgs a = valid_forward();
  a.is_causal = true;
  a.causal_alignment = CausalAlignment::top_left;
  EXPECT_EQ(memattn::validate_forward(a).causal_offset, 0);
}

TEST(ValidateForward, CausalOffsetBottomRightIsLkMinusLq) {
  ForwardArgs a = valid_forward();
  a.is_causal = true;
  a.causal_alignment = CausalAlignment::bottom_right;
  EXPECT_EQ(memattn::validate_forward(a).causal_offset, kLk - kLq);

  // Lq > Lk: a negative offset (the first Lq - Lk queries see no key).
  a.q = meta_view(DType::f32, {kB, kHq, 30, kD});
  a.out = meta_view(DType::f32, {kB, kHq, 30, kDv});
  a.lse = meta_view(DType::f32, {kB, kHq, 30});
  EXPECT_EQ(memattn::validate_forward(a).causal_offset, kLk - 30);
}

TEST(ValidateForward, AcceptsEveryQueryDtype) {
  for (DType dt : {DType::f16, DType::bf16, DType::f32, DType::f64}) {
    SCOPED_TRACE(memattn::dtype_name(dt));
    EXPECT_NO_THROW(memattn::validate_forward(valid_forward(dt)));
  }
}

TEST(ValidateForward, AcceptsHeadDimBounds) {
  for (std::int64_t d : {1, 17, 256}) {
    ForwardArgs a = valid_forward();
    a.q.sizes[3] = d;
    a.k.sizes[3] = d;
    a.v.sizes[3] = d;
    a.out.sizes[3] = d;
    SCOPED_TRACE(d);
    const ProblemShape s = memattn::validate_forward(a);
    EXPECT_EQ(s.D, d);
    EXPECT_EQ(s.Dv, d);
  }
}

TEST(ValidateForward, AcceptsEmptyBatchAndSequences) {
  {
    ForwardArgs a = valid_forward();
    for (TensorView* t : {&a.q, &a.k, &a.v, &a.out, &a.lse}) t->sizes[0] = 0;
    EXPECT_EQ(memattn::validate_forward(a).B, 0);
  }
  {
    ForwardArgs a = valid_forward();
    for (TensorView* t : {&a.q, &a.out, &a.lse}) t->sizes[2] = 0;
    EXPECT_EQ(memattn::validate_forward(a).Lq, 0);
  }
  {
    ForwardArgs a = valid_forward();
    a.k.sizes[2] = 0;
    a.v.sizes[2] = 0;
    EXPECT_EQ(memattn::validate_forward(a).Lk, 0);
  }
}

TEST(ValidateForward, AcceptsMqa) {
  ForwardArgs a = valid_forward();
  a.k.sizes[1] = 1;
  a.v.sizes[1] = 1;
  const ProblemShape s = memattn::validate_forward(a);
  EXPECT_EQ(s.Hk, 1);
  EXPECT_EQ(s.group_size(), kHq);
}

TEST(ValidateForward, AcceptsMasksOfEveryAllowedForm) {
  const std::vector<std::vector<std::int64_t>> shapes = {{kB, kHq, kLq, kLk}, {1, kHq, kLq, kLk},
                                                         {kB, 1, 1, kLk},     {1, 1, kLq, kLk},
                                                         {1, 1, 1, 1},        {kB, kHq, kLq, 1}};
  for (const auto& shape : shapes) {
    for (DType dt : {DType::boolean, DType::f32}) {
      ForwardArgs a = valid_forward();
      a.attn_mask = meta_view(dt, shape);
      SCOPED_TRACE(a.attn_mask.shape_string() + " " + memattn::dtype_name(dt));
      EXPECT_NO_THROW(memattn::validate_forward(a));
    }
  }
  // A full-size mask broadcast with stride 0 (torch's expand) is fine too.
  ForwardArgs a = valid_forward();
  a.attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  a.attn_mask.strides[0] = 0;
  a.attn_mask.strides[1] = 0;
  EXPECT_NO_THROW(memattn::validate_forward(a));
}

TEST(ValidateForward, AcceptsFloatMaskInQDtypeOrFloat32) {
  for (DType qdt : {DType::f16, DType::bf16, DType::f32, DType::f64}) {
    for (DType mdt : {qdt, DType::f32}) {
      ForwardArgs a = valid_forward(qdt);
      a.attn_mask = meta_view(mdt, {kB, kHq, kLq, kLk});
      SCOPED_TRACE(std::string(memattn::dtype_name(qdt)) + " q, " + memattn::dtype_name(mdt) +
                   " mask");
      EXPECT_NO_THROW(memattn::validate_forward(a));
    }
  }
}

TEST(ValidateForward, AcceptsKeyPaddingMask) {
  ForwardArgs a = valid_forward();
  a.key_padding_mask = meta_view(DType::boolean, {kB, kLk});
  EXPECT_NO_THROW(memattn::validate_forward(a));
}

TEST(ValidateForward, AcceptsDropoutInRange) {
  for (double p : {0.0, 0.5, 0.999}) {
    ForwardArgs a = valid_forward();
    a.dropout_p = p;
    SCOPED_TRACE(p);
    EXPECT_NO_THROW(memattn::validate_forward(a));
  }
}

TEST(ValidateForward, AcceptsCudaCallsFromMetadata) {
  // Validation is device-agnostic; only planning says no backend can run it.
  EXPECT_NO_THROW(memattn::validate_forward(valid_forward(DType::f16, DeviceType::cuda)));
}

TEST(ValidateBackward, DerivesProblemShape) {
  const ProblemShape s = memattn::validate_backward(valid_backward());
  EXPECT_EQ(s.B, kB);
  EXPECT_EQ(s.Hq, kHq);
  EXPECT_EQ(s.Hk, kHk);
  EXPECT_EQ(s.Lq, kLq);
  EXPECT_EQ(s.Lk, kLk);
  EXPECT_EQ(s.D, kD);
  EXPECT_EQ(s.Dv, kDv);
  EXPECT_DOUBLE_EQ(s.scale, 1.0 / std::sqrt(static_cast<double>(kD)));
}

TEST(ValidateBackward, AcceptsGradAttnMaskForFloatMask) {
  BackwardArgs b = valid_backward();
  b.fwd.attn_mask = meta_view(DType::f32, {1, kHq, kLq, kLk});
  b.grad_attn_mask = meta_view(DType::f32, {1, kHq, kLq, kLk});
  EXPECT_NO_THROW(memattn::validate_backward(b));
  // Every grad dim may be 1 (summed) or the mask's size there.
  b.fwd.attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  b.grad_attn_mask = meta_view(DType::f32, {1, kHq, kLq, kLk});
  EXPECT_NO_THROW(memattn::validate_backward(b));
  // A float64 problem takes a float64 mask gradient, whatever the mask's dtype.
  BackwardArgs b64 = valid_backward(DType::f64);
  for (DType mask_dtype : {DType::f64, DType::f32}) {
    b64.fwd.attn_mask = meta_view(mask_dtype, {kB, kHq, kLq, kLk});
    b64.grad_attn_mask = meta_view(DType::f64, {kB, kHq, kLq, kLk});
    EXPECT_NO_THROW(memattn::validate_backward(b64));
  }
  // A bfloat16 problem takes a float32 one, whatever the mask's dtype.
  BackwardArgs b16 = valid_backward(DType::bf16);
  for (DType mask_dtype : {DType::bf16, DType::f32}) {
    b16.fwd.attn_mask = meta_view(mask_dtype, {kB, kHq, kLq, kLk});
    b16.grad_attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
    EXPECT_NO_THROW(memattn::validate_backward(b16));
  }
}

// ---------------------------------------------------------------------------------------------
// q, k, v: rank and dtype.

TEST(ValidateForward, RejectsAbsentQ) {
  ForwardArgs a = valid_forward();
  a.q = TensorView{};
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "q"));
}

TEST(ValidateForward, RejectsQNot4D) {
  ForwardArgs a = valid_forward();
  a.q = meta_view(DType::f32, {kHq, kLq, kD});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "q", {"[8, 16, 32]"}));
}

TEST(ValidateForward, RejectsKNot4D) {
  ForwardArgs a = valid_forward();
  a.k = meta_view(DType::f32, {kB, kHk, kLk});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "k", {"[2, 4, 24]"}));
}

TEST(ValidateForward, RejectsVNot4D) {
  ForwardArgs a = valid_forward();
  a.v = meta_view(DType::f32, {kB * kHk, kLk, kDv});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"[8, 24, 48]"}));
}

TEST(ValidateForward, RejectsBoolQ) {
  ForwardArgs a = valid_forward();
  a.q.dtype = DType::boolean;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "q", {"bool"}));
}

TEST(ValidateForward, RejectsKDtypeDifferentFromQ) {
  ForwardArgs a = valid_forward();
  a.k.dtype = DType::f64;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "k", {"float64"}));
}

TEST(ValidateForward, RejectsVDtypeDifferentFromQ) {
  ForwardArgs a = valid_forward();
  a.v.dtype = DType::bf16;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "v", {"bfloat16"}));
}

// ---------------------------------------------------------------------------------------------
// Devices: one device (type and index) for every tensor.

TEST(ValidateForward, RejectsKOnAnotherDeviceType) {
  ForwardArgs a = valid_forward();
  a.k.device = DeviceType::cuda;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "k", {"cuda"}));
}

TEST(ValidateForward, RejectsVOnAnotherDeviceIndex) {
  ForwardArgs a = valid_forward(DType::f32, DeviceType::cuda);
  a.v.device_index = 1;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"cuda"}));
}

TEST(ValidateForward, RejectsAttnMaskOnAnotherDevice) {
  ForwardArgs a = valid_forward();
  a.attn_mask = meta_view(DType::boolean, {kB, kHq, kLq, kLk}, DeviceType::cuda);
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "attn_mask", {"cuda"}));
}

TEST(ValidateForward, RejectsKeyPaddingMaskOnAnotherDevice) {
  ForwardArgs a = valid_forward();
  a.key_padding_mask = meta_view(DType::boolean, {kB, kLk}, DeviceType::cuda);
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "key_padding_mask", {"cuda"}));
}

TEST(ValidateForward, RejectsOutOnAnotherDevice) {
  ForwardArgs a = valid_forward();
  a.out.device = DeviceType::cuda;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "out", {"cuda"}));
}

TEST(ValidateForward, RejectsLseOnAnotherDevice) {
  ForwardArgs a = valid_forward();
  a.lse.device = DeviceType::cuda;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "lse", {"cuda"}));
}

// ---------------------------------------------------------------------------------------------
// Sizes: B, Hk, Hq % Hk, Lk, D, Dv.

TEST(ValidateForward, RejectsKBatchMismatch) {
  ForwardArgs a = valid_forward();
  a.k.sizes[0] = 3;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "k", {"[3, 4, 24, 32]"}));
}

TEST(ValidateForward, RejectsVBatchMismatch) {
  ForwardArgs a = valid_forward();
  a.v.sizes[0] = 1;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"[1, 4, 24, 48]"}));
}

TEST(ValidateForward, RejectsKVHeadMismatch) {
  ForwardArgs a = valid_forward();
  a.v.sizes[1] = 2;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"[2, 2, 24, 48]"}));
}

TEST(ValidateForward, RejectsZeroKeyHeads) {
  ForwardArgs a = valid_forward();
  a.k.sizes[1] = 0;
  a.v.sizes[1] = 0;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "k", {"[2, 0, 24, 32]"}));
}

TEST(ValidateForward, RejectsHqNotMultipleOfHk) {
  ForwardArgs a = valid_forward();
  a.k.sizes[1] = 3;
  a.v.sizes[1] = 3;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "k", {"[2, 3, 24, 32]"}));
}

TEST(ValidateForward, RejectsKVLengthMismatch) {
  ForwardArgs a = valid_forward();
  a.v.sizes[2] = 25;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"[2, 4, 25, 48]"}));
}

TEST(ValidateForward, RejectsKHeadDimMismatch) {
  ForwardArgs a = valid_forward();
  a.k.sizes[3] = 16;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "k", {"[2, 4, 24, 16]"}));
}

TEST(ValidateForward, RejectsZeroHeadDim) {
  ForwardArgs a = valid_forward();
  a.q.sizes[3] = 0;
  a.k.sizes[3] = 0;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "q", {"[2, 8, 16, 0]"}));
}

TEST(ValidateForward, RejectsHeadDimAbove256) {
  ForwardArgs a = valid_forward();
  a.q.sizes[3] = 257;
  a.k.sizes[3] = 257;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "q", {"[2, 8, 16, 257]", "256"}));
}

TEST(ValidateForward, RejectsZeroValueHeadDim) {
  ForwardArgs a = valid_forward();
  a.v.sizes[3] = 0;
  a.out.sizes[3] = 0;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"[2, 4, 24, 0]"}));
}

TEST(ValidateForward, RejectsValueHeadDimAbove256) {
  ForwardArgs a = valid_forward();
  a.v.sizes[3] = 300;
  a.out.sizes[3] = 300;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "v", {"[2, 4, 24, 300]", "256"}));
}

// ---------------------------------------------------------------------------------------------
// attn_mask.

TEST(ValidateForward, RejectsAttnMaskNot4D) {
  ForwardArgs a = valid_forward();
  a.attn_mask = meta_view(DType::boolean, {kLq, kLk});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "attn_mask", {"[16, 24]"}));
}

TEST(ValidateForward, RejectsAttnMaskFloatOfOtherDtype) {
  ForwardArgs a = valid_forward(DType::f32);
  a.attn_mask = meta_view(DType::f16, {kB, kHq, kLq, kLk});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "attn_mask", {"float16"}));

  ForwardArgs b = valid_forward(DType::bf16);
  b.attn_mask = meta_view(DType::f64, {1, 1, kLq, kLk});
  EXPECT_TRUE(ThrowsError(fwd_call(b), ErrorKind::invalid_type, "attn_mask", {"float64"}));
}

TEST(ValidateForward, RejectsAttnMaskDimNeitherOneNorFull) {
  const std::vector<std::int64_t> full = {kB, kHq, kLq, kLk};
  for (int dim = 0; dim < 4; ++dim) {
    std::vector<std::int64_t> shape = full;
    shape[dim] = full[dim] + 1;
    ForwardArgs a = valid_forward();
    a.attn_mask = meta_view(DType::f32, shape);
    SCOPED_TRACE("dim " + std::to_string(dim) + " " + a.attn_mask.shape_string());
    EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "attn_mask",
                            {a.attn_mask.shape_string()}));
  }
}

// ---------------------------------------------------------------------------------------------
// key_padding_mask.

TEST(ValidateForward, RejectsFloatKeyPaddingMask) {
  ForwardArgs a = valid_forward();
  a.key_padding_mask = meta_view(DType::f32, {kB, kLk});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "key_padding_mask", {"float32"}));
}

TEST(ValidateForward, RejectsKeyPaddingMaskWrongLength) {
  ForwardArgs a = valid_forward();
  a.key_padding_mask = meta_view(DType::boolean, {kB, kLk + 1});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "key_padding_mask", {"[2, 25]"}));
}

TEST(ValidateForward, RejectsKeyPaddingMaskWrongBatch) {
  ForwardArgs a = valid_forward();
  a.key_padding_mask = meta_view(DType::boolean, {kB + 1, kLk});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "key_padding_mask", {"[3, 24]"}));
}

TEST(ValidateForward, RejectsKeyPaddingMaskWrongRank) {
  ForwardArgs a = valid_forward();
  a.key_padding_mask = meta_view(DType::boolean, {kB, 1, 1, kLk});
  EXPECT_TRUE(
      ThrowsError(fwd_call(a), ErrorKind::invalid_value, "key_padding_mask", {"[2, 1, 1, 24]"}));
}

// ---------------------------------------------------------------------------------------------
// Options: dropout_p in [0, 1), scale finite.

TEST(ValidateForward, RejectsDropoutOutOfRange) {
  for (double p : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    ForwardArgs a = valid_forward();
    a.dropout_p = p;
    SCOPED_TRACE(p);
    EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "dropout_p"));
  }
}

TEST(ValidateForward, RejectsNonFiniteScale) {
  for (double s :
       {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
        std::numeric_limits<double>::quiet_NaN()}) {
    ForwardArgs a = valid_forward();
    a.has_scale = true;
    a.scale = s;
    SCOPED_TRACE(s);
    EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "scale"));
  }
}

TEST(ValidateForward, IgnoresScaleValueWhenNotGiven) {
  ForwardArgs a = valid_forward();
  a.has_scale = false;
  a.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_DOUBLE_EQ(memattn::validate_forward(a).scale, 1.0 / std::sqrt(static_cast<double>(kD)));
}

// ---------------------------------------------------------------------------------------------
// Outputs: out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32.

TEST(ValidateForward, RejectsOutWrongShape) {
  ForwardArgs a = valid_forward();
  a.out = meta_view(DType::f32, {kB, kHq, kLq, kD});  // D instead of Dv
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "out", {"[2, 8, 16, 32]"}));
}

TEST(ValidateForward, RejectsOutWrongRank) {
  ForwardArgs a = valid_forward();
  a.out = meta_view(DType::f32, {kB * kHq, kLq, kDv});
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "out", {"[16, 16, 48]"}));
}

TEST(ValidateForward, RejectsOutWrongDtype) {
  ForwardArgs a = valid_forward(DType::bf16);
  a.out.dtype = DType::f32;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "out", {"float32"}));
}

TEST(ValidateForward, RejectsLseWrongShape) {
  ForwardArgs a = valid_forward();
  a.lse = meta_view(DType::f32, {kB, kHk, kLq});  // Hk instead of Hq
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_value, "lse", {"[2, 4, 16]"}));
}

TEST(ValidateForward, RejectsLseWrongDtype) {
  ForwardArgs a = valid_forward(DType::f32);
  a.lse.dtype = DType::f64;
  EXPECT_TRUE(ThrowsError(fwd_call(a), ErrorKind::invalid_type, "lse", {"float64"}));

  ForwardArgs b = valid_forward(DType::bf16);
  b.lse.dtype = DType::bf16;  // lse is float32 for low-precision problems
  EXPECT_TRUE(ThrowsError(fwd_call(b), ErrorKind::invalid_type, "lse", {"bfloat16"}));

  ForwardArgs c = valid_forward(DType::f64);
  c.lse.dtype = DType::f32;  // float64 problems keep a float64 lse
  EXPECT_TRUE(ThrowsError(fwd_call(c), ErrorKind::invalid_type, "lse", {"float32"}));
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_out like out; grad_q/k/v like q/k/v in q's dtype; grad_attn_mask float32 and
// only with a float attn_mask.

TEST(ValidateBackward, RunsForwardRulesToo) {
  BackwardArgs b = valid_backward();
  b.fwd.k.dtype = DType::f64;
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_type, "k", {"float64"}));
}

TEST(ValidateBackward, RejectsMissingOut) {
  BackwardArgs b = valid_backward();
  b.fwd.out = TensorView{};
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "out"));
}

TEST(ValidateBackward, RejectsMissingLse) {
  BackwardArgs b = valid_backward();
  b.fwd.lse = TensorView{};
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "lse"));
}

TEST(ValidateBackward, RejectsMissingGradOut) {
  BackwardArgs b = valid_backward();
  b.grad_out = TensorView{};
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_out"));
}

TEST(ValidateBackward, RejectsGradOutWrongShape) {
  BackwardArgs b = valid_backward();
  b.grad_out = meta_view(DType::f32, {kB, kHq, kLq + 1, kDv});
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_out", {"[2, 8, 17, 48]"}));
}

TEST(ValidateBackward, RejectsGradOutWrongDtype) {
  BackwardArgs b = valid_backward();
  b.grad_out.dtype = DType::f64;
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_type, "grad_out", {"float64"}));
}

TEST(ValidateBackward, RejectsGradQWrongShape) {
  BackwardArgs b = valid_backward();
  b.grad_q = meta_view(DType::f32, {kB, kHk, kLq, kD});
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_q", {"[2, 4, 16, 32]"}));
}

TEST(ValidateBackward, RejectsGradQWrongDtype) {
  BackwardArgs b = valid_backward(DType::bf16);
  b.grad_q.dtype = DType::f32;  // grads are in q's dtype
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_type, "grad_q", {"float32"}));
}

TEST(ValidateBackward, RejectsGradKWrongShape) {
  BackwardArgs b = valid_backward();
  b.grad_k = meta_view(DType::f32, {kB, kHq, kLk, kD});  // expanded to Hq heads
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_k", {"[2, 8, 24, 32]"}));
}

TEST(ValidateBackward, RejectsGradKWrongDtype) {
  BackwardArgs b = valid_backward();
  b.grad_k.dtype = DType::f64;
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_type, "grad_k", {"float64"}));
}

TEST(ValidateBackward, RejectsGradVWrongShape) {
  BackwardArgs b = valid_backward();
  b.grad_v = meta_view(DType::f32, {kB, kHk, kLk, kD});  // D instead of Dv
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_v", {"[2, 4, 24, 32]"}));
}

TEST(ValidateBackward, RejectsGradVWrongDtype) {
  BackwardArgs b = valid_backward();
  b.grad_v.dtype = DType::bf16;
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_type, "grad_v", {"bfloat16"}));
}

TEST(ValidateBackward, RejectsGradAttnMaskWithoutAttnMask) {
  BackwardArgs b = valid_backward();
  b.grad_attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_attn_mask"));
}

TEST(ValidateBackward, RejectsGradAttnMaskWithBoolMask) {
  // A bool mask has no gradient. Either kind is defensible here (the mask's dtype is what is
  // wrong, or the argument should not be there); the message must name grad_attn_mask.
  BackwardArgs b = valid_backward();
  b.fwd.attn_mask = meta_view(DType::boolean, {kB, kHq, kLq, kLk});
  b.grad_attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  const auto as_value = ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_attn_mask");
  const auto as_type = ThrowsError(bwd_call(b), ErrorKind::invalid_type, "grad_attn_mask");
  EXPECT_TRUE(as_value || as_type) << as_value.message() << "\n" << as_type.message();
}

TEST(ValidateBackward, RejectsGradAttnMaskOfWrongDtype) {
  // float32, float64 for float64 problems.
  BackwardArgs b = valid_backward(DType::f32);
  b.fwd.attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  b.grad_attn_mask = meta_view(DType::f64, {kB, kHq, kLq, kLk});
  EXPECT_TRUE(ThrowsError(bwd_call(b), ErrorKind::invalid_type, "grad_attn_mask", {"float64"}));

  BackwardArgs b16 = valid_backward(DType::bf16);
  b16.fwd.attn_mask = meta_view(DType::bf16, {kB, kHq, kLq, kLk});
  b16.grad_attn_mask = meta_view(DType::bf16, {kB, kHq, kLq, kLk});
  EXPECT_TRUE(ThrowsError(bwd_call(b16), ErrorKind::invalid_type, "grad_attn_mask", {"bfloat16"}));

  BackwardArgs b64 = valid_backward(DType::f64);
  b64.fwd.attn_mask = meta_view(DType::f64, {kB, kHq, kLq, kLk});
  b64.grad_attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  EXPECT_TRUE(ThrowsError(bwd_call(b64), ErrorKind::invalid_type, "grad_attn_mask", {"float32"}));
}

TEST(ValidateBackward, RejectsGradAttnMaskWrongShape) {
  BackwardArgs b = valid_backward();
  b.fwd.attn_mask = meta_view(DType::f32, {1, kHq, kLq, kLk});
  // Dim 0 larger than the mask's (1), which is neither 1 nor the mask's size.
  b.grad_attn_mask = meta_view(DType::f32, {kB, kHq, kLq, kLk});
  EXPECT_TRUE(
      ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_attn_mask", {"[2, 8, 16, 24]"}));
  b.grad_attn_mask = meta_view(DType::f32, {1, kHq, kLq, kLk + 2});
  EXPECT_TRUE(
      ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_attn_mask", {"[1, 8, 16, 26]"}));
  b.grad_attn_mask = meta_view(DType::f32, {kHq, kLq, kLk});
  EXPECT_TRUE(
      ThrowsError(bwd_call(b), ErrorKind::invalid_value, "grad_attn_mask", {"[8, 16, 24]"}));
}

// ---------------------------------------------------------------------------------------------
// Planning: the CPU backend for CPU float32, none (with every reason) otherwise.

const memattn::BackendVerdict* find_verdict(const memattn::Plan& p, const std::string& backend) {
  for (const auto& v : p.verdicts) {
    if (v.backend == backend) return &v;
  }
  return nullptr;
}

bool any_reason_contains(const memattn::BackendVerdict& v, const std::string& needle) {
  for (const auto& r : v.reasons) {
    if (r.find(needle) != std::string::npos) return true;
  }
  return false;
}

std::string describe(const memattn::Plan& p) {
  std::string s = "backend='" + p.backend + "' kernel='" + p.kernel + "' reason='" + p.reason + "'";
  for (const auto& v : p.verdicts) {
    s += "\n  " + v.backend + ":";
    for (const auto& r : v.reasons) s += " [" + r + "]";
  }
  return s;
}

TEST(Plan, CpuFloat32GoesToCpu) {
  const ForwardArgs a = valid_forward(DType::f32);
  for (bool backward : {false, true}) {
    const memattn::Plan p = memattn::plan(a, memattn::validate_forward(a), backward);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "cpu");
    EXPECT_EQ(p.kernel.rfind("cpu/", 0), 0u) << "kernel should start with cpu/";
    EXPECT_FALSE(p.reason.empty());
    const memattn::BackendVerdict* cpu = find_verdict(p, "cpu");
    ASSERT_NE(cpu, nullptr) << "the plan must list the cpu verdict";
    EXPECT_TRUE(cpu->reasons.empty());
  }
}

TEST(Plan, CpuFloat64AndBfloat16GoToCpu) {
  for (DType dt : {DType::f64, DType::bf16}) {
    const ForwardArgs a = valid_forward(dt);
    const memattn::Plan p = memattn::plan(a, memattn::validate_forward(a), false);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "cpu");
    EXPECT_EQ(p.kernel.rfind("cpu/", 0), 0u);
  }
}

TEST(Plan, CpuFloat16HasNoBackend) {
  const ForwardArgs a = valid_forward(DType::f16);
  const memattn::Plan p = memattn::plan(a, memattn::validate_forward(a), false);
  SCOPED_TRACE(describe(p));
  EXPECT_EQ(p.backend, "");
  const memattn::BackendVerdict* cpu = find_verdict(p, "cpu");
  ASSERT_NE(cpu, nullptr);
  EXPECT_TRUE(any_reason_contains(*cpu, "float16"));
}

TEST(Plan, CudaCallHasNoBackendWithoutCuda) {
  if (memattn::build_info().cuda_built) GTEST_SKIP() << "this build has a CUDA backend";
  const ForwardArgs a = valid_forward(DType::f16, DeviceType::cuda);
  const memattn::Plan p = memattn::plan(a, memattn::validate_forward(a), false);
  SCOPED_TRACE(describe(p));
  EXPECT_EQ(p.backend, "");
  const memattn::BackendVerdict* cuda = find_verdict(p, "cuda");
  ASSERT_NE(cuda, nullptr) << "the plan must list the cuda verdict";
  EXPECT_TRUE(any_reason_contains(*cuda, "without CUDA"));
  const memattn::BackendVerdict* cpu = find_verdict(p, "cpu");
  ASSERT_NE(cpu, nullptr) << "the plan must list the cpu verdict";
  EXPECT_FALSE(cpu->reasons.empty());
}

TEST(Plan, CollectsEveryCpuReason) {
  // float16 on a cuda device: the CPU verdict lists both the dtype and the device.
  if (memattn::build_info().cuda_built) GTEST_SKIP() << "this build has a CUDA backend";
  const ForwardArgs a = valid_forward(DType::f16, DeviceType::cuda);
  const memattn::Plan p = memattn::plan(a, memattn::validate_forward(a), false);
  SCOPED_TRACE(describe(p));
  const memattn::BackendVerdict* cpu = find_verdict(p, "cpu");
  ASSERT_NE(cpu, nullptr);
  EXPECT_TRUE(any_reason_contains(*cpu, "float16"));
  EXPECT_TRUE(any_reason_contains(*cpu, "cuda"));
}

TEST(Dispatch, ForwardOnCudaWithoutCudaIsNotImplemented) {
  if (memattn::build_info().cuda_built) GTEST_SKIP() << "this build has a CUDA backend";
  const ForwardArgs a = valid_forward(DType::f32, DeviceType::cuda);
  EXPECT_TRUE(ThrowsError([&] { memattn::forward(a, memattn::ExecContext{}); },
                          ErrorKind::not_implemented, "", {"without CUDA"}));
}

TEST(Dispatch, BackwardOnCudaWithoutCudaIsNotImplemented) {
  if (memattn::build_info().cuda_built) GTEST_SKIP() << "this build has a CUDA backend";
  BackwardArgs b = valid_backward(DType::f32);
  for (TensorView* t : {&b.fwd.q, &b.fwd.k, &b.fwd.v, &b.fwd.out, &b.fwd.lse, &b.grad_out,
                        &b.grad_q, &b.grad_k, &b.grad_v}) {
    t->device = DeviceType::cuda;
  }
  EXPECT_TRUE(ThrowsError([&] { memattn::backward(b, memattn::ExecContext{}); },
                          ErrorKind::not_implemented, "", {"without CUDA"}));
}

TEST(Dispatch, ForwardFloat16OnCpuIsNotImplemented) {
  const ForwardArgs a = valid_forward(DType::f16);
  EXPECT_TRUE(ThrowsError([&] { memattn::forward(a, memattn::ExecContext{}); },
                          ErrorKind::not_implemented, "", {"float16"}));
}

TEST(Dispatch, ForwardValidatesBeforePlanning) {
  // A bad argument is reported as such even when no backend could run the call.
  ForwardArgs a = valid_forward(DType::f16, DeviceType::cuda);
  a.k.sizes[3] = 7;
  EXPECT_TRUE(ThrowsError([&] { memattn::forward(a, memattn::ExecContext{}); },
                          ErrorKind::invalid_value, "k"));
}

TEST(BuildInfo, ReportsCpuIsas) {
  const memattn::BuildInfo info = memattn::build_info();
  EXPECT_FALSE(info.version.empty());
  ASSERT_FALSE(info.cpu_isas_built.empty());
  ASSERT_FALSE(info.cpu_isas_usable.empty());
  bool base_usable = false;
  for (const std::string& isa : info.cpu_isas_usable) base_usable = base_usable || isa == "base";
  EXPECT_TRUE(base_usable) << "the portable base kernels run on every CPU";
  for (const std::string& isa : info.cpu_isas_usable) {
    bool built = false;
    for (const std::string& b : info.cpu_isas_built) built = built || b == isa;
    EXPECT_TRUE(built) << isa << " is usable but not built";
  }
  EXPECT_FALSE(info.cpu_isa_selected.empty());
  EXPECT_FALSE(info.cpu_isa_reason.empty());
}

TEST(TensorView, ShapeString) {
  EXPECT_EQ(meta_view(DType::f32, {2, 8, 16}).shape_string(), "[2, 8, 16]");
  EXPECT_EQ(meta_view(DType::f32, {2, 8, 128, 64}).shape_string(), "[2, 8, 128, 64]");
  EXPECT_EQ(meta_view(DType::f32, {2, 8, 128, 64}).stride_string(), "[65536, 8192, 64, 1]");
}

TEST(TensorView, DtypeNamesAndSizes) {
  EXPECT_STREQ(memattn::dtype_name(DType::f16), "float16");
  EXPECT_STREQ(memattn::dtype_name(DType::bf16), "bfloat16");
  EXPECT_STREQ(memattn::dtype_name(DType::f32), "float32");
  EXPECT_STREQ(memattn::dtype_name(DType::f64), "float64");
  EXPECT_STREQ(memattn::dtype_name(DType::boolean), "bool");
  EXPECT_STREQ(memattn::dtype_short_name(DType::f16), "f16");
  EXPECT_STREQ(memattn::dtype_short_name(DType::bf16), "bf16");
  EXPECT_STREQ(memattn::dtype_short_name(DType::f32), "f32");
  EXPECT_STREQ(memattn::dtype_short_name(DType::f64), "f64");
  EXPECT_STREQ(memattn::dtype_short_name(DType::boolean), "bool");
  EXPECT_EQ(memattn::dtype_bytes(DType::f16), 2);
  EXPECT_EQ(memattn::dtype_bytes(DType::bf16), 2);
  EXPECT_EQ(memattn::dtype_bytes(DType::f32), 4);
  EXPECT_EQ(memattn::dtype_bytes(DType::f64), 8);
  EXPECT_EQ(memattn::dtype_bytes(DType::boolean), 1);
  EXPECT_EQ(meta_view(DType::f32, {2, 3, 5, 7}).numel(), 210);
}

}  // namespace
