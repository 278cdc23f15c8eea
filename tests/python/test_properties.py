"""Property-based tests: hypothesis draws shapes, masks and options; memattn must agree with the
float64 reference (forward and backward) under the same tolerance policy as the other tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_testing import Inputs, check_against_reference

MASK_KINDS = ["none", "bool", "float", "float_grad"]
# Broadcast patterns of the mask over [B, Hq, Lq, Lk]: True = that dim is present (else 1).
BROADCASTS = st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())


@st.composite
def attention_calls(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    B = draw(st.integers(1, 3))
    Hk = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4]))
    Hq = Hk * group
    Lq = draw(st.integers(1, 40))
    Lk = draw(st.integers(1, 40))
    D = draw(st.sampled_from([1, 3, 8, 16, 31, 64, 100]))
    Dv = draw(st.sampled_from([D, 1, 5, 32]))
    is_causal = draw(st.booleans())
    alignment = draw(st.sampled_from(["top_left", "bottom_right"]))
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    present = draw(BROADCASTS)
    use_kpm = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.25, 1.3]))
    transposed = draw(st.booleans())  # q, k, v as [B, L, H, D] views
    seed = draw(st.integers(0, 2**31 - 1))
    return {
        "dtype": dtype,
        "shape": (B, Hq, Hk, Lq, Lk, D, Dv),
        "is_causal": is_causal,
        "alignment": alignment,
        "mask_kind": mask_kind,
        "present": present,
        "use_kpm": use_kpm,
        "scale": scale,
        "transposed": transposed,
        "seed": seed,
    }


def _build(call):
    gen = torch.Generator().manual_seed(call["seed"])
    B, Hq, Hk, Lq, Lk, D, Dv = call["shape"]
    dtype = call["dtype"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if call["transposed"]:
        q, k, v = randn(B, Lq, Hq, D), randn(B, Lk, Hk, D), randn(B, Lk, Hk, Dv)

        def prepare(q, k, v, m):
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m
    else:
        q, k, v = randn(B, Hq, Lq, D), randn(B, Hk, Lk, D), randn(B, Hk, Lk, Dv)
        prepare = None
    for t in (q, k, v):
        t.requires_grad_()

    full = (B, Hq, Lq, Lk)
    mask_shape = tuple(n if keep else 1 for n, keep in zip(full, call["present"], strict=True))
    mask = None
    if call["mask_kind"] == "bool":
        mask = torch.rand(mask_shape, generator=gen) > 0.25
    elif call["mask_kind"].startswith("float"):
        mask = randn(*mask_shape).requires_grad_(call["mask_kind"] == "float_grad")

    kwargs = {"is_causal": call["is_causal"], "causal_alignment": call["alignment"]}
    if call["scale"] is not None:
        kwargs["scale"] = call["scale"]
    if call["use_kpm"]:
        kwargs["key_padding_mask"] = torch.rand(B, Lk, generator=gen) < 0.3
    return Inputs(q, k, v, mask, prepare=prepare, kwargs=kwargs)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(call=attention_calls())
def test_matches_reference(call):
    check_against_reference(_build(call))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=attention_calls())
def test_matches_reference_many(call):
    check_against_reference(_build(call))
