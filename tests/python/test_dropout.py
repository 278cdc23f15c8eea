"""Dropout: reproducible from the generator, the documented keep rate, and a backward that uses
exactly the forward's mask.

The mask is recovered from the output itself: with ``v`` = identity (``Dv = Lk``), row ``i`` of
the output is the dropped-out probability row, ``P[i, j] * keep[i, j] / (1 - p)``, and every
``P[i, j]`` is positive without masks. The recovered mask then drives the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import memattn
from attn_testing import (
    DROPOUT_CALL_IDS,
    DROPOUT_CALLS,
    assert_dropout_matches_reference,
    dropout_call_kwargs,
    make_qkv,
    recover_keep_mask,
    seeded_generator,
)
from memattn.reference import attention_reference


def _identity_v(B, Hk, Lk, dtype=torch.float32):
    return torch.eye(Lk, dtype=dtype).expand(B, Hk, Lk, Lk).contiguous()


def test_same_seed_same_output():
    q, k, v = make_qkv(B=2, Hq=2, Lq=20, Lk=30, requires_grad=False)
    a = memattn.attention(q, k, v, dropout_p=0.3, generator=seeded_generator(7))
    b = memattn.attention(q, k, v, dropout_p=0.3, generator=seeded_generator(7))
    assert torch.equal(a, b)


def test_different_seed_different_output():
    q, k, v = make_qkv(B=2, Hq=2, Lq=20, Lk=30, requires_grad=False)
    a = memattn.attention(q, k, v, dropout_p=0.3, generator=seeded_generator(7))
    b = memattn.attention(q, k, v, dropout_p=0.3, generator=seeded_generator(8))
    assert not torch.equal(a, b)


def test_default_generator_follows_manual_seed():
    q, k, v = make_qkv(requires_grad=False)
    torch.manual_seed(123)
    a = memattn.attention(q, k, v, dropout_p=0.2)
    b = memattn.attention(q, k, v, dropout_p=0.2)  # the generator moved on: a new mask
    torch.manual_seed(123)
    c = memattn.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_generator_advances_per_call():
    q, k, v = make_qkv(requires_grad=False)
    g = seeded_generator(5)
    a = memattn.attention(q, k, v, dropout_p=0.2, generator=g)
    b = memattn.attention(q, k, v, dropout_p=0.2, generator=g)
    assert not torch.equal(a, b)


def test_no_dropout_ignores_generator():
    q, k, v = make_qkv(requires_grad=False)
    g = seeded_generator(5)
    state = g.get_state()
    a = memattn.attention(q, k, v, dropout_p=0.0, generator=g)
    assert torch.equal(g.get_state(), state), "dropout_p=0 must not draw from the generator"
    assert torch.equal(a, memattn.attention(q, k, v))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(p):
    B, H, Lq, Lk = 2, 4, 64, 128
    q, k, _ = make_qkv(B=B, Hq=H, Lq=Lq, Lk=Lk, D=16, requires_grad=False)
    keep = recover_keep_mask(q, k, p, seed=11)
    n = keep.numel()
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 6 * sigma, (
        f"keep fraction {frac:.4f}, want {1 - p} ± {6 * sigma:.4f}"
    )
    # The mask differs between heads, batch entries and rows (not one pattern repeated).
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_kept_values_scaled():
    """Kept weights are P / (1 - p); dropped ones exactly 0."""
    p = 0.25
    q, k, _ = make_qkv(B=1, Hq=2, Lq=16, Lk=24, D=8, requires_grad=False)
    v = _identity_v(1, 2, 24)
    with torch.no_grad():
        out = memattn.attention(q, k, v, dropout_p=p, generator=seeded_generator(3))
        probs = attention_reference(q, k, v)
    keep = out != 0
    torch.testing.assert_close(out[keep].double(), probs[keep] / (1 - p), rtol=1e-5, atol=1e-7)


def test_lse_is_before_dropout():
    q, k, v = make_qkv(requires_grad=False)
    _, lse_drop = memattn.attention(
        q, k, v, dropout_p=0.5, return_lse=True, generator=seeded_generator(1)
    )
    _, lse = memattn.attention(q, k, v, return_lse=True)
    assert torch.equal(lse_drop, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", DROPOUT_CALLS, ids=DROPOUT_CALL_IDS)
def test_forward_and_backward_match_reference_with_recovered_mask(dtype, kwargs):
    p, seed = 0.3, 1234
    B, Hq, Hk, Lq, Lk, D, Dv = 2, 4, 2, 19, 27, 16, 12
    kwargs = dropout_call_kwargs(kwargs, B, Lk)
    q, k, v = make_qkv(B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype)
    # Recover the mask in float64 (no rounding can turn a kept weight into 0).
    keep = recover_keep_mask(q.detach().double(), k.detach().double(), p, seed, **kwargs)
    mask = torch.randn(1, Hq, Lq, Lk, dtype=torch.float64).to(dtype).requires_grad_()

    out = memattn.attention(
        q, k, v, attn_mask=mask, dropout_p=p, generator=seeded_generator(seed), **kwargs
    )
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out.to(dtype))

    assert_dropout_matches_reference(out, grads, (q, k, v, mask), grad_out, keep, p, dtype, kwargs)


def test_gradcheck_with_dropout():
    """Finite differences agree with backward when every call re-seeds the generator."""
    q, k, v = make_qkv(B=1, Hq=2, Lq=5, Lk=6, D=4, Dv=3, dtype=torch.float64)

    def fn(q, k, v):
        return memattn.attention(q, k, v, dropout_p=0.4, generator=seeded_generator(99))

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-5, rtol=1e-4)


def test_mask_independent_of_isa():
    """The Philox stream is the same on every CPU kernel variant."""
    from conftest import usable_cpu_isas

    q, k, _ = make_qkv(B=1, Hq=2, Lq=9, Lk=33, D=8, dtype=torch.float64, requires_grad=False)
    masks = {}
    mp = pytest.MonkeyPatch()
    try:
        for isa in usable_cpu_isas():
            mp.setenv("MEMATTN_CPU_ISA", isa)
            masks[isa] = recover_keep_mask(q, k, 0.5, seed=77)
    finally:
        mp.undo()
    first = next(iter(masks.values()))
    for isa, m in masks.items():
        assert torch.equal(m, first), f"dropout mask differs on {isa}"


def test_non_cpu_generator_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA generator")
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(ValueError, match="generator"):
        memattn.attention(q, k, v, dropout_p=0.1, generator=torch.Generator("cuda"))
