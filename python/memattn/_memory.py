"""Peak-memory measurement for `memattn demo` and `memattn bench`.

CPU: each measurement runs in a fresh Python process, so nothing an earlier measurement left in
the allocator's caches inflates or hides the next one. The child builds its inputs, runs a tiny
warm-up call (libraries, thread pools and code paths initialise there, not in the measurement),
resets the kernel's resident-set high-water mark (``/proc/self/clear_refs`` ``5``), reads the
resident set size, makes the measured call, and reports ``VmHWM - VmRSS(before)``: the extra
resident memory the call needed at its peak (outputs included, inputs excluded). glibc is told to
serve every allocation of 64 KiB or more with ``mmap`` so that freed buffers leave the resident
set at once instead of lingering in malloc's arenas.

CUDA: in process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
what was allocated before the call.

The work to measure is named as ``"module:function"`` plus JSON keyword arguments; the function
builds the inputs and returns a zero-argument callable that makes the call. The child process
is ``python -m memattn._memory``.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["cpu_peak_in_subprocess", "cuda_peak", "proc_status_bytes"]

_RESULT_TAG = "MEMATTN_MEMORY_RESULT "


def proc_status_bytes(field: str) -> int:
    """One ``kB`` field of /proc/self/status (e.g. ``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no field {field!r}")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _resolve(target: str) -> Callable[..., Callable[[], Any]]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    build = _resolve(spec["target"])
    if spec.get("warmup_kwargs") is not None:
        warm = build(**spec["warmup_kwargs"])
        warm()
        del warm
    run = build(**spec["kwargs"])
    gc.collect()
    if spec.get("limit_bytes"):
        # Cap the address space so that an allocation beyond the budget fails with an error
        # (recorded) instead of pushing the machine into swap or the OOM killer.
        vm = proc_status_bytes("VmSize")
        limit = vm + int(spec["limit_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    exact = _reset_hwm()
    rss_before = proc_status_bytes("VmRSS")
    try:
        result = run()
    except (RuntimeError, MemoryError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    hwm = proc_status_bytes("VmHWM")
    del result
    return {
        "ok": True,
        "peak_bytes": max(0, hwm - rss_before),
        "rss_before_bytes": rss_before,
        "hwm_bytes": hwm,
        "hwm_reset": exact,
    }


def cpu_peak_in_subprocess(
    target: str,
    kwargs: dict[str, Any],
    *,
    warmup_kwargs: dict[str, Any] | None = None,
    threads: int | None = None,
    limit_bytes: int | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Peak extra resident memory of one call, measured in a fresh process.

    Returns ``{"ok": True, "peak_bytes": ...}`` or ``{"ok": False, "error": ...}`` (the call
    raised, ran out of its ``limit_bytes`` budget, was killed, or timed out).
    """
    if not os.path.exists("/proc/self/status"):
        return {"ok": False, "error": "peak memory needs Linux /proc (not available here)"}
    spec = {
        "target": target,
        "kwargs": kwargs,
        "warmup_kwargs": warmup_kwargs,
        "threads": threads,
        "limit_bytes": limit_bytes,
    }
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONUNBUFFERED"] = "1"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "memattn._memory", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
        if proc.returncode == -9:
            why += " (out of memory?)"
        return {"ok": False, "error": why}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"measurement process failed (exit {proc.returncode}): {tail}"}


def cuda_peak(run: Callable[[], Any], device: Any = None) -> dict[str, Any]:
    """Peak extra CUDA memory allocated through torch by one call of ``run``."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        result = run()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as e:
        return {"ok": False, "error": f"OutOfMemoryError: {str(e).splitlines()[0][:300]}"}
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return {"ok": True, "peak_bytes": int(peak)}


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = _child(spec)
    print(_RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
