"""The two ceilings an attention kernel on this GPU is judged against (src/cuda/sm90/NOTES.md):

- matmul: bf16/fp16 dense GEMM TFLOP/s of torch.matmul (cuBLAS) at large square sizes and at
  attention's own product shapes (a 128-row tile against D = 64 / 128 columns, batched);
- copy: device-to-device copy bandwidth (bytes read + bytes written per second) of
  Tensor.copy_ on a buffer far larger than L2.

Median of --reps CUDA-event timings after warm-up, no cache flush (the buffers dwarf L2).

    python bench/ceilings.py [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from memattn.bench import cuda_event_times


def median_ms(fn, reps: int) -> float:
    return statistics.median(cuda_event_times(fn, warmup=5, reps=reps))


def matmul_tflops(m: int, n: int, k: int, dtype: torch.dtype, reps: int, batch: int = 1) -> float:
    """TFLOP/s of a (batch x) [m, k] @ [k, n] product."""
    a = torch.randn(batch, m, k, device="cuda", dtype=dtype)
    b = torch.randn(batch, k, n, device="cuda", dtype=dtype)
    out = torch.empty(batch, m, n, device="cuda", dtype=dtype)
    ms = median_ms(lambda: torch.matmul(a, b, out=out), reps)
    return 2.0 * batch * m * n * k / (ms * 1e-3) / 1e12


def copy_gbps(nbytes: int, reps: int) -> float:
    """GB/s (1e9 bytes) of reads + writes of a device-to-device copy of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps)
    return 2.0 * nbytes / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    rows: list[tuple[str, float, str]] = []
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for size in (4096, 8192):
            tf = matmul_tflops(size, size, size, dtype, args.reps)
            rows.append((f"matmul {name} {size}x{size}x{size}", tf, "TFLOP/s"))
    # Attention's products, batched over 1024 tiles: S = Q K^T (128 x 128, k = D) and
    # O += P V (128 x D, k = 128), bf16.
    for d in (64, 128):
        tf = matmul_tflops(128, 128, d, torch.bfloat16, args.reps, batch=1024 * 8)
        rows.append((f"matmul bf16 batched 128x128x{d} (S = Q K^T)", tf, "TFLOP/s"))
        tf = matmul_tflops(128, d, 128, torch.bfloat16, args.reps, batch=1024 * 8)
        rows.append((f"matmul bf16 batched 128x{d}x128 (O += P V)", tf, "TFLOP/s"))
    for nbytes in (2**28, 2**30):
        rows.append((f"copy D2D {nbytes >> 20} MiB", copy_gbps(nbytes, args.reps), "GB/s"))

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("| ceiling | value | unit |\n|---|---:|---|")
    for label, value, unit in rows:
        print(f"| {label} | {value:.0f} | {unit} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
