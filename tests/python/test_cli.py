"""The `memattn` command: demo, bench, doctor, and the helpers they stand on."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memattn
from memattn import _memory, bench, cli, demo

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_json_tiny(capsys):
    # --device cpu: on a GPU machine "auto" picks CUDA, whose SDPA backends differ.
    code, out, _ = run_cli(
        capsys, "demo", "--json", "--size", "tiny", "--reps", "1", "--no-progress",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    both = json.loads(out)
    model = both["model"]
    assert model["verify"]["ok"], model["verify"]
    assert model["status_after"]["attention_other"] == 0
    assert model["restore"]["memattn_modules_left"] == 0
    assert model["restore"]["output_bit_identical"]
    assert {(r["mode"], r["impl"]) for r in model["rows"]} == {
        ("eval", "torch"),
        ("eval", "memattn"),
        ("train", "torch"),
        ("train", "memattn"),
    }
    result = both["attention"]
    assert result["meta"]["device"] == "cpu"
    assert result["shape"] == {"B": 1, "H": 2, "L": 64, "D": 32}
    cases = {r["case"] for r in result["rows"]}
    assert cases == {"self-attention", "padded batch (key_padding_mask)"}
    for case in cases:
        impls = {r["impl"]: r for r in result["rows"] if r["case"] == case}
        assert set(impls) == {"memattn", "sdpa_flash", "sdpa_math"}, impls
        ours = impls["memattn"]
        assert "error" not in ours, ours
        assert ours["max_abs_err"] < 1e-5, ours  # fp32 vs the float64 reference
        assert ours["median_ms"] > 0
        assert ours["memory"]["ok"], ours["memory"]
        assert ours["memory"]["peak_bytes"] >= 0
        assert result["plans"][case]["backend"] == "cpu"
    # The table printed without --json.
    text = demo.format_table(result)
    assert "max error" in text
    assert "peak MiB" in text
    assert text.count("\nself-attention                   memattn") == 1
    assert "summary: memattn is" in text


def test_demo_and_bench_cuda_without_backend_say_so(capsys):
    if memattn.build_info()["cuda_built"] and torch.cuda.is_available():
        pytest.skip("this machine can run memattn on CUDA")
    code, _, err = run_cli(capsys, "demo", "--device", "cuda", "--size", "tiny", "--no-progress")
    assert code == 2
    assert "--device cuda" in err
    assert ("no CUDA GPU" in err) or ("built without its CUDA backend" in err)
    code, _, err = run_cli(capsys, "bench", "--device", "cuda", "--quick")
    assert code == 2
    assert "--device cuda" in err


# ---------------------------------------------------------------------------------------------
# doctor


def test_doctor_json(capsys):
    code, out, _ = run_cli(capsys, "doctor", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["memattn_version"] == memattn.__version__
    assert r["torch"]["version"] == torch.__version__
    assert r["torch"]["threads"] == torch.get_num_threads()
    b = r["build"]
    assert b["cpu_isa_selected"] in b["cpu_isas_usable"]
    assert set(b["cpu_isas_usable"]) <= set(b["cpu_isas_built"])
    assert isinstance(b["cuda_built"], bool)
    assert r["cuda"]["torch_cuda_available"] == torch.cuda.is_available()
    assert isinstance(b["cuda_summary"], str)
    assert r["cuda"]["memattn_cuda_summary"] == b["cuda_summary"]
    if b["cuda_built"]:
        assert b["cuda_summary"], "a CUDA build must say what its kernels were built for"
        assert not r["cuda"]["memattn_cuda_reason"]
    else:
        assert r["cuda"]["memattn_cuda_reason"], "a CUDA-less build must say why"
        assert not b["cuda_summary"]
    plans = {p["call"]: p for p in r["sample_plans"]}
    fp32 = plans["cpu float32, causal"]["plan"]
    assert fp32["backend"] == "cpu"
    assert fp32["kernel"].startswith("cpu/")
    fp16 = plans["cpu float16 (not supported on CPU)"]["plan"]
    assert fp16["backend"] == ""
    reasons = " ".join(" ".join(v[1]) for v in fp16["verdicts"])
    assert "float16" in reasons


def test_doctor_text(capsys):
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 0
    for needle in ("memattn build", "CPU kernels built", "selected", "CUDA", "Sample plans"):
        assert needle in out, needle
    info = memattn.build_info()
    if info["cuda_built"]:
        assert f"memattn CUDA build:         {info['cuda_summary']}" in out
    else:
        assert "memattn CUDA build:" not in out
        assert info["cuda_reason"] in out


@pytest.mark.parametrize("cuda_built", [True, False])
def test_doctor_text_cuda_lines(cuda_built):
    """Both forms of the CUDA lines, whichever way this memattn was built."""
    from memattn import doctor

    r = doctor.collect()
    r["cuda"].update(
        memattn_cuda_built=cuda_built,
        memattn_cuda_reason="" if cuda_built else "memattn was built without CUDA (test)",
        memattn_cuda_summary="kernels for sm_80, sm_90, PTX 90 (test)" if cuda_built else "",
    )
    text = doctor.format_report(r)
    if cuda_built:
        assert "memattn CUDA backend built: yes\n" in text
        assert "memattn CUDA build:         kernels for sm_80, sm_90, PTX 90 (test)" in text
    else:
        assert "memattn CUDA backend built: no (memattn was built without CUDA (test))" in text
        assert "memattn CUDA build:" not in text


def test_doctor_respects_forced_isa(capsys, monkeypatch):
    monkeypatch.setenv("MEMATTN_CPU_ISA", "base")
    code, out, _ = run_cli(capsys, "doctor", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["build"]["cpu_isa_selected"] == "base"
    assert r["env"]["MEMATTN_CPU_ISA"] == "base"


# ---------------------------------------------------------------------------------------------
# bench


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One `memattn bench --quick` run (seconds), shared by the tests that read its files."""
    tmp_path = tmp_path_factory.mktemp("quick_bench")
    out_json, results = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    plot = tmp_path / "bench.png"
    argv = [
        "bench",
        "--device",
        "cpu",
        "--quick",
        "--no-progress",
        "--memory-lengths",
        "256,1024",
        "--out-json",
        str(out_json),
        "--results",
        str(results),
        "--plot",
        str(plot),
    ]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return {
        "code": code,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "json": out_json,
        "results": results,
        "plot": plot,
    }


def test_bench_quick_writes_json_markdown_and_plot(quick_bench):
    code, out, err = quick_bench["code"], quick_bench["out"], quick_bench["err"]
    out_json, results = quick_bench["json"], quick_bench["results"]
    assert code == 0, err
    data = json.loads(out_json.read_text())
    meta = data["meta"]
    assert meta["device"] == "cpu"
    assert meta["torch_threads"] == torch.get_num_threads()
    assert meta["command"].startswith("memattn bench --device cpu --quick")
    for key in ("date", "torch", "memattn_version", "cpu", "memattn_cpu_isa"):
        assert meta[key], key
    # quick sweep: fp32, L in {128, 256}, D=64, causal and not, fwd and fwd+bwd
    assert len(data["rows"]) == 8
    for row in data["rows"]:
        ours = row["results"]["memattn"]
        assert ours["median_ms"] > 0 and ours["gflop_per_s"] > 0, row
        assert ours["min_ms"] <= ours["median_ms"] <= ours["max_ms"], row
        assert row["flops"] > 0
        assert set(row["results"]) == {"memattn", "sdpa_flash", "sdpa_math"}
        assert row["best_torch"] in ("sdpa_flash", "sdpa_math")
        assert row["speedup_vs_best_torch"] > 0
        assert row["max_abs_diff_vs_best_torch"] < 1e-4, row
    fwd = [r for r in data["rows"] if r["pass"] == "fwd"]
    bwd = [r for r in data["rows"] if r["pass"] == "fwd+bwd"]
    assert {r["label"] for r in fwd} == {r["label"] for r in bwd}
    assert [m["L"] for m in data["memory"]] == [256, 1024]
    for m in data["memory"]:
        assert m["results"]["memattn"]["ok"], m
    # The math path stores the scores: 16x the tokens -> far more than 4x the memory.
    big = data["memory"][-1]["results"]
    assert big["sdpa_math"]["peak_bytes"] > 4 * big["memattn"]["peak_bytes"]

    md = results.read_text()
    assert md.startswith("# memattn benchmark results")
    assert md.count("<!-- memattn-bench:cpu:begin -->") == 1
    assert "| pass | case | memattn ms |" in md
    assert "quick mode" in md
    assert "Peak memory of one forward pass" in md
    assert "| fwd+bwd | self fp32 2x2x256x64 (causal) |" in md
    assert md.split("<!-- memattn-bench:cpu:begin -->")[1].strip().startswith("## CPU")
    assert "## CPU" in out  # the table is printed too
    plot = quick_bench["plot"]
    if HAVE_MATPLOTLIB:
        assert plot.read_bytes().startswith(PNG_MAGIC)
        assert "![memattn speed-up" in md
        assert "](bench.png)" in md  # relative to the markdown file
        assert f"wrote {plot}" in err
    else:
        assert not plot.exists()
        assert "![" not in md
        assert "plot skipped" in err


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib (pip install 'memattn[bench]')")
def test_bench_plot_from_json(quick_bench, capsys, tmp_path):
    src = tmp_path / "quick.json"
    shutil.copy(quick_bench["json"], src)
    png, md = tmp_path / "out" / "plot.png", tmp_path / "out" / "RESULTS.md"
    code, out, err = run_cli(
        capsys, "bench", "--plot-from", str(src), "--plot", str(png), "--results", str(md)
    )
    assert code == 0, err
    assert out == ""  # nothing is run or printed, only written
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert 10_000 < len(data) < 200_000
    text = md.read_text()
    assert "![memattn speed-up" in text
    assert "](plot.png)" in text
    assert "| fwd+bwd | self fp32 2x2x256x64 (causal) |" in text  # the section, from the JSON
    # Without --plot the PNG goes next to the JSON.
    code, _, err = run_cli(capsys, "bench", "--plot-from", str(src))
    assert code == 0, err
    assert (tmp_path / "quick.png").read_bytes().startswith(PNG_MAGIC)


def test_bench_plot_from_bad_json_and_missing_device(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a bench result"}')
    code, _, err = run_cli(capsys, "bench", "--plot-from", str(bad))
    assert code == 2
    assert "not a `memattn bench` JSON" in err
    code, _, err = run_cli(capsys, "bench", "--plot-from", str(tmp_path / "missing.json"))
    assert code == 2
    code, _, err = run_cli(capsys, "bench", "--quick")
    assert code == 2
    assert "--device is required" in err


def test_bench_plot_skipped_without_matplotlib(quick_bench, capsys, monkeypatch, tmp_path):
    # None in sys.modules makes `import matplotlib...` raise ImportError.
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    hint = "pip install 'memattn[bench]'"

    # --plot-from: the plot is all it does, so it fails (status 1), with the one-line reason.
    png = tmp_path / "plot.png"
    code, _, err = run_cli(
        capsys, "bench", "--plot-from", str(quick_bench["json"]), "--plot", str(png)
    )
    assert code == 1
    lines = [x for x in err.splitlines() if "plot skipped" in x]
    assert len(lines) == 1, err
    assert hint in lines[0]
    assert not png.exists()

    # A benchmark run never fails for it: the JSON and markdown are written, without the link.
    result = json.loads(quick_bench["json"].read_text())
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: result)
    out_json, md = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    argv = ["bench", "--device", "cpu", "--quick", "--out-json", str(out_json)]
    argv += ["--results", str(md), "--plot", str(png)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert json.loads(out_json.read_text())["rows"] == result["rows"]
    assert "![" not in md.read_text()
    assert not png.exists()
    lines = [x for x in err.splitlines() if "plot skipped" in x]
    assert len(lines) == 1, err
    assert hint in lines[0]


def test_results_markdown_sections_are_replaced(tmp_path):
    path = str(tmp_path / "sub" / "RESULTS.md")
    bench.update_results_markdown(path, "cpu", "## CPU\nfirst\n")
    bench.update_results_markdown(path, "cuda", "## CUDA\ngpu\n")
    bench.update_results_markdown(path, "cpu", "## CPU\nsecond\n")
    text = Path(path).read_text()
    assert "first" not in text
    assert "second" in text
    assert "gpu" in text
    assert text.count("memattn-bench:cpu:begin") == 1
    assert text.index("memattn-bench:cpu:begin") < text.index("memattn-bench:cuda:begin")


def test_bench_rejects_fp16_on_cpu(capsys):
    code, _, err = run_cli(capsys, "bench", "--device", "cpu", "--quick", "--dtypes", "fp16")
    assert code == 2
    assert "fp16" in err


def test_bench_rejects_rounds_on_cpu(capsys):
    code, _, err = run_cli(capsys, "bench", "--device", "cpu", "--quick", "--rounds", "3")
    assert code == 2
    assert "--rounds 3" in err and "cuda" in err


def test_time_rounds_rotates_the_order_every_round():
    """One timing per implementation and round; round r starts with implementation r."""
    order: list[str] = []
    steps = {name: (lambda name=name: name) for name in ("a", "b", "c")}

    def time_one(fn):
        order.append(fn())
        return float(len(order))

    times, failed = bench.time_rounds(steps, rounds=3, time_one=time_one)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    assert failed == {}
    times, _ = bench.time_rounds(steps, rounds=0, time_one=lambda fn: 1.0)  # at least one round
    assert times == {"a": [1.0], "b": [1.0], "c": [1.0]}
    order.clear()  # limits: "a" in the first round only, "b" in the first two
    times, _ = bench.time_rounds(steps, rounds=3, time_one=time_one, limits={"a": 1, "b": 2})
    assert order == ["a", "b", "c", "b", "c", "c"]
    assert [len(times[name]) for name in "abc"] == [1, 2, 3]


def test_time_rounds_drops_an_implementation_after_its_error():
    calls = {"a": 0, "b": 0}

    def time_one(fn):
        name = fn()
        calls[name] += 1
        if name == "b" and calls[name] == 2:
            raise RuntimeError("out of memory")
        return 1.0

    steps = {name: (lambda name=name: name) for name in calls}
    times, failed = bench.time_rounds(steps, rounds=4, time_one=time_one, errors=(RuntimeError,))
    assert times == {"a": [1.0] * 4}
    assert list(failed) == ["b"] and "out of memory" in str(failed["b"])
    assert calls == {"a": 4, "b": 2}  # not timed again after its error
    with pytest.raises(KeyError):  # errors of other types are not caught
        bench.time_rounds(steps, rounds=1, time_one=lambda fn: {}[fn()])


@pytest.mark.parametrize(
    ("Lq", "Lk", "causal", "alignment", "expected"),
    [
        (5, 5, False, "top_left", 25),
        (5, 5, True, "top_left", 15),  # n(n+1)/2
        (5, 5, True, "bottom_right", 15),
        (3, 5, True, "top_left", 1 + 2 + 3),
        (3, 5, True, "bottom_right", 3 + 4 + 5),
        (5, 3, True, "top_left", 1 + 2 + 3 + 3 + 3),
        (5, 3, True, "bottom_right", 0 + 0 + 1 + 2 + 3),
        (1, 4096, True, "bottom_right", 4096),  # decode
    ],
)
def test_allowed_pairs(Lq, Lk, causal, alignment, expected):
    assert bench.allowed_pairs(Lq, Lk, causal, alignment) == expected
    ref = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        offset = 0 if alignment == "top_left" else Lk - Lq
        ref = ref.tril(offset)
    assert int(ref.sum()) == expected


def test_case_flops_follow_design_section5():
    c = bench.Case("self", B=2, Hq=8, Hk=8, Lq=512, Lk=512, D=64, dtype="fp32")
    assert bench.case_flops(c, backward=False) == 4 * 2 * 8 * 64 * 512 * 512
    assert bench.case_flops(c, backward=True) == 3.5 * bench.case_flops(c, backward=False)
    padded = bench.Case("padded", B=4, Hq=2, Hk=2, Lq=100, Lk=100, D=8, dtype="fp32", pad_frac=0.25)
    lengths = bench.key_lengths(padded)
    assert lengths[0] == 100
    assert lengths[-1] == 50
    assert sum(lengths) / 4 == pytest.approx(75, abs=1)
    inputs = bench.make_inputs(padded, "cpu", requires_grad=False)
    valid = (~inputs["key_padding_mask"]).sum(dim=1).tolist()
    assert valid == lengths
    assert bench.case_flops(padded, backward=False) == 4 * 2 * 8 * 100 * sum(lengths)


def test_make_cases_token_budget():
    cases = bench.make_cases(
        dtypes=["fp32", "bf16"],
        lengths=[512, 2048, 4096],
        head_dims=[64, 128],
        tokens=4096,
        hidden=512,
        extras=True,
    )
    selfs = [c for c in cases if c.kind == "self"]
    assert len(selfs) == 2 * 3 * 2 * 2
    for c in selfs:
        assert c.B * c.Lq == 4096
        assert c.Hq * c.D == 512
    kinds = {c.kind for c in cases}
    assert kinds == {"self", "cross", "padded", "gqa", "decode"}
    gqa = next(c for c in cases if c.kind == "gqa")
    assert gqa.Hq % gqa.Hk == 0
    assert gqa.Hq > gqa.Hk


# ---------------------------------------------------------------------------------------------
# peak memory helper


def test_cpu_peak_memory_is_linear_for_memattn_and_quadratic_for_math():
    def peak(impl, L):
        kw = {"impl": impl, "B": 1, "Hq": 4, "Hk": 4, "Lq": L, "Lk": L, "D": 64, "dtype": "fp32"}
        r = _memory.cpu_peak_in_subprocess(
            "memattn.bench:memory_target", kw, warmup_kwargs=dict(kw, Lq=64, Lk=64), threads=1
        )
        assert r["ok"], r
        return r["peak_bytes"]

    L = 2048
    out_bytes = 4 * L * 64 * 4
    scores_bytes = 4 * L * L * 4
    ours = peak("memattn", L)
    assert out_bytes * 0.9 <= ours <= 3 * out_bytes + (4 << 20), ours
    assert peak("sdpa_math", L) >= scores_bytes


def test_cpu_peak_reports_failures():
    r = _memory.cpu_peak_in_subprocess("memattn.bench:no_such_target", {})
    assert not r["ok"]
    assert "exit" in r["error"]


# ---------------------------------------------------------------------------------------------
# the command itself


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2
    assert "demo" in out
    assert "bench" in out
    assert "doctor" in out


def test_console_script_and_module_entry_point():
    exe = shutil.which("memattn")
    cmd = [exe] if exe else [sys.executable, "-m", "memattn.cli"]
    proc = subprocess.run(
        [*cmd, "--help"], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "doctor" in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "script", ["scripts/demo.sh", "scripts/test.sh", "scripts/gpu_check.sh", ".ci/run"]
)
def test_scripts_parse(script):
    path = REPO / script
    if not path.exists():
        pytest.skip(f"{script} not in this tree (installed package only)")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert os.access(path, os.X_OK) or script == ".ci/run"
