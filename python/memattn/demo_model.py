"""The model demo: convert a real ``torch.nn.Transformer`` and measure what changes.

``run_model_demo(device)`` builds an encoder-decoder ``nn.Transformer`` (padded source batch,
causal target), then walks the converter's whole cycle on it:

1. ``inspect``: which attention calls the model makes, and what runs them (torch's fused
   encoder fast path, torch's MHA);
2. ``status`` before;
3. time and peak memory of an inference forward and a training step, with torch's attention;
4. ``optimize`` (verified on probes, end to end included);
5. ``verify``: the converted model's output on the demo input against the original's;
6. time and peak memory again, with memattn; ``inspect`` and ``status`` after;
7. ``restore``: original classes back, output bit-identical to the original's.

``format_report(result)`` prints it as tables. Peak memory on CPU is measured in a fresh process
per measurement (``memattn._memory``), on CUDA with torch's allocator statistics.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

__all__ = ["MODEL_SIZES", "build_inputs", "build_model", "format_report", "run_model_demo"]

# d_model, nhead, encoder layers, decoder layers, feed-forward, batch, source len, target len
MODEL_SIZES = {
    "default": {"E": 512, "H": 8, "enc": 2, "dec": 2, "ff": 1024, "B": 2, "S": 1024, "T": 256},
    "small": {"E": 64, "H": 4, "enc": 1, "dec": 1, "ff": 128, "B": 2, "S": 128, "T": 64},
}
_PAD_FRACTION = 0.25  # of the source batch's second half, as trailing padding


def _size(small: bool) -> dict:
    return MODEL_SIZES["small" if small else "default"]


def build_model(small: bool = False, device: str = "cpu", seed: int = 0):
    """The demo's ``nn.Transformer`` (batch_first, dropout 0.1), weights from ``seed``."""
    import torch

    cfg = _size(small)
    torch.manual_seed(seed)
    return torch.nn.Transformer(
        d_model=cfg["E"],
        nhead=cfg["H"],
        num_encoder_layers=cfg["enc"],
        num_decoder_layers=cfg["dec"],
        dim_feedforward=cfg["ff"],
        batch_first=True,
        device=device,
    )


def build_inputs(small: bool = False, device: str = "cpu", seed: int = 1) -> dict:
    """Keyword arguments of the model's forward: ``src``, ``tgt``, a causal ``tgt_mask``, and
    the source padding as ``src_key_padding_mask`` / ``memory_key_padding_mask``."""
    import torch

    cfg = _size(small)
    gen = torch.Generator().manual_seed(seed)
    B, S, T, E = cfg["B"], cfg["S"], cfg["T"], cfg["E"]
    src = torch.randn(B, S, E, generator=gen).to(device)
    tgt = torch.randn(B, T, E, generator=gen).to(device)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[B // 2 :, S - int(S * _PAD_FRACTION) :] = True
    kpm = kpm.to(device)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(T, device=device)
    return {
        "src": src,
        "tgt": tgt,
        "tgt_mask": tgt_mask,
        "tgt_is_causal": True,
        "src_key_padding_mask": kpm,
        "memory_key_padding_mask": kpm,
    }


def memory_target(small: bool, converted: bool, mode: str, device: str = "cpu"):
    """For ``memattn._memory``: builds the model and inputs, returns the call to measure."""
    import torch

    import memattn

    model = build_model(small, device)
    if converted:
        memattn.optimize(model, verify=False)
    inputs = build_inputs(small, device)
    if mode == "eval":
        model.eval()

        def run():
            with torch.no_grad():
                return model(**inputs)

        return run
    model.train()

    def step():
        out = model(**inputs)
        out.float().pow(2).mean().backward()
        return out.detach()

    return step


def _time_ms(fn, device: str, reps: int) -> float:
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak(device: str, small: bool, converted: bool, mode: str, fn) -> dict:
    try:
        from memattn import _memory
    except ImportError:
        return {"ok": False, "error": "memattn._memory is not available"}
    if device == "cuda":
        return _memory.cuda_peak(fn)
    import torch

    return _memory.cpu_peak_in_subprocess(
        "memattn.demo_model:memory_target",
        {"small": small, "converted": converted, "mode": mode},
        warmup_kwargs={"small": True, "converted": converted, "mode": mode},
        threads=torch.get_num_threads(),
    )


def _resolve_device(device: str) -> tuple[str, str]:
    try:
        from memattn.demo import resolve_device
    except ImportError:
        return ("cpu", "") if device in ("auto", "cpu") else (device, "")
    return resolve_device(device)


def _measure(model, inputs, device, small, converted, reps, measure_memory) -> list[dict]:
    import torch

    rows = []
    impl = "memattn" if converted else "torch"

    def eval_call():
        with torch.no_grad():
            return model(**inputs)

    def train_call():
        out = model(**inputs)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        return out.detach()

    for mode, fn in (("eval", eval_call), ("train", train_call)):
        model.train(mode == "train")
        row = {"mode": mode, "impl": impl, "time_ms": _time_ms(fn, device, reps)}
        if measure_memory:
            row["memory"] = _peak(device, small, converted, mode, fn)
        rows.append(row)
    model.eval()
    return rows


def run_model_demo(
    device: str = "cpu", small: bool = False, *, reps: int = 3, measure_memory: bool = True
) -> dict:
    """Runs inspect -> status -> optimize -> verify -> restore on an encoder-decoder
    ``nn.Transformer`` and measures time and peak memory before and after. ``device``:
    ``"cpu"``, ``"cuda"`` or ``"auto"``; ``small`` for a quick run (tests). Returns a dict
    (JSON-ready); ``format_report`` prints it."""
    import torch

    import memattn
    from memattn.convert import origin_of

    device, note = _resolve_device(device)
    cfg = _size(small)
    model = build_model(small, device).eval()
    inputs = build_inputs(small, device)
    result: dict[str, Any] = {"device": device, "note": note, "small": small, "config": cfg}
    result["torch"] = torch.__version__
    result["memattn"] = memattn.__version__
    result["threads"] = torch.get_num_threads()

    with torch.no_grad():
        report = memattn.inspect(model, **inputs)
    reference = report.output
    result["inspect_before"] = report.to_dict()
    result["inspect_before_text"] = str(report)
    st = memattn.status(model)
    result["status_before"] = st.to_dict()
    result["status_before_text"] = str(st)

    rows = _measure(model, inputs, device, small, False, reps, measure_memory)

    t0 = time.perf_counter()
    probe = build_inputs(True, device) if small else _small_probe(inputs)
    memattn.optimize(model, probe=probe)
    result["optimize_s"] = time.perf_counter() - t0
    result["verification"] = {
        path: origin_of(m).verification
        for path, m in model.named_modules()
        if origin_of(m) is not None
    }
    with torch.no_grad():
        report = memattn.inspect(model, **inputs)
    out = report.output
    err = (out.double() - reference.double()).abs().max().item()
    scale = max(1.0, reference.double().abs().max().item())
    result["verify"] = {"max_abs_err": err, "ok": bool(err <= 1e-3 * scale)}
    result["inspect_after"] = report.to_dict()
    result["inspect_after_text"] = str(report)
    st = memattn.status(model)
    result["status_after"] = st.to_dict()
    result["status_after_text"] = str(st)

    rows += _measure(model, inputs, device, small, True, reps, measure_memory)
    result["rows"] = rows

    memattn.restore(model)
    st = memattn.status(model)
    with torch.no_grad():
        again = model(**inputs)
    result["status_restored"] = st.to_dict()
    result["status_restored_text"] = str(st)
    result["restore"] = {
        "memattn_modules_left": st.attention_memattn,
        "output_bit_identical": bool(torch.equal(again, reference)),
    }
    return result


def _small_probe(inputs: dict) -> dict:
    """The demo inputs cut to a few tokens: enough for the end-to-end check of optimize."""
    B = min(2, inputs["src"].shape[0])
    S, T = 16, 8
    kpm = inputs["src_key_padding_mask"][:B, -S:].clone()
    return {
        "src": inputs["src"][:B, :S],
        "tgt": inputs["tgt"][:B, :T],
        "tgt_mask": inputs["tgt_mask"][:T, :T],
        "tgt_is_causal": True,
        "src_key_padding_mask": kpm,
        "memory_key_padding_mask": kpm,
    }


def _mib(row: dict) -> str:
    m = row.get("memory") or {}
    return f"{m['peak_bytes'] / 2**20:.1f}" if m.get("ok") else "-"


def format_report(result: dict) -> str:
    """The demo's result as text: the model, inspect and status before and after, and the
    before/after table of time and peak memory."""
    c = result["config"]
    lines = [
        f"memattn {result['memattn']} model demo on {result['device']}, torch {result['torch']}, "
        f"{result['threads']} threads",
        f"nn.Transformer: d_model={c['E']}, nhead={c['H']} (head dim {c['E'] // c['H']}), "
        f"{c['enc']} encoder + {c['dec']} decoder layers, batch {c['B']}, source {c['S']} "
        f"tokens ({_PAD_FRACTION:.0%} padding in half the batch), target {c['T']} (causal)",
    ]
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    lines += ["", "1. inspect (before)", result["inspect_before_text"]]
    lines += ["", "2. status (before)", result["status_before_text"]]
    lines += ["", f"3. optimize: {result['optimize_s']:.2f} s, verified per module:"]
    for path, text in result["verification"].items():
        lines.append(f"   {path}: {text}")
    v = result["verify"]
    lines += [
        "",
        f"4. verify: max |converted - original| on the demo input = {v['max_abs_err']:.2e} "
        f"({'ok' if v['ok'] else 'MISMATCH'})",
        "",
        "5. inspect and status (after)",
        result["inspect_after_text"],
        result["status_after_text"],
        "",
        "6. before / after (time = median; memory = peak extra during the call)",
    ]
    header = f"{'mode':<22} {'torch ms':>10} {'memattn ms':>11} {'speed-up':>9} "
    header += f"{'torch MiB':>10} {'memattn MiB':>12}"
    lines += [header, "-" * len(header)]
    for mode, title in (("eval", "inference forward"), ("train", "training fwd+bwd")):
        before = next(r for r in result["rows"] if r["mode"] == mode and r["impl"] == "torch")
        after = next(r for r in result["rows"] if r["mode"] == mode and r["impl"] == "memattn")
        speed = before["time_ms"] / after["time_ms"] if after["time_ms"] > 0 else float("nan")
        lines.append(
            f"{title:<22} {before['time_ms']:>10.1f} {after['time_ms']:>11.1f} {speed:>8.2f}x "
            f"{_mib(before):>10} {_mib(after):>12}"
        )
    r = result["restore"]
    lines += [
        "",
        f"7. restore: {r['memattn_modules_left']} memattn module(s) left; output bit-identical "
        f"to the original: {'yes' if r['output_bit_identical'] else 'no'}",
        result["status_restored_text"],
    ]
    return "\n".join(lines)
