"""`memattn bench`: memattn against PyTorch's SDPA backends, per DESIGN.md §5.

Protocol
- Every implementation runs in the same process, on the same inputs, with the same number of
  threads (``torch.get_num_threads()``; memattn follows it too), one after the other per case.
- Timing: warm-up calls, then the median of several timed calls. CPU: ``time.perf_counter``,
  the implementations interleaved call by call (see ``time_interleaved``).
  CUDA: ``triton.testing.do_bench`` (median, L2 flushed) when Triton is there, else CUDA events;
  ``rounds`` rounds per case, each timing every implementation once in an order rotated every
  round, and the case's time is the median over the rounds (``time_rounds``), so that a drift
  of the GPU's clocks during a case does not favour whichever implementation ran first.
- FLOPs: forward ``4 * Hq * D * (allowed (query, key) pairs, summed over the batch)``; without
  causal that is ``B * Lq * Lk`` pairs; causal counts the pairs the alignment allows (``Lq*Lk/2``
  only when ``Lq == Lk``, roughly); padded keys are not counted. Forward + backward is 3.5x the
  forward.
- Sweep: a token budget per batch (``B = tokens // L``) and a hidden size (``Hq = hidden // D``).
  §5's 16k tokens and hidden 2048 are the CUDA defaults; on CPU the defaults are 4096 tokens and
  hidden 512, so the full sweep finishes in minutes on a small machine. Both are flags, and the
  values used are written with the results.
- CUDA extras (§5): cross-attention 4096x77 and 1024x4096, a padded batch (bool key padding)
  at L=2048 with D=128, GQA 32:8, decode. A PyTorch backend that refuses a case (FLASH with a
  mask, a head dim or GQA it lacks, ...) is recorded as ``unsupported`` with torch's reasons, not
  as a failure; the fastest backend that runs the case is the comparison. MATH is skipped where
  its Lq x Lk scores would not fit the memory budget.
- Peak memory of a forward pass over L (B=1, H=8, D=64, fp32): on CPU each number comes from a
  fresh process (see ``memattn._memory``); on CUDA from torch's allocator statistics.

Results: JSON (every number, plus device, CPU model, threads, versions, date and command), a
markdown section in ``bench/RESULTS.md`` that is replaced each time the same device runs again,
and a PNG plot (``plot_results``; needs matplotlib, the ``memattn[bench]`` extra) of the
speed-up per row and the peak-memory sweep, linked from that section.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = [
    "Case",
    "allowed_pairs",
    "case_flops",
    "make_cases",
    "plot_results",
    "run_bench",
    "update_results_markdown",
]

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
CPU_IMPLS = ("memattn", "sdpa_flash", "sdpa_math")
CUDA_IMPLS = ("memattn", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")


# ---------------------------------------------------------------------------------------------
# Cases and FLOPs


@dataclass(frozen=True)
class Case:
    """One benchmarked attention call. q [B, Hq, Lq, D], k/v [B, Hk, Lk, D]."""

    kind: str  # "self", "cross", "padded", "gqa", "decode"
    B: int
    Hq: int
    Hk: int
    Lq: int
    Lk: int
    D: int
    dtype: str  # short name: fp32, bf16, fp16, fp64
    causal: bool = False
    # Fraction of keys padded on average (key_padding_mask); 0 = no mask.
    pad_frac: float = 0.0

    def label(self) -> str:
        shape = f"{self.B}x{self.Hq}x{self.Lq}x{self.D}"
        if self.Lk != self.Lq:
            shape = f"{self.B}x{self.Hq}x{self.Lq}x{self.Lk}x{self.D}"
        extra = []
        if self.Hk != self.Hq:
            extra.append(f"gqa {self.Hq}:{self.Hk}")
        if self.pad_frac:
            extra.append(f"pad {self.pad_frac:.0%}")
        if self.causal:
            extra.append("causal")
        return f"{self.kind} {self.dtype} {shape}" + (f" ({', '.join(extra)})" if extra else "")


def key_lengths(case: Case) -> list[int]:
    """Unpadded key count per batch element: from Lk down to about Lk*(1-2*pad_frac)."""
    if not case.pad_frac:
        return [case.Lk] * case.B
    out = []
    for b in range(case.B):
        frac = case.pad_frac * 2 * b / max(case.B - 1, 1) if case.B > 1 else case.pad_frac
        out.append(max(1, case.Lk - round(case.Lk * frac)))
    return out


def allowed_pairs(
    Lq: int, Lk: int, causal: bool, alignment: str = "top_left", Lk_valid: int | None = None
) -> int:
    """(query, key) pairs a call computes: keys j < Lk_valid and, if causal, j <= i + offset."""
    valid = Lk if Lk_valid is None else Lk_valid
    if not causal:
        return Lq * valid
    offset = 0 if alignment == "top_left" else Lk - Lq
    total = 0
    for i in range(Lq):
        total += max(0, min(valid, i + offset + 1))
    return total


def case_flops(case: Case, backward: bool) -> float:
    pairs = sum(allowed_pairs(case.Lq, case.Lk, case.causal, Lk_valid=n) for n in key_lengths(case))
    fwd = 4.0 * case.Hq * case.D * pairs
    return fwd * 3.5 if backward else fwd


def make_cases(
    *,
    dtypes: Sequence[str],
    lengths: Sequence[int],
    head_dims: Sequence[int],
    tokens: int,
    hidden: int,
    causal: Sequence[bool] = (False, True),
    extras: bool = True,
    device: str = "cpu",
) -> list[Case]:
    """The sweep: self-attention over dtypes x head dims x lengths x causal, plus (``extras``)
    cross-attention, a padded batch, GQA and decode rows. On CUDA the extras are DESIGN.md §5's
    fixed shapes (cross 4096x77 and 1024x4096, padding at L=2048 with D=128, GQA 32:8 at
    hidden 2048); on CPU they scale with the (smaller) sweep."""
    cases = []
    for dt in dtypes:
        for D in head_dims:
            H = max(1, hidden // D)
            for L in lengths:
                B = max(1, tokens // L)
                for c in causal:
                    cases.append(Case("self", B, H, H, L, L, D, dt, c))
        if extras and device == "cuda":
            cases += _cuda_extras(
                dt, lengths=lengths, head_dims=head_dims, tokens=tokens, hidden=hidden
            )
        elif extras:
            D = 64 if 64 in head_dims or not head_dims else head_dims[0]
            H = max(1, hidden // D)
            Lbig = max(lengths)
            Lmid = sorted(lengths)[len(lengths) // 2]
            Lsmall = min(lengths)
            cases += [
                # Cross-attention: image tokens to a short text (4096x77 in §5), and the reverse
                # aspect (1024x4096).
                Case("cross", max(1, tokens // Lbig), H, H, Lbig, 77, D, dt),
                Case("cross", max(1, tokens // Lbig), H, H, Lsmall, Lbig, D, dt),
                # A padded batch: key_padding_mask, 25% of keys padded on average.
                Case("padded", max(2, tokens // Lmid), H, H, Lmid, Lmid, D, dt, pad_frac=0.25),
                # GQA 4:1 (§5: 32:8).
                Case("gqa", max(1, tokens // Lmid), H, max(1, H // 4), Lmid, Lmid, D, dt),
                # Decode: one query against a long cache.
                Case("decode", max(1, tokens // Lbig) * 4, H, H, 1, Lbig, D, dt),
            ]
    return cases


def _cuda_extras(
    dt: str, *, lengths: Sequence[int], head_dims: Sequence[int], tokens: int, hidden: int
) -> list[Case]:
    """DESIGN.md §5's extra CUDA rows for one dtype."""
    D = 64 if 64 in head_dims or not head_dims else head_dims[0]
    H = max(1, hidden // D)
    D_pad = 128 if 128 in head_dims or not head_dims else max(head_dims)
    H_pad = max(1, hidden // D_pad)
    Lbig = max(lengths)
    Lmid = 2048 if 2048 in lengths else sorted(lengths)[len(lengths) // 2]
    return [
        # Cross-attention: image tokens to a short text, and a short query over a long context.
        Case("cross", max(1, tokens // 4096), H, H, 4096, 77, D, dt),
        Case("cross", max(1, tokens // 4096), H, H, 1024, 4096, D, dt),
        # A padded batch (bool key padding, 25% of keys padded on average) at L=2048, D=128:
        # SDPA gets it as a [B, 1, 1, L] bool mask, which FLASH refuses; the fastest backend
        # that supports it is the comparison.
        Case("padded", max(2, tokens // 2048), H_pad, H_pad, 2048, 2048, D_pad, dt, pad_frac=0.25),
        # GQA 32:8 (hidden 2048, D 64).
        Case("gqa", max(1, tokens // Lmid), H, max(1, H // 4), Lmid, Lmid, D, dt),
        Case("gqa", max(1, tokens // Lmid), H, max(1, H // 4), Lmid, Lmid, D, dt, True),
        # Decode: one query against a long cache.
        Case("decode", max(1, tokens // Lbig) * 4, H, H, 1, Lbig, D, dt),
    ]


# ---------------------------------------------------------------------------------------------
# Implementations


def _torch_dtype(short: str) -> Any:
    import torch

    return getattr(torch, DTYPES[short])


def make_inputs(case: Case, device: str, *, requires_grad: bool, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = _torch_dtype(case.dtype)

    def rnd(*shape: int) -> Any:
        t = torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    inputs: dict[str, Any] = {
        "q": rnd(case.B, case.Hq, case.Lq, case.D),
        "k": rnd(case.B, case.Hk, case.Lk, case.D),
        "v": rnd(case.B, case.Hk, case.Lk, case.D),
        "key_padding_mask": None,
        "is_causal": case.causal,
    }
    if case.pad_frac:
        kpm = torch.zeros(case.B, case.Lk, dtype=torch.bool)
        for b, n in enumerate(key_lengths(case)):
            kpm[b, n:] = True
        inputs["key_padding_mask"] = kpm.to(device)
    return inputs


_SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}


def impl_fn(name: str) -> Callable[..., Any]:
    """A function (q, k, v, key_padding_mask, is_causal) -> out for one implementation."""
    import torch.nn.functional as F

    if name == "memattn":
        import memattn

        def run_memattn(q: Any, k: Any, v: Any, key_padding_mask: Any, is_causal: bool) -> Any:
            return memattn.attention(
                q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal
            )

        return run_memattn

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA_BACKENDS[name])

    def run_sdpa(q: Any, k: Any, v: Any, key_padding_mask: Any, is_causal: bool) -> Any:
        # SDPA has no key_padding_mask: the user builds a broadcast bool mask (True = attend).
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, **kw
            )

    return run_sdpa


def _step_fn(name: str, inputs: dict[str, Any], backward: bool) -> Callable[[], Any]:
    """A zero-argument callable doing one forward (or forward + backward) of `name`."""
    fn = impl_fn(name)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    kpm, causal = inputs["key_padding_mask"], inputs["is_causal"]
    if not backward:
        return lambda: fn(q, k, v, kpm, causal)
    import torch

    g = torch.Generator(device="cpu").manual_seed(1)
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g).to(q.device, q.dtype)

    def step() -> Any:
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v, kpm, causal)
        out.backward(grad)
        return out

    return step


def memory_target(
    impl: str,
    B: int,
    Hq: int,
    Hk: int,
    Lq: int,
    Lk: int,
    D: int,
    dtype: str,
    causal: bool = False,
    pad_frac: float = 0.0,
    backward: bool = False,
    seed: int = 0,
) -> Callable[[], Any]:
    """Builds the inputs of one case and returns the call to measure (used by _memory's child)."""
    import torch

    case = Case("mem", B, Hq, Hk, Lq, Lk, D, dtype, causal, pad_frac)
    inputs = make_inputs(case, "cpu", requires_grad=backward, seed=seed)
    step = _step_fn(impl, inputs, backward)
    if backward:
        return step

    def fwd() -> Any:
        with torch.no_grad():
            return step()

    return fwd


# ---------------------------------------------------------------------------------------------
# Timing


def cuda_event_times(fn: Callable[[], Any], *, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of fn on the current CUDA stream, timed with CUDA
    events after `warmup` (at least 1) untimed calls; no cache flush between calls."""
    import torch

    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


_Key = TypeVar("_Key", bound=Hashable)  # names the implementations timed by time_rounds


def cuda_time_once(fn: Callable[[], Any], *, warmup: int, reps: int) -> float:
    """One CUDA timing of fn in milliseconds: ``triton.testing.do_bench``'s median (25 ms of
    warm-up, 100 ms of calls, L2 flushed) when Triton is there, else the median of `reps` calls
    timed with CUDA events after `warmup` calls."""
    do_bench = _triton_do_bench()
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return statistics.median(cuda_event_times(fn, warmup=warmup, reps=reps))


def time_rounds(
    steps: dict[_Key, Callable[[], Any]],
    *,
    rounds: int,
    time_one: Callable[[Callable[[], Any]], float],
    errors: tuple[type[BaseException], ...] = (),
    limits: dict[_Key, int] | None = None,
) -> tuple[dict[_Key, list[float]], dict[_Key, BaseException]]:
    """Times several implementations of the same call in `rounds` (at least 1) interleaved
    rounds: each round times every implementation once with ``time_one`` (e.g.
    ``cuda_time_once``, itself a median of many calls), in an order rotated every round, so that
    a drift of the clock or temperature during the case hits all of them alike. Returns one
    time per round for each implementation, and the exceptions of the types in `errors` that an
    implementation raised (it is not timed again after its first one). `limits`: an
    implementation named there takes part in its first ``limits[name]`` rounds only."""
    names = list(steps)
    times: dict[_Key, list[float]] = {name: [] for name in names}
    failed: dict[_Key, BaseException] = {}
    for r in range(max(1, rounds)):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            if name in failed or (limits is not None and r >= limits.get(name, r + 1)):
                continue
            try:
                times[name].append(time_one(steps[name]))
            except errors as e:
                failed[name] = e
    return {name: t for name, t in times.items() if name not in failed}, failed


def _triton_do_bench() -> Callable[..., Any] | None:
    """``triton.testing.do_bench`` when Triton is importable and takes ``return_mode``."""
    try:
        import inspect as _inspect

        from triton.testing import do_bench
    except ImportError:
        return None
    try:
        if "return_mode" not in _inspect.signature(do_bench).parameters:
            return None
    except (TypeError, ValueError):
        return None
    return do_bench


def cuda_timing_method() -> str:
    if _triton_do_bench() is not None:
        return "triton.testing.do_bench (CUDA events, median, L2 flushed, 25 ms warm-up)"
    return "CUDA events (median of the timed calls after warm-up calls)"


def time_interleaved(
    steps: dict[str, Callable[[], Any]], *, warmup: int, reps: int, max_seconds: float
) -> dict[str, list[float]]:
    """CPU timing of several implementations of the same call, interleaved: each round times
    every implementation once, in an order rotated every round, so that a change in the
    machine's load or clock during the measurement hits all of them alike. Milliseconds per
    call; fewer rounds (at least 3) for an implementation so slow that `reps` calls would take
    longer than `max_seconds`."""
    names = list(steps)
    first_s = {}
    for name in names:
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            steps[name]()
        first_s[name] = (time.perf_counter() - t0) / max(1, warmup)
    n = {
        name: reps if t * reps <= max_seconds else max(3, int(max_seconds / max(t, 1e-9)))
        for name, t in first_s.items()
    }

    def wall_ms(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    times, _ = time_rounds(steps, rounds=max(n.values(), default=0), time_one=wall_ms, limits=n)
    return times


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, one line per step in logs."""

    def __init__(self, total: int, *, enabled: bool = True, label: str = "") -> None:
        self.total, self.done, self.label = total, 0, label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, msg: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        line = f"[{self.done}/{self.total} {elapsed:6.1f}s] {self.label}{msg}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:160])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    lengths: list[int] = field(default_factory=lambda: [512, 2048, 4096])
    head_dims: list[int] = field(default_factory=lambda: [64, 128])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    passes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    tokens: int = 4096
    hidden: int = 512
    extras: bool = True
    impls: list[str] = field(default_factory=lambda: list(CPU_IMPLS))
    warmup: int = 1
    reps: int = 5
    # CUDA: interleaved timing rounds per case (time_rounds); CPU interleaves every call instead.
    rounds: int = 1
    max_seconds_per_impl: float = 20.0
    memory_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    memory_heads: int = 8
    memory_head_dim: int = 64
    memory_dtype: str = "fp32"
    memory_budget_frac: float = 0.6
    quick: bool = False


def quick_config(device: str) -> BenchConfig:
    """A small sweep that runs in seconds (CI smoke test; checks the whole pipeline)."""
    return BenchConfig(
        device=device,
        dtypes=["fp32"] if device == "cpu" else ["bf16"],
        lengths=[128, 256],
        head_dims=[64],
        tokens=512,
        hidden=128,
        extras=False,
        impls=list(CPU_IMPLS if device == "cpu" else CUDA_IMPLS),
        warmup=1,
        reps=3,
        memory_lengths=[256, 512, 1024],
        memory_heads=2,
        memory_dtype="fp32" if device == "cpu" else "bf16",
        quick=True,
    )


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _math_bytes_estimate(B: int, H: int, Lq: int, Lk: int, elem: int) -> int:
    # The math path holds the scores and their softmax, both [B, H, Lq, Lk], at once.
    return 2 * B * H * Lq * Lk * elem


def _sdpa_available(name: str, device: str) -> str | None:
    """None when the SDPA backend can be asked for on this device, else why not."""
    if device == "cpu" and name in ("sdpa_efficient", "sdpa_cudnn"):
        return "CPU has no such backend"
    return None


def _math_timing_skip(cfg: BenchConfig, case: Case, backward: bool) -> str | None:
    """Why SDPA's MATH backend is not timed for this CUDA case (None: it fits). MATH holds the
    [B, Hq, Lq, Lk] scores and probabilities (in float32 for low-precision inputs), backward
    several more; over the budget it would only measure an out-of-memory error."""
    import torch

    if cfg.device != "cuda":
        return None
    elem = max(4, _torch_dtype(case.dtype).itemsize)
    need = case.B * case.Hq * case.Lq * case.Lk * elem * (6 if backward else 2)
    budget = int(torch.cuda.mem_get_info()[0] * cfg.memory_budget_frac)
    if need <= budget:
        return None
    return (
        f"skipped: MATH needs about {need / 2**30:.0f} GiB for the {case.Lq}x{case.Lk} scores, "
        f"over the {budget / 2**30:.0f} GiB budget"
    )


def _is_unsupported(name: str, e: BaseException) -> bool:
    """An SDPA backend that refuses a case (e.g. FLASH with a mask, a head dim or GQA it lacks):
    with only that backend enabled, torch raises "No available kernel" (CUDA) or "No viable
    backend" (CPU) and says why in warnings."""
    if name == "memattn":
        return False
    text = str(e)
    return (
        isinstance(e, NotImplementedError)
        or "No available kernel" in text
        or "No viable backend" in text
    )


def _error_result(name: str, e: BaseException, caught: Sequence[Any]) -> dict[str, Any]:
    """The result entry of an implementation that raised: ``unsupported`` (with torch's reasons,
    from the warnings it emitted) when an SDPA backend refuses the case, else a failure."""
    msg = f"{type(e).__name__}: {_first_line(e)}"
    if not _is_unsupported(name, e):
        return {"error": msg}
    reasons = []
    for w in caught:
        first = str(w.message).strip().splitlines()
        if first and first[0] not in reasons:
            reasons.append(first[0])
    why = "; ".join(reasons)[:300] if reasons else msg
    return {"error": msg, "unsupported": why}


# What a call of an implementation may raise for a case it cannot run (recorded, not fatal).
_CALL_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)


def run_timing(cfg: BenchConfig, cases: list[Case], progress: Progress) -> list[dict[str, Any]]:
    import warnings

    import torch

    rows = []
    for case in cases:
        for pass_ in cfg.passes:
            backward = pass_ == "fwd+bwd"
            if backward and case.kind == "decode":
                continue
            flops = case_flops(case, backward)
            row: dict[str, Any] = {
                "case": asdict(case),
                "label": case.label(),
                "pass": pass_,
                "flops": flops,
                "results": {},
            }
            inputs = make_inputs(case, cfg.device, requires_grad=backward)
            outs: dict[str, Any] = {}
            steps: dict[str, Callable[[], Any]] = {}
            for name in cfg.impls:
                progress.step(f"{pass_} {case.label()} {name}")
                why_not = _sdpa_available(name, cfg.device) if name != "memattn" else None
                if why_not:
                    row["results"][name] = {"error": why_not}
                    continue
                if name == "sdpa_math":
                    skip = _math_timing_skip(cfg, case, backward)
                    if skip:
                        row["results"][name] = {"error": skip, "skipped": True}
                        continue
                step = _step_fn(name, inputs, backward)
                caught: list[Any] = []
                try:
                    with torch.no_grad() if not backward else contextlib.nullcontext():
                        # The first call is also the first warm-up call; the warnings SDPA emits
                        # there say why a backend refuses the case.
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            outs[name] = step().detach()
                        steps[name] = step
                except _CALL_ERRORS as e:
                    row["results"][name] = _error_result(name, e, caught)
                    outs.pop(name, None)
                    if cfg.device == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
            if steps:
                with torch.no_grad() if not backward else contextlib.nullcontext():
                    if cfg.device == "cuda":
                        timed, failed = time_rounds(
                            steps,
                            rounds=cfg.rounds,
                            time_one=functools.partial(
                                cuda_time_once, warmup=cfg.warmup, reps=cfg.reps
                            ),
                            errors=_CALL_ERRORS,
                        )
                        for name, e in failed.items():
                            row["results"][name] = _error_result(name, e, [])
                            outs.pop(name, None)
                        if any(isinstance(e, torch.cuda.OutOfMemoryError) for e in failed.values()):
                            torch.cuda.empty_cache()
                    else:
                        timed = time_interleaved(
                            steps,
                            warmup=cfg.warmup - 1,
                            reps=cfg.reps,
                            max_seconds=cfg.max_seconds_per_impl,
                        )
                for name, times in timed.items():
                    row["results"][name] = _timing_result(times, flops)
            torch_ok = {
                n: r["median_ms"]
                for n, r in row["results"].items()
                if n != "memattn" and "median_ms" in r
            }
            if torch_ok:
                best = min(torch_ok, key=torch_ok.__getitem__)
                row["best_torch"] = best
                if "median_ms" in row["results"].get("memattn", {}):
                    row["speedup_vs_best_torch"] = (
                        torch_ok[best] / row["results"]["memattn"]["median_ms"]
                    )
                if "memattn" in outs and best in outs:
                    diff = (outs["memattn"].float() - outs[best].float()).abs().max().item()
                    row["max_abs_diff_vs_best_torch"] = diff
            rows.append(row)
            del inputs, outs
    return rows


def _timing_result(times: list[float], flops: float) -> dict[str, Any]:
    ms = statistics.median(times)
    return {
        "median_ms": ms,
        "min_ms": min(times),
        "max_ms": max(times),
        "reps": len(times),
        "gflop_per_s": flops / (ms * 1e-3) / 1e9,
    }


def run_memory(cfg: BenchConfig, progress: Progress) -> list[dict[str, Any]]:
    import torch

    from memattn import _memory

    rows = []
    threads = torch.get_num_threads()
    if cfg.device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = _mem_available_bytes()
    budget = int(free * cfg.memory_budget_frac)
    H, D, dt = cfg.memory_heads, cfg.memory_head_dim, cfg.memory_dtype
    elem = _torch_dtype(dt).itemsize
    for L in cfg.memory_lengths:
        row: dict[str, Any] = {
            "B": 1,
            "H": H,
            "L": L,
            "D": D,
            "dtype": dt,
            "results": {},
            "output_bytes": 1 * H * L * D * elem,
        }
        for name in cfg.impls:
            progress.step(f"memory L={L} {name}")
            why_not = _sdpa_available(name, cfg.device) if name != "memattn" else None
            if why_not:
                row["results"][name] = {"ok": False, "error": why_not}
                continue
            kwargs = {
                "impl": name,
                "B": 1,
                "Hq": H,
                "Hk": H,
                "Lq": L,
                "Lk": L,
                "D": D,
                "dtype": dt,
            }
            if name == "sdpa_math":
                need = _math_bytes_estimate(1, H, L, L, elem)
                if need > budget:
                    row["results"][name] = {
                        "ok": False,
                        "error": f"skipped: needs about {need / 2**30:.1f} GiB for the "
                        f"{L}x{L} scores, over the {budget / 2**30:.1f} GiB budget",
                    }
                    continue
            if cfg.device == "cpu":
                warm = dict(kwargs, Lq=64, Lk=64)
                res = _memory.cpu_peak_in_subprocess(
                    "memattn.bench:memory_target",
                    kwargs,
                    warmup_kwargs=warm,
                    threads=threads,
                    limit_bytes=budget,
                )
            else:
                case = Case("mem", 1, H, H, L, L, D, dt)
                inputs = make_inputs(case, "cuda", requires_grad=False)
                step = _step_fn(name, inputs, backward=False)
                try:
                    with torch.no_grad():
                        step()
                        res = _memory.cuda_peak(step)
                except (RuntimeError, NotImplementedError) as e:
                    res = {"ok": False, "error": f"{type(e).__name__}: {_first_line(e)}"}
                del inputs
            row["results"][name] = res
        rows.append(row)
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _git_commit() -> str | None:
    """The checkout the benchmark was run from (with "+dirty" for local changes), if any."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def bench_meta(cfg: BenchConfig, command: str) -> dict[str, Any]:
    from memattn.doctor import system_meta

    meta = system_meta()
    meta["device"] = cfg.device
    meta["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["command"] = command
    commit = _git_commit()
    if commit:
        meta["git_commit"] = commit
    try:
        import memattn

        info = memattn.build_info()
        meta["memattn_cpu_isa"] = info.get("cpu_isa_selected")
        meta["memattn_cuda_built"] = info.get("cuda_built")
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        meta["memattn_build_error"] = str(e)
    if cfg.device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu"] = torch.cuda.get_device_name()
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_count"] = torch.cuda.device_count()
        meta["cuda"] = torch.version.cuda
        meta["cudnn"] = (
            torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        )
        meta["timing"] = cuda_timing_method()
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
    return meta


def run_bench(
    cfg: BenchConfig, *, command: str, show_progress: bool = True, memory: bool = True
) -> dict[str, Any]:
    cases = make_cases(
        dtypes=cfg.dtypes,
        lengths=cfg.lengths,
        head_dims=cfg.head_dims,
        tokens=cfg.tokens,
        hidden=cfg.hidden,
        causal=cfg.causal,
        extras=cfg.extras,
        device=cfg.device,
    )
    n_timing = sum(
        len(cfg.impls)
        for c in cases
        for p in cfg.passes
        if not (p == "fwd+bwd" and c.kind == "decode")
    )
    n_memory = len(cfg.memory_lengths) * len(cfg.impls) if memory else 0
    progress = Progress(n_timing + n_memory, enabled=show_progress, label="bench ")
    t0 = time.perf_counter()
    try:
        rows = run_timing(cfg, cases, progress)
        mem_rows = run_memory(cfg, progress) if memory else []
    finally:
        progress.close()
    return {
        "schema": "memattn-bench/1",
        "meta": bench_meta(cfg, command),
        "config": asdict(cfg),
        "rows": rows,
        "memory": mem_rows,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Output


def _fmt_ms(r: dict[str, Any]) -> str:
    if "median_ms" not in r:
        if "unsupported" in r:
            return "unsup."
        if r.get("skipped"):
            return "skip"
        err = r.get("error", "failed")
        return "n/a" if "no such backend" in err else "fail"
    ms = r["median_ms"]
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_rate(r: dict[str, Any], device: str) -> str:
    if "gflop_per_s" not in r:
        return "-"
    g = r["gflop_per_s"]
    return f"{g / 1e3:.0f}" if device == "cuda" else f"{g:.1f}"


def _fmt_mib(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        err = r.get("error", "failed")
        return "skipped" if err.startswith("skipped") else "n/a" if "no such" in err else "failed"
    return f"{r['peak_bytes'] / 2**20:.1f}"


def markdown_tables(result: dict[str, Any], plot_link: str | None = None) -> str:
    """The markdown section for one device: header facts, the plot (an image link to
    `plot_link`, relative to the markdown file, when given), the timing table, the memory
    table."""
    meta, cfg = result["meta"], result["config"]
    device = meta["device"]
    impls = [
        n
        for n in cfg["impls"]
        if any(n in r["results"] and "median_ms" in r["results"][n] for r in result["rows"])
    ]
    impls = impls or list(cfg["impls"])
    rate = "TFLOP/s" if device == "cuda" else "GFLOP/s"
    lines = []
    where = meta.get("gpu") if device == "cuda" else meta["cpu"]["model"]
    lines.append(f"## {device.upper()}: {where}")
    lines.append("")
    lines.append(f"- date: {meta['date']}")
    commit = f" (git {meta['git_commit']})" if meta.get("git_commit") else ""
    lines.append(f"- command: `{meta['command']}`{commit}")
    lines.append(
        f"- memattn {meta['memattn_version']} (CPU kernel: {meta.get('memattn_cpu_isa')}), "
        f"torch {meta['torch']}, python {meta['python']}"
    )
    if device == "cuda":
        lines.append(
            f"- GPU: {meta.get('gpu')} (compute capability {meta.get('gpu_capability', '?')}, "
            f"{meta.get('gpu_memory_gib', '?')} GiB), CUDA {meta.get('cuda')}, "
            f"cuDNN {meta.get('cudnn')}; timing: {meta.get('timing', '?')}"
        )
    else:
        lines.append(
            f"- threads: {meta['torch_threads']} (torch.get_num_threads(), the same for every "
            f"implementation); logical CPUs: {meta['cpu']['logical_cpus']}"
        )
    lines.append(
        f"- sweep: {cfg['tokens']} tokens per batch (B = tokens / L), hidden {cfg['hidden']} "
        f"(Hq = hidden / D); "
        + (
            f"median of up to {cfg['reps']} timed calls after warm-up, implementations "
            "interleaved call by call"
            if device == "cpu"
            else f"median over {cfg.get('rounds', 1)} interleaved round(s) of one timing per "
            "implementation (order rotated every round)"
        )
        + f"; wall time {result['wall_s']:.0f} s"
    )
    lines.append(
        "- FLOPs: 4·Hq·D·(allowed query-key pairs summed over the batch); forward + "
        "backward = 3.5x forward. Speed-up = best PyTorch time / memattn time "
        "(> 1: memattn is faster)."
    )
    if cfg.get("quick"):
        lines.append("- **quick mode**: a tiny smoke-test sweep, not a performance measurement.")
    lines.append("")
    if plot_link:
        lines.append(
            f"![memattn speed-up over the best PyTorch backend, and peak memory vs L "
            f"({device.upper()})]({plot_link})"
        )
        lines.append("")
    head = ["pass", "case", "memattn ms", f"memattn {rate}"] + [
        f"{n} ms" for n in impls if n != "memattn"
    ]
    head += ["best torch", "speed-up"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 4) + ["---", "---:"]) + "|")
    below = []
    for r in result["rows"]:
        res = r["results"]
        cells = [
            r["pass"],
            r["label"],
            _fmt_ms(res.get("memattn", {})),
            _fmt_rate(res.get("memattn", {}), device),
        ]
        cells += [_fmt_ms(res.get(n, {})) for n in impls if n != "memattn"]
        sp = r.get("speedup_vs_best_torch")
        cells += [
            r.get("best_torch", "-").replace("sdpa_", ""),
            "-" if sp is None else f"{sp:.2f}x",
        ]
        if sp is not None and round(sp, 2) < 1.0:
            below.append(f"{r['pass']} {r['label']}")
            cells[-1] = f"**{sp:.2f}x**"
        lines.append("| " + " | ".join(cells) + " |")
    speedups = [r["speedup_vs_best_torch"] for r in result["rows"] if "speedup_vs_best_torch" in r]
    lines.append("")
    if speedups:
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(
            f"Speed-up over the best PyTorch backend: geometric mean {geo:.2f}x, "
            f"min {min(speedups):.2f}x, max {max(speedups):.2f}x over {len(speedups)} rows; "
            f"{len(below)} row(s) below 1.0x" + (f" (bold): {'; '.join(below)}." if below else ".")
        )
    failures = sorted(
        {
            f"{n}: {v['error']}"
            for r in result["rows"]
            for n, v in r["results"].items()
            if "error" in v
            and "no such backend" not in v["error"]
            and "unsupported" not in v
            and not v.get("skipped")
        }
    )
    unsupported: dict[str, list[str]] = {}
    for r in result["rows"]:
        for n, v in r["results"].items():
            if "unsupported" in v:
                unsupported.setdefault(f"{n}: {v['unsupported']}", []).append(r["label"])
    skipped = sorted(
        {
            f"{n}: {v['error']}"
            for r in result["rows"]
            for n, v in r["results"].items()
            if v.get("skipped")
        }
    )
    if unsupported:
        lines.append("")
        lines.append(
            "Not supported by that PyTorch backend (`unsup.` in the table; the fastest backend "
            "that supports the row is the comparison):"
        )
        for why, labels in sorted(unsupported.items())[:20]:
            cases = sorted(set(labels))
            more = f" and {len(cases) - 3} more" if len(cases) > 3 else ""
            lines.append(f"- {why} ({'; '.join(cases[:3])}{more})")
    if skipped:
        lines.append("")
        lines.append("Skipped (`skip` in the table):")
        lines += [f"- {f}" for f in skipped[:20]]
    if failures:
        lines.append("")
        lines.append("Failures (`fail` in the table):")
        lines += [f"- {f}" for f in failures[:20]]
    if result["memory"]:
        m0 = result["memory"][0]
        lines.append("")
        lines.append(
            f"### Peak memory of one forward pass (B=1, H={m0['H']}, D={m0['D']}, {m0['dtype']})"
        )
        lines.append("")
        how = (
            (
                "extra resident memory at the peak of the call, each in a fresh process "
                "(VmHWM - VmRSS before; outputs included, inputs excluded)"
            )
            if device == "cpu"
            else "torch.cuda.max_memory_allocated during the call minus memory allocated before"
        )
        lines.append(f"MiB; {how}. The output alone is B·H·L·D·(element size) bytes.")
        lines.append("")
        mimpls = list(m0["results"])
        lines.append(
            "| L | output MiB | "
            + " | ".join(f"{n} MiB" for n in mimpls)
            + " | memattn MiB per 1k tokens |"
        )
        lines.append("|---:|---:|" + "---:|" * len(mimpls) + "---:|")
        for m in result["memory"]:
            cells = [str(m["L"]), f"{m['output_bytes'] / 2**20:.1f}"]
            cells += [_fmt_mib(m["results"][n]) for n in mimpls]
            mr = m["results"].get("memattn", {})
            cells.append(
                f"{mr['peak_bytes'] / 2**20 / (m['L'] / 1024):.2f}" if mr.get("ok") else "-"
            )
            lines.append("| " + " | ".join(cells) + " |")
        errs = sorted(
            {
                f"{n} at L={m['L']}: {v['error']}"
                for m in result["memory"]
                for n, v in m["results"].items()
                if not v.get("ok") and "no such" not in v.get("error", "")
            }
        )
        if errs:
            lines.append("")
            lines += [f"- {e}" for e in errs]
    return "\n".join(lines) + "\n"


_RESULTS_HEADER = """# memattn benchmark results

Written by `memattn bench` (see `python/memattn/bench.py` for the protocol, DESIGN.md §5).
Each device's section is replaced when the benchmark runs again on that device; the JSON next
to this file holds every number.
"""


def update_results_markdown(path: str, device: str, section: str) -> None:
    """Replace (or add) the section for `device` in the markdown file at `path`."""
    begin, end = f"<!-- memattn-bench:{device}:begin -->", f"<!-- memattn-bench:{device}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = _RESULTS_HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block.rstrip("\n") + post
    else:
        text = text.rstrip("\n") + "\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def write_json(path: str, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Plot

PLOT_INSTALL_HINT = "pip install 'memattn[bench]'"


def default_plot_path(json_path: str) -> str:
    """The PNG next to a results JSON: bench/results_cpu.json -> bench/results_cpu.png."""
    root, ext = os.path.splitext(json_path)
    return (root if ext.lower() == ".json" else json_path) + ".png"


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        result = json.load(f)
    if not isinstance(result, dict) or "meta" not in result or "rows" not in result:
        raise ValueError(f"{path} is not a `memattn bench` JSON (no 'meta' and 'rows')")
    return result


def plot_results(result: dict[str, Any], path: str) -> None:
    """Draws a results dict (as written to the JSON) into a PNG at `path`: the speed-up of
    memattn over the best PyTorch backend per row, grouped by case (top), and the peak-memory
    sweep, log-log (bottom left), with a summary (bottom right).

    Needs matplotlib (`pip install 'memattn[bench]'`); raises ImportError without it. Uses
    matplotlib's object API only (no pyplot), so it neither needs a display nor changes the
    caller's backend."""
    from matplotlib.figure import Figure

    meta, cfg = result["meta"], result.get("config", {})
    device = meta.get("device", "?")
    rows = result.get("rows", [])
    mem_rows = result.get("memory", [])

    # Groups: one per case without its dtype; bars: (dtype, pass) in the order they ran.
    groups: list[str] = []
    series: list[tuple[str, str]] = []
    speedup: dict[tuple[str, str, str], float] = {}
    for r in rows:
        dt = r["case"]["dtype"]
        group = r["label"].replace(f" {dt} ", " ", 1)
        if group not in groups:
            groups.append(group)
        if (dt, r["pass"]) not in series:
            series.append((dt, r["pass"]))
        if r.get("speedup_vs_best_torch") is not None:
            speedup[(group, dt, r["pass"])] = float(r["speedup_vs_best_torch"])
    dtypes = list(dict.fromkeys(dt for dt, _ in series))
    series.sort(key=lambda s: (dtypes.index(s[0]), s[1] != "fwd"))

    fig = Figure(figsize=(15, 10.5), dpi=80, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.35, 1], width_ratios=[1.5, 1])
    ax = fig.add_subplot(grid[0, :])
    ax_mem = fig.add_subplot(grid[1, 0])
    ax_txt = fig.add_subplot(grid[1, 1])

    # --- speed-up bars
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    width = 0.8 / max(1, len(series))
    for i, (dt, pass_) in enumerate(series):
        base = palette[dtypes.index(dt) % len(palette)]
        xs, ys = [], []
        for g, group in enumerate(groups):
            if (group, dt, pass_) in speedup:
                xs.append(g - 0.4 + width * (i + 0.5))
                ys.append(speedup[(group, dt, pass_)])
        bwd = pass_ == "fwd+bwd"
        ax.bar(
            xs,
            ys,
            width,
            color=base,
            alpha=1.0 if bwd else 0.55,
            hatch="//" if bwd else None,
            edgecolor="white" if bwd else base,
            linewidth=0.5,
            label=f"{dt} {pass_}",
        )
        for x, y in zip(xs, ys, strict=True):
            if round(y, 2) < 1.0:
                ax.annotate(
                    f"{y:.2f}x",
                    (x, y),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                    color="#b00000",
                )
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="1.0x (parity)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, max([1.0, *speedup.values()]) * 1.12)  # room for the legend
    ax.set_ylabel("speed-up: best PyTorch time / memattn time")
    ax.set_title("memattn speed-up over the best PyTorch SDPA backend (> 1: memattn is faster)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=len(series) + 1)
    if not groups:
        ax.text(0.5, 0.5, "no timing rows", ha="center", va="center", transform=ax.transAxes)

    # --- peak memory, log-log
    if mem_rows:
        m0 = mem_rows[0]
        styles = {
            "memattn": {"color": "#d62728", "marker": "o", "linewidth": 2.2, "zorder": 3},
            "sdpa_flash": {"color": "#1f77b4", "marker": "s"},
            "sdpa_math": {"color": "#7f7f7f", "marker": "^"},
            "sdpa_efficient": {"color": "#2ca02c", "marker": "D"},
            "sdpa_cudnn": {"color": "#9467bd", "marker": "v"},
        }
        notes = []
        for name in m0["results"]:
            pts = [
                (m["L"], m["results"][name]["peak_bytes"] / 2**20)
                for m in mem_rows
                if m["results"].get(name, {}).get("ok")
            ]
            missing = [
                m["L"]
                for m in mem_rows
                if not m["results"].get(name, {}).get("ok")
                and "no such" not in m["results"].get(name, {}).get("error", "")
            ]
            if missing:
                notes.append(f"{name}: no point at L={', '.join(map(str, missing))} (skipped)")
            if pts:
                style = {"marker": "o", **styles.get(name, {})}
                ax_mem.plot(*zip(*pts, strict=True), label=name, **style)
        ax_mem.plot(
            [m["L"] for m in mem_rows],
            [m["output_bytes"] / 2**20 for m in mem_rows],
            color="black",
            linestyle=":",
            linewidth=1,
            label="the output alone",
        )
        ax_mem.set_xscale("log", base=2)
        ax_mem.set_yscale("log")
        ax_mem.set_xticks([m["L"] for m in mem_rows], [str(m["L"]) for m in mem_rows])
        ax_mem.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax_mem.set_xlabel("sequence length L")
        ax_mem.set_ylabel("peak MiB")
        ax_mem.set_title(
            f"Peak memory of one forward pass (B=1, H={m0['H']}, D={m0['D']}, {m0['dtype']})"
        )
        ax_mem.grid(which="both", alpha=0.3)
        ax_mem.legend(fontsize=8, loc="upper left")
        if notes:
            ax_mem.text(
                0.99,
                0.02,
                "\n".join(notes),
                ha="right",
                va="bottom",
                fontsize=7,
                transform=ax_mem.transAxes,
            )
    else:
        ax_mem.set_axis_off()
        ax_mem.text(0.5, 0.5, "no memory sweep (--no-memory)", ha="center", va="center")

    # --- summary
    ax_txt.set_axis_off()
    lines = []
    for dt in dtypes:
        for pass_ in ("fwd", "fwd+bwd"):
            vals = [v for (_, d, p), v in speedup.items() if d == dt and p == pass_]
            if vals:
                geo = math.exp(sum(math.log(v) for v in vals) / len(vals))
                lines.append(
                    f"{dt} {pass_:8s} geo-mean {geo:.2f}x  min {min(vals):.2f}x  "
                    f"max {max(vals):.2f}x  ({len(vals)} rows)"
                )
    below = sum(1 for v in speedup.values() if round(v, 2) < 1.0)
    lines.append(f"rows below 1.0x: {below} of {len(speedup)}")
    lines.append("")
    where = meta.get("gpu") if device == "cuda" else meta.get("cpu", {}).get("model", "?")
    lines.append(f"{device.upper()}: {where}")
    lines.append(
        f"threads: {meta.get('torch_threads', '?')}; memattn kernel: "
        f"{meta.get('memattn_cpu_isa', '?') if device == 'cpu' else 'cuda'}"
    )
    if cfg:
        lines.append(
            f"sweep: {cfg.get('tokens')} tokens/batch, hidden {cfg.get('hidden')}, "
            + (
                f"median of up to {cfg.get('reps')} calls"
                if device == "cpu"
                else f"median of {cfg.get('rounds', 1)} interleaved rounds"
            )
        )
    if meta.get("git_commit"):
        lines.append(f"git {meta['git_commit']}")
    if cfg.get("quick"):
        lines.append("QUICK MODE: a smoke test, not a measurement")
    ax_txt.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9)

    title = (
        f"memattn bench, {device.upper()} ({where}), {meta.get('date', '?')}, "
        f"torch {meta.get('torch', '?')}, memattn {meta.get('memattn_version', '?')}"
    )
    if cfg.get("quick"):
        title += " [quick mode]"
    fig.suptitle(title, fontsize=12)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
