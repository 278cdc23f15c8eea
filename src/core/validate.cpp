// One validation step for every argument of a call. Each check names the argument, what it
// got and what it needs, so a user can fix the call from the message alone.
#include <cmath>
#include <string>

#include "memattn/api.h"

namespace memattn {
namespace {

[[noreturn]] void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

std::string shape_of(std::int64_t a, std::int64_t b, std::int64_t c) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + ", " + std::to_string(c) + "]";
}
std::string shape_of(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + ", " + std::to_string(c) + ", " +
         std::to_string(d) + "]";
}

bool is_float(DType t) { return t != DType::boolean; }

void require_present(const TensorView& t, const char* name) {
  if (!t.present()) fail(ErrorKind::invalid_value, std::string(name) + ": is required");
}

void require_rank(const TensorView& t, const char* name, int rank, const char* layout) {
  require_present(t, name);
  if (t.rank != rank)
    fail(ErrorKind::invalid_value, std::string(name) + ": expected a " + std::to_string(rank) +
                                       "-D tensor " + layout + ", got " + std::to_string(t.rank) +
                                       "-D with shape " + t.shape_string());
  for (int i = 0; i < rank; ++i)
    if (t.sizes[i] < 0)
      fail(ErrorKind::invalid_value,
           std::string(name) + ": negative size in shape " + t.shape_string());
}

void require_dtype(const TensorView& t, const char* name, DType want, const char* why) {
  if (t.dtype != want)
    fail(ErrorKind::invalid_type, std::string(name) + ": expected dtype " + dtype_name(want) +
                                      " (" + why + "), got " + dtype_name(t.dtype));
}

void require_shape(const TensorView& t, const char* name, const std::string& want,
                   const std::string& layout) {
  if (t.shape_string() != want)
    fail(ErrorKind::invalid_value, std::string(name) + ": expected shape " + layout + " = " + want +
                                       ", got " + t.shape_string());
}

void require_same_device(const TensorView& t, const char* name, const TensorView& q) {
  if (!t.present()) return;
  if (t.device != q.device || t.device_index != q.device_index)
    fail(ErrorKind::invalid_value,
         std::string(name) + ": is on " + device_name(t.device) + ":" +
             std::to_string(t.device_index) + " but q is on " + device_name(q.device) + ":" +
             std::to_string(q.device_index) + "; all tensors must be on one device");
}

constexpr std::int64_t kMaxHeadDim = 256;

}  // namespace

ProblemShape validate_forward(const ForwardArgs& a) {
  require_rank(a.q, "q", 4, "[B, Hq, Lq, D]");
  require_rank(a.k, "k", 4, "[B, Hk, Lk, D]");
  require_rank(a.v, "v", 4, "[B, Hk, Lk, Dv]");

  if (a.q.dtype != DType::f16 && a.q.dtype != DType::bf16 && a.q.dtype != DType::f32 &&
      a.q.dtype != DType::f64)
    fail(ErrorKind::invalid_type, std::string("q: expected a floating dtype (float16, bfloat16, "
                                              "float32 or float64), got ") +
                                      dtype_name(a.q.dtype));
  if (a.k.dtype != a.q.dtype)
    fail(ErrorKind::invalid_type, std::string("k: expected q's dtype ") + dtype_name(a.q.dtype) +
                                      ", got " + dtype_name(a.k.dtype));
  if (a.v.dtype != a.q.dtype)
    fail(ErrorKind::invalid_type, std::string("v: expected q's dtype ") + dtype_name(a.q.dtype) +
                                      ", got " + dtype_name(a.v.dtype));
  for (auto [t, name] : {std::pair{&a.k, "k"},
                         {&a.v, "v"},
                         {&a.attn_mask, "attn_mask"},
                         {&a.key_padding_mask, "key_padding_mask"},
                         {&a.out, "out"},
                         {&a.lse, "lse"}})
    require_same_device(*t, name, a.q);

  ProblemShape s;
  s.B = a.q.size(0);
  s.Hq = a.q.size(1);
  s.Lq = a.q.size(2);
  s.D = a.q.size(3);
  s.Hk = a.k.size(1);
  s.Lk = a.k.size(2);
  s.Dv = a.v.size(3);
  const std::string q_shape = a.q.shape_string(), k_shape = a.k.shape_string(),
                    v_shape = a.v.shape_string();
  if (a.k.size(0) != s.B || a.v.size(0) != s.B)
    fail(ErrorKind::invalid_value,
         "k, v: batch size (dim 0) must match q's B = " + std::to_string(s.B) + "; got k " +
             k_shape + ", v " + v_shape);
  if (a.v.size(1) != s.Hk)
    fail(ErrorKind::invalid_value, "v: head count (dim 1) must match k's Hk = " +
                                       std::to_string(s.Hk) + "; got v " + v_shape);
  if (s.Hk < 1 || s.Hq < 1 || s.Hq % s.Hk != 0)
    fail(ErrorKind::invalid_value,
         "k: q's head count Hq = " + std::to_string(s.Hq) +
             " must be a positive multiple of k's head count Hk = " + std::to_string(s.Hk) +
             " (GQA/MQA); got q " + q_shape + ", k " + k_shape);
  if (a.v.size(2) != s.Lk)
    fail(ErrorKind::invalid_value, "v: sequence length (dim 2) must match k's Lk = " +
                                       std::to_string(s.Lk) + "; got v " + v_shape);
  if (a.k.size(3) != s.D)
    fail(ErrorKind::invalid_value,
         "k: head dim (dim 3) must match q's D = " + std::to_string(s.D) + "; got k " + k_shape);
  if (s.D < 1 || s.D > kMaxHeadDim)
    fail(ErrorKind::invalid_value, "q: head dim D = " + std::to_string(s.D) +
                                       " is out of range; memattn supports 1 <= D <= 256 (q " +
                                       q_shape + ")");
  if (s.Dv < 1 || s.Dv > kMaxHeadDim)
    fail(ErrorKind::invalid_value, "v: head dim Dv = " + std::to_string(s.Dv) +
                                       " is out of range; memattn supports 1 <= Dv <= 256 (v " +
                                       v_shape + ")");

  if (a.attn_mask.present()) {
    const TensorView& m = a.attn_mask;
    if (m.rank != 4)
      fail(ErrorKind::invalid_value,
           "attn_mask: expected 4 dimensions broadcastable to [B, Hq, Lq, Lk], got " +
               std::to_string(m.rank) + "-D with shape " + m.shape_string());
    if (m.dtype != DType::boolean && m.dtype != a.q.dtype && m.dtype != DType::f32)
      fail(ErrorKind::invalid_type,
           std::string("attn_mask: expected bool (True = attend) or a float mask of q's dtype ") +
               dtype_name(a.q.dtype) + " or float32, got " + dtype_name(m.dtype));
    const std::int64_t full[4] = {s.B, s.Hq, s.Lq, s.Lk};
    for (int i = 0; i < 4; ++i)
      if (m.sizes[i] != 1 && m.sizes[i] != full[i])
        fail(ErrorKind::invalid_value,
             "attn_mask: shape " + m.shape_string() +
                 " is not broadcastable to [B, Hq, Lq, Lk] = " + shape_of(s.B, s.Hq, s.Lq, s.Lk) +
                 ": dim " + std::to_string(i) + " must be 1 or " + std::to_string(full[i]));
  }
  if (a.key_padding_mask.present()) {
    const TensorView& m = a.key_padding_mask;
    if (m.dtype != DType::boolean)
      fail(ErrorKind::invalid_type,
           std::string("key_padding_mask: expected dtype bool (True = padding), got ") +
               dtype_name(m.dtype));
    const std::string want = "[" + std::to_string(s.B) + ", " + std::to_string(s.Lk) + "]";
    if (m.rank != 2 || m.shape_string() != want)
      fail(ErrorKind::invalid_value,
           "key_padding_mask: expected shape [B, Lk] = " + want + ", got " + m.shape_string());
  }
  if (!(a.dropout_p >= 0.0 && a.dropout_p < 1.0))
    fail(ErrorKind::invalid_value,
         "dropout_p: expected 0 <= dropout_p < 1, got " + std::to_string(a.dropout_p));
  if (a.has_scale && !std::isfinite(a.scale))
    fail(ErrorKind::invalid_value,
         "scale: expected a finite number or None, got " + std::to_string(a.scale));
  s.scale = a.has_scale ? a.scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  s.causal_offset = a.causal_alignment == CausalAlignment::bottom_right ? s.Lk - s.Lq : 0;

  if (a.out.present()) {
    require_rank(a.out, "out", 4, "[B, Hq, Lq, Dv]");
    require_dtype(a.out, "out", a.q.dtype, "q's dtype");
    require_shape(a.out, "out", shape_of(s.B, s.Hq, s.Lq, s.Dv), "[B, Hq, Lq, Dv]");
  }
  if (a.lse.present()) {
    require_rank(a.lse, "lse", 3, "[B, Hq, Lq]");
    require_dtype(a.lse, "lse", a.q.dtype == DType::f64 ? DType::f64 : DType::f32,
                  "log-sum-exp is float32, float64 for float64 inputs");
    require_shape(a.lse, "lse", shape_of(s.B, s.Hq, s.Lq), "[B, Hq, Lq]");
  }
  return s;
}

ProblemShape validate_backward(const BackwardArgs& a) {
  const ProblemShape s = validate_forward(a.fwd);
  require_present(a.fwd.out, "out");
  require_present(a.fwd.lse, "lse");
  for (auto [t, name] : {std::pair{&a.grad_out, "grad_out"},
                         {&a.grad_q, "grad_q"},
                         {&a.grad_k, "grad_k"},
                         {&a.grad_v, "grad_v"},
                         {&a.grad_attn_mask, "grad_attn_mask"}})
    require_same_device(*t, name, a.fwd.q);
  const char* why = "gradients have q's dtype";
  require_rank(a.grad_out, "grad_out", 4, "[B, Hq, Lq, Dv]");
  require_dtype(a.grad_out, "grad_out", a.fwd.q.dtype, why);
  require_shape(a.grad_out, "grad_out", shape_of(s.B, s.Hq, s.Lq, s.Dv), "[B, Hq, Lq, Dv]");
  require_rank(a.grad_q, "grad_q", 4, "[B, Hq, Lq, D]");
  require_dtype(a.grad_q, "grad_q", a.fwd.q.dtype, why);
  require_shape(a.grad_q, "grad_q", a.fwd.q.shape_string(), "[B, Hq, Lq, D]");
  require_rank(a.grad_k, "grad_k", 4, "[B, Hk, Lk, D]");
  require_dtype(a.grad_k, "grad_k", a.fwd.q.dtype, why);
  require_shape(a.grad_k, "grad_k", a.fwd.k.shape_string(), "[B, Hk, Lk, D]");
  require_rank(a.grad_v, "grad_v", 4, "[B, Hk, Lk, Dv]");
  require_dtype(a.grad_v, "grad_v", a.fwd.q.dtype, why);
  require_shape(a.grad_v, "grad_v", a.fwd.v.shape_string(), "[B, Hk, Lk, Dv]");
  if (a.grad_attn_mask.present()) {
    const TensorView& g = a.grad_attn_mask;
    const TensorView& m = a.fwd.attn_mask;
    if (!m.present() || !is_float(m.dtype))
      fail(ErrorKind::invalid_value, "grad_attn_mask: given, but attn_mask is " +
                                         std::string(m.present() ? "a bool mask" : "absent") +
                                         "; only a float attn_mask has a gradient");
    require_rank(g, "grad_attn_mask", 4, "(attn_mask's 4-D shape)");
    require_dtype(g, "grad_attn_mask", a.fwd.q.dtype == DType::f64 ? DType::f64 : DType::f32,
                  "mask gradients accumulate in float32, float64 for float64 inputs");
    for (int i = 0; i < 4; ++i)
      if (g.sizes[i] != 1 && g.sizes[i] != m.sizes[i])
        fail(ErrorKind::invalid_value, "grad_attn_mask: shape " + g.shape_string() +
                                           " does not match attn_mask " + m.shape_string() +
                                           ": dim " + std::to_string(i) + " must be 1 or " +
                                           std::to_string(m.sizes[i]));
  }
  return s;
}

}  // namespace memattn
