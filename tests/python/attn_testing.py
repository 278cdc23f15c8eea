"""Helpers shared by the attention tests: input builders and the tolerance policy (DESIGN §4).

Tolerance policy, per compared tensor (outputs, lse and every gradient):

- float64: ``err <= 1e-12 * max(1, |ref|max)``.
- float32: ``err <= max(1e-5 * max(1, |ref|max), 2 * err(math in float32))``. The fixed bound
  holds for ordinary inputs; the second term only matters for ill-conditioned ones (scores in
  the hundreds), where float32 itself cannot do better.
- bfloat16 (and float16): ``err <= 2 * err(math in that dtype) + 1e-3 * max(1, |ref|max)``.

``err`` is the max absolute difference to the float64 reference; "math in dtype" is
``attention_reference(..., dtype=dtype)``, plain attention with every step rounded to that dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import memattn
from memattn.reference import attention_reference

ATOL_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-3}
FIXED_REL = {torch.float64: 1e-12, torch.float32: 1e-5}


def describe_mismatch(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    diff = (got.double() - want.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    idx = tuple(int(i) for i in torch.nonzero(diff > tol)[0]) if (diff > tol).any() else ()
    first = f"; first mismatch at {list(idx)}: got {got[idx].item()!r}, want {want[idx].item()!r}"
    return f"{name}: max abs err {diff.max().item():.3e} > tol {tol:.3e}{first if idx else ''}"


def _finite_part(name, got, want):
    """Checks that -inf / nan positions agree exactly; returns the tensors with them zeroed."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)} != {list(want.shape)}"
    assert not torch.isnan(got).any(), (
        f"{name}: NaN at {torch.nonzero(torch.isnan(got))[0].tolist()}"
    )
    ninf_got, ninf_want = got == -math.inf, want == -math.inf
    if not torch.equal(ninf_got, ninf_want):
        idx = torch.nonzero(ninf_got != ninf_want)[0].tolist()
        raise AssertionError(
            f"{name}: -inf pattern differs, first at {idx}: got "
            f"{got[tuple(idx)].item()}, want {want[tuple(idx)].item()}"
        )
    assert torch.isfinite(got[~ninf_got]).all(), f"{name}: non-finite values"
    return got.masked_fill(ninf_got, 0.0), want.masked_fill(ninf_want, 0.0)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_policy(
    name: str,
    got: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    """Asserts ``got`` (computed in ``dtype``) is as close to ``ref64`` as the policy demands."""
    got_f, want = _finite_part(name, got, ref64)
    mag = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    baseline = 0.0
    if ref_lowp is not None:
        low = ref_lowp.detach().double().cpu()
        low = torch.where(torch.isfinite(low), low, ref64.detach().double().cpu())
        low = low.masked_fill(ref64.detach().cpu() == -math.inf, 0.0)
        baseline = max_err(low, want)
    if dtype in FIXED_REL:
        tol = FIXED_REL[dtype] * mag
        if dtype == torch.float32:
            tol = max(tol, 2.0 * baseline)
    else:
        assert ref_lowp is not None, f"{name}: a low-precision baseline is needed for {dtype}"
        tol = 2.0 * baseline + ATOL_FLOOR[dtype] * mag
    err = max_err(got_f, want)
    assert err <= tol, describe_mismatch(name, got_f, want, tol)


@dataclass
class Inputs:
    """Leaf tensors of one call and how to turn them into ``attention``'s arguments.

    ``prepare(q, k, v, mask)`` builds the actual arguments from the leaves (e.g. transposed
    views); gradients are compared on the leaves. Leaves that require grad get compared grads.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None = None
    prepare: Callable | None = None
    kwargs: dict = field(default_factory=dict)


def make_qkv(
    B=2,
    Hq=2,
    Hk=None,
    Lq=17,
    Lk=None,
    D=16,
    Dv=None,
    dtype=torch.float32,
    magnitude=1.0,
    requires_grad=True,
):
    Hk = Hq if Hk is None else Hk
    Lk = Lq if Lk is None else Lk
    Dv = D if Dv is None else Dv
    q = (torch.randn(B, Hq, Lq, D, dtype=torch.float64) * magnitude).to(dtype)
    k = (torch.randn(B, Hk, Lk, D, dtype=torch.float64) * magnitude).to(dtype)
    v = torch.randn(B, Hk, Lk, Dv, dtype=torch.float64).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def _as_leaf(t, dtype):
    if t is None or not t.is_floating_point():
        return t
    # bf16 / fp32 values are exact in float64, so every run starts from the same numbers.
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _forward(fn, inputs: Inputs, dtype, mask_dtype):
    leaves = [_as_leaf(t, dtype) for t in (inputs.q, inputs.k, inputs.v)]
    leaves.append(_as_leaf(inputs.attn_mask, mask_dtype))
    args = list(leaves) if inputs.prepare is None else list(inputs.prepare(*leaves))
    q, k, v, mask = args
    out, lse = fn(q, k, v, attn_mask=mask, return_lse=True, **inputs.kwargs)
    return out, lse, leaves


def _grads(out, leaves, grad_out):
    wants = [t for t in leaves if t is not None and t.requires_grad]
    if not wants:
        return []
    return list(torch.autograd.grad(out, wants, grad_out.to(out.dtype)))


def _reference(dtype):
    def fn(q, k, v, **kw):
        return attention_reference(q, k, v, dtype=dtype, **kw)

    return fn


GRAD_NAMES = ("grad_q", "grad_k", "grad_v", "grad_attn_mask")


def check_against_reference(inputs: Inputs, *, backward: bool = True):
    """Runs memattn and the references on ``inputs``; asserts out, lse and gradients agree
    under the tolerance policy. Returns memattn's ``(out, lse, grads)`` (grads of the leaves
    that require grad, in q, k, v, attn_mask order) for extra checks by the caller.
    """
    dtype = inputs.q.dtype
    mask = inputs.attn_mask
    mask_dtype = None if mask is None else mask.dtype
    # memattn and the low-precision math get the mask as given (the reference rounds a float
    # mask to its compute dtype); the float64 reference gets an exact float64 copy.
    runs = {
        "ours": (memattn.attention, dtype, mask_dtype),
        "ref64": (_reference(torch.float64), torch.float64, torch.float64),
    }
    if dtype != torch.float64:
        runs["low"] = (_reference(dtype), dtype, mask_dtype)
    results = {name: _forward(fn, inputs, dt, mdt) for name, (fn, dt, mdt) in runs.items()}
    ours_out, ours_lse, leaves = results["ours"]
    grads = {name: [] for name in results}
    if backward:
        grad_out = torch.randn(ours_out.shape, dtype=torch.float64)
        grads = {name: _grads(r[0], r[2], grad_out) for name, r in results.items()}

    low = results.get("low")
    assert ours_out.dtype == dtype, f"out: dtype {ours_out.dtype}, want {dtype}"
    assert ours_lse.dtype == torch.float32, f"lse: dtype {ours_lse.dtype}, want float32"
    assert_close_policy("out", ours_out, results["ref64"][0], low and low[0], dtype)
    # lse is float32 whatever the input dtype; for float64 inputs hold it to float32's bound.
    lse_dtype = torch.float32 if dtype == torch.float64 else dtype
    assert_close_policy("lse", ours_lse, results["ref64"][1], low and low[1], lse_dtype)
    names = [
        name
        for name, t in zip(
            GRAD_NAMES, (inputs.q, inputs.k, inputs.v, inputs.attn_mask), strict=False
        )
        if t is not None and t.requires_grad
    ]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    for i, name in enumerate(names if backward else []):
        g = grads["ours"][i]
        assert g.shape == wanted[i].shape, (
            f"{name}: shape {list(g.shape)}, want {list(wanted[i].shape)}"
        )
        assert g.dtype == wanted[i].dtype, f"{name}: dtype {g.dtype}, want {wanted[i].dtype}"
        assert_close_policy(name, g, grads["ref64"][i], low and grads["low"][i], dtype)
    return ours_out, ours_lse, grads["ours"]
