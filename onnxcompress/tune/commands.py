"""The ``tune`` and ``batch`` subcommands (the CLI face of ``onnxcompress.tune``; cli.py hooks them in with
``add_parsers(sub)``). Like cli.py, this module prints; the library modules only log.

    onnxcompress tune IN.onnx -o OUT.onnx --calib c.npz --val v.npz --target "latency<=0.5,metric>=0.99"
        [--trials 16] [--workers N] [--sampler auto|cheap|optuna|nsga2] [--ray auto|HOST:PORT] [--timeout S]
        [--resume] [--search-passes cleanup,quantize] [--latency-profile F] [--seed 0]
        [--task auto|classify|ctc|detect|embed|none]
    onnxcompress tune --space                 # the search space of every registered pass
    onnxcompress batch manifest.toml [-o DIR] # many models through compress or tune, one summary table

Exit codes: 0 target met (batch: every model met its target), 1 target not reached (the closest trial and what it
missed are printed), 2 bad input (unknown metric, Ray address that does not answer, resume file of another model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxcompress.errors import BadInputError


def _table(header: list[str], rows: list[list[str]]) -> None:
    from onnxcompress.cli_inspect import print_table

    print_table(header, rows)


def _dims(items: list[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise BadInputError(f"--dim {item!r}: expected name=positive integer")
        out[name.strip()] = int(value)
    return out


def split_items(text: str) -> list[str]:
    """``a,b{x=1|2, y=3},c`` -> ["a", "b{x=1|2, y=3}", "c"] (commas inside braces stay)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [x for x in [*items, cur.strip()] if x]


def print_space() -> int:
    from onnxcompress.tune.space import build_space

    _table(["pass", "option", "search range", "declared by"], [list(r) for r in build_space().describe()])
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from onnxcompress.tune.output import COLUMNS, fmt, metric_title, summary_line
    from onnxcompress.tune.study import tune

    if args.space:
        return print_space()
    if not args.input or not args.output or not args.target:
        raise BadInputError("tune needs IN.onnx, -o OUT.onnx and --target (or --space)")
    src, out = Path(args.input), Path(args.output)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise BadInputError("the output path is the input file; onnxcompress never overwrites its input")
    passes = split_items(args.search_passes) if args.search_passes else None
    result = tune(src, args.target, out, calibration=args.calib, validation=args.val, trials=args.trials,
                  workers=args.workers, sampler=args.sampler, seed=args.seed, ray=args.ray, timeout=args.timeout,
                  resume=args.resume, search_passes=passes, latency_profile=args.latency_profile,
                  latency_budget=args.latency_budget, max_validation=args.max_val, dims=_dims(args.dim),
                  task=args.task)
    if not args.quiet:
        key = result.target.minimize
        print(f"Pareto front ({key} vs metric), {len(result.records)} trials, {result.wall_seconds:.0f} s on "
              f"{result.workers} {result.executor} workers:")
        _table(["#", *COLUMNS, "pipeline"], [[str(r["number"])] + [fmt(r["values"].get(k)) for k in COLUMNS]
                                            + [r["pipeline"]] for r in result.pareto])
        print(f"metric = {metric_title(result)}")
        print(summary_line(result))
        for name, path in result.paths.items():
            print(f"wrote {name}: {path}")
    return 0 if result.best is not None else 1


def cmd_batch(args: argparse.Namespace) -> int:
    from onnxcompress.tune.batch import run_manifest

    rows, ok = run_manifest(args.manifest, args.output_dir, workers=args.workers, ray=args.ray)
    _table(["model", "mode", "target", "status", "latency", "size", "metric", "pipeline / error"], rows)
    return 0 if ok else 1


def add_parsers(sub) -> None:
    from onnxcompress.validate import TASKS

    t = sub.add_parser("tune", help="search pipelines of the registered passes for a target (latency/size/metric)")
    t.add_argument("input", nargs="?")
    t.add_argument("-o", "--output", help="best model (recipe, reports and the study journal go beside it)")
    t.add_argument("--target", help='e.g. "latency<=0.5,metric>=0.99" or "metric>=0.99,minimize=size"; '
                   "bounds: latency, size, macs (<=, x FP32), metric, cosine (>=)")
    t.add_argument("--calib", help="calibration data (.npz or folder)")
    t.add_argument("--val", help="validation data the target is checked on (default: the calibration data)")
    t.add_argument("--trials", type=int, default=16, help="trial budget of the study (resumed trials count)")
    t.add_argument("--workers", type=int, default=None, help="parallel trials (default: cores, bounded by memory)")
    t.add_argument("--sampler", default="auto", choices=["auto", "cheap", "optuna", "nsga2"],
                   help="cheap: sensitivity curves + predicted combinations only; optuna (TPE) / nsga2 after them "
                   "(needs the [tune] extra); auto: optuna when installed")
    t.add_argument("--ray", help="run trials on Ray: auto (a running cluster, else local) or HOST:PORT "
                   "(needs the [distributed] extra)")
    t.add_argument("--timeout", type=float, default=None, help="seconds per trial before it is killed (retried once)")
    t.add_argument("--resume", action="store_true", help="continue the study journaled beside -o")
    t.add_argument("--search-passes", help="search only these passes, e.g. quantize,prune-channels")
    t.add_argument("--latency-profile", help="replay latency measurements (a profile JSON or run report)")
    t.add_argument("--latency-budget", type=float, default=1.5, help="seconds per latency measurement")
    t.add_argument("--max-val", type=int, default=None, help="validate on at most this many feeds")
    t.add_argument("--dim", action="append", help="bind a symbolic input dim: name=value")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--task", choices=TASKS, default="auto",
                   help="what metric measures: auto (from the model's outputs: ctc string agreement, detect box F1, "
                   "classify top-1 agreement, else embed per-sample cosine), or one kind for every output")
    t.add_argument("--space", action="store_true", help="print the search space and exit")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=cmd_tune)

    b = sub.add_parser("batch", help="many models (each with data and target) through compress or tune")
    b.add_argument("manifest", help="TOML: [[model]] path, calib, val, and passes (compress) or target (tune)")
    b.add_argument("-o", "--output-dir", default=None, help="where outputs go (default: beside the manifest)")
    b.add_argument("--workers", type=int, default=None)
    b.add_argument("--ray", default=None)
    b.set_defaults(func=cmd_batch)
