"""Masked calls next to the unmasked call of the same shape (issue target: within 0.9x), memattn
and torch's CUDNN backend given the same attn_mask, same inputs, same run. Forward and forward +
backward (gradients of q, k, v); every call of a shape and pass is timed in --rounds interleaved
rounds (memattn.bench.time_rounds: each round times every call once, in an order rotated every
round; one timing = memattn.bench.cuda_time_once), and its time is the median over the rounds;
prints a markdown table. Speed ratio = unmasked time / masked time of the same implementation.

Masks: bool [B, 1, L, L] (90% attend), q-dtype additive [1, H, L, L], and a bool [B, 1, 1, L]
padding-style mask expanded to [B, 1, L, L] (stride 0 along queries). With --structured, masks
whose blocks are mostly all hidden or all visible, where the Hopper forward skips the hidden key
blocks and the mask reads of the visible ones: the causal mask as a bool [L, L] mask and as an
additive q-dtype one (0 / -inf), next to is_causal=True; a sliding window of 256 keys either
side; four documents of L / 4 tokens (block-diagonal).

    python bench/masked_calls.py [--rounds 3] [--reps 10] [--dtype bf16] [--structured]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import memattn
from memattn.bench import cuda_time_once, time_rounds

SHAPES = ((8, 32, 2048, 64), (8, 16, 2048, 128))


# The is_causal=True call without a mask (the structured masks' reference row).
IS_CAUSAL = "is_causal (no mask)"


def masks(B: int, H: int, L: int, dtype: torch.dtype) -> dict:
    return {
        "none": None,
        "bool [B,1,L,L]": torch.rand(B, 1, L, L, device="cuda") < 0.9,
        "additive [1,H,L,L]": torch.randn(1, H, L, L, device="cuda", dtype=dtype),
        "bool [B,1,1,L] expanded": (torch.rand(B, 1, 1, L, device="cuda") < 0.9).expand(B, 1, L, L),
    }


def structured_masks(L: int, dtype: torch.dtype) -> dict:
    i = torch.arange(L, device="cuda")[:, None]
    j = torch.arange(L, device="cuda")[None, :]
    causal = j <= i
    zero = torch.zeros((), device="cuda", dtype=dtype)
    return {
        "none": None,
        IS_CAUSAL: None,
        "causal as bool [L,L]": causal,
        "causal as additive [L,L]": torch.where(causal, zero, -math.inf),
        "window 256 bool [L,L]": (i - j).abs() <= 256,
        "4 documents bool [L,L]": i // (L // 4) == j // (L // 4),
    }


def timed(attend, q, k, v, mask, grad_out):
    if grad_out is None:

        def forward():
            with torch.no_grad():
                attend(q, k, v, mask)

        return forward

    def forward_backward():
        torch.autograd.grad(attend(q, k, v, mask), (q, k, v), grad_out)

    return forward_backward


def memattn_attend(q, k, v, mask, is_causal=False):
    return memattn.attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def cudnn_attend(q, k, v, mask, is_causal=False):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument(
        "--reps", type=int, default=10, help="timed calls per timing without Triton's do_bench"
    )
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument(
        "--structured", action="store_true", help="structured masks (causal, window, documents)"
    )
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}\n")
    print(
        "| B x H x L x D | pass | mask | memattn ms | x unmasked | CUDNN ms | x unmasked "
        "| CUDNN / memattn time |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for B, H, L, D in SHAPES:
        q, k, v = (
            torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        grad_out = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
        for backward in (False, True):
            calls = {}  # (mask, impl) -> call, in the table's order
            pass_masks = structured_masks(L, dtype) if args.structured else masks(B, H, L, dtype)
            for name, mask in pass_masks.items():
                for impl, attend in (("memattn", memattn_attend), ("cudnn", cudnn_attend)):
                    if name == IS_CAUSAL:
                        attend = functools.partial(attend, is_causal=True)
                    fn = timed(attend, q, k, v, mask, grad_out if backward else None)
                    try:
                        fn()  # a backend that refuses the call says so here
                        calls[name, impl] = fn
                    except RuntimeError:
                        pass
            times, _ = time_rounds(
                calls,
                rounds=args.rounds,
                time_one=functools.partial(cuda_time_once, warmup=3, reps=args.reps),
                errors=(RuntimeError,),
            )
            ms = {key: statistics.median(t) for key, t in times.items()}
            base = {impl: ms.get(("none", impl), math.nan) for impl in ("memattn", "cudnn")}
            for name in pass_masks:
                row = {impl: ms.get((name, impl), math.nan) for impl in ("memattn", "cudnn")}
                print(
                    f"| {B}x{H}x{L}x{D} | {'fwd+bwd' if backward else 'fwd'} | {name} "
                    f"| {row['memattn']:.3f} | {base['memattn'] / row['memattn']:.2f} "
                    f"| {row['cudnn']:.3f} | {base['cudnn'] / row['cudnn']:.2f} "
                    f"| {row['cudnn'] / row['memattn']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
