"""A small, representative set of CUDA calls for compute-sanitizer (not a pytest module).

Every case runs memattn once on the GPU, forward and backward, at small sizes, and compares out,
lse and every gradient with the float64 CPU reference under the tolerance policy of
attn_testing.py. Meant to run under the sanitizer, where every kernel launch is slow:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/python/cuda_sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/python/cuda_sanitize_cases.py

(for memcheck set ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so that every tensor is its own
allocation and a read past its end is caught). The cases: fp16, bf16 (tensor-core kernels) and
fp32 (SIMT) x {plain, cross with Dv != D, odd sizes and head dims, GQA / MQA, bool and float
masks (broadcast, with gradient; also masks the Hopper kernels copy by tiles, and masks
broadcast over b that reorder the Hopper grids), key padding
(with masks; alone, skipping trailing key blocks; a fully padded batch entry), causal in both
alignments (fully masked rows), [B, L, H, D] views, dropout, the Hopper forward's 192-row tiles
and 80-key blocks, the Hopper D = 256 backward}.

Exit status: 0 all cases match, 1 a case failed (each failure is printed with its traceback),
2 nothing could run (no GPU, or memattn built without CUDA). ``--list`` prints the case names;
``-k TEXT`` runs the cases whose name contains TEXT; ``--dtypes bf16 fp32`` only those dtypes.

The file name does not match pytest's ``test_*.py``, so pytest never collects it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import memattn
from attn_testing import (
    Inputs,
    assert_close_policy,
    check_against_reference,
    make_qkv,
)
from memattn.reference import attention_reference

DEV = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _qkv(dtype, **kw):
    return make_qkv(device=DEV, dtype=dtype, **kw)


def _float_mask(shape, dtype):
    return (torch.randn(shape, dtype=torch.float64) * 2).to(DEV, dtype).requires_grad_()


_BOTTOM_RIGHT = {"is_causal": True, "causal_alignment": "bottom_right"}


def _bool_mask(shape, p_attend=0.7):
    return (torch.rand(shape) < p_attend).to(DEV)


def case_plain(dtype):
    q, k, v = _qkv(dtype, B=2, Hq=2, Lq=67, D=64)
    check_against_reference(Inputs(q, k, v))


def case_cross_dv(dtype):
    q, k, v = _qkv(dtype, B=2, Hq=2, Lq=17, Lk=130, D=128, Dv=64)
    check_against_reference(Inputs(q, k, v))


def case_odd_sizes(dtype):
    for D, Dv, Lq, Lk in ((40, 72, 1, 100), (33, 33, 17, 1), (256, 256, 19, 70), (8, 8, 100, 3)):
        q, k, v = _qkv(dtype, B=1, Hq=2, Lq=Lq, Lk=Lk, D=D, Dv=Dv)
        check_against_reference(Inputs(q, k, v))


def case_gqa_causal_top_left(dtype):
    q, k, v = _qkv(dtype, B=2, Hq=4, Hk=2, Lq=70, Lk=33, D=64)
    check_against_reference(Inputs(q, k, v, kwargs={"is_causal": True}))


def case_mqa_causal_bottom_right_dead_rows(dtype):
    q, k, v = _qkv(dtype, B=1, Hq=4, Hk=1, Lq=90, Lk=40, D=64)
    check_against_reference(Inputs(q, k, v, kwargs=_BOTTOM_RIGHT))


def case_causal_bottom_right_lq_lt_lk(dtype):
    q, k, v = _qkv(dtype, B=1, Hq=2, Lq=33, Lk=140, D=96)
    check_against_reference(Inputs(q, k, v, kwargs=_BOTTOM_RIGHT))


def case_bool_mask_broadcast_and_padding(dtype):
    q, k, v = _qkv(dtype, B=2, Hq=2, Lq=45, Lk=77, D=64)
    mask = _bool_mask((2, 1, 45, 77))
    kpm = torch.rand(2, 77) < 0.3
    kpm[1] = True  # a fully padded batch entry
    check_against_reference(Inputs(q, k, v, mask, kwargs={"key_padding_mask": kpm.to(DEV)}))


def case_key_padding_only_block_skipping(dtype):
    """Key padding alone (the lean kernels): right padding that leaves whole trailing key
    blocks, a hole before the last unpadded key, and a fully padded batch entry."""
    q, k, v = _qkv(dtype, B=3, Hq=2, Lq=70, Lk=300, D=128)
    kpm = torch.zeros(3, 300, dtype=torch.bool)
    kpm[0, 140:] = True
    kpm[1, 60:150] = True
    kpm[1, 290:] = True
    kpm[2] = True
    check_against_reference(Inputs(q, k, v, kwargs={"key_padding_mask": kpm.to(DEV)}))


def case_many_tiles_per_cta(dtype):
    """More query tiles than the Hopper forward's persistent grid has CTAs (240 at D = 128), so
    each CTA reuses its output staging rows (ForwardTraits::kOut): the lean D = 64 (64-row
    tiles, 264 CTAs) and D = 128 kernels' own staging tiles, then the Q buffer's halves of
    D = 256 and of the masked (general) D = 128 kernel, next to its mask tiles (bool, then
    16-bit) over the CTA's tiles of two key blocks; a partial last tile."""
    q, k, v = _qkv(dtype, B=2, Hq=40, Lq=300, Lk=130, D=64)
    check_against_reference(Inputs(q, k, v))
    q, k, v = _qkv(dtype, B=2, Hq=40, Lq=300, Lk=130, D=128)
    check_against_reference(Inputs(q, k, v))
    check_against_reference(Inputs(q, k, v, _bool_mask((300, 130))))
    check_against_reference(Inputs(q, k, v, _float_mask((300, 130), dtype).detach()))
    q, k, v = _qkv(dtype, B=2, Hq=40, Lq=300, Lk=130, D=256)
    check_against_reference(Inputs(q, k, v))


def _padding_with_a_fully_padded_entry(lk, pad_from):
    """A key_padding_mask for B = 2: batch element 0 padded from key pad_from on, 1 entirely."""
    kpm = torch.zeros(2, lk, dtype=torch.bool)
    kpm[0, pad_from:] = True
    kpm[1] = True
    return kpm.to(DEV)


def _check_padded_then_bottom_right(q, k, v, pad_from):
    """q, k, v (B = 2) with _padding_with_a_fully_padded_entry, then causal bottom-right."""
    kpm = _padding_with_a_fully_padded_entry(k.shape[2], pad_from)
    check_against_reference(Inputs(q, k, v, kwargs={"key_padding_mask": kpm}))
    check_against_reference(Inputs(q, k, v, kwargs=_BOTTOM_RIGHT))


@contextlib.contextmanager
def _d64_tiles(shape):
    """Runs the D = 64 forwards without features on `shape` (MEMATTN_SM90_D64_TILES), so that
    calls small enough for the sanitizers take the shapes that launch.h's rules give larger
    ones."""
    before = os.environ.get("MEMATTN_SM90_D64_TILES")
    os.environ["MEMATTN_SM90_D64_TILES"] = shape
    try:
        yield
    finally:
        if before is None:
            del os.environ["MEMATTN_SM90_D64_TILES"]
        else:
            os.environ["MEMATTN_SM90_D64_TILES"] = before


def case_wide_tiles_d64(dtype):
    """The Hopper forward's 192-row tiles of three consumer warpgroups (calls at D <= 64
    without masks, Lq >= 768 (causal: 1536), Lk > 384: launch.h, sm90_wide_tiles), which end
    at Lq: a first query tile that starts before row 0 (taken after the full tiles,
    tile_order.h's light_tiles_last), a partial last key block, GQA, key padding with a fully
    padded batch entry; causal (bottom-right, Lq > Lk: rows without a visible key), whose tiles
    go in pairs (paired_tile)."""
    q, k, v = _qkv(dtype, B=2, Hq=2, Hk=1, Lq=1030, Lk=400, D=64)
    kpm = _padding_with_a_fully_padded_entry(400, 350)
    with _d64_tiles("wide"):  # non-causal: 256 tiles and more take them
        check_against_reference(Inputs(q, k, v, kwargs={"key_padding_mask": kpm}))
    q, k, v = _qkv(dtype, B=1, Hq=2, Hk=1, Lq=2100, Lk=1900, D=64)
    check_against_reference(Inputs(q, k, v, kwargs=_BOTTOM_RIGHT))


def case_short_keys_d64(dtype):
    """The Hopper forward's 80-key blocks (calls at D <= 64 without masks whose keys fit one
    block: launch.h, sm90_short_keys): Lk = 77 (three zero-filled keys), GQA, a partial last
    query tile, key padding with a fully padded batch entry, causal bottom-right with Lq > Lk."""
    _check_padded_then_bottom_right(*_qkv(dtype, B=2, Hq=4, Hk=2, Lq=333, Lk=77, D=64), 40)


def case_narrow_blocks_d64(dtype):
    """The Hopper forward's 64-key blocks (causal calls at D <= 64 without masks whose rows see
    no more keys than there are queries, with at least 4096 query tiles: launch.h,
    sm90_narrow_blocks; here forced, as the call is smaller): GQA, partial last query and key
    blocks, key padding with a fully padded batch entry, bottom-right with Lq > Lk."""
    q, k, v = _qkv(dtype, B=2, Hq=4, Hk=2, Lq=333, Lk=300, D=64)
    kpm = _padding_with_a_fully_padded_entry(300, 150)
    with _d64_tiles("narrow"):  # 4096 query tiles and more take them
        check_against_reference(
            Inputs(q, k, v, kwargs={"is_causal": True, "key_padding_mask": kpm})
        )
        check_against_reference(Inputs(q, k, v, kwargs=_BOTTOM_RIGHT))


def case_backward_d256(dtype):
    """The Hopper D = 256 backward (both consumer warpgroups on 64 keys, the head dim split;
    dQ parts by the copy engine's bulk reductions): GQA with several query blocks per CTA, a
    partial last key block, key padding with a fully padded batch entry; causal bottom-right
    with Lq > Lk. At Lk = 100 the forward runs 64-key blocks (launch.h,
    sm90_d256_narrow_blocks), the second partial."""
    _check_padded_then_bottom_right(*_qkv(dtype, B=2, Hq=4, Hk=2, Lq=150, Lk=100, D=256), 70)


def case_float_mask_grad_causal_padding(dtype):
    q, k, v = _qkv(dtype, B=2, Hq=4, Hk=2, Lq=45, Lk=77, D=64)
    mask = _float_mask((1, 4, 45, 77), dtype)
    kwargs = {
        "key_padding_mask": (torch.rand(2, 77) < 0.2).to(DEV),
        "is_causal": True,
        "causal_alignment": "bottom_right",
    }
    check_against_reference(Inputs(q, k, v, mask, kwargs=kwargs))


def case_float_mask_full_and_row_broadcast(dtype):
    q, k, v = _qkv(dtype, B=2, Hq=2, Lq=30, Lk=70, D=64)
    check_against_reference(Inputs(q, k, v, _float_mask((2, 2, 30, 70), dtype)))
    check_against_reference(Inputs(q, k, v, _float_mask((2, 1, 30, 1), dtype)))


def case_mask_tiles(dtype):
    """Masks the Hopper kernels copy by TMA tiles (rows of whole 16-byte units; partial tiles
    at Lq = 70, Lk = 144): bool and float without gradient (the single pass; at D = 64 its
    one mask buffer with barriers of its own), float with gradient broadcast along queries (two
    passes), key padding with a hole (those blocks read the mask per element), both head-dim
    buckets."""
    for D in (64, 128):
        q, k, v = _qkv(dtype, B=2, Hq=2, Lq=70, Lk=144, D=D)
        kpm = torch.zeros(2, 144, dtype=torch.bool)
        kpm[0, 20:30] = True
        kpm[1, 100:] = True
        kwargs = {"key_padding_mask": kpm.to(DEV), "is_causal": True}
        check_against_reference(Inputs(q, k, v, _bool_mask((2, 2, 70, 144)), kwargs=kwargs))
        check_against_reference(Inputs(q, k, v, _float_mask((2, 1, 1, 144), dtype)))
        no_grad = _float_mask((2, 2, 70, 144), dtype).detach()
        check_against_reference(Inputs(q, k, v, no_grad, kwargs=kwargs))


def case_structured_mask_blocks(dtype):
    """Masks whose blocks the Hopper kernels skip or run without mask reads (the block lists of
    mask_blocks.cu: the forward's key blocks, the single-pass backward's steps): a causal bool
    mask and a per-batch one (one batch element sees nothing, one a single key) with partial
    tiles and blocks (Lq = 150, Lk = 304: rows of whole 16-byte units, which the mask tiles
    copy), an additive window mask with causal and key padding, a per-head mask under GQA 4:2,
    every head-dim bucket; a causal mask with strided keys (classified one value per lane, not
    in 16-byte loads)."""
    i = torch.arange(150)[:, None]
    j = torch.arange(304)[None, :]
    per_batch = torch.ones(2, 1, 150, 304, dtype=torch.bool)
    per_batch[1] = False
    per_batch[1, 0, 40, 200] = True
    window = torch.zeros(150, 304).masked_fill((i - j).abs() > 60, -math.inf)
    per_head = torch.stack(
        [(j <= i), (i - j).abs() <= 60, (j >= 200) & (i >= 0), (j < 0) & (i >= 0)]
    )[None]
    kpm = torch.zeros(2, 304, dtype=torch.bool)
    kpm[1, 250:] = True
    for D in (64, 128, 256):
        q, k, v = _qkv(dtype, B=2, Hq=2, Lq=150, Lk=304, D=D)
        check_against_reference(Inputs(q, k, v, (j <= i).to(DEV)))
        strided = (j <= i).to(DEV).repeat_interleave(2, dim=-1)[..., ::2]
        check_against_reference(Inputs(q, k, v, strided))
        check_against_reference(Inputs(q, k, v, per_batch.to(DEV)))
        kwargs = {"key_padding_mask": kpm.to(DEV), "is_causal": True}
        check_against_reference(Inputs(q, k, v, window.to(DEV, dtype), kwargs=kwargs))
        q, k, v = _qkv(dtype, B=2, Hq=4, Hk=2, Lq=150, Lk=304, D=D)
        check_against_reference(Inputs(q, k, v, per_head.to(DEV)))


def case_mask_broadcast_over_batch(dtype):
    """Masks broadcast over b but not the heads: the Hopper grids take b inside each head
    (batch_inner); bool tiles with causal and key padding, a float mask with its gradient
    (summed over b), GQA 4:2, both head-dim buckets."""
    for D in (64, 128):
        q, k, v = _qkv(dtype, B=3, Hq=4, Hk=2, Lq=70, Lk=144, D=D)
        kpm = torch.zeros(3, 144, dtype=torch.bool)
        kpm[1, 100:] = True
        kwargs = {"key_padding_mask": kpm.to(DEV), "is_causal": True}
        check_against_reference(Inputs(q, k, v, _bool_mask((1, 4, 70, 144)), kwargs=kwargs))
        check_against_reference(Inputs(q, k, v, _float_mask((1, 4, 70, 144), dtype)))


def case_bshd_views(dtype):
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(DEV, dtype).requires_grad_()

    q, k, v = leaf(2, 40, 4, 64), leaf(2, 70, 2, 64), leaf(2, 70, 2, 64)

    def prepare(q, k, v, m):
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m

    check_against_reference(Inputs(q, k, v, prepare=prepare))


def case_dropout(dtype):
    """Same seed, same bits; forward and backward match the reference driven by the keep mask
    recovered from memattn's output (v = identity, in float32)."""
    p, seed = 0.3, 1234
    B, Hq, Hk, Lq, Lk = 2, 4, 2, 40, 64
    q, k, v = _qkv(dtype, B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=64)
    kwargs = _BOTTOM_RIGHT
    eye = torch.eye(Lk, device=DEV).expand(B, Hk, Lk, Lk).contiguous()
    with torch.no_grad():
        probe = memattn.attention(
            q.detach().float(),
            k.detach().float(),
            eye,
            dropout_p=p,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
    keep = (probe != 0).cpu()
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(seed)
        outs.append(memattn.attention(q, k, v, dropout_p=p, generator=gen, **kwargs))
    assert torch.equal(outs[0], outs[1]), "dropout: same seed, different output"
    grad_out = torch.randn(outs[0].shape, dtype=torch.float64)
    grads = torch.autograd.grad(outs[0], (q, k, v), grad_out.to(DEV, dtype))

    def reference(compute_dtype):
        leaves = [t.detach().cpu().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref = attention_reference(
            *leaves, dropout_p=p, dropout_mask=keep, dtype=compute_dtype, **kwargs
        )
        return (ref, *torch.autograd.grad(ref, leaves, grad_out.to(compute_dtype)))

    ref64, low = reference(torch.float64), reference(dtype)
    names = ("out", "grad_q", "grad_k", "grad_v")
    for name, got, want, lo in zip(names, (outs[0], *grads), ref64, low, strict=True):
        assert_close_policy(name, got, want, lo, dtype)


CASES: list[Callable] = [
    case_plain,
    case_cross_dv,
    case_odd_sizes,
    case_gqa_causal_top_left,
    case_mqa_causal_bottom_right_dead_rows,
    case_causal_bottom_right_lq_lt_lk,
    case_bool_mask_broadcast_and_padding,
    case_key_padding_only_block_skipping,
    case_many_tiles_per_cta,
    case_wide_tiles_d64,
    case_short_keys_d64,
    case_narrow_blocks_d64,
    case_backward_d256,
    case_float_mask_grad_causal_padding,
    case_float_mask_full_and_row_broadcast,
    case_mask_tiles,
    case_structured_mask_blocks,
    case_mask_broadcast_over_batch,
    case_bshd_views,
    case_dropout,
]


def all_cases(dtypes=tuple(DTYPES)) -> list[tuple[str, Callable[[], None]]]:
    out = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for fn in CASES:
            name = f"{fn.__name__.removeprefix('case_')}[{dname}]"
            out.append((name, lambda fn=fn, dtype=dtype: fn(dtype)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default="", help="run cases whose name has this")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=list(DTYPES),
        help="dtypes to run (racecheck: fp16 and bf16 share their kernels' code, one is enough)",
    )
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    cases = [(n, f) for n, f in all_cases(args.dtypes) if args.select in n]
    if args.list:
        print("\n".join(n for n, _ in cases))
        return 0
    if not torch.cuda.is_available():
        print("cuda_sanitize_cases: no CUDA GPU", file=sys.stderr)
        return 2
    info = memattn.build_info()
    if not info["cuda_built"]:
        print(f"cuda_sanitize_cases: memattn has no CUDA backend: {info['cuda_reason']}")
        return 2
    print(f"cuda_sanitize_cases: {len(cases)} cases on {torch.cuda.get_device_name()}", flush=True)
    failed = []
    t_all = time.perf_counter()
    for i, (name, fn) in enumerate(cases):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize()  # surface asynchronous errors at the case that caused them
        except Exception:  # noqa: BLE001 - report every failing case, then exit non-zero
            failed.append(name)
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
            continue
        print(f"ok   {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
    total = time.perf_counter() - t_all
    print(f"cuda_sanitize_cases: {len(cases) - len(failed)} of {len(cases)} ok in {total:.0f}s")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
