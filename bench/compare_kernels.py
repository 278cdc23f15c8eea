"""TFLOP/s of memattn's sm90 and sm80 kernels next to torch's FLASH and CUDNN backends, same
inputs, same run: a quick A/B while tuning the Hopper kernels (the full sweep is `memattn bench`).
Times the forward, or with --backward forward + backward (FLOPs 3.5x the forward's, as in
`memattn bench`), with CUDA events, median of --reps runs after warm-up. With --backward, the
column "sm90 det" is the sm90 kernels under torch.use_deterministic_algorithms(True): the
atomic-free two-pass backward instead of the default single pass.

    python bench/compare_kernels.py [--reps 20] [--backward] [--head-dims 64,128]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import memattn
from memattn.bench import cuda_event_times


def median_ms(fn, reps: int) -> float:
    return statistics.median(cuda_event_times(fn, warmup=3, reps=reps))


def timed_pass(fn, q, k, v, grad_out):
    """fn's forward alone (grad_out None) or its forward + backward."""
    if grad_out is None:

        def run():
            with torch.no_grad():
                fn(q, k, v)

        return run

    def run_both():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    return run_both


def memattn_ms(
    q, k, v, causal: bool, sm90: bool, reps: int, grad_out, deterministic: bool = False
) -> float:
    os.environ["MEMATTN_DISABLE_SM90"] = "0" if sm90 else "1"
    torch.use_deterministic_algorithms(deterministic)
    try:

        def fn(q, k, v):
            return memattn.attention(q, k, v, is_causal=causal)

        return median_ms(timed_pass(fn, q, k, v, grad_out), reps)
    finally:
        os.environ.pop("MEMATTN_DISABLE_SM90")
        torch.use_deterministic_algorithms(False)


def sdpa_ms(q, k, v, causal: bool, backend, reps: int, grad_out) -> float | None:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    try:
        with sdpa_kernel(backend):
            return median_ms(timed_pass(fn, q, k, v, grad_out), reps)
    except RuntimeError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--head-dims", default="64,128,256", help="comma-separated")
    args = parser.parse_args()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    what = "forward + backward" if args.backward else "forward"
    print(f"pass: {what}")
    det = f"{'sm90 det':>10}" if args.backward else ""
    header = f"{'case':<34}{'sm90':>8}{det}{'sm80':>8}{'FLASH':>8}{'CUDNN':>8}  (TFLOP/s)"
    print(header)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for D in head_dims:
        for L in (2048, 8192):
            for causal in (False, True):
                B, H = max(1, 16384 // L), 2048 // D
                q, k, v = (
                    torch.randn(
                        B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen
                    ).requires_grad_(args.backward)
                    for _ in range(3)
                )
                grad_out = torch.randn_like(q) if args.backward else None
                flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
                flops *= 3.5 if args.backward else 1.0
                times = [
                    memattn_ms(q, k, v, causal, True, args.reps, grad_out),
                    memattn_ms(q, k, v, causal, False, args.reps, grad_out),
                    sdpa_ms(q, k, v, causal, SDPBackend.FLASH_ATTENTION, args.reps, grad_out),
                    sdpa_ms(q, k, v, causal, SDPBackend.CUDNN_ATTENTION, args.reps, grad_out),
                ]
                if args.backward:
                    times.insert(1, memattn_ms(q, k, v, causal, True, args.reps, grad_out, True))
                widths = [8, 10, 8, 8, 8] if args.backward else [8] * 4
                cells = "".join(
                    f"{flops / t / 1e9:>{w}.0f}" if t else f"{'-':>{w}}"
                    for t, w in zip(times, widths, strict=True)
                )
                name = f"{B}x{H}x{L}x{D}{' causal' if causal else ''}"
                print(f"{name:<34}{cells}", flush=True)


if __name__ == "__main__":
    main()
