"""memattn.nn.MultiheadAttention (via memattn.optimize) against torch.nn.MultiheadAttention.

Issue 4's target shape: E=1024, 16 heads, B=8, L=2048, self-attention with a
key_padding_mask (a quarter of half the batch padded), eval (no_grad) forward and a training
forward+backward, median of 3 timed calls after one warm-up, same threads. On CPU in fp32;
on CUDA (once memattn's CUDA backend exists) in bf16.

    python bench/mha_dropin.py [--batch 8] [--length 2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import memattn


def median_ms(fn, device: str, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    E, H, B, L, device = 1024, 16, args.batch, args.length, args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, H, batch_first=True, device=device, dtype=dtype)
    ours = memattn.optimize(copy.deepcopy(reference))
    x = torch.randn(B, L, E, device=device, dtype=dtype)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=device)
    kpm[B // 2 :, L - L // 4 :] = True

    def eval_call(m):
        m.eval()
        with torch.no_grad():
            return m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    def train_call(m):
        m.train()
        m.zero_grad()
        m(x, x, x, key_padding_mask=kpm, need_weights=False)[0].float().sum().backward()

    err = (eval_call(ours).float() - eval_call(reference).float()).abs().max().item()
    rows = []
    for mode, call in (("eval forward", eval_call), ("train fwd+bwd", train_call)):
        t_ref = median_ms(lambda call=call: call(reference), device)
        t_ours = median_ms(lambda call=call: call(ours), device)
        rows.append((mode, t_ref, t_ours))
    print(
        f"E={E} H={H} B={B} L={L} {str(dtype)[6:]} on {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"max |memattn - nn.MHA| (eval output): {err:.2e}")
    print(f"{'mode':<14} {'nn.MHA ms':>10} {'memattn ms':>11} {'speed-up':>9}")
    for mode, t_ref, t_ours in rows:
        print(f"{mode:<14} {t_ref:>10.1f} {t_ours:>11.1f} {t_ref / t_ours:>8.2f}x")


if __name__ == "__main__":
    main()
