// The nanobind module `memattn._memattn`: the only file that knows about Python.
// Tensors arrive as DLPack views (nb::ndarray, no copies, no torch headers); the Python layer
// allocates every output and passes it in. Compute releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "memattn/api.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using memattn::DType;
using memattn::ErrorKind;
using memattn::TensorView;

[[noreturn]] void fail(ErrorKind kind, const std::string& message) {
  throw memattn::Error(kind, message);
}

DType dtype_from_dlpack(const nb::dlpack::dtype& dt, const char* name) {
  using Code = nb::dlpack::dtype_code;
  const auto code = static_cast<Code>(dt.code);
  if (dt.lanes == 1) {
    if (code == Code::Float && dt.bits == 16) return DType::f16;
    if (code == Code::Float && dt.bits == 32) return DType::f32;
    if (code == Code::Float && dt.bits == 64) return DType::f64;
    if (code == Code::Bfloat && dt.bits == 16) return DType::bf16;
    if (code == Code::Bool && dt.bits == 8) return DType::boolean;
  }
  fail(ErrorKind::invalid_type,
       std::string(name) + ": unsupported dtype (DLPack code " + std::to_string(dt.code) + ", " +
           std::to_string(dt.bits) +
           " bits); memattn takes float16, bfloat16, float32, float64 or bool");
}

DType dtype_from_name(const std::string& s, const char* name) {
  if (s == "float16") return DType::f16;
  if (s == "bfloat16") return DType::bf16;
  if (s == "float32") return DType::f32;
  if (s == "float64") return DType::f64;
  if (s == "bool") return DType::boolean;
  fail(ErrorKind::invalid_type, std::string(name) + ": unsupported dtype " + s +
                                    "; memattn takes float16, bfloat16, float32, float64 or bool");
}

memattn::DeviceType device_from_name(const std::string& s, const char* name) {
  if (s == "cpu") return memattn::DeviceType::cpu;
  if (s == "cuda") return memattn::DeviceType::cuda;
  fail(ErrorKind::invalid_value,
       std::string(name) + ": tensors on device '" + s + "' are not supported (cpu or cuda)");
}

template <class ShapeAt>
void check_rank(std::size_t rank, ShapeAt shape_at, const char* name) {
  if (rank <= static_cast<std::size_t>(memattn::kMaxRank)) return;
  std::string shape = "[";
  for (std::size_t i = 0; i < rank; ++i)
    shape += (i ? ", " : "") + std::to_string(static_cast<std::int64_t>(shape_at(i)));
  fail(ErrorKind::invalid_value, std::string(name) + ": expected at most 4 dimensions, got " +
                                     std::to_string(rank) + "-D with shape " + shape + "]");
}

TensorView view_of(const nb::ndarray<>& a, const char* name) {
  check_rank(a.ndim(), [&](std::size_t i) { return a.shape(i); }, name);
  TensorView v;
  v.data = a.data();
  v.dtype = dtype_from_dlpack(a.dtype(), name);
  if (a.device_type() == nb::device::cpu::value) {
    v.device = memattn::DeviceType::cpu;
  } else if (a.device_type() == nb::device::cuda::value) {
    v.device = memattn::DeviceType::cuda;
  } else {
    fail(ErrorKind::invalid_value, std::string(name) + ": tensors on DLPack device type " +
                                       std::to_string(a.device_type()) +
                                       " are not supported (cpu or cuda)");
  }
  v.device_index = a.device_id();
  v.rank = static_cast<int>(a.ndim());
  for (int i = 0; i < v.rank; ++i) {
    v.sizes[i] = static_cast<std::int64_t>(a.shape(i));
    v.strides[i] = static_cast<std::int64_t>(a.stride(i));
  }
  return v;
}

TensorView view_of(const std::optional<nb::ndarray<>>& a, const char* name) {
  return a ? view_of(*a, name) : TensorView{};
}

// A tensor described by metadata only: (dtype name, shape, strides, device type name).
using TensorSpec =
    std::tuple<std::string, std::vector<std::int64_t>, std::vector<std::int64_t>, std::string>;

TensorView view_of(const std::optional<TensorSpec>& spec, const char* name) {
  if (!spec) return TensorView{};
  const auto& [dtype, shape, strides, device] = *spec;
  check_rank(shape.size(), [&](std::size_t i) { return shape[i]; }, name);
  if (strides.size() != shape.size())
    fail(ErrorKind::invalid_value, std::string(name) + ": spec has " +
                                       std::to_string(shape.size()) + " sizes but " +
                                       std::to_string(strides.size()) + " strides");
  TensorView v;
  v.dtype = dtype_from_name(dtype, name);
  v.device = device_from_name(device, name);
  v.rank = static_cast<int>(shape.size());
  for (int i = 0; i < v.rank; ++i) {
    v.sizes[i] = shape[i];
    v.strides[i] = strides[i];
  }
  return v;
}

memattn::CausalAlignment alignment_from_name(const std::string& s) {
  if (s == "top_left") return memattn::CausalAlignment::top_left;
  if (s == "bottom_right") return memattn::CausalAlignment::bottom_right;
  fail(ErrorKind::invalid_value,
       "causal_alignment: expected 'top_left' or 'bottom_right', got '" + s + "'");
}

void set_options(memattn::ForwardArgs& a, bool is_causal, const std::string& causal_alignment,
                 double dropout_p, std::uint64_t dropout_seed, std::optional<double> scale) {
  a.is_causal = is_causal;
  a.causal_alignment = alignment_from_name(causal_alignment);
  a.dropout_p = dropout_p;
  a.dropout_seed = dropout_seed;
  a.has_scale = scale.has_value();
  a.scale = scale.value_or(0.0);
}

// The tensors of a forward call, from ndarrays or from specs alike.
template <class Tensor, class OptionalTensor>
memattn::ForwardArgs forward_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const OptionalTensor& attn_mask,
                                  const OptionalTensor& key_padding_mask) {
  memattn::ForwardArgs a;
  a.q = view_of(q, "q");
  a.k = view_of(k, "k");
  a.v = view_of(v, "v");
  a.attn_mask = view_of(attn_mask, "attn_mask");
  a.key_padding_mask = view_of(key_padding_mask, "key_padding_mask");
  return a;
}

nb::dict shape_dict(const memattn::ProblemShape& s) {
  nb::dict d;
  d["B"] = s.B;
  d["Hq"] = s.Hq;
  d["Hk"] = s.Hk;
  d["Lq"] = s.Lq;
  d["Lk"] = s.Lk;
  d["D"] = s.D;
  d["Dv"] = s.Dv;
  d["scale"] = s.scale;
  return d;
}

nb::dict plan_dict(const memattn::Plan& p) {
  nb::dict d;
  d["backend"] = p.backend;
  d["kernel"] = p.kernel;
  d["reason"] = p.reason;
  nb::list verdicts;
  for (const auto& v : p.verdicts) verdicts.append(nb::make_tuple(v.backend, v.reasons));
  d["verdicts"] = verdicts;
  return d;
}

}  // namespace

NB_MODULE(_memattn, m) {
  m.doc() = "memattn's C++ core (validate, plan, CPU backend), bound with nanobind.";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const memattn::Error& e) {
      switch (e.kind()) {
        case ErrorKind::invalid_value:
          PyErr_SetString(PyExc_ValueError, e.what());
          return;
        case ErrorKind::invalid_type:
          PyErr_SetString(PyExc_TypeError, e.what());
          return;
        case ErrorKind::not_implemented:
          PyErr_SetString(PyExc_NotImplementedError, e.what());
          return;
        case ErrorKind::runtime:
          PyErr_SetString(PyExc_RuntimeError, e.what());
          return;
      }
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def(
      "validate",
      [](const TensorSpec& q, const TensorSpec& k, const TensorSpec& v,
         const std::optional<TensorSpec>& attn_mask,
         const std::optional<TensorSpec>& key_padding_mask, bool is_causal,
         const std::string& causal_alignment, double dropout_p, std::optional<double> scale) {
        memattn::ForwardArgs a = forward_args(q, k, v, attn_mask, key_padding_mask);
        set_options(a, is_causal, causal_alignment, dropout_p, 0, scale);
        return shape_dict(memattn::validate_forward(a));
      },
      "q"_a, "k"_a, "v"_a, "attn_mask"_a.none(), "key_padding_mask"_a.none(), nb::kw_only(),
      "is_causal"_a, "causal_alignment"_a, "dropout_p"_a, "scale"_a.none(),
      "Validates a call from tensor metadata (dtype, shape, strides, device) alone and returns "
      "the derived sizes. Raises ValueError / TypeError naming the argument.");

  m.def(
      "plan",
      [](const TensorSpec& q, const TensorSpec& k, const TensorSpec& v,
         const std::optional<TensorSpec>& attn_mask,
         const std::optional<TensorSpec>& key_padding_mask, bool is_causal,
         const std::string& causal_alignment, double dropout_p, std::optional<double> scale,
         bool backward, bool grad_q_accum_scratch) {
        memattn::ForwardArgs a = forward_args(q, k, v, attn_mask, key_padding_mask);
        set_options(a, is_causal, causal_alignment, dropout_p, 0, scale);
        const auto shape = memattn::validate_forward(a);
        return plan_dict(memattn::plan(a, shape, backward, grad_q_accum_scratch));
      },
      "q"_a, "k"_a, "v"_a, "attn_mask"_a.none(), "key_padding_mask"_a.none(), nb::kw_only(),
      "is_causal"_a, "causal_alignment"_a, "dropout_p"_a, "scale"_a.none(), "backward"_a = false,
      "grad_q_accum_scratch"_a = false,
      "Validates a call from metadata and returns the plan: chosen backend, kernel, reason, and "
      "every backend's list of reasons it was not taken. grad_q_accum_scratch (backward plans): "
      "whether the backward call would get the Hopper single pass's dQ scratch.");

  m.def(
      "forward",
      [](const nb::ndarray<>& q, const nb::ndarray<>& k, const nb::ndarray<>& v,
         const nb::ndarray<>& out, const nb::ndarray<>& lse,
         const std::optional<nb::ndarray<>>& attn_mask,
         const std::optional<nb::ndarray<>>& key_padding_mask, bool is_causal,
         const std::string& causal_alignment, double dropout_p, std::uint64_t dropout_seed,
         std::optional<double> scale, int num_threads,
         const std::optional<nb::ndarray<>>& key_range_scratch,
         const std::optional<nb::ndarray<>>& mask_block_scratch, std::uintptr_t stream) {
        memattn::ForwardArgs a = forward_args(q, k, v, attn_mask, key_padding_mask);
        a.out = view_of(out, "out");
        a.lse = view_of(lse, "lse");
        a.key_range_scratch = view_of(key_range_scratch, "key_range_scratch");
        a.mask_block_scratch = view_of(mask_block_scratch, "mask_block_scratch");
        set_options(a, is_causal, causal_alignment, dropout_p, dropout_seed, scale);
        memattn::ExecContext ctx;
        ctx.num_threads = num_threads;
        ctx.stream = reinterpret_cast<void*>(stream);
        nb::gil_scoped_release release;
        memattn::forward(a, ctx);
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "attn_mask"_a.none(), "key_padding_mask"_a.none(),
      nb::kw_only(), "is_causal"_a, "causal_alignment"_a, "dropout_p"_a, "dropout_seed"_a,
      "scale"_a.none(), "num_threads"_a, "key_range_scratch"_a.none() = nb::none(),
      "mask_block_scratch"_a.none() = nb::none(), "stream"_a = 0,
      "Runs the forward pass into the caller's `out` [B, Hq, Lq, Dv] and `lse` [B, Hq, Lq] "
      "(float32). CUDA calls are queued on `stream` (a cudaStream_t as an integer, 0 = the "
      "default stream) and not synchronized; with a key_padding_mask they skip fully padded "
      "key blocks when given `key_range_scratch`, float32 [>= 2*B] on the same device; with an "
      "attn_mask the Hopper kernels skip the key blocks it hides when given "
      "`mask_block_scratch`, float32 on the same device, of the size Python's "
      "_ops._mask_block_scratch gives.");

  m.def(
      "backward",
      [](const nb::ndarray<>& grad_out, const nb::ndarray<>& q, const nb::ndarray<>& k,
         const nb::ndarray<>& v, const nb::ndarray<>& out, const nb::ndarray<>& lse,
         const nb::ndarray<>& grad_q, const nb::ndarray<>& grad_k, const nb::ndarray<>& grad_v,
         const std::optional<nb::ndarray<>>& grad_attn_mask,
         const std::optional<nb::ndarray<>>& attn_mask,
         const std::optional<nb::ndarray<>>& key_padding_mask, bool is_causal,
         const std::string& causal_alignment, double dropout_p, std::uint64_t dropout_seed,
         std::optional<double> scale, int num_threads,
         const std::optional<nb::ndarray<>>& grad_scratch,
         const std::optional<nb::ndarray<>>& key_range_scratch,
         const std::optional<nb::ndarray<>>& grad_q_accum_scratch,
         const std::optional<nb::ndarray<>>& mask_block_scratch, std::uintptr_t stream) {
        memattn::BackwardArgs a;
        a.fwd = forward_args(q, k, v, attn_mask, key_padding_mask);
        a.fwd.out = view_of(out, "out");
        a.fwd.lse = view_of(lse, "lse");
        a.fwd.key_range_scratch = view_of(key_range_scratch, "key_range_scratch");
        a.fwd.mask_block_scratch = view_of(mask_block_scratch, "mask_block_scratch");
        set_options(a.fwd, is_causal, causal_alignment, dropout_p, dropout_seed, scale);
        a.grad_out = view_of(grad_out, "grad_out");
        a.grad_q = view_of(grad_q, "grad_q");
        a.grad_k = view_of(grad_k, "grad_k");
        a.grad_v = view_of(grad_v, "grad_v");
        a.grad_attn_mask = view_of(grad_attn_mask, "grad_attn_mask");
        a.grad_scratch = view_of(grad_scratch, "grad_scratch");
        a.grad_q_accum_scratch = view_of(grad_q_accum_scratch, "grad_q_accum_scratch");
        memattn::ExecContext ctx;
        ctx.num_threads = num_threads;
        ctx.stream = reinterpret_cast<void*>(stream);
        nb::gil_scoped_release release;
        memattn::backward(a, ctx);
      },
      "grad_out"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "grad_q"_a, "grad_k"_a, "grad_v"_a,
      "grad_attn_mask"_a.none(), "attn_mask"_a.none(), "key_padding_mask"_a.none(), nb::kw_only(),
      "is_causal"_a, "causal_alignment"_a, "dropout_p"_a, "dropout_seed"_a, "scale"_a.none(),
      "num_threads"_a, "grad_scratch"_a.none() = nb::none(),
      "key_range_scratch"_a.none() = nb::none(), "grad_q_accum_scratch"_a.none() = nb::none(),
      "mask_block_scratch"_a.none() = nb::none(), "stream"_a = 0,
      "Runs the backward pass into the caller's grad_q/grad_k/grad_v (and grad_attn_mask, "
      "float32, zero-filled, the 4-D shape of attn_mask, when the mask needs a gradient). CUDA "
      "calls need `grad_scratch`, float32 [B, Hq, Lq], take `key_range_scratch` as forward "
      "does, and are queued on `stream`; given `grad_q_accum_scratch` (float32, "
      ">= B*Hq*ceil(Lq/64)*64*(64 if max(D, Dv) <= 64 else 128)), the Hopper backward of calls "
      "without dropout or a mask gradient runs in one pass (dQ summed with atomic adds: last "
      "bits vary run to run); with an attn_mask, that pass also takes `mask_block_scratch`, "
      "float32 on the same device, of the size Python's _ops._mask_step_scratch gives, to list "
      "the blocks the mask leaves visible and skip the others.");

  m.def("build_info", [] {
    const auto info = memattn::build_info();
    nb::dict d;
    d["version"] = info.version;
    d["cpu_isas_built"] = info.cpu_isas_built;
    d["cpu_isas_usable"] = info.cpu_isas_usable;
    d["cpu_isa_selected"] = info.cpu_isa_selected;
    d["cpu_isa_reason"] = info.cpu_isa_reason;
    d["cuda_built"] = info.cuda_built;
    d["cuda_reason"] = info.cuda_reason;
    d["cuda_summary"] = info.cuda_summary;
    return d;
  });
}
