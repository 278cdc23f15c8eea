"""Host time of a tiny attention call: memattn against torch's SDPA, same inputs, same run.

The call is so small (default 1x1x128x64) that its kernels take a few microseconds, so the wall
time per call of a loop (synchronised once at the end) is the host path: argument checks,
dispatch, allocation, the extension's validation and launches, and for forward + backward the
autograd engine. Prints a markdown table; numbers are per call.

    python bench/host_overhead.py [--device cuda] [--dtype bf16] [--calls 500]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import memattn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def us_per_call(fn, calls: int, device: torch.device) -> float:
    for _ in range(max(calls // 10, 10)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--shape", default="1,1,128,64", help="B,H,L,D")
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    B, H, L, D = (int(x) for x in args.shape.split(","))
    q, k, v = (
        torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn_like(q)
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}),")
    print(f"torch {torch.__version__}, {B}x{H}x{L}x{D} {dtype}, {args.calls} calls\n")
    print("| implementation | forward (no grad) us | forward + backward us |")
    print("|---|---:|---:|")
    for name, attend in (
        ("memattn", memattn.attention),
        ("sdpa", F.scaled_dot_product_attention),
    ):

        def forward(attend=attend):
            with torch.no_grad():
                attend(q, k, v)

        def forward_backward(attend=attend):
            torch.autograd.grad(attend(q, k, v), (q, k, v), grad)

        fwd = us_per_call(forward, args.calls, device)
        fwd_bwd = us_per_call(forward_backward, args.calls, device)
        print(f"| {name} | {fwd:.1f} | {fwd_bwd:.1f} |")


if __name__ == "__main__":
    main()
