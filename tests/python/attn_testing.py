"""Helpers shared by the attention tests: input builders and the tolerance policy (DESIGN §4).

Tolerance policy, per compared tensor (outputs, lse and every gradient):

- float64: ``err <= max(1e-12, 128 * u * S) * max(1, |ref|max)``.
- float32: ``err <= max(max(1e-5, 8 * u * S) * max(1, |ref|max), 2 * err(math in float32))``.
- bfloat16 (and float16): ``err <= 2 * err(math in that dtype) + 1e-3 * max(1, |ref|max)``.

``|ref|max`` is, for gradients, the larger of the gradient's own max and the size of the terms
it sums before they cancel (``gradient_scales``): a gradient that cancels to ~0 (e.g. a row with
a single visible key has an exactly zero score gradient) is still computed from terms of that
size, and FlashAttention-style backward (delta = rowsum(dO * O)) rounds them differently from
autograd's softmax backward. ``u`` is the dtype's unit roundoff and ``S`` the largest
|scaled score|. The fixed bounds hold
for ordinary inputs (S ~ 10); the ``u * S`` term only matters for ill-conditioned ones (scores
in the thousands), where rounding a score already moves exp(score - lse) by ``u * S``
relative: backward recomputes the scores, so no implementation of this kind can do better.
For float64 the reference carries that rounding too, hence the larger factor.

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
SCORE_ROUNDING_FACTOR = {torch.float64: 128.0, torch.float32: 8.0}


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
    *,
    max_score: float = 0.0,
    term_scale: float = 0.0,
) -> None:
    """Asserts ``got`` (computed in ``dtype``) is as close to ``ref64`` as the policy demands.

    ``max_score``: the largest |scaled score| of the call (``S`` in the module doc);
    ``term_scale``: the size of the terms a gradient sums (see ``gradient_scales``)."""
    got_f, want = _finite_part(name, got, ref64)
    mag = max(1.0, want.abs().max().item() if want.numel() else 0.0, term_scale)
    baseline = 0.0
    if ref_lowp is not None:
        low = ref_lowp.detach().double().cpu()
        low = torch.where(torch.isfinite(low), low, ref64.detach().double().cpu())
        low = low.masked_fill(ref64.detach().cpu() == -math.inf, 0.0)
        baseline = max_err(low, want)
    if dtype in FIXED_REL:
        unit_roundoff = torch.finfo(dtype).eps / 2
        rel = max(FIXED_REL[dtype], SCORE_ROUNDING_FACTOR[dtype] * unit_roundoff * max_score)
        tol = rel * mag
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
    device=None,
):
    """Random q, k, v (drawn on the CPU in float64, then rounded to ``dtype`` and moved to
    ``device``, so a seed gives the same numbers on every device)."""
    Hk = Hq if Hk is None else Hk
    Lk = Lq if Lk is None else Lk
    Dv = D if Dv is None else Dv
    q = (torch.randn(B, Hq, Lq, D, dtype=torch.float64) * magnitude).to(device, dtype)
    k = (torch.randn(B, Hk, Lk, D, dtype=torch.float64) * magnitude).to(device, dtype)
    v = torch.randn(B, Hk, Lk, Dv, dtype=torch.float64).to(device, dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def _as_leaf(t, dtype, device=None):
    """``t`` as a fresh leaf in ``dtype`` on ``device`` (None: where it is)."""
    if t is None:
        return t
    if not t.is_floating_point():
        return t if device is None else t.to(device)
    # bf16 / fp16 / fp32 values are exact in float64, so every run starts from the same numbers.
    return t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad)


def _forward(fn, inputs: Inputs, dtype, mask_dtype, device=None):
    """One run of ``fn`` on ``inputs``' leaves (in ``dtype``, moved to ``device`` when given:
    the references run on the CPU whatever device memattn runs on)."""
    leaves = [_as_leaf(t, dtype, device) for t in (inputs.q, inputs.k, inputs.v)]
    leaves.append(_as_leaf(inputs.attn_mask, mask_dtype, device))
    args = list(leaves) if inputs.prepare is None else list(inputs.prepare(*leaves))
    q, k, v, mask = args
    out, lse = fn(q, k, v, attn_mask=mask, return_lse=True, **inputs.kwargs)
    return out, lse, leaves, args


def max_abs_score(q, k, scale=None) -> float:
    """max |q @ k^T * scale| over every (query, key) pair, in float64 (GQA-aware)."""
    q, k = q.detach().double(), k.detach().double()
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q @ k.transpose(-2, -1)).abs().max().item() * abs(scale)


def _grads(out, leaves, grad_out):
    wants = [t for t in leaves if t is not None and t.requires_grad]
    if not wants:
        return []
    return list(torch.autograd.grad(out, wants, grad_out.to(out.device, out.dtype)))


def _reference(dtype):
    def fn(q, k, v, **kw):
        return attention_reference(q, k, v, dtype=dtype, **kw)

    return fn


def gradient_scales(q, k, v, mask, kwargs, grad_out) -> dict[str, float]:
    """Size of the terms each gradient sums, before cancellation, from float64 math.

    With P the probabilities, dP = dO v^T and delta = rowsum(P * dP), the score gradient is
    dS = P * (dP - delta); its terms have size C = P * (|dP| + |delta|). Then grad_q sums
    C |k| * scale, grad_k sums C^T |q| * scale, grad_v sums P^T |dO|, and the mask gradient
    sums C over its broadcast dims. P comes from the reference itself (v = identity).
    """
    q, k, v = (t.detach().double() for t in (q, k, v))
    B, Hq, _, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    if min(q.numel(), k.numel(), v.numel()) == 0:
        return {}
    group = Hq // Hk
    scale = kwargs.get("scale")
    scale = abs(1.0 / math.sqrt(D) if scale is None else scale)
    eye = torch.eye(Lk, dtype=torch.float64).expand(B, Hk, Lk, Lk)
    m = None if mask is None else mask.detach()
    with torch.no_grad():
        probs = attention_reference(q, k, eye, attn_mask=m, **kwargs)  # [B, Hq, Lq, Lk]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    go = grad_out.double()
    dp = go @ vr.transpose(-2, -1)
    delta = (probs * dp).sum(-1, keepdim=True)
    terms = probs * (dp.abs() + delta.abs())
    grad_k = (terms.transpose(-2, -1) @ q.abs()).unflatten(1, (Hk, group)).sum(2) * scale
    grad_v = (probs.transpose(-2, -1) @ go.abs()).unflatten(1, (Hk, group)).sum(2)
    scales = {
        "grad_q": (terms @ kr.abs()).max().item() * scale,
        "grad_k": grad_k.max().item(),
        "grad_v": grad_v.max().item(),
    }
    if m is not None and m.is_floating_point():
        shape = (1,) * (4 - m.dim()) + tuple(m.shape)
        dims = [d for d in range(4) if shape[d] == 1 or (m.dim() == 4 and m.stride(d) == 0)]
        summed = terms.sum(dim=dims) if dims else terms
        scales["grad_attn_mask"] = summed.max().item() if summed.numel() else 0.0
    return scales


GRAD_NAMES = ("grad_q", "grad_k", "grad_v", "grad_attn_mask")


def check_against_reference(inputs: Inputs, *, backward: bool = True):
    """Runs memattn and the references on ``inputs``; asserts out, lse and gradients agree
    under the tolerance policy. Returns memattn's ``(out, lse, grads)`` (grads of the leaves
    that require grad, in q, k, v, attn_mask order) for extra checks by the caller.

    memattn runs on the inputs' device (CUDA leaves: the CUDA backend, with masks and
    ``kwargs`` tensors on that device too); both references always run on the CPU.
    """
    dtype = inputs.q.dtype
    mask = inputs.attn_mask
    mask_dtype = None if mask is None else mask.dtype
    # memattn and the low-precision math get the mask as given (the reference rounds a float
    # mask to its compute dtype); the float64 reference gets an exact float64 copy.
    # memattn runs where the inputs are (CPU or CUDA); the references always on the CPU.
    runs = {
        "ours": (memattn.attention, dtype, mask_dtype, None),
        "ref64": (_reference(torch.float64), torch.float64, torch.float64, "cpu"),
    }
    if dtype != torch.float64:
        runs["low"] = (_reference(dtype), dtype, mask_dtype, "cpu")
    results = {
        name: _forward(fn, inputs, dt, mdt, dev) for name, (fn, dt, mdt, dev) in runs.items()
    }
    ours_out, ours_lse, leaves, _ = results["ours"]
    ref_args = results["ref64"][3]
    smax = max_abs_score(ref_args[0], ref_args[1], inputs.kwargs.get("scale"))
    grads = {name: [] for name in results}
    scales = {}
    if backward:
        grad_out = torch.randn(ours_out.shape, dtype=torch.float64)
        grads = {name: _grads(r[0], r[2], grad_out) for name, r in results.items()}
        scales = gradient_scales(*ref_args, inputs.kwargs, grad_out)

    low = results.get("low")
    assert ours_out.dtype == dtype, f"out: dtype {ours_out.dtype}, want {dtype}"
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours_lse.dtype == lse_dtype, f"lse: dtype {ours_lse.dtype}, want {lse_dtype}"
    ref64 = results["ref64"]
    assert_close_policy("out", ours_out, ref64[0], low and low[0], dtype, max_score=smax)
    assert_close_policy("lse", ours_lse, ref64[1], low and low[1], dtype, max_score=smax)
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
        lo = low and grads["low"][i]
        assert_close_policy(
            name, g, grads["ref64"][i], lo, dtype, max_score=smax, term_scale=scales.get(name, 0.0)
        )
    return ours_out, ours_lse, grads["ours"]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (memattn draws dropout seeds from CPU generators)."""
    return torch.Generator().manual_seed(seed)


def recover_keep_mask(q, k, p, seed, **kwargs):
    """The keep mask [B, Hq, Lq, Lk] (on the CPU) memattn draws for (q, k, p, seed) on q's
    device: with v = identity (Dv = Lk), out[i, j] = P[i, j] * keep[i, j] / (1 - p)."""
    B, Hk, Lk = k.shape[0], k.shape[1], k.shape[2]
    v = torch.eye(Lk, dtype=q.dtype, device=q.device).expand(B, Hk, Lk, Lk).contiguous()
    with torch.no_grad():
        out = memattn.attention(q, k, v, dropout_p=p, generator=seeded_generator(seed), **kwargs)
    return (out != 0).cpu()


# The dropout tests' call variants (parametrize with ids=DROPOUT_CALL_IDS): plain, bottom-right
# causal, and key padding, whose "random" mask dropout_call_kwargs draws.
DROPOUT_CALLS = [
    {},
    {"is_causal": True, "causal_alignment": "bottom_right"},
    {"key_padding_mask": "random"},
]
DROPOUT_CALL_IDS = ["plain", "causal_br", "kpm"]


def dropout_call_kwargs(kwargs: dict, B: int, Lk: int, device=None) -> dict:
    """One of DROPOUT_CALLS ready to pass: "random" key padding becomes a bool [B, Lk] mask
    (30% padded, drawn on the CPU, then moved to `device` if given)."""
    if kwargs.get("key_padding_mask") != "random":
        return kwargs
    mask = torch.rand(B, Lk) < 0.3
    return {"key_padding_mask": mask if device is None else mask.to(device)}


def assert_dropout_matches_reference(out, grads, leaves, grad_out, keep, p, dtype, kwargs):
    """``out`` and ``grads`` (of q, k, v, mask = ``leaves``) of a dropout call against
    ``attention_reference`` driven by the recovered ``keep`` mask, in float64 and in ``dtype``,
    with the tolerance policy. ``grad_out``: the float64 CPU gradient the grads were taken with."""

    def reference(compute_dtype):
        ref_leaves = [t.detach().cpu().to(compute_dtype).requires_grad_() for t in leaves]
        ref = attention_reference(
            *ref_leaves[:3],
            attn_mask=ref_leaves[3],
            dropout_p=p,
            dropout_mask=keep,
            dtype=compute_dtype,
            **kwargs,
        )
        return (ref, *torch.autograd.grad(ref, ref_leaves, grad_out.to(compute_dtype)))

    ref64 = reference(torch.float64)
    low = reference(dtype) if dtype != torch.float64 else (None,) * 5
    names = ("out", "grad_q", "grad_k", "grad_v", "grad_attn_mask")
    for name, got, want, lo in zip(names, (out, *grads), ref64, low, strict=True):
        assert_close_policy(name, got, want, lo, dtype)


def assert_dead_rows(out, lse, grad_q, dead):
    """dead: bool [B, Hq, Lq] (CPU), True where the row has no key left: out exactly 0, lse
    -inf, grad_q 0 there; nothing NaN, lse finite elsewhere. Tensors may be on any device."""
    out, lse, grad_q = out.detach().cpu(), lse.cpu(), grad_q.cpu()
    assert dead.any(), "the test must contain fully masked rows"
    assert not torch.isnan(out).any()
    assert not torch.isnan(lse).any()
    assert torch.equal(out[dead], torch.zeros_like(out[dead])), "dead rows: out must be exactly 0"
    assert torch.all(lse[dead] == -math.inf), "dead rows: lse must be -inf"
    assert torch.isfinite(lse[~dead]).all()
    assert not torch.isnan(grad_q).any()
    assert torch.equal(grad_q[dead], torch.zeros_like(grad_q[dead])), "dead rows: grad_q must be 0"


def masked_causal_attention(q, k, v, mask, kpm):
    """memattn.attention with a mask, key padding and bottom-right causal, as [B, L, H * Dv]
    times 2: the function the torch.compile tests compile."""
    out = memattn.attention(
        q,
        k,
        v,
        attn_mask=mask,
        key_padding_mask=kpm,
        is_causal=True,
        causal_alignment="bottom_right",
    )
    return out.transpose(1, 2).flatten(2) * 2.0
