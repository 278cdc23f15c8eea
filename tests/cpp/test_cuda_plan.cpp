// The CUDA backend's planner verdicts for CUDA-device views, from metadata alone (null or fake
// data pointers, nothing is launched): layout reasons, dtype reasons, and a reason rather than
// a crash when no GPU or driver is there. Every test here holds on a machine without a GPU (CI
// has none); assertions that only hold without a GPU skip themselves where one is present.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "memattn/api.h"
#include "test_support.h"

#if MEMATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using memattn::BackwardArgs;
using memattn::DeviceType;
using memattn::DType;
using memattn::ErrorKind;
using memattn::ForwardArgs;
using memattn::TensorView;
using memattn_test::meta_view;
using memattn_test::ThrowsError;

// B = 2, Hq = 8, Hk = 4, Lq = 16, Lk = 24, D = 32, Dv = 48 (head dims multiples of 8).
constexpr std::int64_t kB = 2, kHq = 8, kHk = 4, kLq = 16, kLk = 24;

ForwardArgs cuda_forward(DType dtype, std::int64_t d = 32, std::int64_t dv = 48,
                         int device_index = 0) {
  const DeviceType cuda = DeviceType::cuda;
  ForwardArgs a;
  a.q = meta_view(dtype, {kB, kHq, kLq, d}, cuda, device_index);
  a.k = meta_view(dtype, {kB, kHk, kLk, d}, cuda, device_index);
  a.v = meta_view(dtype, {kB, kHk, kLk, dv}, cuda, device_index);
  a.out = meta_view(dtype, {kB, kHq, kLq, dv}, cuda, device_index);
  a.lse =
      meta_view(dtype == DType::f64 ? DType::f64 : DType::f32, {kB, kHq, kLq}, cuda, device_index);
  return a;
}

BackwardArgs cuda_backward(DType dtype) {
  BackwardArgs b;
  b.fwd = cuda_forward(dtype);
  b.grad_out = meta_view(dtype, {kB, kHq, kLq, 48}, DeviceType::cuda);
  b.grad_q = meta_view(dtype, {kB, kHq, kLq, 32}, DeviceType::cuda);
  b.grad_k = meta_view(dtype, {kB, kHk, kLk, 32}, DeviceType::cuda);
  b.grad_v = meta_view(dtype, {kB, kHk, kLk, 48}, DeviceType::cuda);
  return b;
}

// Row-major strides of `t` with rows (dim 2) `row` elements apart and the last dim `last`
// apart: padded rows, or a view of every `last`-th element.
void restride(TensorView& t, std::int64_t row, std::int64_t last = 1) {
  t.strides[3] = last;
  t.strides[2] = row;
  t.strides[1] = row * t.sizes[2];
  t.strides[0] = t.strides[1] * t.sizes[1];
}

// Number of CUDA devices this process sees; 0 without a GPU, a driver or a CUDA build.
int gpu_count() {
#if MEMATTN_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // reset the runtime's last error for later calls
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

#define SKIP_WITHOUT_CUDA_BUILD()                                                            \
  do {                                                                                       \
    if (!memattn::build_info().cuda_built) GTEST_SKIP() << "this build has no CUDA backend"; \
  } while (0)

const memattn::BackendVerdict& verdict(const memattn::Plan& p, const std::string& backend) {
  for (const auto& v : p.verdicts)
    if (v.backend == backend) return v;
  static const memattn::BackendVerdict missing{"<missing>", {"<no verdict>"}};
  ADD_FAILURE() << "the plan has no verdict for " << backend;
  return missing;
}

memattn::Plan plan_of(const ForwardArgs& a, bool backward = false) {
  return memattn::plan(a, memattn::validate_forward(a), backward);
}

std::string describe(const memattn::Plan& p) {
  std::string s = "backend='" + p.backend + "' kernel='" + p.kernel + "'";
  for (const auto& v : p.verdicts) {
    s += "\n  " + v.backend + ":";
    for (const auto& r : v.reasons) s += " [" + r + "]";
  }
  return s;
}

// Reasons of `v` that contain `needle`.
int count_reasons(const memattn::BackendVerdict& v, const std::string& needle) {
  int n = 0;
  for (const auto& r : v.reasons) n += r.find(needle) != std::string::npos;
  return n;
}

bool has_reason(const memattn::BackendVerdict& v, const std::string& needle) {
  return count_reasons(v, needle) > 0;
}

// A reason about the layout of tensor `name` ("q: the CUDA kernels need ...").
bool has_layout_reason(const memattn::BackendVerdict& v, const std::string& name,
                       const std::string& needle) {
  for (const auto& r : v.reasons)
    if (r.rfind(name + ": ", 0) == 0 && r.find(needle) != std::string::npos) return true;
  return false;
}

constexpr const char* kContiguous = "contiguous last dim";
constexpr const char* kMultipleOf8 = "multiple of 8";
constexpr const char* kAlignedRows = "16-byte aligned rows";
constexpr const char* kAlignedData = "16-byte aligned data";

// ---------------------------------------------------------------------------------------------
// Build facts

TEST(CudaBuild, BuildInfoSaysWhetherCudaIsBuilt) {
  const memattn::BuildInfo info = memattn::build_info();
#if MEMATTN_HAVE_CUDA
  EXPECT_TRUE(info.cuda_built) << "a CUDA build must report cuda_built";
  EXPECT_TRUE(info.cuda_reason.empty()) << info.cuda_reason;
  EXPECT_FALSE(info.cuda_summary.empty()) << "cuda_summary says what the kernels were built for";
#else
  EXPECT_FALSE(info.cuda_built);
  EXPECT_NE(info.cuda_reason.find("without CUDA"), std::string::npos) << info.cuda_reason;
  EXPECT_TRUE(info.cuda_summary.empty()) << info.cuda_summary;
#endif
}

// ---------------------------------------------------------------------------------------------
// Layout reasons (the same with and without a GPU)

TEST(CudaPlan, ContiguousAlignedViewsHaveNoLayoutReasons) {
  SKIP_WITHOUT_CUDA_BUILD();
  for (DType dt : {DType::f16, DType::bf16, DType::f32}) {
    for (bool backward : {false, true}) {
      const memattn::Plan p = plan_of(cuda_forward(dt), backward);
      SCOPED_TRACE(describe(p));
      const auto& cuda = verdict(p, "cuda");
      for (const char* needle : {kContiguous, kMultipleOf8, kAlignedRows, kAlignedData, "dtype"})
        EXPECT_FALSE(has_reason(cuda, needle)) << needle;
      // The CPU backend refuses CUDA tensors.
      EXPECT_TRUE(has_reason(verdict(p, "cpu"), "cuda"));
    }
  }
}

TEST(CudaPlan, CpuTensorsAreRefusedByTheCudaBackend) {
  SKIP_WITHOUT_CUDA_BUILD();
  ForwardArgs a = cuda_forward(DType::f32);
  for (TensorView* t : {&a.q, &a.k, &a.v, &a.out, &a.lse}) t->device = DeviceType::cpu;
  const memattn::Plan p = plan_of(a);
  SCOPED_TRACE(describe(p));
  EXPECT_EQ(p.backend, "cpu");
  const auto& cuda = verdict(p, "cuda");
  ASSERT_EQ(cuda.reasons.size(), 1u);
  EXPECT_NE(cuda.reasons[0].find("not cuda"), std::string::npos);
}

TEST(CudaPlan, NonContiguousLastDimIsAReasonForEveryDtype) {
  SKIP_WITHOUT_CUDA_BUILD();
  for (DType dt : {DType::f16, DType::bf16, DType::f32}) {
    ForwardArgs a = cuda_forward(dt);
    restride(a.k, 2 * a.k.sizes[3], /*last=*/2);  // every other element of a wider row
    const memattn::Plan p = plan_of(a);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "");
    const auto& cuda = verdict(p, "cuda");
    EXPECT_TRUE(has_layout_reason(cuda, "k", kContiguous));
    EXPECT_TRUE(has_layout_reason(cuda, "k", "[")) << "the reason shows the strides";
    EXPECT_FALSE(has_layout_reason(cuda, "q", kContiguous));
    EXPECT_FALSE(has_layout_reason(cuda, "v", kContiguous));
  }
}

TEST(CudaPlan, HeadDimNotMultipleOf8IsAReasonForTensorCoreDtypes) {
  SKIP_WITHOUT_CUDA_BUILD();
  for (DType dt : {DType::f16, DType::bf16}) {
    const memattn::Plan p = plan_of(cuda_forward(dt, /*d=*/30, /*dv=*/44));
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "");
    const auto& cuda = verdict(p, "cuda");
    for (const char* name : {"q", "k", "v", "out"})
      EXPECT_TRUE(has_layout_reason(cuda, name, kMultipleOf8)) << name;
  }
  {  // only v and out: D is fine
    const memattn::Plan p = plan_of(cuda_forward(DType::bf16, /*d=*/64, /*dv=*/20));
    SCOPED_TRACE(describe(p));
    const auto& cuda = verdict(p, "cuda");
    EXPECT_FALSE(has_layout_reason(cuda, "q", kMultipleOf8));
    EXPECT_FALSE(has_layout_reason(cuda, "k", kMultipleOf8));
    EXPECT_TRUE(has_layout_reason(cuda, "v", kMultipleOf8));
    EXPECT_TRUE(has_layout_reason(cuda, "out", kMultipleOf8));
  }
}

TEST(CudaPlan, Float32TakesAnyHeadDimAndAlignment) {
  // The SIMT fp32 kernels need only a contiguous last dim.
  SKIP_WITHOUT_CUDA_BUILD();
  ForwardArgs a = cuda_forward(DType::f32, /*d=*/30, /*dv=*/7);
  restride(a.q, 33);
  a.k.data = reinterpret_cast<void*>(std::uintptr_t{0x1004});
  const memattn::Plan p = plan_of(a);
  SCOPED_TRACE(describe(p));
  const auto& cuda = verdict(p, "cuda");
  for (const char* needle : {kContiguous, kMultipleOf8, kAlignedRows, kAlignedData})
    EXPECT_FALSE(has_reason(cuda, needle)) << needle;
}

TEST(CudaPlan, UnalignedRowStridesAreAReasonForTensorCoreDtypes) {
  SKIP_WITHOUT_CUDA_BUILD();
  for (DType dt : {DType::f16, DType::bf16}) {
    ForwardArgs a = cuda_forward(dt);
    restride(a.q, a.q.sizes[3] + 4);  // rows 8 bytes apart from a 16-byte boundary
    const memattn::Plan p = plan_of(a);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "");
    const auto& cuda = verdict(p, "cuda");
    EXPECT_TRUE(has_layout_reason(cuda, "q", kAlignedRows));
    EXPECT_EQ(count_reasons(cuda, kAlignedRows), 1) << "one reason per tensor, not per dim";
    EXPECT_FALSE(has_layout_reason(cuda, "k", kAlignedRows));
  }
}

TEST(CudaPlan, PaddedAlignedRowStridesAreFine) {
  // Rows padded to a multiple of 8 elements (e.g. a slice of a packed qkv tensor) need no copy.
  SKIP_WITHOUT_CUDA_BUILD();
  ForwardArgs a = cuda_forward(DType::bf16);
  restride(a.q, 3 * a.q.sizes[3]);
  restride(a.k, 3 * a.k.sizes[3]);
  const memattn::Plan p = plan_of(a);
  SCOPED_TRACE(describe(p));
  const auto& cuda = verdict(p, "cuda");
  EXPECT_FALSE(has_reason(cuda, kAlignedRows));
  EXPECT_FALSE(has_reason(cuda, kContiguous));
}

TEST(CudaPlan, UnalignedDataPointerIsAReasonForTensorCoreDtypes) {
  SKIP_WITHOUT_CUDA_BUILD();
  ForwardArgs a = cuda_forward(DType::f16);
  a.v.data = reinterpret_cast<void*>(std::uintptr_t{0x1008});  // 8-byte aligned only
  const memattn::Plan p = plan_of(a);
  SCOPED_TRACE(describe(p));
  EXPECT_EQ(p.backend, "");
  EXPECT_TRUE(has_layout_reason(verdict(p, "cuda"), "v", kAlignedData));
}

TEST(CudaPlan, CollectsEveryLayoutReasonNotOnlyTheFirst) {
  SKIP_WITHOUT_CUDA_BUILD();
  ForwardArgs a = cuda_forward(DType::bf16);
  restride(a.q, 2 * a.q.sizes[3], /*last=*/2);                 // q: last dim not contiguous
  restride(a.k, a.k.sizes[3] + 4);                             // k: rows not 16-byte aligned
  a.v.data = reinterpret_cast<void*>(std::uintptr_t{0x1002});  // v: data not aligned
  for (bool backward : {false, true}) {
    const memattn::Plan p = plan_of(a, backward);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "");
    const auto& cuda = verdict(p, "cuda");
    EXPECT_TRUE(has_layout_reason(cuda, "q", kContiguous));
    EXPECT_TRUE(has_layout_reason(cuda, "k", kAlignedRows));
    EXPECT_TRUE(has_layout_reason(cuda, "v", kAlignedData));
  }
}

TEST(CudaPlan, EmptyTensorsHaveNoLayoutReasons) {
  // Nothing is read from an empty tensor, so its strides do not matter.
  SKIP_WITHOUT_CUDA_BUILD();
  ForwardArgs a = cuda_forward(DType::f16);
  for (TensorView* t : {&a.k, &a.v}) {
    t->sizes[2] = 0;
    restride(*t, t->sizes[3] + 1, /*last=*/3);
  }
  const memattn::Plan p = plan_of(a);
  SCOPED_TRACE(describe(p));
  const auto& cuda = verdict(p, "cuda");
  EXPECT_FALSE(has_layout_reason(cuda, "k", kContiguous));
  EXPECT_FALSE(has_layout_reason(cuda, "v", kContiguous));
}

// ---------------------------------------------------------------------------------------------
// Dtypes

TEST(CudaPlan, Float64IsRefusedWithAReason) {
  SKIP_WITHOUT_CUDA_BUILD();
  for (bool backward : {false, true}) {
    const memattn::Plan p = plan_of(cuda_forward(DType::f64), backward);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "");
    const auto& cuda = verdict(p, "cuda");
    EXPECT_TRUE(has_reason(cuda, "float64"));
    EXPECT_TRUE(has_reason(cuda, "not supported on CUDA"));
    // The CPU backend takes float64, but not on a CUDA device.
    EXPECT_TRUE(has_reason(verdict(p, "cpu"), "cuda"));
  }
}

TEST(CudaDispatch, Float64ForwardIsNotImplementedAndNamesTheDtype) {
  SKIP_WITHOUT_CUDA_BUILD();
  const ForwardArgs a = cuda_forward(DType::f64);
  EXPECT_TRUE(ThrowsError([&] { memattn::forward(a, memattn::ExecContext{}); },
                          ErrorKind::not_implemented, "", {"no backend", "float64"}));
}

// ---------------------------------------------------------------------------------------------
// No GPU, no driver, or a device that does not exist: a reason, never a crash.

TEST(CudaPlan, DeviceIndexBeyondAnyGpuIsAReason) {
  // Holds with and without a GPU: no machine has device 63 or 70 (70 is past the backend's
  // per-device cache; 63 is inside it and asks the runtime).
  SKIP_WITHOUT_CUDA_BUILD();
  for (int index : {63, 70}) {
    const memattn::Plan p =
        plan_of(cuda_forward(DType::bf16, 32, 48, /*device_index=*/index), false);
    SCOPED_TRACE(describe(p));
    EXPECT_EQ(p.backend, "");
    EXPECT_TRUE(
        has_reason(verdict(p, "cuda"), "cannot query CUDA device " + std::to_string(index) + ":"));
  }
}

TEST(CudaPlan, WithoutAGpuTheVerdictSaysTheDeviceCannotBeQueried) {
  SKIP_WITHOUT_CUDA_BUILD();
  if (gpu_count() > 0) GTEST_SKIP() << "a GPU is present";
  for (DType dt : {DType::f16, DType::bf16, DType::f32}) {
    for (bool backward : {false, true}) {
      const memattn::Plan p = plan_of(cuda_forward(dt), backward);
      SCOPED_TRACE(describe(p));
      EXPECT_EQ(p.backend, "");
      EXPECT_EQ(p.kernel, "");
      const auto& cuda = verdict(p, "cuda");
      // The only reason: the call itself is fine for the CUDA kernels.
      ASSERT_EQ(cuda.reasons.size(), 1u);
      EXPECT_EQ(cuda.reasons[0].rfind("cannot query CUDA device 0: ", 0), 0u);
    }
  }
}

TEST(CudaPlan, WithoutAGpuLayoutReasonsAreStillListed) {
  SKIP_WITHOUT_CUDA_BUILD();
  if (gpu_count() > 0) GTEST_SKIP() << "a GPU is present";
  ForwardArgs a = cuda_forward(DType::f16, /*d=*/30, /*dv=*/48);
  const memattn::Plan p = plan_of(a);
  SCOPED_TRACE(describe(p));
  const auto& cuda = verdict(p, "cuda");
  EXPECT_TRUE(has_reason(cuda, "cannot query CUDA device 0"));
  EXPECT_TRUE(has_layout_reason(cuda, "q", kMultipleOf8));
  EXPECT_TRUE(has_layout_reason(cuda, "k", kMultipleOf8));
}

TEST(CudaDispatch, WithoutAGpuForwardAndBackwardRaiseNotImplemented) {
  SKIP_WITHOUT_CUDA_BUILD();
  if (gpu_count() > 0) GTEST_SKIP() << "a GPU is present";
  const ForwardArgs a = cuda_forward(DType::bf16);
  EXPECT_TRUE(ThrowsError([&] { memattn::forward(a, memattn::ExecContext{}); },
                          ErrorKind::not_implemented, "", {"cannot query CUDA device 0"}));
  const BackwardArgs b = cuda_backward(DType::bf16);
  EXPECT_TRUE(ThrowsError([&] { memattn::backward(b, memattn::ExecContext{}); },
                          ErrorKind::not_implemented, "", {"cannot query CUDA device 0"}));
}

}  // namespace
