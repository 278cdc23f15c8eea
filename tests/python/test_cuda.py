"""memattn on CUDA: every CUDA kernel against the float64 CPU reference (DESIGN.md §4).

Run on a GPU machine with ``pytest -m cuda`` (pyproject's ``addopts`` deselect the ``cuda``
marker by default). The module skips itself without a CUDA GPU or when memattn was built
without its CUDA backend (``memattn.build_info()["cuda_built"]``).

The case matrix mirrors the CPU suite (test_functional.py, test_autograd.py, test_dropout.py)
for fp16 and bf16 (tensor-core kernels) and fp32 (SIMT kernels): forward ``out`` and ``lse`` and
the gradients of q, k, v and of a float ``attn_mask`` that requires grad, under the tolerance
policy of attn_testing.py (memattn runs on the GPU, both references on the CPU). On top of that:
grid limits (B * H = 70000), a long sequence (L = 8192), streams and devices, O(L) memory,
run-to-run determinism, dropout's Philox stream shared with the CPU backend, torch.compile,
``explain`` / ``inspect`` naming the kernel, nn.MultiheadAttention and ``memattn.optimize`` on a
CUDA bf16 model.

Unwritten outputs: the kernels write into fresh ``torch.empty`` tensors, which the caching
allocator serves from blocks earlier tensors freed. ``poison_cuda_cache`` fills every free
block with 0xFF bytes (NaN in fp16, bf16, fp32 and fp64) right before a checked call, so an
element a kernel forgets to write reads as NaN, which the checks reject.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import memattn
from attn_testing import (
    DROPOUT_CALL_IDS,
    DROPOUT_CALLS,
    Inputs,
    assert_close_policy,
    assert_dead_rows,
    assert_dropout_matches_reference,
    check_against_reference,
    dropout_call_kwargs,
    make_qkv,
    masked_causal_attention,
    recover_keep_mask,
    seeded_generator,
)
from memattn import convert
from memattn import nn as mnn
from memattn.reference import attention_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if not memattn.build_info()["cuda_built"]:
    pytest.skip(
        f"memattn's CUDA backend is not built: {memattn.build_info().get('cuda_reason', '')}",
        allow_module_level=True,
    )

DEV = "cuda"
# fp16 / bf16: tensor-core kernels; fp32: SIMT kernels.
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LOW = [torch.float16, torch.bfloat16]


# ---- helpers ---------------------------------------------------------------------------------


def poison_cuda_cache(nbytes: int = 256 * 2**20) -> None:
    """Fills the CUDA caching allocator's free memory with 0xFF bytes (NaN in every float
    dtype), so that the next ``torch.empty`` tensors hold NaN until a kernel writes them.

    Frees the cached blocks first (so no clean block is left to be picked instead), then
    allocates, fills and frees: ``nbytes`` in one large-pool block (any request above 1 MiB is
    split from it) and 64 MiB of 1 MiB blocks, two per 2 MiB small-pool segment (requests up to
    1 MiB). Blocks belong to the current stream: call it on the stream of the checked call."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    small = [torch.full((2**20,), 255, dtype=torch.uint8, device=DEV) for _ in range(64)]
    large = torch.full((nbytes,), 255, dtype=torch.uint8, device=DEV)
    del small, large


def check_cuda(inputs: Inputs, *, backward: bool = True):
    """``check_against_reference`` on CUDA inputs, after poisoning the allocator's cache."""
    assert inputs.q.is_cuda, "build the inputs on the GPU"
    poison_cuda_cache()
    out, lse, grads = check_against_reference(inputs, backward=backward)
    assert out.is_cuda and lse.is_cuda
    return out, lse, grads


def check_cuda_fully_padded_entry(q, k, v, pad_from: int, **kwargs):
    """``check_cuda`` (forward) of q, k, v with B = 2 and a key_padding_mask that pads batch
    entry 0 entirely (its output 0, lse -inf) and entry 1 from key ``pad_from`` on; ``kwargs``
    go to the call."""
    kpm = torch.zeros(2, k.shape[2], dtype=torch.bool)
    kpm[0] = True
    kpm[1, pad_from:] = True
    out, lse, _ = check_cuda(
        Inputs(q, k, v, kwargs={"key_padding_mask": kpm.to(DEV), **kwargs}), backward=False
    )
    assert torch.all(out[0] == 0)
    assert torch.all(lse[0] == -math.inf)


def check_cuda_both_alignments(q, k, v):
    """``check_cuda`` (forward) of q, k, v, causal in both alignments; with Lq > Lk the first
    Lq - Lk rows of the bottom-right call see no key (output 0, lse -inf)."""
    for alignment in ("top_left", "bottom_right"):
        causal = {"is_causal": True, "causal_alignment": alignment}
        out, lse, _ = check_cuda(Inputs(q, k, v, kwargs=causal), backward=False)
        blind = q.shape[2] - k.shape[2]
        if alignment == "bottom_right" and blind > 0:
            assert torch.all(out[:, :, :blind] == 0)
            assert torch.all(lse[:, :, :blind] == -math.inf)


def qkv(**kwargs):
    return make_qkv(device=DEV, **kwargs)


def rand_mask(shape, dtype, *, scale=2.0, requires_grad=True):
    """A float mask drawn in float64 on the CPU, rounded to ``dtype``, as a CUDA leaf."""
    m = (torch.randn(shape, dtype=torch.float64) * scale).to(DEV, dtype)
    return m.requires_grad_(requires_grad)


def bool_mask(shape, p_attend=0.7):
    return (torch.rand(shape) < p_attend).to(DEV)


def _kernel_name(plan: dict) -> str:
    return f"{plan['backend']}/{plan['kernel']}"


# ---- sizes and head dims ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("Lq", "Lk"),
    [(1, 1), (17, 17), (100, 100), (257, 257), (1, 257), (257, 17), (17, 1), (5, 1000)],
)
def test_sequence_lengths(dtype, Lq, Lk):
    q, k, v = qkv(B=2, Hq=2, Lq=Lq, Lk=Lk, D=64, dtype=dtype)
    check_cuda(Inputs(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("Lq", "Lk"), [(1000, 1000), (1, 1000), (1000, 77)])
def test_long_sequences_causal_gqa(dtype, Lq, Lk):
    q, k, v = qkv(B=1, Hq=2, Hk=1, Lq=Lq, Lk=Lk, D=64, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right"}
    check_cuda(Inputs(q, k, v, kwargs=kwargs))


HEAD_DIMS = [
    *((d, d) for d in (1, 8, 16, 33, 40, 64, 72, 96, 100, 128, 200, 255, 256)),
    (64, 128),
    (128, 64),
    (256, 32),
    (40, 72),
    (96, 256),
    (17, 33),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("D", "Dv"), HEAD_DIMS, ids=str)
def test_head_dims(dtype, D, Dv):
    q, k, v = qkv(B=1, Hq=2, Lq=37, Lk=130, D=D, Dv=Dv, dtype=dtype)
    check_cuda(Inputs(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_head_dims_causal_gqa_masks(dtype, D):
    """The fast head-dim buckets with everything on: GQA, causal, float mask, padding."""
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=130, Lk=200, D=D, dtype=dtype)
    mask = rand_mask((1, 4, 130, 200), dtype)
    kpm = (torch.rand(2, 200) < 0.2).to(DEV)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right", "key_padding_mask": kpm}
    check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("Hq", "Hk"), [(8, 2), (8, 1), (6, 3), (4, 4)])
def test_gqa_mqa(dtype, Hq, Hk):
    q, k, v = qkv(B=2, Hq=Hq, Hk=Hk, Lq=33, Lk=150, D=64, Dv=64, dtype=dtype)
    check_cuda(Inputs(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_dv_differs_with_causal_and_masks(dtype):
    q, k, v = qkv(B=2, Hq=8, Hk=2, Lq=71, Lk=134, D=64, Dv=128, dtype=dtype)
    mask = rand_mask((1, 8, 71, 134), dtype)
    kpm = (torch.rand(2, 134) < 0.2).to(DEV)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right", "key_padding_mask": kpm}
    check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("B", "Hq", "Hk"), [(35000, 2, 2), (1, 70000, 70000), (70000, 1, 1)])
def test_grid_limits_many_batch_heads(dtype, B, Hq, Hk):
    """B * H = 70000 rows of tiny attention: more than the 65535 a grid's y / z dims take."""
    q, k, v = qkv(B=B, Hq=Hq, Hk=Hk, Lq=3, Lk=5, D=64, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right"}
    check_cuda(Inputs(q, k, v, kwargs=kwargs))


def test_empty_batch_queries_and_keys():
    for dtype in DTYPES:
        for B, Lq in ((0, 5), (2, 0)):
            q, k, v = qkv(B=B, Hq=2, Lq=Lq, Lk=7, D=64, dtype=dtype)
            out, lse = memattn.attention(q, k, v, return_lse=True)
            assert out.shape == (B, 2, Lq, 64) and out.is_cuda
            assert lse.shape == (B, 2, Lq)
            out.sum().backward()
            assert q.grad.shape == q.shape
            assert torch.equal(k.grad, torch.zeros_like(k))
        # Lk = 0: every row is fully masked.
        q, k, v = qkv(B=2, Hq=2, Lq=5, Lk=0, D=64, Dv=32, dtype=dtype)
        poison_cuda_cache()
        out, lse = memattn.attention(q, k, v, return_lse=True)
        assert torch.equal(out.cpu(), torch.zeros(2, 2, 5, 32, dtype=dtype))
        assert torch.all(lse == -math.inf)
        out.backward(torch.randn_like(out))
        assert torch.equal(q.grad, torch.zeros_like(q))


# ---- causal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize(
    ("Lq", "Lk"),
    [(17, 17), (100, 37), (37, 100), (1, 300), (300, 1), (128, 128), (130, 257), (257, 130)],
)
def test_causal(dtype, alignment, Lq, Lk):
    q, k, v = qkv(B=1, Hq=3, Lq=Lq, Lk=Lk, D=64, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": alignment}
    check_cuda(Inputs(q, k, v, kwargs=kwargs))


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(
    ("Lq", "Lk", "causal"),
    [
        (256, 77, None),  # partial last key block: hidden key columns only
        (200, 77, None),  # and a partial last query block: the general loop
        (256, 256, "top_left"),  # diagonal blocks: causal limit only
        (256, 300, "bottom_right"),  # limit shifted by Lk - Lq = 44
        (300, 256, "bottom_right"),  # shifted by -44: leading queries see no key
        (130, 257, "top_left"),  # diagonal and key end in one block: the general loop
    ],
)
def test_block_boundaries_cheap_and_general_masking(kernel, D, Lq, Lk, causal, monkeypatch):
    """Blocks that only the key range's end or only the causal limit cut take one compare per
    element (sm80/scores.cuh: mask_key_end, mask_causal_diagonal), others the general loop;
    trailing key padding (no holes) takes the cheap cases too. Forward and backward against
    float64 on both tensor-core kernel families."""
    if kernel == "sm90" and not _is_hopper():
        pytest.skip("the sm90 kernels run on compute capability 9.0")
    monkeypatch.setenv("MEMATTN_DISABLE_SM90", "0" if kernel == "sm90" else "1")
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=Lq, Lk=Lk, D=D, dtype=torch.bfloat16)
    kwargs = {"is_causal": True, "causal_alignment": causal} if causal else {}
    check_cuda(Inputs(q, k, v, kwargs=kwargs))
    kpm = torch.zeros(2, Lk, dtype=torch.bool)
    kpm[1, Lk - 40 :] = True  # batch 1 ends 40 keys early
    check_cuda(Inputs(q, k, v, kwargs=kwargs | {"key_padding_mask": kpm.to(DEV)}))


def test_causal_bottom_right_decode_row_sees_every_key():
    q, k, v = qkv(Lq=1, Lk=500, D=64, dtype=torch.bfloat16, requires_grad=False)
    causal = memattn.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    full = memattn.attention(q, k, v)
    torch.testing.assert_close(causal, full)  # up to rounding: the causal kernel may differ


# ---- masks -----------------------------------------------------------------------------------

B, H, LQ, LK = 2, 3, 70, 130

MASK_SHAPES = {
    "full": (B, H, LQ, LK),
    "11qk": (1, 1, LQ, LK),
    "2d": (LQ, LK),
    "1d": (LK,),
    "b11k": (B, 1, 1, LK),
    "1hqk": (1, H, LQ, LK),
    "b1q1": (B, 1, LQ, 1),
    "bh1k": (B, H, 1, LK),
    "bhq1": (B, H, LQ, 1),
    "1h11": (1, H, 1, 1),
    "3d": (H, LQ, LK),
    "scalar": (),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=str)
def test_bool_mask(dtype, shape):
    q, k, v = qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=64, dtype=dtype)
    mask = bool_mask(MASK_SHAPES[shape])
    if shape == "scalar":
        mask = torch.tensor(True, device=DEV)
    check_cuda(Inputs(q, k, v, mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=str)
def test_float_mask_with_grad(dtype, shape):
    """A float mask is added to the scores; its gradient is summed over broadcast dims."""
    q, k, v = qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=64, dtype=dtype)
    check_cuda(Inputs(q, k, v, rand_mask(MASK_SHAPES[shape], dtype)))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", ["1hqk", "b11k"])
def test_float32_mask_for_low_precision_q(dtype, shape):
    q, k, v = qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=64, dtype=dtype)
    mask = rand_mask(MASK_SHAPES[shape], torch.float32)
    _, _, grads = check_cuda(Inputs(q, k, v, mask))
    assert grads[3].dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_mask_without_grad(dtype):
    q, k, v = qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=64, dtype=dtype)
    check_cuda(Inputs(q, k, v, rand_mask((B, 1, LQ, LK), dtype, requires_grad=False)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("base_shape", "kind"),
    [((1, H, LQ, LK), "float"), ((1, 1, LQ, LK), "float"), ((B, 1, 1, LK), "bool")],
    ids=["expand_batch", "expand_batch_heads", "bool_expand"],
)
def test_expanded_stride0_mask(dtype, base_shape, kind):
    """A mask expanded to the full shape (stride-0 dims) is read as it is; the gradient of the
    un-expanded tensor is the sum over the expanded dims."""
    q, k, v = qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=64, dtype=dtype)
    base = bool_mask(base_shape) if kind == "bool" else rand_mask(base_shape, dtype)

    def prepare(q, k, v, m):
        return q, k, v, m.expand(B, H, LQ, LK)

    check_cuda(Inputs(q, k, v, base, prepare=prepare))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_non_contiguous_view(dtype):
    """A transposed float mask (non-contiguous, no stride 0, last stride != 1)."""
    q, k, v = qkv(B=B, Hq=H, Lq=LQ, Lk=LK, D=64, dtype=dtype)
    base = rand_mask((B, H, LK, LQ), dtype)

    def prepare(q, k, v, m):
        return q, k, v, m.transpose(-1, -2)

    check_cuda(Inputs(q, k, v, base, prepare=prepare))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_mask(dtype):
    q, k, v = qkv(B=3, Hq=2, Lq=41, Lk=137, D=64, dtype=dtype)
    kpm = torch.zeros(3, 137, dtype=torch.bool)
    kpm[0, 100:] = True  # right padding
    kpm[1, :70] = True  # left padding, a whole key block
    kpm[2] = torch.rand(137) < 0.4
    check_cuda(Inputs(q, k, v, kwargs={"key_padding_mask": kpm.to(DEV)}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_mask_with_float_mask_and_causal(dtype):
    q, k, v = qkv(B=2, Hq=2, Lq=125, Lk=125, D=64, dtype=dtype)
    kpm = (torch.rand(2, 125) < 0.3).to(DEV)
    mask = rand_mask((2, 2, 125, 125), dtype)
    kwargs = {"key_padding_mask": kpm, "is_causal": True}
    check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_mask_equals_float_mask(dtype):
    q, k, v = qkv(B=2, Hq=2, Lq=9, Lk=140, D=64, dtype=dtype, requires_grad=False)
    kpm = torch.rand(2, 140) < 0.3
    kpm[:, 0] = False
    float_mask = torch.zeros(2, 1, 1, 140).masked_fill(kpm[:, None, None, :], -math.inf)
    a = memattn.attention(q, k, v, key_padding_mask=kpm.to(DEV))
    b = memattn.attention(q, k, v, attn_mask=float_mask.to(DEV, dtype))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


def _padding_patterns(Lk: int) -> torch.Tensor:
    """Key padding rows that exercise the kernels' key ranges (first padded key, last unpadded
    key + 1): right padding inside a block and on a block boundary, holes before the last
    unpadded key, left padding, no padding and all padding."""
    rows = torch.zeros(7, Lk, dtype=torch.bool)
    rows[0, 300:] = True  # right padding inside a 128-key block
    rows[1, 256:] = True  # right padding from a block boundary
    rows[2, 130:260] = True  # a hole of whole and partial blocks ...
    rows[2, 500:] = True  # ... before right padding
    rows[3, :200] = True  # left padding
    rows[4] = torch.rand(Lk) < 0.3  # scattered
    rows[4, 0] = False  # (so that every causal query keeps a key)
    rows[6] = True  # every key padded: the rows see nothing
    return rows  # row 5: no padding


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("D", "causal"), [(64, None), (128, None), (64, "top_left"), (128, "bottom_right")]
)
def test_key_padding_patterns_skip_blocks_exactly(dtype, kernel, D, causal, monkeypatch):
    """Key padding now runs in the lean kernels, which stop at each batch element's last
    unpadded key and read the mask per key only after its first padded key: every pattern must
    still match the reference, and fully padded batch elements give 0 / -inf / zero grads."""
    if kernel == "sm90" and (dtype == torch.float32 or not _is_hopper()):
        pytest.skip("the sm90 kernels run fp16/bf16 on compute capability 9.0")
    monkeypatch.setenv("MEMATTN_DISABLE_SM90", "0" if kernel == "sm90" else "1")
    kpm = _padding_patterns(600)
    q, k, v = qkv(B=7, Hq=4, Hk=2, Lq=150, Lk=600, D=D, dtype=dtype)
    kwargs = {"key_padding_mask": kpm.to(DEV)}
    if causal:
        kwargs |= {"is_causal": True, "causal_alignment": causal}
    out, lse, grads = check_cuda(Inputs(q, k, v, kwargs=kwargs))
    dead = torch.zeros(7, 4, 150, dtype=torch.bool)
    dead[6] = True
    if causal == "top_left":
        dead[3] = True  # left padding hides every key these 150 queries may see
    assert_dead_rows(out, lse, grads[0], dead)
    assert not grads[1][6].any() and not grads[2][6].any()


def test_key_range_scratch_is_checked():
    """The module checks the CUDA kernels' key-range scratch like grad_scratch."""
    from memattn import _memattn

    q, k, v = qkv(B=3, Hq=2, Lq=10, Lk=20, D=64, dtype=torch.bfloat16, requires_grad=False)
    out, lse = torch.empty_like(q), torch.empty(3, 2, 10, device=DEV)
    kpm = torch.zeros(3, 20, dtype=torch.bool, device=DEV)
    for scratch in (torch.empty(5, device=DEV), torch.empty(6, dtype=torch.float16, device=DEV)):
        with pytest.raises(ValueError, match=r"^key_range_scratch: .*2\*B = 6 elements"):
            _memattn.forward(
                q, k, v, out, lse, None, kpm,
                is_causal=False, causal_alignment="top_left", dropout_p=0.0, dropout_seed=0,
                scale=None, num_threads=1, key_range_scratch=scratch,
            )  # fmt: skip
        torch.cuda.synchronize()


# ---- fully masked rows -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_bool_mask(dtype):
    q, k, v = qkv(B=2, Hq=2, Lq=70, Lk=130, D=64, dtype=dtype)
    mask = torch.rand(2, 2, 70, 130) > 0.3
    mask[..., 0] = True  # every other row keeps a key
    mask[0, :, 3, :] = False
    mask[1, 1, :2, :] = False
    mask[1, 0, 64:, :] = False  # the rows of a whole query block
    out, lse, grads = check_cuda(Inputs(q, k, v, mask.to(DEV)))
    assert_dead_rows(out, lse, grads[0], ~mask.any(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_float_mask_neg_inf(dtype):
    q, k, v = qkv(B=1, Hq=2, Lq=8, Lk=130, D=64, dtype=dtype)
    mask = torch.randn(1, 2, 8, 130, dtype=torch.float64).to(dtype)
    mask[0, 0, 5, :] = -math.inf
    mask[0, 1, :, 4] = -math.inf  # partial -inf columns are ordinary masking
    mask = mask.to(DEV).requires_grad_(True)
    out, lse, grads = check_cuda(Inputs(q, k, v, mask))
    dead = torch.zeros(1, 2, 8, dtype=torch.bool)
    dead[0, 0, 5] = True
    assert_dead_rows(out, lse, grads[0], dead)
    assert torch.equal(grads[3][0, 0, 5].cpu(), torch.zeros(130, dtype=grads[3].dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_batch_by_key_padding(dtype):
    q, k, v = qkv(B=2, Hq=2, Lq=6, Lk=90, D=64, dtype=dtype)
    kpm = torch.zeros(2, 90, dtype=torch.bool)
    kpm[1] = True
    out, lse, grads = check_cuda(Inputs(q, k, v, kwargs={"key_padding_mask": kpm.to(DEV)}))
    dead = torch.zeros(2, 2, 6, dtype=torch.bool)
    dead[1] = True
    assert_dead_rows(out, lse, grads[0], dead)
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))
    assert torch.equal(grads[2][1], torch.zeros_like(grads[2][1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_causal_bottom_right(dtype):
    """Lq > Lk with bottom_right: the first Lq - Lk queries see no key."""
    q, k, v = qkv(B=1, Hq=2, Lq=150, Lk=40, D=64, dtype=dtype)
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right"}
    out, lse, grads = check_cuda(Inputs(q, k, v, kwargs=kwargs))
    dead = torch.zeros(1, 2, 150, dtype=torch.bool)
    dead[..., :110] = True
    assert_dead_rows(out, lse, grads[0], dead)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_from_mask_and_causal_combined(dtype):
    """Row 0 sees only key 0 under top_left causal; the mask removes key 0 for it."""
    q, k, v = qkv(B=1, Hq=1, Lq=66, Lk=66, D=64, dtype=dtype)
    mask = torch.ones(66, 66, dtype=torch.bool)
    mask[0, 0] = False
    out, lse, grads = check_cuda(Inputs(q, k, v, mask.to(DEV), kwargs={"is_causal": True}))
    dead = torch.zeros(1, 1, 66, dtype=torch.bool)
    dead[0, 0, 0] = True
    assert_dead_rows(out, lse, grads[0], dead)


# ---- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_bshd_views(dtype):
    """q, k, v as [B, L, H, D] memory viewed as [B, H, L, D] (nn.MHA's layout)."""
    Bn, Lq, Lk, Hq, Hk, D = 2, 70, 130, 4, 2, 64

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(DEV, dtype).requires_grad_()

    q, k, v = leaf(Bn, Lq, Hq, D), leaf(Bn, Lk, Hk, D), leaf(Bn, Lk, Hk, D)

    def prepare(q, k, v, m):
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m

    out, _, _ = check_cuda(Inputs(q, k, v, prepare=prepare))
    assert out.transpose(1, 2).is_contiguous(), "out should be laid out like q ([B, L, H, D])"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_qkv_and_non_unit_last_stride(dtype):
    """q, k, v split from one packed [B, L, 3, H, 2D] tensor: q with last stride 2, k a
    narrow, v the second half (a storage offset)."""
    Bn, L, Hn, D = 2, 75, 3, 64
    qkv_ = torch.randn(Bn, L, 3, Hn, 2 * D, dtype=torch.float64).to(DEV, dtype).requires_grad_()

    def prepare(p, k_, v_, m):
        q = p[:, :, 0, :, ::2].transpose(1, 2)
        k = p[:, :, 1, :, :D].transpose(1, 2)
        v = p[:, :, 2, :, D:].transpose(1, 2)
        return q, k, v, m

    dummy = torch.zeros(1, device=DEV)
    _, _, grads = check_cuda(Inputs(qkv_, dummy, dummy, prepare=prepare))
    assert grads[0].shape == qkv_.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows_and_pointers(dtype):
    """Rows that are not 16-byte aligned: a one-element storage offset and odd row strides."""
    Bn, Hn, Lq, Lk, D = 2, 2, 45, 77, 64
    q0 = torch.randn(Bn, Hn, Lq, D + 1, dtype=torch.float64).to(DEV, dtype).requires_grad_()
    k0 = torch.randn(Bn, Hn, Lk, D + 3, dtype=torch.float64).to(DEV, dtype).requires_grad_()
    v0 = torch.randn(Bn, Hn, Lk + 1, D, dtype=torch.float64).to(DEV, dtype).requires_grad_()

    def prepare(q, k, v, m):
        return q[..., 1:], k[..., :D], v[:, :, 1:], m

    check_cuda(Inputs(q0, k0, v0, prepare=prepare))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permuted_sliced_and_expanded(dtype):
    """q from a permuted, sequence-sliced tensor; k and v from every other batch entry, with
    their one head expanded to every query head (stride 0 on the head dim)."""

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(DEV, dtype).requires_grad_()

    q0 = leaf(4, 80, 3, 64)  # [B, Lq, Hq, D]
    k0 = leaf(3, 1, 130, 64)
    v0 = leaf(3, 1, 130, 96)

    def prepare(q, k, v, m):
        q = q.permute(0, 2, 1, 3)[1:3, :, 5:]
        return q, k[::2].expand(2, 3, 130, 64), v[::2].expand(2, 3, 130, 96), m

    check_cuda(Inputs(q0, k0, v0, prepare=prepare))


# ---- values and options ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude(dtype):
    """Scores in the hundreds: the online softmax must rescale without overflow."""
    q, k, v = qkv(B=1, Hq=2, Lq=133, Lk=147, D=32, dtype=dtype, magnitude=20.0)
    check_cuda(Inputs(q, k, v, kwargs={"is_causal": True}))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("rise", [3.0, 7.9, 8.1, 40.0])
def test_row_maximum_rising_across_key_blocks(dtype, D, rise):
    """Scores that rise by ``rise`` (log2 units) every 64 keys: the forwards' reference row
    maximum (at D = 256 it moves only past a jump of 8, sm80/softmax.cuh) must give the exact
    out and lse whether a block raises it or not, causal or not."""
    gen = torch.Generator().manual_seed(int(rise * 10) + D)
    B, H, L = 1, 2, 600
    u = torch.randn(D, dtype=torch.float64, generator=gen)
    u /= u.norm()
    steps = torch.arange(L, dtype=torch.float64) // 64  # 0, 0, ..., 1, 1, ...
    # q . k * D^-0.5 * log2(e) = rise * step (+ noise), with q = sqrt(D) u
    q = math.sqrt(D) * u + 0.1 * torch.randn(B, H, L, D, dtype=torch.float64, generator=gen)
    k = (rise / math.log2(math.e)) * steps[:, None] * u + 0.1 * torch.randn(
        B, H, L, D, dtype=torch.float64, generator=gen
    )
    v = torch.randn(B, H, L, D, dtype=torch.float64, generator=gen)
    q, k, v = (t.to(DEV, dtype).requires_grad_() for t in (q, k, v))
    for causal in (False, True):
        check_cuda(Inputs(q, k, v, kwargs={"is_causal": causal}), backward=D <= 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.5, 1e-3, 3.0])
def test_scale(dtype, scale):
    q, k, v = qkv(B=1, Hq=2, Lq=67, Lk=139, D=64, dtype=dtype)
    check_cuda(Inputs(q, k, v, kwargs={"scale": scale}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_scale_is_inverse_sqrt_d(dtype):
    q, k, v = qkv(D=64, Lq=40, Lk=70, dtype=dtype, requires_grad=False)
    a = memattn.attention(q, k, v)
    b = memattn.attention(q, k, v, scale=1 / 8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_sdpa(dtype):
    """Same conventions as torch's SDPA on CUDA (bool True = attend, scale, causal)."""
    q, k, v = qkv(B=2, Hq=4, Lq=96, Lk=96, D=64, dtype=dtype, requires_grad=False)
    mask = bool_mask((2, 4, 96, 96), 0.8)
    mask[..., 0] = True
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}, {"scale": 0.3}):
        ours = memattn.attention(q, k, v, **kwargs)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(ours, theirs, **tol)


def test_grad_only_for_v_and_no_grad():
    q, k, v = qkv(Lq=40, Lk=70, D=64, dtype=torch.bfloat16)
    q.requires_grad_(False)
    k.requires_grad_(False)
    check_cuda(Inputs(q, k, v))
    with torch.no_grad():
        assert not memattn.attention(q, k, v).requires_grad


def test_forward_saves_only_out_and_lse():
    q, k, v = qkv(B=1, Hq=2, Lq=64, Lk=64, D=64, dtype=torch.bfloat16)
    kpm = torch.zeros(1, 64, dtype=torch.bool, device=DEV)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, lse = memattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    allowed = {id(t) for t in (q, k, v, kpm)}
    for t in saved:
        if id(t) not in allowed:
            assert t.shape in (out.shape, lse.shape), f"unexpected saved tensor {tuple(t.shape)}"


# ---- dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_same_seed_same_result(dtype):
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=70, Lk=130, D=64, dtype=dtype)
    runs = []
    for _ in range(2):
        out = memattn.attention(q, k, v, dropout_p=0.3, generator=seeded_generator(7))
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    other = memattn.attention(q, k, v, dropout_p=0.3, generator=seeded_generator(8))
    assert not torch.equal(runs[0][0], other)


def test_dropout_default_generator_follows_manual_seed():
    q, k, v = qkv(Lq=40, Lk=70, D=64, dtype=torch.bfloat16, requires_grad=False)
    torch.manual_seed(123)
    a = memattn.attention(q, k, v, dropout_p=0.2)
    b = memattn.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(123)
    c = memattn.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", DROPOUT_CALLS, ids=DROPOUT_CALL_IDS)
def test_dropout_mask_is_the_cpu_backends(dtype, kwargs):
    """CPU and CUDA key the same Philox stream the same way: one seed, one mask."""
    p, seed = 0.3, 99
    Bn, Hq, Hk, Lq, Lk = 2, 4, 2, 70, 128
    kwargs = dropout_call_kwargs(kwargs, Bn, Lk)
    # magnitude 0.5: scores ~ N(0, 1/16), so no kept weight is near fp16's underflow
    q, k, _ = make_qkv(B=Bn, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=64, magnitude=0.5, requires_grad=False)
    cpu = recover_keep_mask(q.double(), k.double(), p, seed, **kwargs)
    cuda_kwargs = {n: t.to(DEV) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
    gpu = recover_keep_mask(q.to(DEV, dtype), k.to(DEV, dtype), p, seed, **cuda_kwargs)
    assert torch.equal(gpu, cpu), f"{(gpu != cpu).sum().item()} keep decisions differ"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction(p):
    q, k, _ = qkv(B=2, Hq=4, Lq=64, Lk=256, D=64, dtype=torch.bfloat16, requires_grad=False)
    keep = recover_keep_mask(q, k, p, seed=11)
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(frac - (1 - p)) < 6 * sigma, f"keep fraction {frac:.4f}, want {1 - p}"
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_dropout_matches_cpu_backend_fp32():
    """Same inputs, same seed: the CUDA (SIMT) result is the CPU backend's, up to rounding."""
    p, seed = 0.25, 4321
    q, k, v = make_qkv(B=2, Hq=4, Hk=2, Lq=70, Lk=150, D=64, Dv=48)
    mask = torch.randn(1, 4, 70, 150, requires_grad=True)
    kpm = torch.rand(2, 150) < 0.2
    kwargs = {"is_causal": True, "causal_alignment": "bottom_right"}
    grad_out = torch.randn(2, 4, 70, 48)
    results = []
    for dev in ("cpu", DEV):
        leaves = [t.detach().to(dev).requires_grad_() for t in (q, k, v, mask)]
        out = memattn.attention(
            *leaves[:3],
            attn_mask=leaves[3],
            key_padding_mask=kpm.to(dev),
            dropout_p=p,
            generator=seeded_generator(seed),
            **kwargs,
        )
        grads = torch.autograd.grad(out, leaves, grad_out.to(dev))
        results.append([t.detach().cpu() for t in (out, *grads)])
    for name, a, b in zip(("out", "q", "k", "v", "mask"), *results, strict=True):
        tol = 1e-5 * max(1.0, a.abs().max().item())
        assert (a - b).abs().max().item() <= tol, f"{name}: CPU and CUDA differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", DROPOUT_CALLS, ids=DROPOUT_CALL_IDS)
@pytest.mark.parametrize("Lk", [100, 128], ids=["mask_per_element", "mask_tiles"])
def test_dropout_forward_and_backward_match_reference(dtype, kwargs, Lk):
    """Backward uses exactly the forward's mask: fwd and grads match the reference driven by
    the mask recovered from memattn's own output. Lk = 128 gives attn_mask rows of whole
    16-byte units, which the Hopper kernels copy by tiles."""
    p, seed = 0.3, 1234
    Bn, Hq, Hk, Lq, D, Dv = 2, 4, 2, 70, 64, 64
    kwargs = dropout_call_kwargs(kwargs, Bn, Lk, DEV)
    q, k, v = qkv(B=Bn, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype)
    # Recovered in float32 (the SIMT kernels; no rounding turns a kept weight into 0).
    keep = recover_keep_mask(q.detach().float(), k.detach().float(), p, seed, **kwargs)
    mask = rand_mask((1, Hq, Lq, Lk), dtype)

    poison_cuda_cache()
    out = memattn.attention(
        q, k, v, attn_mask=mask, dropout_p=p, generator=seeded_generator(seed), **kwargs
    )
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out.to(DEV, dtype))

    assert_dropout_matches_reference(out, grads, (q, k, v, mask), grad_out, keep, p, dtype, kwargs)


@pytest.mark.parametrize("D", [96, 64])
def test_dropout_lse_is_before_dropout(D):
    """lse is that of the probabilities before dropout: the same as without dropout. At D = 96
    both calls sum the rows alike, so the lse agree to float32 rounding; at D <= 64 the sm90
    forward without dropout sums the 16-bit P on the tensor cores and the dropout kernel the
    float32 P, so they agree to the 16-bit P's rounding (lse after dropout would be ~0.7 off)."""
    q, k, v = qkv(Lq=70, Lk=130, D=D, dtype=torch.bfloat16, requires_grad=False)
    _, lse_drop = memattn.attention(
        q, k, v, dropout_p=0.5, return_lse=True, generator=seeded_generator(1)
    )
    _, lse = memattn.attention(q, k, v, return_lse=True)
    tol = 1e-6 if D > 64 else 2e-3
    torch.testing.assert_close(lse_drop, lse, rtol=tol, atol=tol)


# ---- determinism, streams, devices, memory ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_run_to_run(dtype):
    """Same call, same bits, forward and backward: GQA (dk/dv summed over the query heads of
    a group), a float mask whose gradient is summed over the batch, many blocks per row."""
    q, k, v = qkv(B=2, Hq=8, Hk=2, Lq=1000, Lk=1000, D=64, dtype=dtype)
    mask = rand_mask((1, 8, 1000, 1000), dtype)
    kpm = (torch.rand(2, 1000) < 0.1).to(DEV)
    grad = torch.randn(2, 8, 1000, 64, device=DEV, dtype=dtype)
    runs = []
    for _ in range(3):
        out = memattn.attention(
            q,
            k,
            v,
            attn_mask=mask,
            key_padding_mask=kpm,
            is_causal=True,
            dropout_p=0.1,
            generator=seeded_generator(5),
        )
        runs.append((out, *torch.autograd.grad(out, (q, k, v, mask), grad)))
    for other in runs[1:]:
        for name, a, b in zip(("out", "q", "k", "v", "mask"), runs[0], other, strict=True):
            assert torch.equal(a, b), f"{name}: not bit-identical run to run"


def test_runs_on_the_current_stream():
    """memattn launches on torch's current stream: inputs written on a side stream behind a
    long sleep are read only after they are written."""
    base = qkv(B=2, Hq=4, Lq=256, Lk=256, D=64, dtype=torch.float16, requires_grad=False)
    want = memattn.attention(*base, is_causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q, k, v = (t * 1 for t in base)
        got = memattn.attention(q, k, v, is_causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_backward_on_a_side_stream():
    q, k, v = qkv(B=2, Hq=4, Lq=256, Lk=256, D=64, dtype=torch.bfloat16)
    out = memattn.attention(q, k, v, is_causal=True)
    want = torch.autograd.grad(out.sum(), (q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q2, k2, v2 = (t.detach() * 1 for t in (q, k, v))
        for t in (q2, k2, v2):
            t.requires_grad_()
        out2 = memattn.attention(q2, k2, v2, is_causal=True)
        got = torch.autograd.grad(out2.sum(), (q2, k2, v2))
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    q, k, v = qkv(B=2, Hq=4, Lq=100, Lk=130, D=64, dtype=torch.bfloat16)
    want = memattn.attention(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    leaves = [t.detach().to("cuda:1").requires_grad_() for t in (q, k, v)]
    with torch.cuda.device(0):
        got = memattn.attention(*leaves, is_causal=True)
        got_grads = torch.autograd.grad(got.sum(), leaves)
    assert got.device == torch.device("cuda:1")
    assert torch.equal(got.cpu(), want.cpu())
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


def test_tensors_on_other_devices_are_refused():
    q, k, v = qkv(Lq=10, Lk=12, D=64, dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        memattn.attention(q, k, v, key_padding_mask=torch.zeros(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        memattn.attention(q, k, v, attn_mask=torch.ones(10, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="k"):
        memattn.attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match="generator"):
        memattn.attention(q, k, v, dropout_p=0.1, generator=torch.Generator(DEV))


def test_memory_is_linear_in_sequence_length():
    """Forward and backward never materialise Lq x Lk (1 GiB here): extra memory beyond the
    outputs stays within a few O(L) buffers."""
    Bn, Hn, L, D = 1, 8, 8192, 64
    q, k, v = qkv(B=Bn, Hq=Hn, Lq=L, D=D, dtype=torch.bfloat16)
    grad = torch.randn(Bn, Hn, L, D, device=DEV, dtype=torch.bfloat16)
    tensor_bytes = q.numel() * q.element_size()  # 8 MiB
    scores_bytes = Bn * Hn * L * L * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = memattn.attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - before
    assert fwd_peak <= tensor_bytes + 16 * 2**20, f"forward peak {fwd_peak / 2**20:.1f} MiB"
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - before
    # grads (3 x 8 MiB) plus fp32 scratch of O(L) (e.g. a dq accumulator, 16 MiB)
    assert bwd_peak <= 8 * tensor_bytes + 32 * 2**20 < scores_bytes, (
        f"backward peak {bwd_peak / 2**20:.1f} MiB"
    )
    del grads


# ---- a long sequence -------------------------------------------------------------------------


def _chunked_attention(q, k, v, *, is_causal, dtype, chunk=1024):
    """Plain attention (explicit softmax) in ``dtype`` on q's device, a block of query rows at a
    time (the whole score matrix would not fit at this length in float64). Differentiable."""
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    Lq, Lk = q.shape[2], k.shape[2]
    outs, lses = [], []
    for i0 in range(0, Lq, chunk):
        s = (qc[:, :, i0 : i0 + chunk] @ kc.transpose(-2, -1)) * scale
        if is_causal:
            i = torch.arange(i0, min(i0 + chunk, Lq), device=q.device)[:, None]
            j = torch.arange(Lk, device=q.device)[None, :]
            s = s.masked_fill(j > i, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse[..., None]) @ vc)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_long_sequence_8192_bf16(is_causal):
    """L = 8192, D = 128, bf16: out, lse and grads against float64 math on the GPU (chunked),
    with bf16 math as the tolerance baseline."""
    q, k, v = qkv(B=1, Hq=2, Lq=8192, D=128, dtype=torch.bfloat16)
    grad_out = torch.randn(1, 2, 8192, 128, dtype=torch.float64, device=DEV)
    poison_cuda_cache()
    out, lse = memattn.attention(q, k, v, is_causal=is_causal, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(torch.bfloat16))
    results = {}
    for name, dt in (("ref64", torch.float64), ("low", torch.bfloat16)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        ref, ref_lse = _chunked_attention(*leaves, is_causal=is_causal, dtype=dt)
        ref_grads = torch.autograd.grad(ref, leaves, grad_out.to(dt))
        results[name] = [t.detach().cpu() for t in (ref, ref_lse, *ref_grads)]
        del ref, ref_lse, ref_grads, leaves
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    for i, (name, got) in enumerate(zip(names, (out, lse, *grads), strict=True)):
        assert_close_policy(name, got, results["ref64"][i], results["low"][i], torch.bfloat16)


# ---- property-based --------------------------------------------------------------------------


@st.composite
def cuda_calls(draw):
    Hk = draw(st.integers(1, 3))
    return {
        "dtype": draw(st.sampled_from(DTYPES)),
        "B": draw(st.integers(1, 3)),
        "Hk": Hk,
        "Hq": Hk * draw(st.sampled_from([1, 2, 4])),
        "Lq": draw(st.integers(1, 200)),
        "Lk": draw(st.integers(1, 200)),
        "D": draw(st.sampled_from([8, 32, 33, 64, 80, 128, 256])),
        "Dv": draw(st.sampled_from([None, 16, 64, 100])),
        "is_causal": draw(st.booleans()),
        "alignment": draw(st.sampled_from(["top_left", "bottom_right"])),
        "mask": draw(st.sampled_from(["none", "bool", "float", "float_grad"])),
        "present": draw(st.tuples(*[st.booleans()] * 4)),
        "kpm": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(call=cuda_calls())
def test_matches_reference_property(call):
    torch.manual_seed(call["seed"])
    dtype, Bn, Hq, Lq, Lk = call["dtype"], call["B"], call["Hq"], call["Lq"], call["Lk"]
    q, k, v = qkv(B=Bn, Hq=Hq, Hk=call["Hk"], Lq=Lq, Lk=Lk, D=call["D"], Dv=call["Dv"], dtype=dtype)
    shape = tuple(
        n if keep else 1 for n, keep in zip((Bn, Hq, Lq, Lk), call["present"], strict=True)
    )
    mask = None
    if call["mask"] == "bool":
        mask = bool_mask(shape, 0.75)
    elif call["mask"] != "none":
        mask = rand_mask(shape, dtype, requires_grad=call["mask"] == "float_grad")
    kwargs = {"is_causal": call["is_causal"], "causal_alignment": call["alignment"]}
    if call["kpm"]:
        kwargs["key_padding_mask"] = (torch.rand(Bn, Lk) < 0.3).to(DEV)
    check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


# ---- autograd integration: opcheck and torch.compile -----------------------------------------


def _op_args(dtype, *, requires_grad=True, dropout=False):
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=37, Lk=70, D=64, dtype=dtype, requires_grad=requires_grad)
    mask = rand_mask((1, 4, 37, 70), dtype, requires_grad=requires_grad)
    kpm = torch.zeros(2, 70, dtype=torch.bool, device=DEV)
    kpm[1, -5:] = True
    seed = torch.tensor([42], dtype=torch.int64) if dropout else None
    return (q, k, v, mask, kpm, True, "bottom_right", 0.2 if dropout else 0.0, seed, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
def test_opcheck_forward_cuda(dtype, dropout):
    args = _op_args(dtype, dropout=dropout)
    torch.library.opcheck(torch.ops.memattn.attention_forward.default, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck_backward_cuda(dtype):
    q, k, v, mask, kpm, causal, align, p, seed, scale = _op_args(dtype, requires_grad=False)
    out, lse = torch.ops.memattn.attention_forward(
        q, k, v, mask, kpm, causal, align, p, seed, scale
    )
    args = (torch.randn_like(out), q, k, v, out, lse, mask, kpm)
    args += (causal, align, p, seed, scale, True)
    torch.library.opcheck(torch.ops.memattn.attention_backward.default, args)


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("aot_eager", torch.bfloat16), ("aot_eager", torch.float32), ("inductor", torch.bfloat16)],
    ids=str,
)
def test_compile_fullgraph_matches_eager(backend, dtype):
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=70, Lk=130, D=64, dtype=dtype)
    mask = rand_mask((1, 4, 70, 130), dtype)
    kpm = (torch.rand(2, 130) < 0.3).to(DEV)
    torch._dynamo.reset()
    results = []
    for f in (
        masked_causal_attention,
        torch.compile(masked_causal_attention, fullgraph=True, backend=backend),
    ):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mask)]
        out = f(*leaves, kpm)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out, *grads))
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, **tol)


def test_compile_dynamic_shapes_and_dropout():
    def fn(q, k, v):
        return memattn.attention(q, k, v, is_causal=True, dropout_p=0.2)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for Lq in (5, 70, 129):
        q, k, v = qkv(B=1, Hq=2, Lq=Lq, Lk=Lq + 3, D=64, dtype=torch.bfloat16)
        torch.manual_seed(Lq)
        got = compiled(q, k, v)
        torch.manual_seed(Lq)
        want = fn(q, k, v)
        assert torch.equal(got, want)
        g_got = torch.autograd.grad(got.sum(), (q, k, v))
        g_want = torch.autograd.grad(want.sum(), (q, k, v))
        for a, b in zip(g_got, g_want, strict=True):
            assert torch.equal(a, b)


# ---- explain / inspect -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_explain_names_the_cuda_kernel(dtype, D):
    """fp16 / bf16 on a fast head dim: a tensor-core kernel (sm80 / sm90); fp32: SIMT."""
    q, k, v = qkv(B=1, Hq=2, Lq=128, D=D, dtype=dtype, requires_grad=False)
    for backward in (False, True):
        plan = memattn.explain(q, k, v, is_causal=True, backward=backward)
        name = _kernel_name(plan)
        assert plan["backend"].startswith("cuda"), plan
        assert plan["kernel"], plan
        assert plan["reason"], plan
        if dtype == torch.float32:
            assert "simt" in name.lower(), plan
        else:
            assert "simt" not in name.lower(), plan
            assert re.search(r"sm_?\d{2,3}", name), plan
        verdicts = dict(plan["verdicts"])
        assert verdicts[plan["backend"]] == []
        assert verdicts["cpu"], "the CPU backend must say why it was not taken"
        assert plan.get("layout_copies") == [], plan  # contiguous, aligned: nothing copied


def _is_hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def _sm90_built() -> bool:
    return "sm_90a" in memattn.build_info().get("cuda_summary", "")


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_runs_the_sm90_kernels(dtype, monkeypatch):
    """On H100/H200 the forward takes the wgmma/TMA kernels at every head dim, the backward at
    every head dim too, except over 128 columns for calls with attn_mask or dropout and under
    deterministic mode (sm80 there); MEMATTN_DISABLE_SM90=1 sends both passes to sm80."""
    assert _sm90_built(), memattn.build_info()
    for D in (64, 128, 96, 256, 200):
        q, k, v = qkv(B=1, Hq=2, Lq=100, D=D, dtype=dtype, requires_grad=False)
        assert memattn.explain(q, k, v)["kernel"].startswith("cuda/sm90/"), D
        plan = memattn.explain(q, k, v, backward=True)
        assert plan["kernel"].startswith("cuda/sm90/"), (D, plan)
    mask = bool_mask((1, 2, 100, 100))
    for kwargs in ({"attn_mask": mask}, {"dropout_p": 0.1}):
        plan = memattn.explain(q, k, v, backward=True, **kwargs)
        assert plan["kernel"] == "cuda/sm80/" + plan["kernel"].split("/", 2)[2], (kwargs, plan)
        assert plan["backward_passes"] == 2, plan
    torch.use_deterministic_algorithms(True)
    try:
        plan = memattn.explain(q, k, v, backward=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert plan["kernel"].startswith("cuda/sm80/") and plan["backward_passes"] == 2, plan
    monkeypatch.setenv("MEMATTN_DISABLE_SM90", "1")
    assert memattn.explain(q, k, v)["kernel"].startswith("cuda/sm80/")
    q, k, v = qkv(B=1, Hq=2, Lq=100, D=128, dtype=dtype, requires_grad=False)
    plan = memattn.explain(q, k, v, backward=True)
    assert plan["kernel"].startswith("cuda/sm80/") and plan["backward_passes"] == 2, plan


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("D", "Dv"),
    [(64, 64), (40, 40), (64, 48), (128, 128), (100, 100), (128, 64), (256, 256), (256, 160)],
    ids=str,
)
def test_hopper_staged_output_across_many_tiles(dtype, D, Dv):
    """The sm90 forward writes each tile's output through shared memory and TMA stores
    (ForwardTraits::kOut): the lean D = 64 (64-row tiles here; the wide tiles in
    test_hopper_wide_tiles_d64) and D = 128 kernels through a staging tile of their own (D = 128
    next to two Q buffers), D = 256 and the masked (general) D = 128 kernel through each
    warpgroup's half of the tile's Q buffer; the general D = 64 kernel from registers. More tiles than CTAs, so every CTA reuses its
    staging rows and Q buffers; a partial last query tile (rows past Lq are not written); value
    head dims whose last 64-column chunk is partial or absent; a fully padded batch entry (tiles
    no key is visible to, written from registers: zeros, lse -inf); a bool mask (the general
    kernel). Outputs start from a poisoned allocator cache."""
    q, k, v = qkv(B=3, Hq=48, Lq=300, Lk=200, D=D, Dv=Dv, dtype=dtype)
    check_cuda(Inputs(q, k, v), backward=False)
    kpm = torch.zeros(3, 200, dtype=torch.bool)
    kpm[1] = True
    kpm[2, 150:] = True
    out, lse, _ = check_cuda(
        Inputs(q, k, v, kwargs={"key_padding_mask": kpm.to(DEV)}), backward=False
    )
    assert torch.all(out[1] == 0)
    assert torch.all(lse[1] == -math.inf)
    mask = torch.rand(300, 200) < 0.7
    mask[7] = False  # a fully masked row
    check_cuda(Inputs(q, k, v, mask.to(DEV)), backward=False)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 40], ids=str)
def test_hopper_wide_tiles_d64(dtype, D):
    """Calls of head dim <= 64 without masks or dropout with Lq >= 768 (causal: 1536), Lk > 384
    and (non-causal) at least 256 tiles of 192 rows run the sm90 forward on 192-row tiles of
    three consumer warpgroups (launch.h, sm90_wide_tiles; explain names the kernel
    ".../d64/wide"), which end at Lq: Lq = 1100 =
    5 * 192 + 140 leaves a first query tile that starts 52 rows before row 0 (its first
    warpgroup stores its output from registers, the others through TMA); those light
    tiles come after all full ones (tile_order.h, light_tiles_last), Lq = 1152 = 6 * 192 has
    none. More tiles than CTAs (a CTA reuses its Q buffer); Lk = 1000 a partial last key block;
    GQA; a fully padded batch entry (tiles without key blocks between a CTA's other tiles) and a
    right-padded one. Lq < 768, Lk <= 384 and fewer tiles keep the 64-row tiles. Outputs start
    from a poisoned allocator cache."""
    q, k, v = qkv(B=2, Hq=24, Hk=8, Lq=1100, Lk=1000, D=D, dtype=dtype, requires_grad=False)
    assert memattn.explain(q, k, v)["kernel"].endswith("/d64/wide")
    check_cuda(Inputs(q, k, v), backward=False)
    q_whole = qkv(B=2, Hq=24, Hk=8, Lq=1152, Lk=1000, D=D, dtype=dtype, requires_grad=False)[0]
    check_cuda(Inputs(q_whole, k, v), backward=False)
    kpm = torch.zeros(2, 1000, dtype=torch.bool)
    kpm[0, 777:] = True
    kpm[1] = True
    kwargs = {"key_padding_mask": kpm.to(DEV)}
    assert memattn.explain(q, k, v, **kwargs)["kernel"].endswith("/d64/wide")
    out, lse, _ = check_cuda(Inputs(q, k, v, kwargs=kwargs), backward=False)
    assert torch.all(out[1] == 0)
    assert torch.all(lse[1] == -math.inf)
    assert not memattn.explain(q, k, v, is_causal=True)["kernel"].endswith("/wide")
    q768 = torch.empty(2, 32, 768, D, device=DEV, dtype=dtype)  # 64 bh x 4 tiles of 192 rows
    assert memattn.explain(q768, k[:, :8], v[:, :8])["kernel"].endswith("/d64/wide")
    assert not memattn.explain(q768[:, :, :767], k[:, :8], v[:, :8])["kernel"].endswith("/wide")
    assert not memattn.explain(q768[:1], k[:1, :8], v[:1, :8])["kernel"].endswith("/wide")
    assert not memattn.explain(q, k[:, :, :384], v[:, :, :384])["kernel"].endswith("/wide")
    assert memattn.explain(q, k[:, :, :385], v[:, :, :385])["kernel"].endswith("/d64/wide")
    assert not memattn.explain(q, k, v, dropout_p=0.1)["kernel"].endswith("/wide")


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [128, 256, 64], ids=str)
def test_hopper_causal_tiles_in_pairs(dtype, D):
    """The sm90 forward takes the tiles of a causal call with fewer than 64 bh in pairs of equal
    cost (forward.cuh, launch_forward; tile_order.h, paired_tile), a bh's query blocks M - 1 - k
    and k on one CTA, and those of one with more in snake order. Lq = 1100: M = 9 tiles per bh
    of 128 rows at D = 128 / 256 (four pairs and a middle tile), 18 of 64 rows at D = 64; 48 bh:
    full rounds of pairs on the persistent grid, pairs left over and middle tiles; 80 bh: the
    snake. Both alignments; bottom-right with Lq > Lk leaves the first 100 rows without a
    visible key (0, lse -inf). Outputs start from a poisoned allocator cache."""
    for Hq in (24, 40):
        q, k, v = qkv(B=2, Hq=Hq, Hk=8, Lq=1100, Lk=1000, D=D, dtype=dtype, requires_grad=False)
        check_cuda_both_alignments(q, k, v)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 40], ids=str)
@pytest.mark.parametrize("Lk", [77, 80, 9, 1], ids=str)
def test_hopper_short_keys_d64(dtype, D, Lk):
    """Calls of head dim <= 64 without masks or dropout whose keys fit one block of 80
    (launch.h, sm90_short_keys) run the sm90 forward with 80-key blocks (explain names the
    kernel ".../d64/short_keys"): Lk = 77 (CLIP's text tokens) and 9 leave zero-filled keys in
    the block, 80 fills it. Lq = 333: more tiles than CTAs and a partial last query tile; GQA;
    both causal alignments (bottom-right with Lq > Lk leaves rows without a key: 0, lse -inf);
    key padding with a fully padded batch entry. Lk = 81 keeps the 128-key blocks. Outputs
    start from a poisoned allocator cache."""
    q, k, v = qkv(B=2, Hq=36, Hk=12, Lq=333, Lk=Lk, D=D, dtype=dtype, requires_grad=False)
    assert memattn.explain(q, k, v)["kernel"].endswith("/d64/short_keys")
    check_cuda(Inputs(q, k, v), backward=False)
    check_cuda_both_alignments(q, k, v)
    check_cuda_fully_padded_entry(q, k, v, Lk // 2 + 1)
    k81, v81 = qkv(B=2, Hq=36, Hk=12, Lq=8, Lk=81, D=D, dtype=dtype, requires_grad=False)[1:]
    assert not memattn.explain(q, k81, v81)["kernel"].endswith("/short_keys")
    assert not memattn.explain(q, k, v, dropout_p=0.1)["kernel"].endswith("/short_keys")


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 40], ids=str)
@pytest.mark.parametrize(("Lq", "Lk"), [(700, 700), (1100, 1000), (128, 81), (130, 97)], ids=str)
def test_hopper_narrow_blocks_d64(dtype, D, Lq, Lk, monkeypatch):
    """The sm90 forward's 64-row tiles with 64-key blocks, three CTAs per multiprocessor
    (TileShape::narrow), which causal calls of head dim <= 64 without masks or dropout take when
    they are too short for the wide tiles, their rows see no more keys than there are queries
    and they have at least 4096 query tiles of 64 rows (launch.h, sm90_narrow_blocks; explain
    names the kernel ".../d64/narrow"). Run here through MEMATTN_SM90_D64_TILES=narrow on calls
    small enough for the reference: Lq = 700, eleven query tiles, the last partial; Lq = 1100
    with 48 and 24 bh, Lk = 1000 a partial last key block; Lq = 128 and 130: two and three query
    tiles, Lk = 81 and 97 a second key block of 17 and 33 keys. GQA; both alignments
    (bottom-right with Lq > Lk leaves rows without a key: 0, lse -inf); key padding with a fully
    padded batch entry; non-causal. Outputs start from a poisoned allocator cache."""
    monkeypatch.setenv("MEMATTN_SM90_D64_TILES", "narrow")
    for Hq in (48, 24) if Lq == 1100 else (12,):
        q, k, v = qkv(B=2, Hq=Hq, Hk=Hq // 3, Lq=Lq, Lk=Lk, D=D, dtype=dtype, requires_grad=False)
        assert memattn.explain(q, k, v, is_causal=True)["kernel"].endswith("/d64/narrow")
        check_cuda_both_alignments(q, k, v)
    check_cuda_fully_padded_entry(q, k, v, Lk // 2 + 1, is_causal=True)
    check_cuda(Inputs(q, k, v), backward=False)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("Lk", [512, 100, 64], ids=str)
def test_hopper_d256_narrow_blocks(dtype, Lk):
    """The sm90 D = 256 forward without masks or dropout runs 64-key blocks instead of 80-key
    ones where fewer key columns are computed that way (launch.h, sm90_d256_narrow_blocks;
    explain names the kernel ".../d256/narrow"): Lk = 512 (eight blocks where 80-key blocks
    take seven, the last with 32 keys), 100 (a second block of 36 keys), 64 (one block).
    Lq = 300: three query tiles, the last partial; GQA; D = 200 (TMA's zero columns); both
    causal alignments (bottom-right with Lq > Lk leaves rows without a key: 0, lse -inf); key
    padding with a fully padded batch entry. Lk = 400 / 640 keep the 80-key blocks, and so do
    masked calls. Outputs start from a poisoned allocator cache."""
    for D in (200, 256):
        q, k, v = qkv(B=2, Hq=6, Hk=2, Lq=300, Lk=Lk, D=D, dtype=dtype, requires_grad=False)
        assert memattn.explain(q, k, v)["kernel"].endswith("/d256/narrow")
        check_cuda(Inputs(q, k, v), backward=False)
    check_cuda_both_alignments(q, k, v)
    check_cuda_fully_padded_entry(q, k, v, Lk // 3)
    for other in (400, 640):
        k_other = torch.empty(2, 2, other, 256, device=DEV, dtype=dtype)
        assert memattn.explain(q, k_other, k_other)["kernel"].endswith("/d256")
    mask = torch.ones(300, Lk, dtype=torch.bool, device=DEV)
    assert memattn.explain(q, k, v, attn_mask=mask)["kernel"].endswith("/d256")


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_d64_tile_shape_rules(dtype, monkeypatch):
    """Which tile shape a D = 64 forward without features runs on (launch.h,
    sm90_d64_tile_shape), as explain names it: the narrow tiles for causal calls with Lk <= Lq,
    Lq < 1536 and at least 4096 query tiles of 64 rows; MEMATTN_SM90_D64_TILES overrides the
    rules for every such call, and a value that names no shape is an error."""
    monkeypatch.delenv("MEMATTN_SM90_D64_TILES", raising=False)

    def kernel(q, k, **kwargs):
        return memattn.explain(q, k, k, **kwargs)["kernel"]

    q = torch.empty(4, 64, 1024, 64, device=DEV, dtype=dtype)  # 4096 tiles of 64 rows
    k = torch.empty(4, 16, 1024, 64, device=DEV, dtype=dtype)
    assert kernel(q, k, is_causal=True).endswith("/d64/narrow")
    assert kernel(q[:, :, :1000], k[:, :, :1000], is_causal=True).endswith("/d64/narrow")
    assert kernel(q, k, is_causal=True, causal_alignment="bottom_right").endswith("/d64/narrow")
    assert kernel(q[:3], k[:3], is_causal=True).endswith("/d64")  # 3072 tiles
    assert kernel(q[:, :, :1000], k, is_causal=True).endswith("/d64")  # Lk > Lq
    assert kernel(q, k).endswith("/d64/wide")
    assert not kernel(q, k, is_causal=True, dropout_p=0.1).endswith("/narrow")
    q_long = torch.empty(2, 32, 1536, 64, device=DEV, dtype=dtype)
    assert kernel(q_long, k[:2, :8, :1536], is_causal=True).endswith("/d64/wide")
    small = torch.empty(1, 2, 100, 64, device=DEV, dtype=dtype)
    for shape in ("standard", "wide", "short_keys", "narrow"):
        monkeypatch.setenv("MEMATTN_SM90_D64_TILES", shape)
        suffix = "/d64" if shape == "standard" else f"/d64/{shape}"
        assert kernel(small, small).endswith(suffix)
    monkeypatch.setenv("MEMATTN_SM90_D64_TILES", "square")
    with pytest.raises(RuntimeError, match="MEMATTN_SM90_D64_TILES=square: expected standard"):
        memattn.attention(small, small, small)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", ["standard", "wide", "short_keys", "narrow"], ids=str)
def test_hopper_d64_tile_shapes_on_any_call(dtype, shape, monkeypatch):
    """Each D = 64 forward tile shape computes any call, not only those its rule gives it
    (MEMATTN_SM90_D64_TILES): queries shorter than a wide tile, keys past one 80-key block,
    non-causal calls on the narrow tiles, causal ones with Lk > Lq; GQA, key padding with a
    fully padded batch entry, and causal calls with key padding that has holes (padded keys
    before unpadded ones, read per key) or none (the wide tiles' row key ends). Outputs start
    from a poisoned allocator cache."""
    monkeypatch.setenv("MEMATTN_SM90_D64_TILES", shape)
    for Lq, Lk in ((100, 300), (333, 200), (1, 500)):
        q, k, v = qkv(B=2, Hq=6, Hk=2, Lq=Lq, Lk=Lk, D=64, dtype=dtype, requires_grad=False)
        assert memattn.explain(q, k, v)["kernel"].split("/")[-1] == (
            "d64" if shape == "standard" else shape
        )
        check_cuda(Inputs(q, k, v), backward=False)
        check_cuda_both_alignments(q, k, v)
        check_cuda_fully_padded_entry(q, k, v, Lk // 3)
        kpm = torch.zeros(2, Lk, dtype=torch.bool)
        kpm[0, Lk // 4 : Lk // 2] = True  # a hole
        kpm[1, Lk // 2 :] = True
        for alignment in ("top_left", "bottom_right"):
            kwargs = {"key_padding_mask": kpm.to(DEV), "is_causal": True}
            check_cuda(
                Inputs(q, k, v, kwargs={**kwargs, "causal_alignment": alignment}), backward=False
            )


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", ["standard", "wide", "narrow"], ids=str)
@pytest.mark.parametrize("D", [64, 40])
def test_hopper_d64_row_sums_on_tensor_cores(dtype, shape, D, monkeypatch):
    """The D <= 64 forward tiles without features sum each row's P in P V, through a chunk of
    ones after each V stage (forward.cuh, kSumsOnTensorCores). q = 0 makes every visible score 0,
    so P = 1 and a row's sum is its count of visible keys: lse = ln(count) and out = the mean of
    the visible V rows, over 4999 keys (39 blocks, the last partial), with key padding that
    leaves 1 / 2345 keys to the two batch entries. Then scores over a wide range (q * 4), and
    the rows of a bottom-right causal call that see no key (out 0, lse -inf)."""
    monkeypatch.setenv("MEMATTN_SM90_D64_TILES", shape)
    _, k, v = qkv(B=2, Hq=4, Hk=2, Lq=200, Lk=4999, D=D, dtype=dtype, requires_grad=False)
    q = torch.zeros(2, 4, 200, D, device=DEV, dtype=dtype)
    kpm = torch.ones(2, 4999, dtype=torch.bool, device=DEV)
    kpm[0, 17] = False
    kpm[1, 100:2445] = False
    out, lse = memattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert memattn.explain(q, k, v)["kernel"].split("/")[-1] == (
        "d64" if shape == "standard" else shape
    )
    for b, (first, end) in enumerate(((17, 18), (100, 2445))):
        want = v[b, :, first:end].double().mean(dim=1, keepdim=True).repeat_interleave(2, dim=0)
        torch.testing.assert_close(out[b].double(), want.expand(4, 200, D), rtol=0, atol=1e-2)
        torch.testing.assert_close(
            lse[b], torch.full_like(lse[b], math.log(end - first)), rtol=0, atol=1e-5
        )
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=300, Lk=260, D=D, dtype=dtype, requires_grad=False)
    check_cuda(Inputs(q * 4, k, v), backward=False)
    check_cuda_both_alignments(q, k, v)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    ("B", "Hq", "Hk"), [(2, 24, 8), (1, 2, 1)], ids=["many_tiles", "few_tiles"]
)
def test_hopper_wide_tiles_d64_causal(dtype, B, Hq, Hk):
    """Causal calls from Lq = 1536 on run the wide tiles too, taken in pairs of a bh's query
    blocks M - 1 - k and k (forward.cuh, paired_tile). Lq = 2100: M = 11 query tiles per bh,
    the first starting 12 rows before row 0, five pairs and a middle tile per bh; with 48 bh
    (528 tiles on at most 132 CTAs) full rounds of pairs, pairs left over and middle tiles;
    with 2 bh (22 tiles, 22 CTAs) only left-over pairs. Both alignments; bottom-right with
    Lq > Lk (Lk = 1900) leaves the first 200 rows without a visible key (zeros, lse -inf), so
    some warpgroups of the first tiles have none; key padding with a fully padded batch entry
    (tiles without key blocks)."""
    q, k, v = qkv(B=B, Hq=Hq, Hk=Hk, Lq=2100, Lk=2000, D=64, dtype=dtype, requires_grad=False)
    for alignment in ("top_left", "bottom_right"):
        causal = {"is_causal": True, "causal_alignment": alignment}
        assert memattn.explain(q, k, v, **causal)["kernel"].endswith("/d64/wide")
        check_cuda(Inputs(q, k, v, kwargs=causal), backward=False)
    causal = {"is_causal": True, "causal_alignment": "bottom_right"}
    out, lse, _ = check_cuda(
        Inputs(q, k[:, :, :1900], v[:, :, :1900], kwargs=causal), backward=False
    )
    assert torch.all(out[:, :, :200] == 0)
    assert torch.all(lse[:, :, :200] == -math.inf)
    kpm = torch.zeros(B, 2000, dtype=torch.bool)
    kpm[0, 1500:] = True
    if B > 1:
        kpm[-1] = True
    out, lse, _ = check_cuda(
        Inputs(q, k, v, kwargs={"is_causal": True, "key_padding_mask": kpm.to(DEV)}), backward=False
    )
    if B > 1:
        assert torch.all(out[-1] == 0)
        assert torch.all(lse[-1] == -math.inf)
    assert not memattn.explain(q[:, :, :1535], k, v, is_causal=True)["kernel"].endswith("/wide")
    assert memattn.explain(q[:, :, :1536], k, v, is_causal=True)["kernel"].endswith("/d64/wide")


# Masks the sm90 forward copies by TMA tiles (mask_tile.cuh): bool or q's dtype, contiguous keys,
# rows of whole 16-byte units. Lk = 208 (not a multiple of the 128-key block) and Lq = 70 (not
# of the query tile) leave partial tiles, read past the mask's end as zeros.
TILE_LQ, TILE_LK = 70, 208
TILE_MASK_SHAPES = {
    "full": (B, H, TILE_LQ, TILE_LK),
    "11qk": (1, 1, TILE_LQ, TILE_LK),
    "1hqk": (1, H, TILE_LQ, TILE_LK),
    "b1qk": (B, 1, TILE_LQ, TILE_LK),
    "b11k": (B, 1, 1, TILE_LK),  # one row, broadcast along queries
    "bh1k": (B, H, 1, TILE_LK),
    "1d": (TILE_LK,),
}


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(TILE_MASK_SHAPES), ids=str)
def test_hopper_mask_tiles(dtype, D, kind, shape):
    """Masks read from TMA tiles, each broadcast pattern, with rows the mask empties; causal
    and key padding on the full masks."""
    size = TILE_MASK_SHAPES[shape]
    q, k, v = qkv(B=B, Hq=H, Lq=TILE_LQ, Lk=TILE_LK, D=D, dtype=dtype)
    if kind == "bool":
        mask = torch.rand(size) < 0.7
        if len(size) == 4 and size[2] > 1:
            mask[..., 3, :] = False  # fully masked rows, also in the second query tile
            mask[..., 66, :] = False
        mask = mask.to(DEV)
    else:
        mask = rand_mask(size, dtype)
    check_cuda(Inputs(q, k, v, mask))
    if shape == "full":
        kpm = (torch.rand(B, TILE_LK) < 0.2).to(DEV)
        for alignment in ("top_left", "bottom_right"):
            kwargs = {"is_causal": True, "causal_alignment": alignment, "key_padding_mask": kpm}
            check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_hopper_mask_tiles_whole_blocks(dtype, D, kind):
    """Blocks that bounds and causality leave whole (no per-element compare), with and without
    causal; a bool mask with scale <= 0 (its raw-score path needs scale > 0, so it takes the
    per-element reads)."""
    q, k, v = qkv(B=2, Hq=2, Lq=256, Lk=256, D=D, dtype=dtype)
    mask = bool_mask((2, 2, 256, 256)) if kind == "bool" else rand_mask((2, 2, 256, 256), dtype)
    for kwargs in ({}, {"is_causal": True}, {"scale": -0.3}, {"scale": 0.0}):
        check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_mask_tiles_strided_and_per_element_fallback(dtype):
    """A mask view with aligned row strides (a slice of a wider mask) takes the tiles; masks
    TMA cannot copy take the per-element reads: rows of 200 bool keys (not 16-byte units), a
    float32 mask with 16-bit inputs, an unaligned start, and a mask broadcast along keys."""
    q, k, v = qkv(B=B, Hq=H, Lq=TILE_LQ, Lk=200, D=64, dtype=dtype)
    wide = torch.rand(B, H, TILE_LQ, 256) < 0.7
    check_cuda(Inputs(q, k, v, wide[..., :200].to(DEV)))
    check_cuda(Inputs(q, k, v, bool_mask((B, H, TILE_LQ, 200))))
    check_cuda(Inputs(q, k, v, rand_mask((B, 1, TILE_LQ, 200), torch.float32)))
    base = rand_mask((B, H, TILE_LQ, 208), dtype, requires_grad=False)
    check_cuda(Inputs(q, k, v, base[..., 1:201]))  # rows 16-byte units, start 2 bytes off
    check_cuda(Inputs(q, k, v, bool_mask((B, H, TILE_LQ, 1))))


def _lean_backward_cases(dtype):
    """Calls the single-pass Hopper backward serves (no attn_mask, no dropout): every head-dim
    bucket (D = 96 runs in 128, 200 in 256), GQA, causal both ways, key padding, odd lengths."""
    kpm = (torch.rand(2, 200) < 0.2).to(DEV)
    for D in (64, 256):
        q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=130, Lk=200, D=D, dtype=dtype)
        yield Inputs(q, k, v, kwargs={"is_causal": True, "key_padding_mask": kpm})
    for D in (64, 96, 128, 200, 256):
        q, k, v = qkv(B=1, Hq=2, Lq=257, Lk=77, D=D, dtype=dtype)
        yield Inputs(q, k, v, kwargs={"is_causal": True, "causal_alignment": "bottom_right"})
        q, k, v = qkv(B=2, Hq=3, Lq=70, Lk=300, D=D, dtype=dtype)
        yield Inputs(q, k, v)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_mask_broadcast_over_batch(dtype, D):
    """An attn_mask broadcast over the batch but not the heads ([1, H, Lq, Lk], [H, Lq, Lk])
    makes the sm90 grids take the batch elements inside each head (params.h, batch_inner);
    every kernel must still find its (b, h) pairs and write there: the forward (more tiles than
    a wave), both backward passes and the single pass (bool tiles at D = 128), GQA 6:2, causal
    in both alignments, key padding that differs per batch element, the additive mask's
    gradient (summed over b), mask tiles and the per-element reads."""
    Bm, Hq, Hk, Lq, Lk = 5, 6, 2, 1100, 208
    q, k, v = qkv(B=Bm, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, dtype=dtype)
    kpm = torch.zeros(Bm, Lk, dtype=torch.bool)
    kpm[1, 150:] = True
    kpm[3, 20:40] = True  # a hole: the per-element reads for this entry
    kpm = kpm.to(DEV)
    cases = (
        (bool_mask((1, Hq, Lq, Lk)), {}),
        (bool_mask((Hq, Lq, Lk)), {"is_causal": True, "key_padding_mask": kpm}),
        (
            rand_mask((1, Hq, Lq, Lk), dtype, requires_grad=False),
            {"is_causal": True, "causal_alignment": "bottom_right"},
        ),
        (rand_mask((1, Hq, Lq, Lk), dtype), {"key_padding_mask": kpm}),  # grad summed over b
        (rand_mask((1, Hq, 1, 1), dtype, requires_grad=False), {}),  # no tiles: per element
    )
    for mask, kwargs in cases:
        check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


# Structured masks at the kernels' block scale: Lq = 300, Lk = 528 leave partial query tiles and
# key blocks at every tile shape (64- or 128-row tiles, 64- or 128-key blocks); a bool mask's
# rows of 528 bytes are whole 16-byte units, so the mask tiles (and the single-pass backward)
# take it.
STRUCT_LQ, STRUCT_LK = 300, 528


def _structured_bool_masks() -> dict:
    """Bool masks (CPU) whose blocks are mostly all hidden or all visible, and per batch element
    ([4, 1, Lq, Lk]) the edge cases of the block classes: everything visible, nothing visible,
    one visible element in a hidden block, one hidden element in each of two visible blocks."""
    i = torch.arange(STRUCT_LQ)[:, None]
    j = torch.arange(STRUCT_LK)[None, :]
    per_batch = torch.ones(4, 1, STRUCT_LQ, STRUCT_LK, dtype=torch.bool)
    per_batch[1] = False
    per_batch[2] = False
    per_batch[2, 0, 37, 300] = True
    per_batch[3, 0, 5, 260] = False
    per_batch[3, 0, 200, 10] = False
    return {
        "causal": j <= i,
        "window": (i - j).abs() < 80,
        "documents": torch.bucketize(i, torch.tensor([90, 230]))
        == torch.bucketize(j, torch.tensor([100, 350])),
        "per_batch": per_batch,
        "key_ranges": (j < 140) | (j >= 390),  # [Lk] hidden keys 140..389 for every query
    }


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("name", list(_structured_bool_masks()), ids=str)
def test_hopper_structured_masks(dtype, D, kind, name):
    """Masks whose key blocks the Hopper forward skips (all hidden) or runs without reading the
    mask (all visible; the core's MaskBlockList): results against float64, fully masked rows
    (output 0, lse -inf); as additive masks (0 / -inf) with one small nonzero value in a zero
    block and one finite value in a -inf block; with causal and key padding; backward too."""
    bool_mask_ = _structured_bool_masks()[name]
    if name == "key_ranges":
        bool_mask_ = bool_mask_[0]
    B_ = 4 if name == "per_batch" else 2
    q, k, v = qkv(B=B_, Hq=2, Lq=STRUCT_LQ, Lk=STRUCT_LK, D=D, dtype=dtype)
    if kind == "bool":
        mask = bool_mask_.to(DEV)
    else:
        additive = torch.zeros(bool_mask_.shape, dtype=torch.float64)
        additive.masked_fill_(~bool_mask_, -math.inf)
        if name == "per_batch":
            additive[3, 0, 100, 400] = 0.5  # not whole: the mask changes a score
            additive[1, 0, 150, 450] = -1.0  # not hidden: one key visible
        mask = additive.to(DEV, dtype)
    out, lse, _ = check_cuda(Inputs(q, k, v, mask))
    if name == "per_batch":  # batch element 1 sees nothing (as a float mask: one key, row 150)
        dead = torch.ones(STRUCT_LQ, dtype=torch.bool)
        if kind == "float":
            dead[150] = False
        assert torch.all(out[1][:, dead] == 0) and torch.all(lse[1][:, dead] == -math.inf)
    kpm = torch.zeros(B_, STRUCT_LK, dtype=torch.bool)
    kpm[0, 450:] = True
    kpm[-1, 100:] = True
    for alignment in ("top_left", "bottom_right"):
        kwargs = {"is_causal": True, "causal_alignment": alignment, "key_padding_mask": kpm.to(DEV)}
        check_cuda(Inputs(q, k, v, mask, kwargs=kwargs))


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", ["rows_520", "key_stride_2", "start_offset", "aligned"])
def test_hopper_structured_masks_any_layout(dtype, D, layout):
    """The classification of structured masks reads 16 bytes per lane where every mask row starts
    on a 16-byte boundary with contiguous keys, one value per lane otherwise: causal and document
    masks (bool and additive) whose rows are not whole 16-byte units (Lk = 520), whose keys are
    strided, or whose start is off a 16-byte boundary give the same results (float64 reference,
    forward and backward) as the aligned layout; bool, q's dtype and float32."""
    Lk = 520 if layout == "rows_520" else STRUCT_LK
    i = torch.arange(STRUCT_LQ)[:, None]
    j = torch.arange(Lk)[None, :]
    documents = torch.bucketize(i, torch.tensor([90, 230])) == torch.bucketize(
        j, torch.tensor([100, 350])
    )
    q, k, v = qkv(B=2, Hq=2, Lq=STRUCT_LQ, Lk=Lk, D=D, dtype=dtype)
    for visible in (j <= i, documents):
        additive = torch.zeros(visible.shape).masked_fill(~visible, -math.inf)
        for mask in (visible.to(DEV), additive.to(DEV, dtype), additive.to(DEV)):
            if layout == "key_stride_2":
                mask = mask.repeat_interleave(2, dim=-1)[..., ::2]
            elif layout == "start_offset":
                mask = torch.cat([mask[:, :1], mask], dim=-1)[:, 1:]
                assert mask.data_ptr() % 16 != 0
            check_cuda(Inputs(q, k, v, mask))


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_structured_masks_per_head_gqa(dtype, D):
    """The single-pass backward's step lists (the core's MaskStepList) under GQA: each query
    head of a k/v head's group has its own structure (a window, documents, nothing visible, a
    random mask), and the list of a key block interleaves them; also causal, both alignments.
    Forward and backward against float64."""
    i = torch.arange(STRUCT_LQ)[:, None]
    j = torch.arange(STRUCT_LK)[None, :]
    masks = _structured_bool_masks()
    per_head = torch.stack(
        [
            masks["window"],
            masks["documents"],
            torch.zeros(STRUCT_LQ, STRUCT_LK, dtype=torch.bool),
            torch.rand(STRUCT_LQ, STRUCT_LK) < 0.5,
            masks["causal"],
            (j >= 256) & (i < 200),
        ]
    )[None].to(DEV)
    q, k, v = qkv(B=2, Hq=6, Hk=2, Lq=STRUCT_LQ, Lk=STRUCT_LK, D=D, dtype=dtype)
    check_cuda(Inputs(q, k, v, per_head))
    for alignment in ("top_left", "bottom_right"):
        kwargs = {"is_causal": True, "causal_alignment": alignment}
        check_cuda(Inputs(q, k, v, per_head, kwargs=kwargs))


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_backward_never_reads_hidden_query_blocks(dtype, D):
    """The single-pass backward skips the steps a mask hides (MaskStepList), not computes and
    zeroes them: with NaN in the queries and output gradients of rows that see no key
    (128..255: whole query blocks at both step sizes), dK and dV are exactly those of finite
    values there (a computed step would give 0 * NaN = NaN in dV += P^T dO), and those rows'
    dQ is 0."""
    q, k, v = qkv(B=2, Hq=2, Lq=STRUCT_LQ, Lk=STRUCT_LK, D=D, dtype=dtype, requires_grad=False)
    mask = torch.rand(2, 1, STRUCT_LQ, STRUCT_LK) < 0.8
    mask[:, :, 128:256] = False
    mask = mask.to(DEV)
    grad_out = torch.randn(q.shape, dtype=torch.float64).to(DEV, dtype)

    def grads(q_, grad_out_):
        q_ = q_.clone().requires_grad_(True)
        k_, v_ = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = memattn.attention(q_, k_, v_, attn_mask=mask)
        return torch.autograd.grad(out, (q_, k_, v_), grad_out_)

    finite = grads(q, grad_out)
    q_nan, grad_out_nan = q.clone(), grad_out.clone()
    q_nan[:, :, 128:256] = math.nan
    grad_out_nan[:, :, 128:256] = math.nan
    got = grads(q_nan, grad_out_nan)
    assert torch.equal(got[1], finite[1]) and torch.equal(got[2], finite[2])
    assert torch.all(got[0][:, :, 128:256] == 0)
    # dQ is summed with atomic adds: its last bits may differ between the two runs
    torch.testing.assert_close(got[0], finite[0], rtol=0, atol=1e-2)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_hopper_forward_never_reads_hidden_key_blocks(dtype, D):
    """The blocks a mask hides are skipped, not computed and zeroed: with NaN in the keys and
    values that the mask hides from every query (128..255: whole blocks at every block size),
    the forward's output is exactly that of finite values there (a computed block would give
    0 * NaN = NaN in P V). Also with dropout, whose draws must follow each block's real keys:
    its keep mask, recovered from an unmasked call, drives the reference."""
    Lk = 256  # recover_keep_mask's identity v: Dv = Lk
    q, k, v = qkv(B=2, Hq=2, Lq=STRUCT_LQ, Lk=Lk, D=D, dtype=dtype, requires_grad=False)
    mask = torch.rand(2, 1, STRUCT_LQ, Lk) < 0.8
    mask[..., 128:] = False
    mask = mask.to(DEV)
    finite = check_cuda(Inputs(q, k, v, mask), backward=False)[0]
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 128:] = math.nan
    v_nan[:, :, 128:] = math.nan
    with torch.no_grad():
        out = memattn.attention(q, k_nan, v_nan, attn_mask=mask)
    assert torch.equal(out, finite)

    p, seed = 0.3, 5
    keep = recover_keep_mask(q, k, p, seed)
    with torch.no_grad():
        got = memattn.attention(
            q, k, v, attn_mask=mask, dropout_p=p, generator=seeded_generator(seed)
        )

    def reference(compute_dtype):
        q_, k_, v_ = (t.cpu().to(compute_dtype) for t in (q, k, v))
        return attention_reference(
            q_, k_, v_, attn_mask=mask.cpu(), dropout_p=p, dropout_mask=keep, dtype=compute_dtype
        )

    assert_close_policy("out", got, reference(torch.float64), reference(dtype), dtype)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_backward_single_pass_and_deterministic_mode(dtype):
    """On Hopper a lean backward sums dQ with atomic adds (one pass); under
    torch.use_deterministic_algorithms it takes the two atomic-free passes, bit-identical run
    to run. Both match float64, and they agree with each other on the same grad_out."""
    from memattn import _ops

    def grads(inputs, grad_out):
        out = memattn.attention(inputs.q, inputs.k, inputs.v, **inputs.kwargs)
        return torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), grad_out)

    for inputs in _lean_backward_cases(dtype):
        q, v = inputs.q, inputs.v
        assert _ops.single_pass_backward(q, q.shape[-1], v.shape[-1], None, 0.0)
        plan = memattn.explain(q, inputs.k, v, backward=True, **inputs.kwargs)
        assert plan["backward_passes"] == 1, plan
        check_cuda(inputs)
        grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], device=DEV, dtype=dtype)
        single = grads(inputs, grad_out)
        torch.use_deterministic_algorithms(True)
        try:
            assert not _ops.single_pass_backward(q, q.shape[-1], v.shape[-1], None, 0.0)
            plan = memattn.explain(q, inputs.k, v, backward=True, **inputs.kwargs)
            assert plan["backward_passes"] == 2, plan
            check_cuda(inputs)
            two_pass, again = grads(inputs, grad_out), grads(inputs, grad_out)
        finally:
            torch.use_deterministic_algorithms(False)
        for name, a, b, c in zip("qkv", single, two_pass, again, strict=True):
            assert torch.equal(b, c), f"grad {name}: two passes not bit-identical run to run"
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=f"grad {name}")
    q = qkv(B=1, Hq=2, Lq=10, D=64, dtype=dtype, requires_grad=False)[0]
    mask = rand_mask((1, 2, 10, 10), dtype)
    assert not _ops.single_pass_backward(q, 64, 64, mask, 0.0)
    assert memattn.explain(q, q, q, attn_mask=mask, backward=True)["backward_passes"] == 2
    assert not _ops.single_pass_backward(q, 64, 64, None, 0.1)
    assert not _ops.single_pass_backward(q, 256, 256, mask, 0.0)  # masks: sm80 at D > 128
    # scale <= 0 runs the general kernels' two passes
    assert not _ops.single_pass_backward(q, 64, 64, None, 0.0, -0.5)
    assert memattn.explain(q, q, q, scale=-0.5, backward=True)["backward_passes"] == 2


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_backward_single_pass_mask_tiles(dtype):
    """A bool or q-dtype attn_mask the mask tiles can copy takes the single pass at head dims
    up to 128 (causal, key padding with holes, a row-broadcast mask, a mask broadcast over b);
    it matches float64 and the two passes. Other masked calls keep two passes: unaligned rows,
    a mask that needs its gradient, a float32 mask with 16-bit inputs, dropout."""
    from memattn import _ops

    def passes(q, k, v, mask, **kwargs):
        plan = memattn.explain(q, k, v, attn_mask=mask, backward=True, **kwargs)
        return plan["backward_passes"]

    kpm = torch.zeros(2, 208, dtype=torch.bool)
    kpm[0, 50:60] = True
    kpm[1, 190:] = True
    for D, mask_shape, kind, kwargs in (
        (128, (2, 1, 130, 208), "bool", {}),
        (96, (2, 2, 130, 208), "bool", {"is_causal": True, "key_padding_mask": kpm.to(DEV)}),
        (128, (2, 1, 1, 208), "bool", {"is_causal": True, "causal_alignment": "bottom_right"}),
        (128, (2, 2, 130, 208), "additive", {"is_causal": True, "key_padding_mask": kpm.to(DEV)}),
        (96, (1, 2, 130, 208), "additive", {}),
        (128, (2, 1, 1, 208), "additive", {"is_causal": True, "causal_alignment": "bottom_right"}),
        (64, (2, 1, 130, 208), "bool", {"is_causal": True, "key_padding_mask": kpm.to(DEV)}),
        (40, (1, 2, 130, 208), "bool", {}),
        (64, (2, 1, 1, 208), "bool", {"is_causal": True, "causal_alignment": "bottom_right"}),
        (64, (1, 2, 130, 208), "additive", {"is_causal": True, "key_padding_mask": kpm.to(DEV)}),
        (32, (2, 2, 130, 208), "additive", {}),
    ):
        q, k, v = qkv(B=2, Hq=2, Lq=130, Lk=208, D=D, dtype=dtype)
        if kind == "bool":
            mask = bool_mask(mask_shape)
        else:
            mask = rand_mask(mask_shape, dtype, requires_grad=False)
            if mask_shape[2] > 1:
                mask[..., 5, :] = -math.inf  # a row the mask empties
        inputs = Inputs(q, k, v, mask, kwargs=kwargs)
        assert passes(q, k, v, mask, **kwargs) == 1
        check_cuda(inputs)
        grad_out = torch.randn(q.shape, device=DEV, dtype=dtype)
        out = memattn.attention(q, k, v, attn_mask=mask, **kwargs)
        single = torch.autograd.grad(out, (q, k, v), grad_out)
        torch.use_deterministic_algorithms(True)
        try:
            assert passes(q, k, v, mask, **kwargs) == 2
            out = memattn.attention(q, k, v, attn_mask=mask, **kwargs)
            two_pass = torch.autograd.grad(out, (q, k, v), grad_out)
        finally:
            torch.use_deterministic_algorithms(False)
        for name, a, b in zip("qkv", single, two_pass, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=f"grad {name}")
    q, k, v = qkv(B=2, Hq=2, Lq=130, Lk=200, D=128, dtype=dtype)
    unaligned = bool_mask((2, 1, 130, 200))  # rows of 200 bytes
    assert passes(q, k, v, unaligned) == 2
    check_cuda(Inputs(q, k, v, unaligned))
    assert passes(q, k, v, rand_mask((2, 1, 130, 200), dtype, requires_grad=False)) == 1
    assert passes(q, k, v, rand_mask((2, 1, 130, 200), dtype)) == 2  # its gradient
    unaligned = rand_mask((2, 1, 130, 204), dtype, requires_grad=False)[..., :200]  # 408 B rows
    assert passes(q, k, v, unaligned) == 2
    float32 = rand_mask((2, 1, 130, 200), torch.float32, requires_grad=False)
    assert passes(q, k, v, float32) == 2
    check_cuda(Inputs(q, k, v, float32))
    assert not _ops.single_pass_backward(q, 128, 128, bool_mask((2, 1, 130, 208)), 0.1)


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_backward_direct_dq_for_one_key_block(dtype):
    """Keys that fit one block (Lk <= 128), no causal limit, no key padding: the single pass
    writes dQ directly (no scratch, no atomics), so it matches float64, is bit-identical run
    to run and runs under deterministic mode too. Causal or padded calls keep the scratch."""
    from memattn import _ops

    for B, Hq, Hk, Lq, Lk, D in (
        (2, 4, 2, 70, 77, 64),
        (1, 2, 2, 300, 128, 96),
        (2, 2, 1, 130, 1, 128),
    ):
        q, k, v = qkv(B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, dtype=dtype)
        assert _ops.direct_dq_backward(q, k, D, D, None, None, False, 0.0, None)
        assert _ops.dq_path(q, k, D, D, None, None, False, 0.0, None, False) == "direct"
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                assert memattn.explain(q, k, v, backward=True)["backward_passes"] == 1
                check_cuda(Inputs(q, k, v))
                grad_out = torch.randn(q.shape, device=DEV, dtype=dtype)
                runs = [
                    torch.autograd.grad(memattn.attention(q, k, v), (q, k, v), grad_out)
                    for _ in range(2)
                ]
            finally:
                torch.use_deterministic_algorithms(False)
            for name, a, b in zip("qkv", *runs, strict=True):
                assert torch.equal(a, b), f"grad {name}: not bit-identical run to run"
    q, k, v = qkv(B=1, Hq=2, Lq=70, Lk=77, D=64, dtype=dtype)
    assert not _ops.direct_dq_backward(q, k, 64, 64, None, None, True, 0.0, None)
    kpm = torch.zeros(1, 77, dtype=torch.bool, device=DEV)
    assert not _ops.direct_dq_backward(q, k, 64, 64, None, kpm, False, 0.0, None)
    assert not _ops.direct_dq_backward(q, k, 64, 64, None, None, False, 0.0, -1.0)
    assert _ops.dq_path(q, k, 64, 64, None, None, True, 0.0, None, False) == "accumulated"
    q, k, v = qkv(B=1, Hq=2, Lq=70, Lk=129, D=64, dtype=dtype)
    assert not _ops.direct_dq_backward(q, k, 64, 64, None, None, False, 0.0, None)
    assert _ops.dq_path(q, k, 64, 64, None, None, False, 0.0, None, False) == "accumulated"
    mask = rand_mask((1, 2, 70, 129), dtype)  # its gradient: two passes
    assert _ops.dq_path(q, k, 64, 64, mask, None, False, 0.0, None, True) is None
    assert memattn.explain(q, k, v, attn_mask=mask, backward=True)["backward_passes"] == 2


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 kernels run on compute capability 9.0")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_hopper_backward_head_dim_256(dtype):
    """The D = 256 backward (both consumer warpgroups share 64 keys and split the head dim)
    against float64: one query or key, lengths at and across its 64-row blocks, many steps
    per CTA across a GQA group, causal both ways (rows with no key), a fully padded batch
    entry, D and Dv that differ and run in the 256 bucket, transposed (BSHD) views."""
    from memattn import _ops

    kpm = torch.zeros(2, 150, dtype=torch.bool)
    kpm[0, 100:] = True
    kpm[1, :] = True  # every key padded: zero output and gradients
    bottom_right = {"is_causal": True, "causal_alignment": "bottom_right"}
    cases = [  # (B, Hq, Hk, Lq, Lk, D, Dv), kwargs
        ((1, 2, 2, 1, 300, 256, 256), {}),
        ((2, 2, 2, 64, 1, 256, 256), {}),
        ((1, 3, 3, 65, 64, 256, 256), {"is_causal": True}),
        ((1, 6, 2, 700, 333, 256, 256), {}),
        ((1, 2, 2, 300, 129, 256, 256), {"is_causal": True}),
        ((1, 2, 2, 129, 300, 256, 256), {"is_causal": True}),
        ((1, 2, 2, 300, 129, 256, 256), bottom_right),
        ((2, 2, 2, 90, 150, 256, 256), {"key_padding_mask": kpm.to(DEV)}),
        ((1, 2, 2, 100, 77, 136, 256), {}),
        ((1, 2, 2, 100, 77, 256, 200), {"is_causal": True}),
    ]
    for (B, Hq, Hk, Lq, Lk, D, Dv), kwargs in cases:
        q, k, v = qkv(B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype)
        assert _ops.single_pass_backward(q, D, Dv, None, 0.0), (Lq, Lk, D, Dv)
        plan = memattn.explain(q, k, v, backward=True, **kwargs)
        assert plan["kernel"].startswith("cuda/sm90/") and plan["kernel"].endswith("/d256"), plan
        assert plan["backward_passes"] == 1, plan
        check_cuda(Inputs(q, k, v, kwargs=kwargs))
    base = torch.randn(2, 90, 6, 256, dtype=dtype, device=DEV)  # BSHD layout, transposed view
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in base.split(2, dim=2))
    check_cuda(Inputs(q, k, v, kwargs={"is_causal": True}))


def test_grad_q_accum_scratch_is_checked():
    """The module checks the single pass's dQ scratch like grad_scratch (on Hopper, the only
    GPU that reads it; elsewhere it is ignored)."""
    from memattn import _memattn

    q, k, v = qkv(B=3, Hq=2, Lq=10, Lk=20, D=64, dtype=torch.bfloat16, requires_grad=False)
    out, lse = torch.empty_like(q), torch.empty(3, 2, 10, device=DEV)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    needed = 3 * 2 * 64 * 64  # B * Hq * ceil(Lq / 64) * 64 * 64
    for scratch in (
        torch.empty(needed - 1, device=DEV),
        torch.empty(needed, dtype=torch.float16, device=DEV),
    ):
        call = functools.partial(
            _memattn.backward, q, q, k, v, out, lse, *grads, None, None, None,
            is_causal=False, causal_alignment="top_left", dropout_p=0.0, dropout_seed=0,
            scale=None, num_threads=1, grad_scratch=torch.empty(60, device=DEV),
            grad_q_accum_scratch=scratch,
        )  # fmt: skip
        if _is_hopper():
            with pytest.raises(ValueError, match=rf"^grad_q_accum_scratch: .* = {needed} elements"):
                call()
        else:
            call()
        torch.cuda.synchronize()


def _forward_cases(dtype):
    """Inputs that exercise the kernels' features: odd sizes, GQA, causal both ways, masks,
    key padding, fully masked rows, strided views (dropout: the dropout tests)."""
    q, k, v = qkv(B=2, Hq=4, Hk=2, Lq=130, Lk=200, D=64, dtype=dtype)
    mask = rand_mask((1, 4, 130, 200), dtype)
    kpm = (torch.rand(2, 200) < 0.2).to(DEV)
    yield Inputs(q, k, v, mask, kwargs={"is_causal": True, "key_padding_mask": kpm})
    for D in (32, 96, 128, 256):
        q, k, v = qkv(B=1, Hq=2, Lq=257, Lk=77, D=D, dtype=dtype)
        yield Inputs(q, k, v, kwargs={"is_causal": True, "causal_alignment": "bottom_right"})
    q, k, v = qkv(B=1, Hq=3, Lq=300, Lk=300, D=128, dtype=dtype)
    yield Inputs(q, k, v, bool_mask((1, 1, 300, 300), p_attend=0.05))  # some rows fully masked
    q, k, v = qkv(B=2, Hq=2, Lq=70, Lk=90, D=64, dtype=dtype)
    yield Inputs(q, k, v, rand_mask((2, 1, 70, 90), torch.float32))  # fp32 mask, low-precision q
    base = torch.randn(2, 90, 6, 64, dtype=dtype, device=DEV)  # BSHD layout, transposed view
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in base.split(2, dim=2))
    yield Inputs(q, k, v)


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_tensor_core_kernels_on_every_feature(dtype, kernel, monkeypatch):
    """Both families of tensor-core kernels (sm90 where the GPU is a Hopper), forward and
    backward, against the float64 reference on the same feature mix."""
    if kernel == "sm90" and not _is_hopper():
        pytest.skip("the sm90 kernels run on compute capability 9.0")
    monkeypatch.setenv("MEMATTN_DISABLE_SM90", "0" if kernel == "sm90" else "1")
    for inputs in _forward_cases(dtype):
        q, k, v = inputs.q, inputs.k, inputs.v
        assert memattn.explain(q, k, v)["kernel"].startswith(f"cuda/{kernel}/")
        # Over 128 head-dim columns the sm90 backward serves lean calls only.
        lean = inputs.attn_mask is None and not inputs.kwargs.get("dropout_p")
        backward_kernel = "sm80" if max(q.shape[-1], v.shape[-1]) > 128 and not lean else kernel
        plan = memattn.explain(q, k, v, backward=True)
        assert plan["kernel"].startswith(f"cuda/{backward_kernel}/"), plan
        check_cuda(inputs)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_explain_odd_head_dims_and_layouts_still_run_on_cuda(dtype):
    """Head dims off the fast buckets and unaligned layouts are padded or routed, never
    refused: explain names a CUDA kernel and lists the copies (``layout_copies``)."""
    for D in (8, 33, 100, 255):
        q, k, v = qkv(B=1, Hq=2, Lq=40, D=D, dtype=dtype, requires_grad=False)
        plan = memattn.explain(q, k, v)
        assert plan["backend"].startswith("cuda"), plan
        assert plan["reason"], plan
        assert bool(plan.get("layout_copies")) == (D % 8 != 0), plan
    base = torch.randn(1, 2, 40, 65, device=DEV, dtype=dtype)
    plan = memattn.explain(base[..., 1:], base[..., 1:], base[..., 1:])
    assert plan["backend"].startswith("cuda"), plan
    assert plan.get("layout_copies"), plan


def test_inspect_cuda_model_reports_the_cuda_kernel():
    mha = mnn.MultiheadAttention(256, 4, batch_first=True, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(2, 40, 256, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        report = memattn.inspect(mha, x, x, x, need_weights=False)
    assert len(report) == 1
    call = next(iter(report))
    assert call.backend.startswith("memattn/cuda"), call
    assert call.kernel and "simt" not in call.kernel.lower(), call
    assert call.dtype == "bfloat16"


# ---- nn.MultiheadAttention and the converter on CUDA ------------------------------------------

E_MHA, H_MHA = 256, 4  # head dim 64
MHA_OPTIONS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 96, "vdim": 160},
}


def _mha_modules(options):
    """(torch's MHA in float64 on the CPU, torch's in bf16 on CUDA, memattn's in bf16 on
    CUDA), all with the same weights."""
    ref = nn.MultiheadAttention(E_MHA, H_MHA, dtype=torch.float64, **options)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    torch_bf16 = copy.deepcopy(ref).to(DEV, torch.bfloat16)
    ours = mnn.MultiheadAttention(E_MHA, H_MHA, device=DEV, dtype=torch.bfloat16, **options)
    ours.load_state_dict(torch_bf16.state_dict())
    return ref, torch_bf16, ours


def _mha_inputs(options, Bn=2, Lq=40, Lk=70):
    kdim, vdim = options.get("kdim", E_MHA), options.get("vdim", E_MHA)
    bf = options.get("batch_first", False)

    def x(L, d):
        return torch.randn((Bn, L, d) if bf else (L, Bn, d), dtype=torch.float64)

    kpm = torch.zeros(Bn, Lk, dtype=torch.bool)
    kpm[1, Lk - 9 :] = True
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    masks = {
        "none": {},
        "bool_kpm": {"attn_mask": j > i + 20, "key_padding_mask": kpm},  # True = masked out
        "float": {"attn_mask": torch.randn(Lq, Lk, dtype=torch.float64)},
    }
    return (x(Lq, E_MHA), x(Lk, kdim), x(Lk, vdim)), masks


def _to(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {n: _to(t, device, dtype) for n, t in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(t, device, dtype) for t in obj)
    return obj


@pytest.mark.parametrize("option", list(MHA_OPTIONS))
def test_multihead_attention_bf16_matches_torch(option):
    """Output, weights and every gradient: as close to float64 as torch's own bf16 MHA on CUDA
    (DESIGN.md §4 policy, torch's bf16 module as the baseline)."""
    options = MHA_OPTIONS[option]
    ref, torch_bf16, ours = _mha_modules(options)
    args, masks = _mha_inputs(options)
    for mask_name, mask in masks.items():
        for need_weights in (False, True):
            kw = dict(mask, need_weights=need_weights)
            results = {}
            for name, module, dev, dt in (
                ("ref", ref, "cpu", torch.float64),
                ("torch", torch_bf16, DEV, torch.bfloat16),
                ("ours", ours, DEV, torch.bfloat16),
            ):
                module.zero_grad()
                leaves = [a.detach().to(dev, dt).requires_grad_() for a in args]
                kw_dev = _to(kw, dev, dt)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, weights = module(*leaves, **kw_dev)
                g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
                out.backward(g.to(dev, dt))
                results[name] = {
                    "out": out,
                    "weights": weights,
                    **{f"grad input{n}": t.grad for n, t in enumerate(leaves)},
                    **{f"grad {n}": p.grad for n, p in module.named_parameters()},
                }
            where = f"{option}/{mask_name}/need_weights={need_weights}"
            for key, want in results["ref"].items():
                got, base = results["ours"][key], results["torch"][key]
                if want is None:
                    assert got is None, f"{where}: {key}"
                    continue
                assert_close_policy(f"{where}: {key}", got, want, base, torch.bfloat16)


def _transformer():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor notes
        return nn.Transformer(
            d_model=E_MHA,
            nhead=H_MHA,
            num_encoder_layers=2,
            num_decoder_layers=1,
            dim_feedforward=512,
            dropout=0.0,
            batch_first=True,
            dtype=torch.float64,
        )


def _transformer_inputs():
    torch.manual_seed(1)
    kpm = torch.zeros(2, 70, dtype=torch.bool)
    kpm[1, 55:] = True
    return {
        "src": torch.randn(2, 70, E_MHA, dtype=torch.float64),
        "tgt": torch.randn(2, 40, E_MHA, dtype=torch.float64),
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(40, dtype=torch.float64),
        "tgt_is_causal": True,
        "src_key_padding_mask": kpm,
        "memory_key_padding_mask": kpm,
    }


def test_optimize_cuda_bf16_transformer():
    """``memattn.optimize`` converts a CUDA bf16 model (every module, strict), verifies it,
    and the converted model is as close to float64 as the original bf16 model; inspect shows
    the CUDA kernels; training works; restore gives the classes back."""
    ref64 = _transformer().eval()
    model = copy.deepcopy(ref64).to(DEV, torch.bfloat16).eval()
    inputs = _transformer_inputs()
    inputs_dev = _to(inputs, DEV, torch.bfloat16)
    with torch.no_grad():
        want = ref64(**inputs)
        before = model(**inputs_dev)
    # strict: a module left unconverted (e.g. "no backend for CUDA") raises instead of warning
    assert memattn.optimize(model, probe=inputs_dev, strict=True) is model
    st_ = memattn.status(model)
    assert st_.attention_total == st_.attention_memattn == 4, str(st_)
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            assert type(m) is mnn.MultiheadAttention, path
            assert convert.origin_of(m).verification.startswith("verified"), path
    with torch.no_grad():
        after = model(**inputs_dev)
        report = memattn.inspect(model, **inputs_dev)
    assert_close_policy("transformer output", after, want, before, torch.bfloat16)
    assert len(report) == 4
    for call in report:
        assert call.backend.startswith("memattn/cuda"), call
    model.train()
    out = model(**inputs_dev)
    out.float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    memattn.restore(model)
    assert memattn.status(model).attention_memattn == 0


def test_multihead_attention_fully_masked_rows_give_zero_on_cuda():
    """Where torch gives NaN (a row with every key masked), memattn gives 0."""
    ours = mnn.MultiheadAttention(E_MHA, H_MHA, batch_first=True, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(2, 10, E_MHA, device=DEV, dtype=torch.bfloat16)
    kpm = torch.zeros(2, 10, dtype=torch.bool, device=DEV)
    kpm[1] = True
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert torch.isfinite(out).all()
    bias = ours.out_proj.bias.to(out.dtype)
    assert torch.equal(out[1], bias.expand_as(out[1]))
