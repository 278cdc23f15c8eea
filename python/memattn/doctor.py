"""`memattn doctor`: what this machine has, what memattn was built with, and what it would run.

Everything here is read, never changed: versions, the CPU's model and SIMD features, the CPU
kernel variants memattn compiled and the one it selected (and why), whether a GPU is there,
whether memattn's CUDA backend was built (what its kernels were built for, or why not), and the
plan for a sample call with the reasons each backend was or was not chosen.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

__all__ = ["collect", "cpu_info", "format_report", "system_meta"]

# The CPU features that decide which memattn kernel variant can run (see build_info()).
_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "amx_bf16",
    "amx_tile",
)


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPU count and the SIMD features memattn cares about."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    info: dict[str, Any] = {
        "model": model,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "features": {name: name in flags for name in _FEATURES} if flags else {},
    }
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        pass
    return info


def _memattn_version() -> str:
    try:
        import memattn

        return str(getattr(memattn, "__version__", "unknown"))
    except Exception as e:  # noqa: BLE001 - doctor reports any import failure
        return f"unavailable ({type(e).__name__}: {e})"


def system_meta() -> dict[str, Any]:
    """Versions and machine facts recorded with every benchmark and demo result."""
    import torch

    return {
        "memattn_version": _memattn_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
    }


def _build_info() -> dict[str, Any]:
    try:
        import memattn

        return dict(memattn.build_info())
    except Exception as e:  # noqa: BLE001 - doctor reports any failure instead of crashing
        return {"error": f"{type(e).__name__}: {e}"}


def _cuda_info(build: dict[str, Any]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch_cuda_version": torch.version.cuda,
        "torch_cuda_available": bool(torch.cuda.is_available()),
        "memattn_cuda_built": bool(build.get("cuda_built", False)),
        "memattn_cuda_reason": build.get("cuda_reason", ""),
        # What the CUDA kernels were built for (architectures, CUDA runtime); "" without CUDA.
        "memattn_cuda_summary": build.get("cuda_summary", ""),
        "devices": [],
    }
    if info["torch_cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "multiprocessors": p.multi_processor_count,
                }
            )
    return info


def _plan_to_dict(plan: Any) -> dict[str, Any]:
    if isinstance(plan, dict):
        return dict(plan)
    return {
        k: getattr(plan, k) for k in ("backend", "kernel", "reason", "verdicts") if hasattr(plan, k)
    }


def _sample_plans(cuda_available: bool) -> list[dict[str, Any]]:
    """explain() for a few representative calls; failures are reported, not raised."""
    import torch

    samples: list[tuple[str, str, torch.dtype, dict[str, Any]]] = [
        ("cpu float32, causal", "cpu", torch.float32, {"is_causal": True}),
        ("cpu bfloat16, key_padding_mask", "cpu", torch.bfloat16, {"key_padding_mask": True}),
        ("cpu float16 (not supported on CPU)", "cpu", torch.float16, {}),
    ]
    if cuda_available:
        samples.append(("cuda bfloat16, causal", "cuda", torch.bfloat16, {"is_causal": True}))
    out = []
    for label, device, dtype, kw in samples:
        B, Hq, Hk, L, D = 2, 8, 2, 128, 64
        entry: dict[str, Any] = {
            "call": label,
            "shape": {"B": B, "Hq": Hq, "Hk": Hk, "Lq": L, "Lk": L, "D": D},
        }
        try:
            import memattn

            q = torch.randn(B, Hq, L, D, device=device, dtype=dtype)
            k = torch.randn(B, Hk, L, D, device=device, dtype=dtype)
            v = torch.randn(B, Hk, L, D, device=device, dtype=dtype)
            if kw.get("key_padding_mask"):
                kw = dict(kw, key_padding_mask=torch.zeros(B, L, dtype=torch.bool, device=device))
            entry["plan"] = _plan_to_dict(memattn.explain(q, k, v, **kw))
        except Exception as e:  # noqa: BLE001 - doctor reports any failure instead of crashing
            entry["error"] = f"{type(e).__name__}: {e}"
        out.append(entry)
    return out


def _verdicts(plan: dict[str, Any]) -> list[tuple[str, list[str]]]:
    out = []
    for v in plan.get("verdicts", []):
        if isinstance(v, dict):
            out.append((str(v.get("backend", "?")), list(v.get("reasons", []))))
        else:
            out.append((str(v[0]), list(v[1])))
    return out


def collect() -> dict[str, Any]:
    """Everything `memattn doctor` reports, as a JSON-serialisable dict."""
    import torch

    build = _build_info()
    report: dict[str, Any] = {
        "memattn_version": _memattn_version(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        },
        "cpu": cpu_info(),
        "build": build,
        "env": {
            k: os.environ[k] for k in ("MEMATTN_CPU_ISA", "OMP_NUM_THREADS") if k in os.environ
        },
    }
    report["cuda"] = _cuda_info(build)
    report["sample_plans"] = _sample_plans(report["cuda"]["torch_cuda_available"])
    return report


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_report(r: dict[str, Any]) -> str:
    """Human-readable form of collect()'s dict."""
    lines = [f"memattn {r['memattn_version']}"]
    lines.append(f"  python   {r['python']['version']} ({r['python']['executable']})")
    lines.append(f"  platform {r['platform']}")
    t = r["torch"]
    lines.append(
        f"  torch    {t['version']}, {t['threads']} threads (interop {t['interop_threads']})"
    )
    cpu = r["cpu"]
    lines.append("")
    lines.append(f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['logical_cpus']} logical CPUs)")
    if cpu.get("features"):
        have = [n for n, ok in cpu["features"].items() if ok]
        lack = [n for n, ok in cpu["features"].items() if not ok]
        lines.append(f"  features:    {' '.join(have) or '-'}")
        lines.append(f"  missing:     {' '.join(lack) or '-'}")
    if "torch_cpu_capability" in cpu:
        lines.append(f"  torch picks: {cpu['torch_cpu_capability']}")
    b = r["build"]
    lines.append("")
    if "error" in b:
        lines.append(f"memattn build: UNAVAILABLE: {b['error']}")
        lines.append("  fix: reinstall with `pip install .` from the repository root")
    else:
        lines.append(f"memattn build {b.get('version', '?')}")
        lines.append(f"  CPU kernels built:  {', '.join(b.get('cpu_isas_built', [])) or '-'}")
        lines.append(f"  usable on this CPU: {', '.join(b.get('cpu_isas_usable', [])) or '-'}")
        lines.append(
            f"  selected:           {b.get('cpu_isa_selected', '?')} "
            f"({b.get('cpu_isa_reason', '')})"
        )
    if r["env"]:
        lines.append("  environment:        " + ", ".join(f"{k}={v}" for k, v in r["env"].items()))
    c = r["cuda"]
    lines.append("")
    lines.append(
        f"CUDA: torch built with CUDA {c['torch_cuda_version'] or '-'}; "
        f"GPU available: {_yes(c['torch_cuda_available'])}"
    )
    for d in c["devices"]:
        lines.append(
            f"  cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')}, "
            f"{d['memory_gib']} GiB, {d['multiprocessors']} SMs)"
        )
    built = _yes(c["memattn_cuda_built"])
    reason = f" ({c['memattn_cuda_reason']})" if c["memattn_cuda_reason"] else ""
    lines.append(f"  memattn CUDA backend built: {built}{reason}")
    if c.get("memattn_cuda_summary"):
        lines.append(f"  memattn CUDA build:         {c['memattn_cuda_summary']}")
    lines.append("")
    lines.append("Sample plans (memattn.explain):")
    for s in r["sample_plans"]:
        shp = s["shape"]
        dims = f"B={shp['B']} Hq={shp['Hq']} Hk={shp['Hk']} L={shp['Lq']} D={shp['D']}"
        lines.append(f"  {s['call']} [{dims}]")
        if "error" in s:
            lines.append(f"    error: {s['error']}")
            continue
        p = s["plan"]
        if p.get("backend"):
            lines.append(f"    -> {p['backend']}: {p.get('kernel', '')} ({p.get('reason', '')})")
        else:
            lines.append(
                f"    -> no backend can run this call{': ' + p['reason'] if p.get('reason') else ''}"
            )
        for backend, reasons in _verdicts(p):
            if reasons:
                lines.append(f"       {backend}: not usable: {'; '.join(reasons)}")
            else:
                lines.append(f"       {backend}: usable")
    return "\n".join(lines)
