"""memattn.attention against the float64 reference: forward, lse and every gradient.

Tolerances follow DESIGN.md §4 (see attn_testing.py). Each test builds fresh random inputs,
runs memattn, the float64 reference and (below float64) the same math in the test dtype, and
compares full tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import memattn
from attn_testing import Inputs, assert_dead_rows, check_against_reference, make_qkv

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# ---- sizes and head dims ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("Lq", "Lk"), [(1, 1), (17, 17), (127, 127), (1, 127), (127, 17), (17, 1), (5, 300)]
)
def test_sequence_lengths(dtype, Lq, Lk):
    q, k, v = make_qkv(B=2, Hq=2, Lq=Lq, Lk=Lk, D=32, dtype=dtype)
    check_against_reference(Inputs(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("Lq", "Lk"), [(1000, 1000), (1, 1000), (1000, 77)])
def test_long_sequences(dtype, Lq, Lk):
    q, k, v = make_qkv(B=1, Hq=2, Hk=1, Lq=Lq, Lk=Lk, D=64, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right"}
    check_against_reference(Inputs(q, k, v, kwargs=kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("D", "Dv"),
    [(1, 1), (17, 17), (64, 64), (96, 96), (128, 128), (256, 256), (64, 32), (16, 128), (256, 1)],
)
def test_head_dims(dtype, D, Dv):
    q, k, v = make_qkv(B=1, Hq=2, Lq=19, Lk=23, D=D, Dv=Dv, dtype=dtype)
    check_against_reference(Inputs(q, k, v))


def test_head_dim_fp64_and_causal():
    q, k, v = make_qkv(B=1, Hq=2, Lq=33, Lk=33, D=256, Dv=40, dtype=torch.float64)
    check_against_reference(Inputs(q, k, v, kwargs={"is_causal": True}))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(("Hq", "Hk"), [(8, 2), (8, 1), (3, 3), (6, 3)])
def test_gqa_mqa(dtype, Hq, Hk):
    q, k, v = make_qkv(B=2, Hq=Hq, Hk=Hk, Lq=13, Lk=29, D=16, Dv=24, dtype=dtype)
    check_against_reference(Inputs(q, k, v))


def test_gqa_with_causal_and_masks():
    q, k, v = make_qkv(B=2, Hq=8, Hk=2, Lq=21, Lk=34, D=32)
    mask = torch.randn(1, 8, 21, 34, requires_grad=True)
    kpm = torch.rand(2, 34) < 0.2
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right", "key_padding_mask": kpm}
    check_against_reference(Inputs(q, k, v, mask, kwargs=kwargs))


def test_empty_batch_and_queries():
    for B, Lq in ((0, 5), (2, 0)):
        q, k, v = make_qkv(B=B, Hq=2, Lq=Lq, Lk=7, D=8)
        out, lse = memattn.attention(q, k, v, return_lse=True)
        assert out.shape == (B, 2, Lq, 8)
        assert lse.shape == (B, 2, Lq)
        out.sum().backward()
        assert q.grad.shape == q.shape
        assert torch.equal(k.grad, torch.zeros_like(k))


# ---- causal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize(("Lq", "Lk"), [(17, 17), (40, 17), (17, 40), (1, 40), (40, 1), (64, 64)])
def test_causal(dtype, alignment, Lq, Lk):
    q, k, v = make_qkv(B=1, Hq=3, Lq=Lq, Lk=Lk, D=16, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": alignment}
    check_against_reference(Inputs(q, k, v, kwargs=kwargs))


def test_causal_alignment_is_ignored_without_causal():
    q, k, v = make_qkv(Lq=9, Lk=20, requires_grad=False)
    a = memattn.attention(q, k, v, causal_alignment="top_left")
    b = memattn.attention(q, k, v, causal_alignment="bottom_right")
    assert torch.equal(a, b)


def test_causal_bottom_right_decode_row_sees_every_key():
    """Lq = 1 with bottom_right is decoding: the single query sees the whole cache."""
    q, k, v = make_qkv(Lq=1, Lk=50, requires_grad=False)
    causal = memattn.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    full = memattn.attention(q, k, v)
    torch.testing.assert_close(causal, full, rtol=0, atol=1e-6)


# ---- masks -----------------------------------------------------------------------------------

B, H, LQ, LK = 2, 3, 13, 21

MASK_SHAPES = {
    "full": (B, H, LQ, LK),
    "2d": (LQ, LK),
    "1d": (LK,),
    "b11k": (B, 1, 1, LK),
    "1hqk": (1, H, LQ, LK),
    "b1q1": (B, 1, LQ, 1),
    "3d": (H, LQ, LK),
    "scalar": (),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=str)
def test_bool_mask(dtype, shape):
    q, k, v = make_qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=16, dtype=dtype)
    mask = torch.rand(MASK_SHAPES[shape]) > 0.3
    if shape == "scalar":
        mask = torch.tensor(True)
    check_against_reference(Inputs(q, k, v, mask))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=str)
def test_float_mask_with_grad(dtype, shape):
    """A float mask is added to the scores; its gradient is summed over broadcast dims."""
    q, k, v = make_qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=16, dtype=dtype)
    mask = (torch.randn(MASK_SHAPES[shape], dtype=torch.float64) * 2).to(dtype)
    mask.requires_grad_(True)
    check_against_reference(Inputs(q, k, v, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float32_mask_for_low_precision_q(dtype):
    q, k, v = make_qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=16, dtype=dtype)
    mask = torch.randn(1, H, LQ, LK, dtype=torch.float32, requires_grad=True)
    _, _, grads = check_against_reference(Inputs(q, k, v, mask))
    assert grads[3].dtype == torch.float32


def test_float_mask_without_grad():
    q, k, v = make_qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=16)
    mask = torch.randn(B, 1, LQ, LK)
    check_against_reference(Inputs(q, k, v, mask))


@pytest.mark.parametrize(
    ("base_shape", "dtype"),
    [((1, H, LQ, LK), torch.float32), ((1, 1, LQ, LK), torch.float32), ((B, 1, 1, LK), torch.bool)],
    ids=["expand_batch", "expand_batch_heads", "bool_expand"],
)
def test_expanded_stride0_mask(base_shape, dtype):
    """A mask expanded to the full shape (stride-0 dims): read as it is, and the gradient of
    the un-expanded tensor is the sum over the expanded dims, as autograd defines it."""
    q, k, v = make_qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=16)
    if dtype == torch.bool:
        base = torch.rand(base_shape) > 0.3
    else:
        base = torch.randn(base_shape, requires_grad=True)

    def prepare(q, k, v, m):
        return q, k, v, m.expand(B, H, LQ, LK)

    check_against_reference(Inputs(q, k, v, base, prepare=prepare))


def test_mask_non_contiguous_view():
    """A transposed float mask (non-contiguous, no stride 0)."""
    q, k, v = make_qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=16)
    base = torch.randn(B, H, LK, LQ, requires_grad=True)

    def prepare(q, k, v, m):
        return q, k, v, m.transpose(-1, -2)

    check_against_reference(Inputs(q, k, v, base, prepare=prepare))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_key_padding_mask(dtype):
    q, k, v = make_qkv(B=3, Hq=2, Lq=11, Lk=37, D=16, dtype=dtype)
    kpm = torch.zeros(3, 37, dtype=torch.bool)
    kpm[0, 30:] = True  # right padding
    kpm[1, :5] = True  # left padding
    kpm[2] = torch.rand(37) < 0.4
    check_against_reference(Inputs(q, k, v, kwargs={"key_padding_mask": kpm}))


def test_key_padding_mask_with_float_mask_and_causal():
    q, k, v = make_qkv(B=2, Hq=2, Lq=25, Lk=25, D=16)
    kpm = torch.rand(2, 25) < 0.3
    mask = torch.randn(2, 2, 25, 25, requires_grad=True)
    kwargs = {"key_padding_mask": kpm, "is_causal": True}
    check_against_reference(Inputs(q, k, v, mask, kwargs=kwargs))


def test_key_padding_mask_equals_float_mask():
    """key_padding_mask True = padding matches an additive -inf [B, 1, 1, Lk] mask."""
    q, k, v = make_qkv(B=2, Hq=2, Lq=9, Lk=14, requires_grad=False)
    kpm = torch.rand(2, 14) < 0.3
    kpm[:, 0] = False
    float_mask = torch.zeros(2, 1, 1, 14).masked_fill(kpm[:, None, None, :], -math.inf)
    a = memattn.attention(q, k, v, key_padding_mask=kpm)
    b = memattn.attention(q, k, v, attn_mask=float_mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- fully masked rows -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fully_masked_rows_bool_mask(dtype):
    q, k, v = make_qkv(B=2, Hq=2, Lq=9, Lk=11, D=16, dtype=dtype)
    mask = torch.rand(2, 2, 9, 11) > 0.3
    mask[..., 0] = True  # every other row keeps a key
    mask[0, :, 3, :] = False
    mask[1, 1, :2, :] = False
    out, lse, grads = check_against_reference(Inputs(q, k, v, mask))
    assert_dead_rows(out, lse, grads[0], ~mask.any(-1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fully_masked_rows_float_mask_neg_inf(dtype):
    q, k, v = make_qkv(B=1, Hq=2, Lq=8, Lk=10, D=16, dtype=dtype)
    mask = torch.randn(1, 2, 8, 10, dtype=torch.float64).to(dtype)
    mask[0, 0, 5, :] = -math.inf
    mask[0, 1, :, 4] = -math.inf  # partial -inf columns are ordinary masking
    mask.requires_grad_(True)
    out, lse, grads = check_against_reference(Inputs(q, k, v, mask))
    dead = torch.zeros(1, 2, 8, dtype=torch.bool)
    dead[0, 0, 5] = True
    assert_dead_rows(out, lse, grads[0], dead)
    assert torch.equal(grads[3][0, 0, 5], torch.zeros_like(grads[3][0, 0, 5]))


def test_fully_masked_batch_by_key_padding():
    q, k, v = make_qkv(B=2, Hq=2, Lq=6, Lk=9, D=8)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1] = True
    out, lse, grads = check_against_reference(Inputs(q, k, v, kwargs={"key_padding_mask": kpm}))
    dead = torch.zeros(2, 2, 6, dtype=torch.bool)
    dead[1] = True
    assert_dead_rows(out, lse, grads[0], dead)
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))
    assert torch.equal(grads[2][1], torch.zeros_like(grads[2][1]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fully_masked_rows_causal_bottom_right(dtype):
    """Lq > Lk with bottom_right: the first Lq - Lk queries see no key."""
    q, k, v = make_qkv(B=1, Hq=2, Lq=12, Lk=5, D=16, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right"}
    out, lse, grads = check_against_reference(Inputs(q, k, v, kwargs=kwargs))
    dead = torch.zeros(1, 2, 12, dtype=torch.bool)
    dead[..., :7] = True
    assert_dead_rows(out, lse, grads[0], dead)


def test_fully_masked_rows_from_mask_and_causal_combined():
    """Row 0 sees only key 0 under top_left causal; the mask removes key 0 for it."""
    q, k, v = make_qkv(B=1, Hq=1, Lq=6, Lk=6, D=8)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[0, 0] = False
    out, lse, grads = check_against_reference(Inputs(q, k, v, mask, kwargs={"is_causal": True}))
    dead = torch.zeros(1, 1, 6, dtype=torch.bool)
    dead[0, 0, 0] = True
    assert_dead_rows(out, lse, grads[0], dead)


def test_no_keys():
    """Lk = 0: every row is fully masked."""
    q, k, v = make_qkv(B=2, Hq=2, Lq=5, Lk=0, D=8, Dv=4)
    out, lse = memattn.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros(2, 2, 5, 4))
    assert torch.all(lse == -math.inf)
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad, torch.zeros_like(q))


# ---- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_transposed_bshd_views(dtype):
    """q, k, v as [B, L, H, D] memory viewed as [B, H, L, D] (nn.MHA's layout)."""
    Bn, Lq, Lk, Hq, Hk, D = 2, 19, 23, 4, 2, 16
    q = torch.randn(Bn, Lq, Hq, D).to(dtype).requires_grad_()
    k = torch.randn(Bn, Lk, Hk, D).to(dtype).requires_grad_()
    v = torch.randn(Bn, Lk, Hk, D).to(dtype).requires_grad_()

    def prepare(q, k, v, m):
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m

    out, _, _ = check_against_reference(Inputs(q, k, v, prepare=prepare))
    assert out.transpose(1, 2).is_contiguous(), "out should be laid out like q ([B, L, H, D])"


def test_out_contiguous_for_contiguous_q():
    q, k, v = make_qkv(requires_grad=False)
    assert memattn.attention(q, k, v).is_contiguous()


def test_packed_qkv_and_slices():
    """q, k, v split from one packed [B, L, 3, H, D] tensor, plus a sliced head dim."""
    Bn, L, Hn, D = 2, 15, 3, 16
    qkv = torch.randn(Bn, L, 3, Hn, 2 * D, dtype=torch.float64).requires_grad_()

    def prepare(qkv_, k_, v_, m):
        # strided last dim (::2) for q, a plain narrow for k, the second half for v
        q = qkv_[:, :, 0, :, ::2].transpose(1, 2)
        k = qkv_[:, :, 1, :, :D].transpose(1, 2)
        v = qkv_[:, :, 2, :, D:].transpose(1, 2)
        return q, k, v, m

    dummy = torch.zeros(1)
    _, _, grads = check_against_reference(Inputs(qkv, dummy, dummy, prepare=prepare))
    assert grads[0].shape == qkv.shape


def test_permuted_and_batch_sliced():
    """q from a permuted tensor, k and v from every other batch entry (stride on dim 0)."""
    q0 = torch.randn(4, 17, 3, 16, requires_grad=True)  # [B, Lq, Hq, D] -> sliced batch
    k0 = torch.randn(3, 1, 20, 16, requires_grad=True)  # MQA
    v0 = torch.randn(3, 1, 20, 24, requires_grad=True)

    def prepare(q, k, v, m):
        return q.permute(0, 2, 1, 3)[1:3], k[::2], v[::2], m

    check_against_reference(Inputs(q0, k0, v0, prepare=prepare))


# ---- values and options ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_magnitude(dtype):
    """Scores in the hundreds: the online softmax must rescale without overflow."""
    q, k, v = make_qkv(B=1, Hq=2, Lq=33, Lk=47, D=32, dtype=dtype, magnitude=30.0)
    check_against_reference(Inputs(q, k, v, kwargs={"is_causal": True}))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.5, 1.0, 1e-3, 3])
def test_scale(dtype, scale):
    q, k, v = make_qkv(B=1, Hq=2, Lq=17, Lk=19, D=16, dtype=dtype)
    check_against_reference(Inputs(q, k, v, kwargs={"scale": scale}))


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = make_qkv(D=25, requires_grad=False)
    a = memattn.attention(q, k, v)
    b = memattn.attention(q, k, v, scale=1 / 5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_return_lse_shapes():
    q, k, v = make_qkv(B=2, Hq=4, Hk=2, Lq=7, Lk=9, D=8, Dv=5, requires_grad=False)
    out = memattn.attention(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 4, 7, 5)
    out2, lse = memattn.attention(q, k, v, return_lse=True)
    assert torch.equal(out, out2)
    assert lse.shape == (2, 4, 7)
    assert lse.dtype == torch.float32
    _, lse64 = memattn.attention(q.double(), k.double(), v.double(), return_lse=True)
    assert lse64.dtype == torch.float64
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)


def test_matches_torch_sdpa():
    """Same conventions as torch's SDPA (bool True = attend, scale, causal top_left)."""
    q, k, v = make_qkv(B=2, Hq=4, Lq=24, Lk=24, D=32, requires_grad=False)
    mask = torch.rand(2, 4, 24, 24) > 0.2
    mask[..., 0] = True
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}, {"scale": 0.3}):
        ours = memattn.attention(q, k, v, **kwargs)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_forward_saves_only_out_and_lse():
    """Backward state is the inputs plus out and lse: nothing of size Lq x Lk."""
    Lq = Lk = 64
    q, k, v = make_qkv(B=1, Hq=2, Lq=Lq, Lk=Lk, D=8)
    kpm = torch.zeros(1, Lk, dtype=torch.bool)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, lse = memattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    allowed = {id(t) for t in (q, k, v, kpm)}
    for t in saved:
        if id(t) in allowed:
            continue
        assert t.shape in (out.shape, lse.shape), f"unexpected saved tensor {tuple(t.shape)}"
    assert sum(t.numel() for t in saved) <= sum(t.numel() for t in (q, k, v, kpm, out, lse))
    assert not lse.requires_grad


def test_no_grad_inputs():
    q, k, v = make_qkv(requires_grad=False)
    out = memattn.attention(q, k, v)
    assert not out.requires_grad


def test_grad_only_for_v():
    q, k, v = make_qkv()
    q.requires_grad_(False)
    k.requires_grad_(False)
    out = memattn.attention(q, k, v)
    out.sum().backward()
    assert q.grad is None
    assert k.grad is None
    check_against_reference(Inputs(q, k, v))


def test_upstream_grad_with_stride0():
    """out.sum().backward() hands the op an expanded (all stride-0) gradient."""
    q, k, v = make_qkv(Lq=10, Lk=12)
    memattn.attention(q, k, v).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    memattn.attention(q, k, v).backward(torch.ones(2, 2, 10, 16))
    for a, b in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 8, 5, 64, device="meta")
    k = torch.empty(2, 2, 7, 64, device="meta")
    v = torch.empty(2, 2, 7, 32, device="meta")
    out, lse = memattn.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 8, 5, 32)
    assert lse.shape == (2, 8, 5)
    assert out.device.type == "meta"


def test_explain_returns_plan():
    q, k, v = make_qkv(requires_grad=False)
    plan = memattn.explain(q, k, v, is_causal=True)
    assert plan["backend"] == "cpu"
    assert plan["kernel"].startswith("cpu/")
    assert isinstance(plan["reason"], str)
    assert plan["reason"]
    backends = [name for name, _ in plan["verdicts"]]
    assert "cpu" in backends
    assert dict(plan["verdicts"])["cpu"] == []
    backward = memattn.explain(q, k, v, backward=True)
    assert backward["backend"] == "cpu"
    assert "backward_passes" not in backward  # a CUDA plan's key


def test_build_info_and_version():
    info = memattn.build_info()
    assert info["version"] == memattn.__version__
    assert info["cpu_isa_selected"] in info["cpu_isas_built"]
    assert set(info.get("cpu_isas_usable", [])) <= set(info["cpu_isas_built"])
    assert isinstance(info["cuda_built"], bool)


# ---- every CPU kernel variant ----------------------------------------------------------------

ISA_CASES = {
    "plain": ({}, {}),
    "gqa_causal_br": (
        {"Hq": 4, "Hk": 2, "Lq": 40, "Lk": 70},
        {"is_causal": True, "causal_alignment": "bottom_right"},
    ),
    "d256_dv17": ({"D": 256, "Dv": 17, "Lq": 18, "Lk": 65}, {}),
    "d1": ({"D": 1, "Lq": 33, "Lk": 31}, {"is_causal": True}),
    "long_keys": ({"B": 1, "Hq": 1, "Lq": 3, "Lk": 300}, {}),
    "scale": ({"Lq": 17, "Lk": 5}, {"scale": 0.7}),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ISA_CASES))
def test_every_cpu_isa(cpu_isa, dtype, case):
    shape_kw, kwargs = ISA_CASES[case]
    q, k, v = make_qkv(**{"B": 2, "Hq": 2, "Lq": 17, "D": 32, **shape_kw}, dtype=dtype)
    check_against_reference(Inputs(q, k, v, kwargs=kwargs))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_every_cpu_isa_masks(cpu_isa, dtype):
    q, k, v = make_qkv(B=2, Hq=3, Lq=29, Lk=37, D=24, dtype=dtype)
    mask = (torch.randn(1, 3, 29, 37, dtype=torch.float64)).to(dtype).requires_grad_()
    kpm = torch.rand(2, 37) < 0.3
    kpm[0] = True  # a fully padded batch entry
    kwargs = {"key_padding_mask": kpm, "is_causal": True}
    check_against_reference(Inputs(q, k, v, mask, kwargs=kwargs))


def test_isa_variants_agree():
    """All variants compute the same function (up to rounding): compare them with each other."""
    from conftest import usable_cpu_isas

    q, k, v = make_qkv(B=1, Hq=2, Lq=31, Lk=45, D=40, requires_grad=False)
    outs = {}
    mp = pytest.MonkeyPatch()
    try:
        for isa in usable_cpu_isas():
            mp.setenv("MEMATTN_CPU_ISA", isa)
            outs[isa] = memattn.attention(q, k, v, is_causal=True)
    finally:
        mp.undo()
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-5, msg=f"isa {isa}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_deterministic_run_to_run(threads):
    """Same call, same bits: forward and backward, whatever the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = make_qkv(B=2, Hq=4, Hk=2, Lq=70, Lk=90, D=32)
        mask = torch.randn(1, 4, 70, 90, requires_grad=True)
        runs = []
        for _ in range(2):
            out = memattn.attention(q, k, v, attn_mask=mask, is_causal=True)
            runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v, mask))))
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(previous)


def test_single_pass_mask_rules():
    """The masks for which Python allocates the Hopper single pass's dQ scratch
    (``_ops._single_pass_mask``; the core's make_mask_map and single_pass_serves_mask state the
    same rules): bool or q's dtype at head dims up to 128, no gradient to compute, contiguous
    keys, a 16-byte aligned start, strides of whole 16-byte units on the dims that are not
    broadcast."""
    from memattn import _ops

    def takes(mask, head_dim=128, needs_grad=False):
        return _ops._single_pass_mask(mask, q, head_dim, needs_grad)

    q = torch.zeros(2, 2, 8, 64, dtype=torch.bfloat16)
    bf16 = torch.zeros(2, 2, 8, 208, dtype=torch.bfloat16)
    flags = torch.zeros(2, 1, 8, 208, dtype=torch.bool)
    assert takes(flags) and takes(flags, 64) and takes(flags, 40)
    assert not takes(flags, 256)
    assert takes(bf16) and takes(bf16, 96) and takes(bf16, 64)
    assert not takes(bf16, 200)
    assert takes(bf16[:1, :, :1].expand(2, 2, 8, 208))  # broadcast dims
    assert not takes(bf16, needs_grad=True)  # the two passes write the mask gradient
    assert not takes(bf16.half()) and not takes(bf16.float())  # not q's dtype
    assert not takes(torch.zeros(2, 2, 8, 204, dtype=q.dtype)[..., :200])  # 408-byte rows
    assert takes(torch.zeros(2, 2, 8, 208, dtype=q.dtype)[..., :200])  # 416-byte rows
    assert not takes(torch.zeros(2, 2, 8, 200, dtype=torch.bool))  # 200-byte rows
    assert not takes(bf16[..., 1:])  # starts 2 bytes in
    assert not takes(bf16.transpose(2, 3))  # keys not contiguous
