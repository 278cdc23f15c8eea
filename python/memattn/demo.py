"""`memattn demo`: memattn.attention next to PyTorch's own attention, on a realistic shape.

For each case (plain self-attention, and a padded batch with a key_padding_mask) and each
implementation (memattn, then every SDPA backend this device has), the demo reports:
- the largest absolute error against a float64 reference (memattn.reference),
- the median time of a few calls after a warm-up,
- the peak memory of one call (CPU: a fresh process per measurement, see memattn._memory;
  CUDA: torch's allocator statistics).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from memattn import bench

__all__ = ["SIZES", "format_table", "run_demo"]

# name: (B, H, L, D). "tiny" exists for the test suite.
SIZES = {
    "default": (4, 16, 2048, 64),
    "small": (2, 8, 512, 64),
    "tiny": (1, 2, 64, 32),
}


def _reference(inputs: dict[str, Any]) -> Any:
    """float64 reference output, computed one batch element at a time to bound its memory."""
    import torch

    from memattn.reference import attention_reference

    q, k, v, kpm = inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"]
    outs = []
    for b in range(q.shape[0]):
        outs.append(
            attention_reference(
                q[b : b + 1].detach().cpu().double(),
                k[b : b + 1].detach().cpu().double(),
                v[b : b + 1].detach().cpu().double(),
                key_padding_mask=None if kpm is None else kpm[b : b + 1].cpu(),
                is_causal=inputs["is_causal"],
            )
        )
    return torch.cat(outs, dim=0)


def _peak(device: str, impl: str, case: bench.Case, step: Any) -> dict[str, Any]:
    import torch

    from memattn import _memory

    if device == "cuda":
        with torch.no_grad():
            return _memory.cuda_peak(step)
    kwargs = {
        "impl": impl,
        "B": case.B,
        "Hq": case.Hq,
        "Hk": case.Hk,
        "Lq": case.Lq,
        "Lk": case.Lk,
        "D": case.D,
        "dtype": case.dtype,
        "pad_frac": case.pad_frac,
    }
    warm = dict(kwargs, B=1, Lq=min(64, case.Lq), Lk=min(64, case.Lk))
    return _memory.cpu_peak_in_subprocess(
        "memattn.bench:memory_target", kwargs, warmup_kwargs=warm, threads=torch.get_num_threads()
    )


def resolve_device(requested: str) -> tuple[str, str]:
    """('cpu' | 'cuda', note). Raises RuntimeError with a clear reason when cuda can't run."""
    import torch

    import memattn

    cuda_built = bool(memattn.build_info().get("cuda_built", False))
    reason = memattn.build_info().get("cuda_reason", "") or "no reason recorded"
    if requested == "cpu":
        return "cpu", ""
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--device cuda: torch sees no CUDA GPU on this machine "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda})."
            )
        if not cuda_built:
            raise RuntimeError(
                "--device cuda: memattn was built without its CUDA backend "
                f"({reason}). Use --device cpu."
            )
        return "cuda", ""
    if torch.cuda.is_available() and cuda_built:
        return "cuda", ""
    if torch.cuda.is_available():
        return (
            "cpu",
            f"a GPU is present but memattn's CUDA backend is not built ({reason}): using CPU",
        )
    return "cpu", ""


def run_demo(
    *, device: str = "auto", size: str = "default", reps: int = 3, progress: bool = True
) -> dict[str, Any]:
    import torch

    import memattn

    device, note = resolve_device(device)
    B, H, L, D = SIZES[size]
    dtype = "fp32" if device == "cpu" else "bf16"
    impls = bench.CPU_IMPLS if device == "cpu" else bench.CUDA_IMPLS
    impls = tuple(n for n in impls if bench._sdpa_available(n, device) is None)
    cases = [
        ("self-attention", bench.Case("self", B, H, H, L, L, D, dtype)),
        (
            "padded batch (key_padding_mask)",
            bench.Case("padded", B, H, H, L, L, D, dtype, pad_frac=0.25),
        ),
    ]
    bar = bench.Progress(len(cases) * (1 + 2 * len(impls)), enabled=progress, label="demo ")
    rows = []
    plans = {}
    try:
        for title, case in cases:
            inputs = bench.make_inputs(case, device, requires_grad=False, seed=0)
            bar.step(f"{title}: float64 reference")
            ref = _reference(inputs)
            plan = memattn.explain(
                inputs["q"], inputs["k"], inputs["v"], key_padding_mask=inputs["key_padding_mask"]
            )
            plans[title] = plan if isinstance(plan, dict) else dict(plan)
            case_rows: dict[str, dict[str, Any]] = {}
            steps = {}
            for impl in impls:
                row: dict[str, Any] = {"case": title, "impl": impl, "shape": asdict(case)}
                case_rows[impl] = row
                step = bench._step_fn(impl, inputs, backward=False)
                bar.step(f"{title}: {impl} error and time")
                try:
                    with torch.no_grad():
                        out = step()
                        if device == "cuda":
                            row["median_ms"] = bench.cuda_time_once(step, warmup=1, reps=reps)
                        else:
                            steps[impl] = step
                    row["max_abs_err"] = (out.detach().cpu().double() - ref).abs().max().item()
                    del out
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                    row["error"] = f"{type(e).__name__}: {bench._first_line(e)}"
            if steps:
                # CPU: time the implementations interleaved call by call (see bench).
                with torch.no_grad():
                    timed = bench.time_interleaved(steps, warmup=1, reps=reps, max_seconds=60.0)
                for impl, times in timed.items():
                    case_rows[impl]["median_ms"] = statistics.median(times)
            for impl, row in case_rows.items():
                bar.step(f"{title}: {impl} peak memory")
                if "error" not in row:
                    step = bench._step_fn(impl, inputs, backward=False)
                    row["memory"] = _peak(device, impl, case, step)
                rows.append(row)
            del inputs, ref
    finally:
        bar.close()
    from memattn.doctor import system_meta

    meta = system_meta()
    meta["device"] = device
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return {
        "meta": meta,
        "note": note,
        "size": size,
        "dtype": dtype,
        "shape": {"B": B, "H": H, "L": L, "D": D},
        "rows": rows,
        "plans": plans,
    }


def _ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _mib(row: dict[str, Any]) -> str:
    m = row.get("memory", {})
    return f"{m['peak_bytes'] / 2**20:.1f}" if m.get("ok") else "-"


def format_table(result: dict[str, Any]) -> str:
    meta, shp = result["meta"], result["shape"]
    where = meta.get("gpu") if meta["device"] == "cuda" else meta["cpu"]["model"]
    lines = [
        f"memattn {meta['memattn_version']} demo on {meta['device']} ({where}), "
        f"torch {meta['torch']}, {meta['torch_threads']} threads",
        f"q, k, v: [B={shp['B']}, H={shp['H']}, L={shp['L']}, D={shp['D']}] {result['dtype']}; "
        "error = max |out - float64 reference|; time = median; memory = peak extra during the call",
    ]
    if result["note"]:
        lines.append(f"note: {result['note']}")
    header = f"{'case':<32} {'impl':<15} {'max error':>10} {'time ms':>9} {'peak MiB':>9}"
    for title in dict.fromkeys(r["case"] for r in result["rows"]):
        lines.append("")
        lines.append(header)
        lines.append("-" * len(header))
        group = [r for r in result["rows"] if r["case"] == title]
        for r in group:
            if "error" in r:
                lines.append(f"{title:<32} {r['impl']:<15} failed: {r['error']}")
                continue
            lines.append(
                f"{title:<32} {r['impl']:<15} {r['max_abs_err']:>10.2e} "
                f"{_ms(r['median_ms']):>9} {_mib(r):>9}"
            )
        lines.append(_summary(group))
        plan = result["plans"].get(title, {})
        if plan:
            lines.append(f"memattn plan: {plan.get('kernel', '?')} ({plan.get('reason', '')})")
    return "\n".join(lines)


def _summary(group: list[dict[str, Any]]) -> str:
    ours = next((r for r in group if r["impl"] == "memattn" and "median_ms" in r), None)
    others = [r for r in group if r["impl"] != "memattn" and "median_ms" in r]
    if ours is None or not others:
        return "summary: nothing to compare"
    fastest = min(others, key=lambda r: r["median_ms"])
    speed = fastest["median_ms"] / ours["median_ms"]
    text = f"summary: memattn is {speed:.2f}x the speed of the fastest PyTorch backend ({fastest['impl']})"
    mem_ok = [r for r in others if r.get("memory", {}).get("ok")]
    if ours.get("memory", {}).get("ok") and mem_ok and ours["memory"]["peak_bytes"] >= 2**20:
        ours_b = ours["memory"]["peak_bytes"]
        ratios = ", ".join(f"{r['impl']} {r['memory']['peak_bytes'] / ours_b:.2f}x" for r in mem_ok)
        text += f"\npeak memory relative to memattn's: {ratios}"
    return text
