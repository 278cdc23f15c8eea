"""Autograd and torch.compile integration of the custom ops.

- gradcheck (float64 finite differences) for q, k, v and a float mask, with causal and padding.
- torch.library.opcheck on both ops (schema, fake tensor, autograd registration, AOT dispatch).
- torch.compile(fullgraph=True) of forward + backward matches eager; errors still surface.
- Eager calls run the op's implementation through an autograd.Function (no op dispatch); calls
  under tracing and dispatch modes, and on meta tensors, see the op.
"""

from __future__ import annotations

import pytest
import torch

import memattn
from attn_testing import make_qkv, masked_causal_attention
from memattn import _ops

GRADCHECK_TOL = {"atol": 1e-7, "rtol": 1e-5}


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"is_causal": True, "causal_alignment": "bottom_right"},
        {"key_padding_mask": "kpm"},
        {"is_causal": True, "key_padding_mask": "kpm", "scale": 0.7},
    ],
    ids=["plain", "causal_tl", "causal_br", "kpm", "causal_kpm_scale"],
)
def test_gradcheck_qkv(kwargs):
    q, k, v = _f64(1, 4, 5, 3), _f64(1, 2, 7, 3), _f64(1, 2, 7, 2)
    if kwargs.get("key_padding_mask") == "kpm":
        kpm = torch.zeros(1, 7, dtype=torch.bool)
        kpm[0, 2] = kpm[0, 5] = True
        kwargs = {**kwargs, "key_padding_mask": kpm}

    def fn(q, k, v):
        return memattn.attention(q, k, v, **kwargs)

    assert torch.autograd.gradcheck(fn, (q, k, v), **GRADCHECK_TOL)


@pytest.mark.parametrize("mask_shape", [(1, 4, 5, 7), (5, 7), (1, 1, 1, 7), (1, 4, 1, 1)], ids=str)
def test_gradcheck_float_mask(mask_shape):
    q, k, v = _f64(1, 4, 5, 3), _f64(1, 2, 7, 3), _f64(1, 2, 7, 2)
    mask = _f64(*mask_shape)

    def fn(q, k, v, mask):
        return memattn.attention(
            q, k, v, attn_mask=mask, is_causal=True, causal_alignment="bottom_right"
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, mask), **GRADCHECK_TOL)


def test_gradcheck_expanded_mask():
    q, k, v = _f64(2, 2, 4, 3), _f64(2, 2, 6, 3), _f64(2, 2, 6, 3)
    base = _f64(1, 2, 4, 6)

    def fn(q, k, v, base):
        return memattn.attention(q, k, v, attn_mask=base.expand(2, 2, 4, 6))

    assert torch.autograd.gradcheck(fn, (q, k, v, base), **GRADCHECK_TOL)


def test_gradcheck_with_fully_masked_rows():
    q, k, v = _f64(1, 2, 6, 3), _f64(1, 2, 4, 3), _f64(1, 2, 4, 3)

    def fn(q, k, v):
        # bottom_right with Lq > Lk: the first two queries see no key
        return memattn.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")

    assert torch.autograd.gradcheck(fn, (q, k, v), **GRADCHECK_TOL)


def test_double_backward_is_refused():
    q, k, v = _f64(1, 1, 3, 2), _f64(1, 1, 3, 2), _f64(1, 1, 3, 2)
    out = memattn.attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_backward"):
        gq.sum().backward()


# ---- opcheck ---------------------------------------------------------------------------------


def _forward_args(with_mask=True, requires_grad=True, dropout=False):
    q, k, v = make_qkv(B=2, Hq=4, Hk=2, Lq=5, Lk=7, D=8, Dv=6, requires_grad=requires_grad)
    mask = torch.randn(1, 4, 5, 7, requires_grad=requires_grad) if with_mask else None
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    seed = torch.tensor([42], dtype=torch.int64) if dropout else None
    return (q, k, v, mask, kpm, True, "bottom_right", 0.2 if dropout else 0.0, seed, None)


@pytest.mark.parametrize(
    ("with_mask", "dropout"), [(True, False), (False, False), (True, True)], ids=str
)
def test_opcheck_forward(with_mask, dropout):
    args = _forward_args(with_mask=with_mask, dropout=dropout)
    torch.library.opcheck(torch.ops.memattn.attention_forward.default, args)


def test_opcheck_forward_bshd_layout():
    q = torch.randn(2, 5, 4, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 7, 2, 8).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 7, 2, 8).transpose(1, 2).requires_grad_()
    args = (q, k, v, None, None, False, "top_left", 0.0, None, 0.5)
    torch.library.opcheck(torch.ops.memattn.attention_forward.default, args)


@pytest.mark.parametrize("mask_needs_grad", [True, False])
def test_opcheck_backward(mask_needs_grad):
    q, k, v, mask, kpm, causal, align, p, seed, scale = _forward_args(requires_grad=False)
    out, lse = torch.ops.memattn.attention_forward(
        q, k, v, mask, kpm, causal, align, p, seed, scale
    )
    grad_out = torch.randn_like(out)
    args = (grad_out, q, k, v, out, lse, mask, kpm, causal, align, p, seed, scale, mask_needs_grad)
    torch.library.opcheck(torch.ops.memattn.attention_backward.default, args)


def test_backward_op_mask_grad_shape():
    q, k, v, mask, kpm, causal, align, p, seed, scale = _forward_args(requires_grad=False)
    out, lse = torch.ops.memattn.attention_forward(
        q, k, v, mask, kpm, causal, align, p, seed, scale
    )
    grads = torch.ops.memattn.attention_backward(
        torch.randn_like(out), q, k, v, out, lse, mask, kpm, causal, align, p, seed, scale, True
    )
    assert grads[3].shape == mask.shape
    assert grads[3].dtype == torch.float32  # float32 for float32 q
    grads = torch.ops.memattn.attention_backward(
        torch.randn_like(out), q, k, v, out, lse, mask, kpm, causal, align, p, seed, scale, False
    )
    assert grads[3].numel() == 0


# ---- torch.compile ---------------------------------------------------------------------------


def _loss_inputs():
    q, k, v = make_qkv(B=2, Hq=4, Hk=2, Lq=9, Lk=13, D=16)
    mask = torch.randn(1, 4, 9, 13, requires_grad=True)
    kpm = torch.rand(2, 13) < 0.3
    return q, k, v, mask, kpm


def _eager_and_compiled(fn, inputs, **compile_kwargs):
    torch._dynamo.reset()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, **compile_kwargs)):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = f(*leaves)
        grads = torch.autograd.grad(
            out, [t for t in leaves if t.requires_grad], torch.ones_like(out)
        )
        results.append((out, grads))
    return results


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    (out_e, grads_e), (out_c, grads_c) = _eager_and_compiled(
        masked_causal_attention, _loss_inputs(), backend=backend
    )
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compile_dynamic_shapes():
    def fn(q, k, v):
        return memattn.attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for Lq in (5, 9, 17):
        q, k, v = make_qkv(B=1, Hq=2, Lq=Lq, Lk=Lq + 3, D=8)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=0, atol=0)


def test_compile_return_lse_and_dropout_seed_from_graph():
    def fn(q, k, v):
        out, lse = memattn.attention(q, k, v, return_lse=True, dropout_p=0.0)
        return out, lse

    torch._dynamo.reset()
    q, k, v = make_qkv(requires_grad=False)
    out_c, lse_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    out_e, lse_e = fn(q, k, v)
    assert torch.equal(out_c, out_e)
    assert torch.equal(lse_c, lse_e)


def test_compile_with_dropout_matches_eager():
    """The seed is drawn in the graph from torch's generator: same manual_seed, same mask."""

    def fn(q, k, v):
        return memattn.attention(q, k, v, dropout_p=0.3)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, k, v = make_qkv()
    torch.manual_seed(3)
    out_c = compiled(q, k, v)
    torch.manual_seed(3)
    out_e = fn(q, k, v)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    grads_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    grads_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_surfaces_validation_errors():
    def fn(q, k, v):
        return memattn.attention(q, k, v)

    torch._dynamo.reset()
    q, k, v = make_qkv(Hq=3, Hk=2, requires_grad=False)
    # Dynamo wraps errors raised while tracing; the original message is kept.
    with pytest.raises((ValueError, RuntimeError), match="Hq = 3 must be a positive multiple"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)


def test_tensor_spec():
    t = torch.empty(2, 3, 4, 5).transpose(1, 2)
    assert _ops.tensor_spec(t) == ("float32", (2, 4, 3, 5), (60, 5, 20, 1), "cpu")
    assert _ops.tensor_spec(torch.empty(3, dtype=torch.bool, device="meta"))[3] == "cpu"


# ---- eager path and op path -----------------------------------------------------------------


def test_eager_calls_take_the_autograd_function_and_match_the_op():
    """Same forward, gradients and saved tensors as the op, bit for bit, masks and dropout
    included; double backward still raises the backward op's error (test above)."""
    args = _forward_args(dropout=True)
    q, k, v, mask = args[:4]
    out_e, lse_e = memattn._ops.attention(*args)
    assert type(out_e.grad_fn).__name__ == "_EagerAttentionBackward"
    out_o, lse_o = torch.ops.memattn.attention_forward(*args)
    assert "attention_forward" in type(out_o.grad_fn).__name__
    assert torch.equal(out_e, out_o) and torch.equal(lse_e, lse_o)
    assert not lse_e.requires_grad
    g = torch.randn_like(out_e)
    grads_e = torch.autograd.grad(out_e, (q, k, v, mask), g)
    grads_o = torch.autograd.grad(out_o, (q, k, v, mask), g)
    for a, b in zip(grads_e, grads_o, strict=True):
        assert torch.equal(a, b)


def test_eager_path_with_an_undefined_output_gradient():
    """A consumer whose backward returns no gradient for out: the inputs get none either."""

    class DropsGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return None

    q, k, v = make_qkv(requires_grad=True)
    out = memattn.attention(q, k, v)
    loss = DropsGradient.apply(out).sum() + (q * 0).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    assert torch.equal(grads[0], torch.zeros_like(q))  # from (q * 0) only
    assert grads[1] is None and grads[2] is None


def test_traced_and_meta_calls_see_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = make_qkv(requires_grad=False)

    def fn(q, k, v):
        return memattn.attention(q, k, v, is_causal=True)

    for mode in ("real", "fake"):
        graph = make_fx(fn, tracing_mode=mode)(q, k, v)
        assert "memattn.attention_forward" in graph.code, mode
    with FakeTensorMode() as fake:
        out = fn(fake.from_tensor(q), fake.from_tensor(k), fake.from_tensor(v))
    assert out.shape == q.shape
    out = fn(q.to("meta"), k.to("meta"), v.to("meta"))
    assert out.device.type == "meta" and out.shape == q.shape
