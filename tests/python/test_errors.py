"""Every error path of docs/CONTRACT.md: the exception type, and a message that names the
argument and shows what it got (shape / dtype / value)."""

from __future__ import annotations

import re

import pytest
import torch

import memattn
from memattn import _memattn


def qkv(B=2, Hq=4, Hk=2, Lq=5, Lk=7, D=8, Dv=None, dtype=torch.float32):
    Dv = D if Dv is None else Dv
    return (
        torch.randn(B, Hq, Lq, D, dtype=dtype),
        torch.randn(B, Hk, Lk, D, dtype=dtype),
        torch.randn(B, Hk, Lk, Dv, dtype=dtype),
    )


def esc(text: str) -> str:
    return re.escape(text)


# ---- Python argument types -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_qkv_not_tensors(name):
    args = dict(zip("qkv", qkv(), strict=True))
    args[name] = [[1.0]]
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor, got list"):
        memattn.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize(
    ("kwarg", "value", "pattern"),
    [
        ("attn_mask", [[True]], "attn_mask: expected a torch.Tensor or None, got list"),
        ("key_padding_mask", 1, "key_padding_mask: expected a torch.Tensor or None, got int"),
        ("is_causal", 1, "is_causal: expected a bool, got int"),
        ("is_causal", None, "is_causal: expected a bool, got NoneType"),
        ("causal_alignment", 0, "causal_alignment: expected a str"),
        ("causal_alignment", None, "causal_alignment: expected a str"),
        ("dropout_p", "0.1", "dropout_p: expected a float in [0, 1), got str"),
        ("dropout_p", True, "dropout_p: expected a float in [0, 1), got bool"),
        ("scale", "1", "scale: expected a float or None, got str"),
        ("return_lse", 1, "return_lse: expected a bool, got int"),
        ("generator", 42, "generator: expected a torch.Generator or None, got int"),
    ],
)
def test_option_types(kwarg, value, pattern):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="^" + esc(pattern)):
        memattn.attention(q, k, v, **{kwarg: value})


def test_integer_scale_and_dropout_are_accepted():
    q, k, v = qkv()
    memattn.attention(q, k, v, scale=1, dropout_p=0)


# ---- ranks and dtypes ------------------------------------------------------------------------


def test_rank_too_low():
    _, k, v = qkv()
    pattern = r"^q: expected a 4-D tensor \[B, Hq, Lq, D\], got 3-D with shape \[4, 5, 8\]"
    with pytest.raises(ValueError, match=pattern):
        memattn.attention(torch.randn(4, 5, 8), k, v)


def test_rank_too_high():
    q, _, v = qkv()
    with pytest.raises(ValueError, match=r"^k: expected .*4 dim.*, got 5"):
        memattn.attention(q, torch.randn(2, 2, 7, 8, 1), v)


def test_v_rank():
    q, k, _ = qkv()
    with pytest.raises(
        ValueError, match=r"^v: expected a 4-D tensor .* got 3-D with shape \[2, 7, 8\]"
    ):
        memattn.attention(q, k, torch.randn(2, 7, 8))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64])
def test_q_dtype_not_float(dtype):
    q, k, v = qkv()
    q = torch.ones_like(q, dtype=dtype)
    with pytest.raises(TypeError, match=r"^q: .*" + str(dtype).removeprefix("torch.")):
        memattn.attention(q, k, v)


def test_q_bool_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^q: expected a floating dtype .* got bool"):
        memattn.attention(q > 0, k, v)


@pytest.mark.parametrize("name", ["k", "v"])
def test_kv_dtype_mismatch(name):
    args = dict(zip("qkv", qkv(), strict=True))
    args[name] = args[name].double()
    with pytest.raises(
        TypeError, match=f"^{name}: " + esc("expected q's dtype float32, got float64")
    ):
        memattn.attention(args["q"], args["k"], args["v"])


def test_float16_on_cpu_has_no_backend():
    q, k, v = qkv(dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="no backend can run this call") as info:
        memattn.attention(q, k, v)
    message = str(info.value)
    assert "[cpu]" in message
    assert "float16 is not supported on CPU" in message
    assert "[cuda]" in message


# ---- devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["k", "v", "attn_mask", "key_padding_mask"])
def test_device_mismatch(name):
    q, k, v = qkv()
    args = {"k": k, "v": v, "attn_mask": None, "key_padding_mask": None}
    meta = {
        "k": torch.empty(k.shape, device="meta"),
        "v": torch.empty(v.shape, device="meta"),
        "attn_mask": torch.empty(5, 7, device="meta"),
        "key_padding_mask": torch.empty(2, 7, dtype=torch.bool, device="meta"),
    }
    args[name] = meta[name]
    with pytest.raises(ValueError, match=f"^{name}: " + esc("expected a tensor on q's device cpu")):
        memattn.attention(q, args.pop("k"), args.pop("v"), **args)


@pytest.mark.cuda
def test_cuda_and_cpu_mixed():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^k: .*cuda"):
        memattn.attention(q, k.cuda(), v)


def test_cuda_plan_explains_missing_backend():
    """Without a GPU: plan a CUDA call from metadata and read why nothing can run it."""
    shape, strides = (1, 2, 3, 4), (24, 12, 4, 1)
    spec = ("float16", shape, strides, "cuda")
    plan = _memattn.plan(
        spec, spec, spec, None, None,
        is_causal=False, causal_alignment="top_left", dropout_p=0.0, scale=None,
    )  # fmt: skip
    verdicts = dict(plan["verdicts"])
    if memattn.build_info()["cuda_built"]:
        pytest.skip("this build has CUDA")
    assert plan["backend"] == ""
    assert any("built without" in reason and "CUDA" in reason for reason in verdicts["cuda"])
    assert any("not cpu" in reason for reason in verdicts["cpu"])
    assert any("float16" in reason for reason in verdicts["cpu"])


# ---- shapes ----------------------------------------------------------------------------------


def test_batch_mismatch():
    q, _k, _v = qkv()
    with pytest.raises(ValueError, match=r"^k, v: batch size .* q's B = 2; got k \[3, 2, 7, 8\]"):
        memattn.attention(q, torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8))


def test_v_heads_mismatch():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"^v: head count .* k's Hk = 2; got v \[2, 1, 7, 8\]"):
        memattn.attention(q, k, torch.randn(2, 1, 7, 8))


def test_heads_not_divisible():
    q, _, _ = qkv(Hq=4)
    k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    with pytest.raises(ValueError, match=r"^k: q's head count Hq = 4 .* Hk = 3"):
        memattn.attention(q, k, v)


def test_zero_kv_heads():
    q, _, _ = qkv()
    k, v = torch.randn(2, 0, 7, 8), torch.randn(2, 0, 7, 8)
    with pytest.raises(ValueError, match=r"^k: .*Hk = 0"):
        memattn.attention(q, k, v)


def test_v_length_mismatch():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"^v: sequence length .* Lk = 7; got v \[2, 2, 6, 8\]"):
        memattn.attention(q, k, torch.randn(2, 2, 6, 8))


def test_k_head_dim_mismatch():
    q, _, v = qkv()
    with pytest.raises(ValueError, match=r"^k: head dim .* D = 8; got k \[2, 2, 7, 9\]"):
        memattn.attention(q, torch.randn(2, 2, 7, 9), v)


@pytest.mark.parametrize("D", [0, 257, 512])
def test_head_dim_range(D):
    q, k, v = qkv(D=D, Dv=8)
    with pytest.raises(ValueError, match=rf"^q: head dim D = {D} is out of range.*1 <= D <= 256"):
        memattn.attention(q, k, v)


@pytest.mark.parametrize("Dv", [0, 257])
def test_value_head_dim_range(Dv):
    q, k, v = qkv(Dv=Dv)
    with pytest.raises(ValueError, match=rf"^v: head dim Dv = {Dv} is out of range"):
        memattn.attention(q, k, v)


# ---- masks -----------------------------------------------------------------------------------


def test_attn_mask_rank_too_high():
    q, k, v = qkv()
    mask = torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"^attn_mask: expected at most 4 dims .* \[1, 2, 4, 5, 7\]"
    ):
        memattn.attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    ("shape", "dim", "want"),
    [((5, 6), 3, 7), ((3, 5, 7), 1, 4), ((2, 4, 4, 7), 2, 5), ((7, 1), 2, 5)],
)
def test_attn_mask_not_broadcastable(shape, dim, want):
    q, k, v = qkv()
    mask = torch.ones(shape, dtype=torch.bool)
    padded = (1,) * (4 - len(shape)) + shape
    pattern = (
        "^attn_mask: "
        + esc(f"shape [{', '.join(map(str, padded))}] is not broadcastable to ")
        + esc("[B, Hq, Lq, Lk] = [2, 4, 5, 7]")
        + f".*dim {dim} must be 1 or {want}"
    )
    with pytest.raises(ValueError, match=pattern):
        memattn.attention(q, k, v, attn_mask=mask)


def test_attn_mask_expanded_to_wrong_size():
    """An expanded (stride-0) dim of the wrong size is an error, not silently narrowed."""
    q, k, v = qkv()
    mask = torch.randn(1, 1, 5, 7).expand(2, 3, 5, 7)
    with pytest.raises(ValueError, match=r"^attn_mask: shape \[2, 3, 5, 7\].*dim 1 must be 1 or 4"):
        memattn.attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    ("q_dtype", "mask_dtype"),
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float64),
        (torch.float64, torch.bfloat16),
    ],
)
def test_attn_mask_float_dtype(q_dtype, mask_dtype):
    q, k, v = qkv(dtype=q_dtype)
    mask = torch.randn(5, 7, dtype=mask_dtype)
    want = str(q_dtype).removeprefix("torch.")
    got = str(mask_dtype).removeprefix("torch.")
    pattern = f"^attn_mask: expected bool .* q's dtype {want} or float32, got {got}"
    with pytest.raises(TypeError, match=pattern):
        memattn.attention(q, k, v, attn_mask=mask)


def test_attn_mask_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^attn_mask: .*int64"):
        memattn.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64))


def test_key_padding_mask_dtype():
    q, k, v = qkv()
    with pytest.raises(
        TypeError, match=r"^key_padding_mask: expected dtype bool \(True = padding\), got float32"
    ):
        memattn.attention(q, k, v, key_padding_mask=torch.zeros(2, 7))


@pytest.mark.parametrize("shape", [(2, 6), (1, 7), (2, 1, 1, 7), (7,)])
def test_key_padding_mask_shape(shape):
    q, k, v = qkv()
    kpm = torch.zeros(shape, dtype=torch.bool)
    got = esc(f"[{', '.join(map(str, shape))}]")
    with pytest.raises(
        ValueError, match=r"^key_padding_mask: expected shape \[B, Lk\] = \[2, 7\], got " + got
    ):
        memattn.attention(q, k, v, key_padding_mask=kpm)


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_p_range(p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^dropout_p: expected 0 <= dropout_p < 1, got "):
        memattn.attention(q, k, v, dropout_p=p)


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_scale_not_finite(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^scale: expected a finite number or None, got "):
        memattn.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("alignment", ["bottom-right", "TOP_LEFT", ""])
def test_causal_alignment_value(alignment):
    q, k, v = qkv()
    pattern = "^causal_alignment: " + esc(
        f"expected 'top_left' or 'bottom_right', got '{alignment}'"
    )
    with pytest.raises(ValueError, match=pattern):
        memattn.attention(q, k, v, is_causal=True, causal_alignment=alignment)


def _bad_calls():
    q, k, v = qkv()
    q3, k3, v3 = qkv(Hq=3, Hk=2)
    return {
        "v length": ((q, k, v[:, :, :3]), {}),
        "heads": ((q3, k3, v3), {}),
        "k dtype": ((q, k.double(), v), {}),
        "q bool": ((q.bool(), k, v), {}),
        "head dim": ((q[..., :0], k[..., :0], v), {}),
        "mask shape": ((q, k, v), {"attn_mask": torch.zeros(1, 1, 5, 6, dtype=torch.bool)}),
        "padding shape": ((q, k, v), {"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}),
        "padding dtype": ((q, k, v), {"key_padding_mask": torch.zeros(2, 7)}),
        "alignment": ((q, k, v), {"is_causal": True, "causal_alignment": "left"}),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_core_validation_matches_python_validation(case):
    """Eager calls without dropout whose tensors the core takes as they are skip Python's
    check (functional.py: _ops.core_validates); the core raises the same error Python's check
    gives: same type, same message."""
    from memattn import _ops

    (q, k, v), kwargs = _bad_calls()[case]
    mask, kpm = kwargs.get("attn_mask"), kwargs.get("key_padding_mask")
    assert _ops.core_validates(q, k, v, mask, kpm)
    with pytest.raises((TypeError, ValueError)) as from_python:
        _ops._validate(
            q,
            k,
            v,
            mask,
            kpm,
            kwargs.get("is_causal", False),
            kwargs.get("causal_alignment", "top_left"),
            0.0,
            None,
        )
    with pytest.raises(from_python.type) as from_core:
        memattn.attention(q, k, v, **kwargs)
    assert str(from_core.value) == str(from_python.value)


def test_python_validates_what_the_core_cannot_take():
    """Tensors of another rank, dtype or layout are validated in Python before anything is
    allocated or exported."""
    from memattn import _ops

    q, k, v = qkv()
    assert not _ops.core_validates(q[0], k, v, None, None)
    assert not _ops.core_validates(q.long(), k, v, None, None)
    assert not _ops.core_validates(q, k, v, None, torch.zeros(2, 7, dtype=torch.int8))
    assert not _ops.core_validates(q.to_sparse(), k, v, None, None)
    with pytest.raises(ValueError, match=r"^q: "):
        memattn.attention(q[0], k, v)


def test_errors_raise_before_drawing_a_seed():
    """Validation runs before the dropout seed is drawn: a bad call leaves the RNG alone."""
    q, k, v = qkv()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError):
        memattn.attention(q, k, v[:, :, :3], dropout_p=0.5, generator=g)
    assert torch.equal(g.get_state(), state)


def test_bad_cpu_isa_env(monkeypatch):
    monkeypatch.setenv("MEMATTN_CPU_ISA", "sse1")
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"MEMATTN_CPU_ISA=sse1: not built into this module"):
        memattn.attention(q, k, v)


def test_explain_validates_too():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"^v: sequence length"):
        memattn.explain(q, k, torch.randn(2, 2, 6, 8))


# ---- the module's own outputs (caller-allocated, checked by the core) ------------------------


def _fwd(q, k, v, out, lse, mask=None):
    _memattn.forward(
        q, k, v, out, lse, mask, None,
        is_causal=False, causal_alignment="top_left", dropout_p=0.0, dropout_seed=0,
        scale=None, num_threads=1,
    )  # fmt: skip


def test_module_out_shape_and_dtype():
    q, k, v = qkv()
    lse = torch.empty(2, 4, 5)
    with pytest.raises(
        ValueError,
        match=r"^out: expected shape \[B, Hq, Lq, Dv\] = \[2, 4, 5, 8\], got \[2, 4, 5, 7\]",
    ):
        _fwd(q, k, v, torch.empty(2, 4, 5, 7), lse)
    with pytest.raises(TypeError, match=r"^out: expected dtype float32 .*got float64"):
        _fwd(q, k, v, torch.empty(2, 4, 5, 8, dtype=torch.float64), lse)


def test_module_lse_shape_and_dtype():
    q, k, v = qkv()
    out = torch.empty(2, 4, 5, 8)
    with pytest.raises(
        ValueError, match=r"^lse: expected shape \[B, Hq, Lq\] = \[2, 4, 5\], got \[2, 4, 6\]"
    ):
        _fwd(q, k, v, out, torch.empty(2, 4, 6))
    with pytest.raises(TypeError, match=r"^lse: expected dtype float32 .*got bfloat16"):
        _fwd(q, k, v, out, torch.empty(2, 4, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"^lse: expected a 3-D tensor"):
        _fwd(q, k, v, out, torch.empty(2, 4, 5, 1))


def _bwd(q, k, v, out, lse, grads, grad_out=None, grad_mask=None, mask=None):
    _memattn.backward(
        torch.randn_like(out) if grad_out is None else grad_out, q, k, v, out, lse, *grads,
        grad_mask, mask, None,
        is_causal=False, causal_alignment="top_left", dropout_p=0.0, dropout_seed=0,
        scale=None, num_threads=1,
    )  # fmt: skip


def _forward_outputs(mask=None):
    q, k, v = qkv()
    out, lse = torch.empty(2, 4, 5, 8), torch.empty(2, 4, 5)
    _fwd(q, k, v, out, lse, mask)
    return q, k, v, out, lse


def test_module_backward_grad_shapes():
    q, k, v, out, lse = _forward_outputs()
    grads = [torch.empty_like(t) for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"^grad_out: expected shape .* got \[2, 4, 5, 7\]"):
        _bwd(q, k, v, out, lse, grads, grad_out=torch.randn(2, 4, 5, 7))
    with pytest.raises(
        ValueError,
        match=r"^grad_k: expected shape \[B, Hk, Lk, D\] = \[2, 2, 7, 8\], got \[2, 2, 7, 9\]",
    ):
        _bwd(q, k, v, out, lse, [grads[0], torch.empty(2, 2, 7, 9), grads[2]])
    with pytest.raises(TypeError, match=r"^grad_v: expected dtype float32 .*got float64"):
        _bwd(q, k, v, out, lse, [grads[0], grads[1], grads[2].double()])


def test_module_backward_grad_mask_rules():
    mask = torch.randn(1, 4, 5, 7)
    q, k, v, out, lse = _forward_outputs(mask)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"^grad_attn_mask: given, but attn_mask is absent"):
        _bwd(q, k, v, out, lse, grads, grad_mask=torch.zeros(1, 4, 5, 7))
    with pytest.raises(ValueError, match=r"^grad_attn_mask: given, but attn_mask is a bool mask"):
        _bwd(q, k, v, out, lse, grads, grad_mask=torch.zeros(1, 4, 5, 7), mask=mask > 0)
    with pytest.raises(TypeError, match=r"^grad_attn_mask: expected dtype float32 .*got float64"):
        _bwd(
            q,
            k,
            v,
            out,
            lse,
            grads,
            grad_mask=torch.zeros(1, 4, 5, 7, dtype=torch.float64),
            mask=mask,
        )
    with pytest.raises(
        ValueError,
        match=r"^grad_attn_mask: shape \[1, 4, 5, 6\] does not match attn_mask \[1, 4, 5, 7\]",
    ):
        _bwd(q, k, v, out, lse, grads, grad_mask=torch.zeros(1, 4, 5, 6), mask=mask)


@pytest.mark.cuda
def test_cuda_tensors_get_a_clear_error_without_the_cuda_backend():
    if memattn.build_info()["cuda_built"]:
        pytest.skip("this build has the CUDA backend")
    q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="built without CUDA"):
        memattn.attention(q, q, q)
