"""The `memattn` command: demo, bench, doctor.

    memattn demo   [--device auto|cpu|cuda] [--json]
    memattn bench  --device cpu|cuda [--quick] [--dtypes fp32 bf16] [--out-json PATH] [--results PATH]
                   [--plot PATH]
    memattn bench  --plot-from JSON [--plot PATH] [--results PATH]
    memattn doctor [--json]

Tables go to stdout, progress to stderr. Exit codes: 0 success, 1 failure, 2 bad usage or a
device that can't run (e.g. --device cuda without memattn's CUDA backend).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from memattn.bench import PLOT_INSTALL_HINT

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like '512,2048', got {text!r}"
        ) from None


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def _command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "memattn " + " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from memattn import doctor

    report = doctor.collect()
    if args.json:
        _print_json(report)
    else:
        print(doctor.format_report(report))
    return 1 if "error" in report["build"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: (1) convert a real nn.Transformer with optimize and measure what changes;
    (2) memattn.attention against PyTorch SDPA on a realistic shape."""
    from memattn import demo, demo_model

    small = args.size != "default"
    result: dict[str, Any] = {}
    try:
        if args.part in ("all", "model"):
            if not args.json:
                print(
                    "Part 1: convert a model (inspect -> status -> optimize -> verify -> restore)"
                )
            result["model"] = demo_model.run_model_demo(
                args.device, small=small, reps=args.reps, measure_memory=True
            )
            if not args.json:
                print(demo_model.format_report(result["model"]), flush=True)
        if args.part in ("all", "attention"):
            if not args.json:
                print("\nPart 2: memattn.attention vs PyTorch SDPA")
            result["attention"] = demo.run_demo(
                device=args.device, size=args.size, reps=args.reps, progress=not args.no_progress
            )
            if not args.json:
                print(demo.format_table(result["attention"]))
    except RuntimeError as e:
        print(f"memattn demo: {e}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(result)
    failed = "model" in result and not result["model"]["verify"]["ok"]
    if "attention" in result:
        rows = result["attention"]["rows"]
        failed |= any(r["impl"] == "memattn" and "error" in r for r in rows)
    return 1 if failed else 0


def _write_plot(result: dict[str, Any], path: str) -> bool:
    """Draws the benchmark plot; says why in one line and returns False when it can't."""
    from memattn import bench

    try:
        bench.plot_results(result, path)
    except ImportError as e:
        print(
            f"memattn bench: plot skipped, matplotlib is not importable ({e}); "
            f"to get the plot: {PLOT_INSTALL_HINT}",
            file=sys.stderr,
        )
        return False
    except Exception as e:  # noqa: BLE001 - a plot must never cost the measured results
        print(f"memattn bench: plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    print(f"wrote {path}", file=sys.stderr)
    return True


def _plot_link(plot: str, markdown: str) -> str:
    """The plot's path relative to the markdown file's folder, with forward slashes."""
    rel = os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(markdown)))
    return rel.replace(os.sep, "/")


def _bench_plot_from(args: argparse.Namespace) -> int:
    """`memattn bench --plot-from JSON`: the plot (and, with --results, the markdown section)
    from a results JSON, without running anything."""
    from memattn import bench

    try:
        result = bench.read_json(args.plot_from)
    except (OSError, ValueError) as e:
        print(f"memattn bench: --plot-from: {e}", file=sys.stderr)
        return 2
    plot = args.plot or bench.default_plot_path(args.plot_from)
    if not _write_plot(result, plot):
        return 1
    if args.results:
        device = result["meta"]["device"]
        section = bench.markdown_tables(result, plot_link=_plot_link(plot, args.results))
        bench.update_results_markdown(args.results, device, section)
        print(f"wrote {args.results} (section '{device}')", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.plot_from:
        return _bench_plot_from(args)
    if args.device is None:
        print("memattn bench: --device is required (or --plot-from JSON)", file=sys.stderr)
        return 2

    import torch

    from memattn import bench, demo

    try:
        device, _ = demo.resolve_device(args.device)
    except RuntimeError as e:
        print(f"memattn bench: {e}", file=sys.stderr)
        return 2
    if args.quick:
        cfg = bench.quick_config(device)
    elif device == "cuda":
        # DESIGN.md §5: 16k tokens per batch, hidden 2048, D up to 256, L up to 16k.
        cfg = bench.BenchConfig(
            device="cuda",
            dtypes=["bf16", "fp16"],
            lengths=[512, 1024, 2048, 4096, 8192, 16384],
            head_dims=[64, 128, 256],
            tokens=16384,
            hidden=2048,
            impls=list(bench.CUDA_IMPLS),
            warmup=5,
            reps=20,
            rounds=3,
            memory_lengths=[1024, 2048, 4096, 8192, 16384, 32768],
            memory_dtype="bf16",
        )
    else:
        cfg = bench.BenchConfig(device="cpu")
    for name in (
        "dtypes",
        "lengths",
        "head_dims",
        "tokens",
        "hidden",
        "reps",
        "warmup",
        "rounds",
        "memory_lengths",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.passes is not None:
        cfg.passes = args.passes
    if args.causal is not None:
        cfg.causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if args.no_extras:
        cfg.extras = False
    if args.rounds is not None and (device != "cuda" or args.rounds < 1):
        print(
            f"memattn bench: --rounds {args.rounds}: needs a positive count of timing rounds "
            "on --device cuda (on CPU every timed call is interleaved already; use --reps)",
            file=sys.stderr,
        )
        return 2
    for dt in cfg.dtypes:
        if device == "cpu" and dt == "fp16":
            print(
                "memattn bench: fp16 is not supported by memattn on CPU (use fp32, bf16)",
                file=sys.stderr,
            )
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    result = bench.run_bench(
        cfg,
        command=_command_line(args.argv),
        show_progress=not args.no_progress,
        memory=not args.no_memory,
    )
    section = bench.markdown_tables(result)
    print(section)
    # A full run writes into bench/ by default; --quick writes only where it is told to, so a
    # smoke test never overwrites the committed results.
    out_json = args.out_json or (None if args.quick else f"bench/results_{device}.json")
    results_md = args.results or (None if args.quick else "bench/RESULTS.md")
    plot = args.plot or (None if args.quick or not out_json else bench.default_plot_path(out_json))
    if out_json:
        bench.write_json(out_json, result)
        print(f"wrote {out_json}", file=sys.stderr)
    plotted = bool(plot) and _write_plot(result, plot)
    if results_md:
        if plotted:
            section = bench.markdown_tables(result, plot_link=_plot_link(plot, results_md))
        bench.update_results_markdown(results_md, device, section)
        print(f"wrote {results_md} (section '{device}')", file=sys.stderr)
    ours = [r for r in result["rows"] if "median_ms" not in r["results"].get("memattn", {})]
    if ours:
        print(
            f"memattn bench: memattn failed on {len(ours)} case(s); see the table", file=sys.stderr
        )
        return 1
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memattn",
        description="memattn: memory-efficient attention with complete semantics.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="convert an nn.Transformer with memattn, then memattn.attention vs PyTorch SDPA",
    )
    d.add_argument(
        "--part",
        choices=["all", "model", "attention"],
        default="all",
        help="model: the converter on nn.Transformer; attention: the kernel vs SDPA",
    )
    d.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to run (auto: CUDA if memattn's CUDA backend is built and a GPU is "
        "there, else CPU)",
    )
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.add_argument(
        "--size", choices=["default", "small", "tiny"], default="default", help=argparse.SUPPRESS
    )
    d.add_argument("--reps", type=int, default=3, help="timed calls per implementation (median)")
    d.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser(
        "bench",
        help="benchmark against PyTorch SDPA backends (DESIGN.md §5)",
        description="Times memattn and every PyTorch SDPA backend of the device in "
        "the same run, on the same inputs and threads; writes JSON, a markdown "
        "table and a PNG plot. A full run writes bench/results_DEVICE.json, "
        "bench/results_DEVICE.png and the DEVICE section of bench/RESULTS.md; "
        "--quick writes only where --out-json/--results/--plot say. The plot needs "
        f"matplotlib ({PLOT_INSTALL_HINT}); without it the plot is skipped with a "
        "message, never the benchmark. `memattn bench --plot-from JSON [--plot PNG] "
        "[--results MD]` redraws the plot (and the markdown section) from a results "
        "JSON without running anything.",
    )
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to run (required, except with --plot-from)",
    )
    b.add_argument("--quick", action="store_true", help="a tiny sweep (seconds): a smoke test")
    b.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(bench_dtypes()),
        default=None,
        help="default: fp32 bf16 on CPU, bf16 fp16 on CUDA",
    )
    b.add_argument(
        "--lengths", type=_ints, default=None, help="sequence lengths, e.g. 512,2048,4096"
    )
    b.add_argument("--head-dims", type=_ints, default=None, help="head dims, e.g. 64,128")
    b.add_argument("--causal", choices=["both", "yes", "no"], default=None)
    b.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=None)
    b.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens per batch: B = tokens / L (default 4096 on CPU, 16384 on CUDA)",
    )
    b.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="hidden size: Hq = hidden / D (default 512 on CPU, 2048 on CUDA)",
    )
    b.add_argument("--reps", type=int, default=None, help="timed calls per implementation")
    b.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    b.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="CUDA: timing rounds per case, the implementations interleaved in an order rotated "
        "every round; the time is the median over the rounds (default 3; 1 in --quick)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads before the run (default: torch's own)",
    )
    b.add_argument(
        "--memory-lengths",
        type=_ints,
        default=None,
        help="L values of the peak-memory sweep (default 1k..16k)",
    )
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory sweep")
    b.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the cross-attention, padded, GQA and decode rows",
    )
    b.add_argument("--out-json", default=None, help="write the JSON results here")
    b.add_argument("--results", default=None, help="update this markdown file's device section")
    b.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write the PNG plot here (default for a full run: the JSON's path with .png, "
        "bench/results_DEVICE.png; --quick: none unless given)",
    )
    b.add_argument(
        "--plot-from",
        default=None,
        metavar="JSON",
        help="run nothing: draw the plot from this results JSON (to --plot, default: the "
        "JSON's path with .png) and, with --results, rewrite that file's section; "
        "sweep options are ignored",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    b.set_defaults(func=cmd_bench)

    doc = sub.add_parser("doctor", help="versions, CPU features, built backends and why not")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(func=cmd_doctor)
    return p


def bench_dtypes() -> list[str]:
    return ["fp32", "bf16", "fp16", "fp64"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `memattn doctor --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
