// Host side of the CUDA backend: capability checks, DeviceParams from the core's arguments and
// the choice of kernel (tensor-core sm80 kernels for fp16/bf16, SIMT kernels for fp32).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/common/check.h"
#include "cuda/common/device.h"
#include "cuda/common/params.h"
#include "cuda/cuda_backend.h"
#include "cuda/launch.h"
#include "memattn/error.h"
#include "memattn/philox.h"

#ifndef MEMATTN_CUDA_ARCHS
#error "MEMATTN_CUDA_ARCHS must be defined by the build"
#endif

namespace memattn::cuda {

// Compute capability and multiprocessor count per device, read once (cudaGetDeviceProperties
// is slow).
DeviceCaps device_caps(int device) {
  static std::mutex mutex;
  static std::array<DeviceCaps, 64> cache;
  if (device < 0 || device >= static_cast<int>(cache.size())) return {true, cudaErrorInvalidDevice};
  std::lock_guard<std::mutex> lock(mutex);
  DeviceCaps& c = cache[device];
  if (!c.known) {
    c.known = true;
    c.error = cudaDeviceGetAttribute(&c.major, cudaDevAttrComputeCapabilityMajor, device);
    if (c.error == cudaSuccess)
      c.error = cudaDeviceGetAttribute(&c.minor, cudaDevAttrComputeCapabilityMinor, device);
    if (c.error == cudaSuccess)
      c.error = cudaDeviceGetAttribute(&c.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  }
  return c;
}

namespace {

constexpr int kMinMajor = 8;  // mma.sync bf16, cp.async, ldmatrix: sm_80 and newer

bool uses_tensor_cores(DType dtype) { return dtype == DType::f16 || dtype == DType::bf16; }

// Head-dim bucket of the tensor-core kernels: the smallest of 64, 96, 128, 256 that holds D and Dv.
int head_dim_bucket(std::int64_t d) { return d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 256; }

// Larger of the query/key and value head dims: what the head-dim buckets must hold.
std::int64_t max_head_dim(const ForwardArgs& a) {
  return a.q.sizes[3] > a.v.sizes[3] ? a.q.sizes[3] : a.v.sizes[3];
}

// DeviceParams::scale_log2 of a call: its scale in log2 units, as the kernels' exponents use it.
float scale_log2(const ProblemShape& s) { return static_cast<float>(s.scale * 1.4426950408889634); }

// The Hopper kernels (sm90/) run fp16/bf16 calls on compute capability 9.0 when they were
// built: every forward, the backward up to 128 head-dim columns, and beyond that the lean
// backward given the dQ scratch (dq_scratch; no attn_mask, no dropout, scale > 0:
// sm90/backward.cuh's head-dim-split single pass; the Python layer gives no scratch under
// deterministic mode). MEMATTN_DISABLE_SM90=1 in the environment (read per call) sends those
// calls to the sm80 kernels instead, e.g. to compare the two. Their head-dim buckets are 64, 128
// and 256 (96 runs in the 128 kernels: TMA reads the missing columns as zeros).
bool use_sm90(const ForwardArgs& a, const ProblemShape& s, bool backward, bool dq_scratch) {
#if MEMATTN_HAVE_SM90
  if (!uses_tensor_cores(a.q.dtype)) return false;
  if (backward && max_head_dim(a) > 128 &&
      (!dq_scratch || features_of(a.attn_mask.present(), a.dropout_p > 0.0, scale_log2(s))))
    return false;
  const DeviceCaps caps = device_caps(a.q.device_index);
  if (caps.error != cudaSuccess || caps.major != 9 || caps.minor != 0) return false;
  const char* disabled = std::getenv("MEMATTN_DISABLE_SM90");
  return disabled == nullptr || disabled[0] == '\0' || std::strcmp(disabled, "0") == 0;
#else
  (void)a;
  (void)s;
  (void)backward;
  (void)dq_scratch;
  return false;
#endif
}
int sm90_head_dim_bucket(std::int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// Layout rules of the kernels for one [B, H, L, D] tensor: contiguous last dim; for the
// tensor-core kernels also 16-byte aligned rows (cp.async copies 16 bytes at a time).
void layout_reasons(std::vector<std::string>& reasons, const TensorView& t, const char* name,
                    bool tensor_cores) {
  if (!t.present() || t.numel() == 0) return;  // nothing is read
  if (t.strides[3] != 1 && t.sizes[3] > 1)
    reasons.push_back(std::string(name) +
                      ": the CUDA kernels need a contiguous last dim (stride 1), got strides " +
                      t.stride_string());
  if (!tensor_cores) return;
  if (t.sizes[3] % 8 != 0)
    reasons.push_back(
        std::string(name) +
        ": the tensor-core kernels need a head dim that is a multiple of 8, got shape " +
        t.shape_string());
  for (int d = 0; d < 3; ++d)
    if (t.sizes[d] > 1 && t.strides[d] % 8 != 0) {
      reasons.push_back(std::string(name) +
                        ": the tensor-core kernels need 16-byte aligned rows (strides of dims 0-2 "
                        "a multiple of 8 elements), got strides " +
                        t.stride_string());
      break;
    }
  if (reinterpret_cast<std::uintptr_t>(t.data) % 16 != 0)
    reasons.push_back(std::string(name) + ": the tensor-core kernels need 16-byte aligned data");
}

Strides3 strides3(const TensorView& t) { return {t.strides[0], t.strides[1], t.strides[2]}; }

// Stride of dim d, 0 where the view is broadcast (size 1).
std::int64_t broadcast_stride(const TensorView& t, int d) {
  return t.sizes[d] == 1 ? 0 : t.strides[d];
}

// A caller-allocated CUDA scratch after checking it: a contiguous 1-D float32 tensor (4-byte
// words) on q's device with at least `needed` elements (`needed_what` names the formula).
void* checked_scratch(const TensorView& t, const char* name, const char* needed_what,
                      std::int64_t needed, const ForwardArgs& a) {
  if (t.dtype != DType::f32 || t.device != DeviceType::cuda || t.device_index != a.q.device_index ||
      t.rank != 1 || t.strides[0] != 1 || t.sizes[0] < needed)
    throw Error(
        ErrorKind::invalid_value,
        std::string(name) + ": the CUDA kernels need a contiguous 1-D float32 tensor of at least " +
            needed_what + " = " + std::to_string(needed) +
            " elements on q's device (cuda:" + std::to_string(a.q.device_index) + "), got " +
            dtype_name(t.dtype) + " " + t.shape_string() + " on " + device_name(t.device));
  return t.data;
}

// key_range_scratch as the kernels' int [B][2] key ranges (params.h).
int* key_range_words(const TensorView& t, const ForwardArgs& a, const ProblemShape& s) {
  return static_cast<int*>(checked_scratch(t, "key_range_scratch", "2*B", 2 * s.B, a));
}

// grad_q_accum_scratch as the sm90 single pass's dQ sums (params.h).
float* dq_accum_words(const TensorView& t, const ForwardArgs& a, const ProblemShape& s) {
  const int columns = sm90_head_dim_bucket(max_head_dim(a));
  const std::string what = "B*Hq*ceil(Lq/64)*64*" + std::to_string(columns);
  return static_cast<float*>(checked_scratch(t, "grad_q_accum_scratch", what.c_str(),
                                             s.B * s.Hq * ((s.Lq + 63) / 64) * 64 * columns, a));
}

DeviceParams make_params(const ForwardArgs& a, const ProblemShape& s) {
  DeviceParams p;
  p.q = a.q.data;
  p.k = a.k.data;
  p.v = a.v.data;
  p.out = a.out.data;
  p.lse = static_cast<float*>(a.lse.data);
  p.q_st = strides3(a.q);
  p.k_st = strides3(a.k);
  p.v_st = strides3(a.v);
  p.out_st = strides3(a.out);
  p.lse_st = {a.lse.strides[0], a.lse.strides[1], a.lse.strides[2]};
  p.B = static_cast<int>(s.B);
  p.Hq = static_cast<int>(s.Hq);
  p.Hk = static_cast<int>(s.Hk);
  p.group = static_cast<int>(s.group_size());
  p.Lq = static_cast<int>(s.Lq);
  p.Lk = static_cast<int>(s.Lk);
  p.D = static_cast<int>(s.D);
  p.Dv = static_cast<int>(s.Dv);
  p.scale = static_cast<float>(s.scale);
  p.scale_log2 = scale_log2(s);
  p.causal = a.is_causal;
  p.causal_offset = s.causal_offset;
  if (a.attn_mask.present()) {
    p.mask_kind = a.attn_mask.dtype == DType::boolean ? MaskKind::boolean
                  : a.attn_mask.dtype == a.q.dtype    ? MaskKind::additive
                  : a.attn_mask.dtype == DType::f32
                      ? MaskKind::additive_f32
                      : throw Error(ErrorKind::invalid_type,
                                    std::string("attn_mask: no CUDA kernel reads dtype ") +
                                        dtype_name(a.attn_mask.dtype));
    p.mask = a.attn_mask.data;
    for (int d = 0; d < 4; ++d) p.mask_st[d] = broadcast_stride(a.attn_mask, d);
    p.batch_inner = p.B > 1 && p.mask_st[0] == 0 && p.mask_st[1] != 0;
    if (a.mask_block_scratch.present()) {
      const TensorView& t = a.mask_block_scratch;
      p.mask_blocks = static_cast<std::int32_t*>(
          checked_scratch(t, "mask_block_scratch", "1", 1, a));  // launch_mask_blocks: the rest
      p.mask_block_words = t.sizes[0];
    }
  }
  if (a.key_padding_mask.present()) {
    p.key_padding = static_cast<const std::uint8_t*>(a.key_padding_mask.data);
    p.key_padding_st[0] = a.key_padding_mask.strides[0];
    p.key_padding_st[1] = a.key_padding_mask.strides[1];
    if (a.key_range_scratch.present()) p.key_ranges = key_range_words(a.key_range_scratch, a, s);
  }
  if (a.dropout_p > 0.0) {
    p.dropout = true;
    p.dropout_seed = a.dropout_seed;
    p.dropout_threshold = philox::dropout_threshold(a.dropout_p);
    p.dropout_keep_scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  }
  p.grad_mask_b_outer = p.B;
  p.grad_mask_h_outer = p.Hq;
  return p;
}

// Makes the tensors' device current for the call and restores the caller's afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

#if MEMATTN_HAVE_SM90
template <class T>
void run_sm90(bool backward, int bucket, const DeviceParams& p, cudaStream_t stream) {
  switch (sm90_head_dim_bucket(bucket)) {  // as run_tensor_core's sm80 switch below
    case 64:
      return backward ? sm90_backward<T, 64>(p, stream) : sm90_forward<T, 64>(p, stream);
    case 128:
      return backward ? sm90_backward<T, 128>(p, stream) : sm90_forward<T, 128>(p, stream);
    default:
      return backward ? sm90_backward<T, 256>(p, stream) : sm90_forward<T, 256>(p, stream);
  }
}
#endif

template <class T>
void run_tensor_core(bool backward, int bucket, const DeviceParams& p, cudaStream_t stream,
                     bool sm90) {
#if MEMATTN_HAVE_SM90
  if (sm90) return run_sm90<T>(backward, bucket, p, stream);
#else
  (void)sm90;
#endif
  switch (bucket) {
    case 64:
      return backward ? sm80_backward<T, 64>(p, stream) : sm80_forward<T, 64>(p, stream);
    case 96:
      return backward ? sm80_backward<T, 96>(p, stream) : sm80_forward<T, 96>(p, stream);
    case 128:
      return backward ? sm80_backward<T, 128>(p, stream) : sm80_forward<T, 128>(p, stream);
    default:
      return backward ? sm80_backward<T, 256>(p, stream) : sm80_forward<T, 256>(p, stream);
  }
}

void run(bool backward, const ForwardArgs& a, const ProblemShape& s, const DeviceParams& p,
         cudaStream_t stream) {
  launch_key_ranges(p, stream);
  const int bucket = head_dim_bucket(s.D > s.Dv ? s.D : s.Dv);
  const bool sm90 = use_sm90(a, s, backward, p.dq_accum != nullptr);
  switch (a.q.dtype) {
    case DType::f16:
      return run_tensor_core<__half>(backward, bucket, p, stream, sm90);
    case DType::bf16:
      return run_tensor_core<__nv_bfloat16>(backward, bucket, p, stream, sm90);
    case DType::f32:
      return backward ? simt_backward(p, stream) : simt_forward(p, stream);
    default:
      throw Error(
          ErrorKind::not_implemented,
          std::string("memattn CUDA backend: no kernel for dtype ") + dtype_name(a.q.dtype));
  }
}

// The backward's own tensors must follow the same layout rules as the forward's.
void require_layout(const TensorView& t, const char* name, bool tensor_cores) {
  std::vector<std::string> reasons;
  layout_reasons(reasons, t, name, tensor_cores);
  if (!reasons.empty())
    throw Error(ErrorKind::not_implemented, "memattn CUDA backward: " + reasons[0]);
}

}  // namespace

std::vector<std::string> unsupported_reasons(const ForwardArgs& a, const ProblemShape&) {
  std::vector<std::string> reasons;
  if (a.q.device != DeviceType::cuda) {
    reasons.push_back(std::string("tensors are on ") + device_name(a.q.device) + ", not cuda");
    return reasons;
  }
  if (a.q.dtype != DType::f16 && a.q.dtype != DType::bf16 && a.q.dtype != DType::f32)
    reasons.push_back(std::string("dtype ") + dtype_name(a.q.dtype) +
                      " is not supported on CUDA (float16, bfloat16, float32)");
  const DeviceCaps caps = device_caps(a.q.device_index);
  if (caps.error != cudaSuccess)
    reasons.push_back("cannot query CUDA device " + std::to_string(a.q.device_index) + ": " +
                      cudaGetErrorString(caps.error));
  else if (caps.major < kMinMajor)
    reasons.push_back("GPU compute capability " + std::to_string(caps.major) + "." +
                      std::to_string(caps.minor) +
                      " is older than 8.0 (sm_80), which the CUDA kernels need");
  const bool tc = uses_tensor_cores(a.q.dtype);
  layout_reasons(reasons, a.q, "q", tc);
  layout_reasons(reasons, a.k, "k", tc);
  layout_reasons(reasons, a.v, "v", tc);
  layout_reasons(reasons, a.out, "out", tc);
  return reasons;
}

std::string kernel_name(const ForwardArgs& a, const ProblemShape& s, bool backward,
                        bool grad_q_accum_scratch) {
  if (!uses_tensor_cores(a.q.dtype)) return std::string("cuda/simt/") + dtype_short_name(a.q.dtype);
  const std::int64_t d = max_head_dim(a);
  if (use_sm90(a, s, backward, grad_q_accum_scratch)) {
    const int bucket = sm90_head_dim_bucket(d);
    const bool features =
        features_of(a.attn_mask.present(), a.dropout_p > 0.0, scale_log2(s));  // has_features
    const TileShape shape = !backward && !features
                                ? sm90_tile_shape(bucket, s.B * s.Hq, s.Lq, s.Lk, a.is_causal)
                                : TileShape::standard;
    return std::string("cuda/sm90/") + dtype_short_name(a.q.dtype) + "/d" + std::to_string(bucket) +
           (shape == TileShape::standard
                ? ""
                : std::string("/") + kTileShapeNames[static_cast<int>(shape)]);
  }
  return std::string("cuda/sm80/") + dtype_short_name(a.q.dtype) + "/d" +
         std::to_string(head_dim_bucket(d));
}

void forward(const ForwardArgs& a, const ProblemShape& s, const ExecContext& ctx) {
  if (s.B * s.Hq * s.Lq == 0) return;
  DeviceGuard guard(a.q.device_index);
  run(/*backward=*/false, a, s, make_params(a, s), static_cast<cudaStream_t>(ctx.stream));
}

void backward(const BackwardArgs& a, const ProblemShape& s, const ExecContext& ctx) {
  const bool tc = uses_tensor_cores(a.fwd.q.dtype);
  require_layout(a.grad_out, "grad_out", tc);
  require_layout(a.grad_q, "grad_q", tc);
  require_layout(a.grad_k, "grad_k", tc);
  require_layout(a.grad_v, "grad_v", tc);
  const TensorView& scratch = a.grad_scratch;
  if (!scratch.present() || scratch.dtype != DType::f32 || scratch.device != DeviceType::cuda ||
      scratch.numel() < s.B * s.Hq * s.Lq)
    throw Error(ErrorKind::invalid_value,
                "grad_scratch: the CUDA backward needs a float32 CUDA tensor of B*Hq*Lq = " +
                    std::to_string(s.B * s.Hq * s.Lq) + " contiguous elements");
  if (s.B * s.Hq * s.Lq == 0 && s.B * s.Hk * s.Lk == 0) return;

  DeviceParams p = make_params(a.fwd, s);
  p.grad_out = a.grad_out.data;
  p.grad_q = a.grad_q.data;
  p.grad_k = a.grad_k.data;
  p.grad_v = a.grad_v.data;
  p.grad_out_st = strides3(a.grad_out);
  p.grad_q_st = strides3(a.grad_q);
  p.grad_k_st = strides3(a.grad_k);
  p.grad_v_st = strides3(a.grad_v);
  p.delta = static_cast<float*>(scratch.data);
  if (a.grad_attn_mask.present()) {
    const TensorView& g = a.grad_attn_mask;
    if ((g.sizes[2] != s.Lq) || (g.sizes[3] != s.Lk))
      throw Error(ErrorKind::not_implemented,
                  "grad_attn_mask: the CUDA backward needs full query and key dims [*, *, " +
                      std::to_string(s.Lq) + ", " + std::to_string(s.Lk) + "], got " +
                      g.shape_string() + " (memattn's Python layer expands the mask first)");
    p.grad_mask = static_cast<float*>(g.data);
    for (int d = 0; d < 4; ++d) p.grad_mask_st[d] = broadcast_stride(g, d);
    p.grad_mask_b_outer = g.sizes[0] == 1 ? 1 : p.B;
    p.grad_mask_h_outer = g.sizes[1] == 1 ? 1 : p.Hq;
  }
  if (a.grad_q_accum_scratch.present() && use_sm90(a.fwd, s, /*backward=*/true, true))
    p.dq_accum = dq_accum_words(a.grad_q_accum_scratch, a.fwd, s);
  DeviceGuard guard(a.fwd.q.device_index);
  run(/*backward=*/true, a.fwd, s, p, static_cast<cudaStream_t>(ctx.stream));
}

std::string build_summary() {
  return std::string("kernels for ") + MEMATTN_CUDA_ARCHS + " (CUDA runtime " +
         std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
         ", linked statically)";
}

}  // namespace memattn::cuda
