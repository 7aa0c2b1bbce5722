"""The ``onnxcompress`` command line. The only module that prints.

    onnxcompress compress IN -o OUT (--passes TEXT | --recipe NAME|F.toml) [--calib DATA] [--val DATA] [--report R.json]
                         [--preprocess TEXT] [--tokenizer tokenizer.json] [--task auto|classify|ctc|detect|embed|none] [-q | -v]
    onnxcompress inspect IN [--dim name=value] [--shape name=DxD] [--json]
    onnxcompress validate A B [--data DATA] [--dim name=value] [--json]
    onnxcompress passes
    onnxcompress recipes
    onnxcompress tune IN -o OUT --target ... / onnxcompress batch manifest.toml

DATA is a .npz, a .npy, a folder of .npz/.npy files, a folder of images (with ``--preprocess``) or a .txt of
sentences (with ``--tokenizer``). Errors print one line to stderr and exit non-zero (2 bad input, 3 pass failure,
4 validation failure, 1 other, 128+signal when interrupted by SIGINT/SIGTERM); ``--debug`` shows the traceback.
Output paths are checked before any work: a missing folder is created once the run has succeeded, an existing
file or an unwritable folder in the way is refused up front; a failed or interrupted run leaves no output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import typing
from pathlib import Path

from onnxcompress import io
from onnxcompress.errors import BadInputError, OnnxCompressError

log = logging.getLogger("onnxcompress")
#: decisions with reasons (layers kept float ...) printed on the console; the reports have all of them
MAX_REASON_LINES = 20


def _progress(args: argparse.Namespace | None = None):
    """Bars in a terminal; heartbeat log lines otherwise; nothing with --quiet."""
    from onnxcompress import progress

    if args is not None and getattr(args, "quiet", False):
        return None
    if sys.stderr.isatty():
        return progress.terminal_bars()
    return progress.heartbeat()


def _parse_dims(items: list[str] | None) -> dict[str, int]:
    dims = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise BadInputError(f"--dim {item!r}: expected name=positive integer, e.g. --dim batch=1")
        dims[name.strip()] = int(value)
    return dims


def _parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        try:
            dims = tuple(int(d) for d in value.lower().replace(",", "x").split("x"))
        except ValueError:
            dims = ()
        if not sep or not name or not dims or any(d <= 0 for d in dims):
            raise BadInputError(f"--shape {item!r}: expected input=DxDxD, e.g. --shape x=1x3x48x192")
        shapes[name.strip()] = dims
    return shapes


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    from onnxcompress.cli_inspect import print_table

    print_table(header, rows)


# ------------------------------------------------------------------------------------------------- commands
def cmd_compress(args: argparse.Namespace) -> int:
    """``onnxcompress compress``: run the pipeline, save model + reports, print the ledger and notes."""
    from onnxcompress.api import compress
    from onnxcompress.report import ledger_rows, noise_reference_line, pass_reasons
    from onnxcompress.result import report_paths
    from onnxcompress.validate import constant_outputs_note

    src, out = Path(args.input), Path(args.output)
    if args.passes and args.recipe:
        raise BadInputError("give either --passes or --recipe, not both")
    if not (args.passes or args.recipe):
        raise BadInputError("give the passes: --passes 'cleanup,...' or --recipe recipe.toml")
    report_arg = Path(args.report) if args.report else None
    written = report_paths(out, report_arg)
    for target in (out, *written):
        if target.exists() and src.exists() and target.resolve() == src.resolve():
            raise BadInputError(f"output {target} is the input file; onnxcompress never overwrites its input")
    if len({t.resolve() for t in (out, *written)}) < 1 + len(written):
        raise BadInputError(f"-o {out} and the reports {', '.join(map(str, written))} must be different files")
    for target, flag in ((out, "-o"), *(((report_arg, "--report"),) if report_arg else ())):
        _check_output_target(target, flag)
    if args.recipe:
        from onnxcompress.pipeline import load_recipe

        pipeline = load_recipe(args.recipe)  # a shipped recipe by name, or a path to a .toml
    else:
        pipeline = args.passes
    result = compress(src, pipeline, calibration=args.calib, validation=args.val,
                      dims=_parse_dims(args.dim), shapes=_parse_shapes(args.shape), seed=args.seed,
                      validate=not args.no_validate, validate_each=args.validate_each, max_validation=args.max_val,
                      latency=not args.no_latency, latency_budget=args.latency_budget,
                      latency_profile=args.latency_profile, progress=_progress(args),
                      preprocess=args.preprocess, tokenizer=args.tokenizer, max_length=args.max_length,
                      task=args.task)
    out, report_path, created = _save_creating_folders(result, out, report_arg)
    if not args.quiet:
        report = result.to_dict()
        print(f"pipeline: {result.pipeline}")
        _print_table(["stage", "nodes", "params", "bytes", "zipped", "MACs", "time", "changes"], ledger_rows(report))
        if result.fidelity is not None:
            w = result.fidelity.worst()
            parts = [f"cosine {w.get('cosine', 1):.6f}", f"SQNR {w.get('sqnr_db', float('inf')):.1f} dB",
                     f"max-abs {w.get('max_abs', 0):.3g}"]
            if "top1_agreement" in w:
                parts.append(f"top-1 agreement {w['top1_agreement']:.4f}")
            tm = result.fidelity.task_metric()
            if tm is not None and tm["metric"] != "top1_agreement":
                parts.append(f"{tm['title']} {tm['value']:.4f}")
            print(f"fidelity ({result.fidelity.feeds} feeds, worst output): " + ", ".join(parts))
            ref = report["fidelity"].get("input_noise_reference")
            if ref:
                print(noise_reference_line(report["fidelity"], ref))
            if (note := constant_outputs_note(report["fidelity"])) is not None:
                print(f"warning: {note}", file=sys.stderr)
            kinds = {n: m.get("metric_kind", "values") for n, m in result.fidelity.outputs.items()}
            print("metrics per output: " + ", ".join(f"{n}: {k}" + (" (top-1/top-5 agreement)"
                                                                    if k == "class scores" else "")
                                                     for n, k in kinds.items()))
        reasons = pass_reasons(report)
        for stage, key, what, reason in reasons[:MAX_REASON_LINES]:
            print(f"{stage}: {key.replace('_', ' ')}: {what}: {reason}")
        if len(reasons) > MAX_REASON_LINES:
            print(f"... {len(reasons) - MAX_REASON_LINES} more decisions with reasons in the reports")
        if result.latency_ms is not None:
            lat = result.latency_ms
            print(f"latency (ORT CPU, 1 thread): {lat['original']:.3f} ms -> {lat['compressed']:.3f} ms "
                  f"({lat['compressed'] / lat['original']:.2f}x)")
        for note in result.notes:
            print(f"note: {note}")
        if created:
            print(f"created folder {', '.join(str(c) for c in created)}")
        print(f"wrote {out} ({human(out.stat().st_size)}) and {report_path} (+ .md, .html)")
    return 0


def _check_output_target(target: Path, flag: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, or a file in the way of a folder
    to create, or a folder we may not write into. Missing folders are fine (created after the run)."""
    if target.is_dir():
        raise BadInputError(f"{flag} {target} is a folder; give a file name")
    folder = target.parent if str(target.parent) else Path(".")
    while not folder.exists():
        folder = folder.parent if str(folder.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"{flag} {target}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"{flag} {target}: cannot write into {folder}")


def _save_creating_folders(result, out: Path, report: Path | None) -> tuple[Path, Path, list[Path]]:
    """One rule for -o and --report: missing folders are created, but only once the run has succeeded, and removed
    again if writing fails (a failed run leaves nothing behind)."""
    created: list[Path] = []
    for folder in {out.parent, *([report.parent] if report else [])}:
        missing = []
        f = folder
        while str(f) not in ("", ".") and not f.exists():
            missing.append(f)
            f = f.parent
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
    try:
        return (*result.save(out, report), created)
    except BaseException:
        for m in reversed(created):
            try:
                m.rmdir()
            except OSError:
                pass
        raise


def human(n: int) -> str:
    """Bytes for humans (``report.human_bytes``)."""
    from onnxcompress.report import human_bytes

    return human_bytes(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``onnxcompress inspect`` (``cli_inspect``): ops, params, MACs, bytes, weights, sparsity, channel groups, units."""
    from onnxcompress.cli_inspect import cmd_inspect as inspect_model

    return inspect_model(args, _parse_dims(args.dim), _parse_shapes(args.shape))


def cmd_recipes(args: argparse.Namespace) -> int:
    """``onnxcompress recipes``: the shipped recipes (``cli_inspect.cmd_recipes``)."""
    from onnxcompress.cli_inspect import cmd_recipes as list_them

    return list_them(args)


def cmd_validate(args: argparse.Namespace) -> int:
    """``onnxcompress validate``: fidelity, size and latency of model B against model A on the same feeds."""
    from onnxcompress.api import check_loads
    from onnxcompress.data_sources import feeds_from_any
    from onnxcompress.latency import measure_latency
    from onnxcompress.report import fmt_metric
    from onnxcompress.synthetic_feeds import accepted_random_feeds
    from onnxcompress.validate import compare_models, structural_problems

    a, b = io.read_model(args.a), io.read_model(args.b)
    check_loads(a, f"model {args.a}")  # a model ORT cannot load is bad input (exit 2), as compress says too
    check_loads(b, f"model {args.b}")
    notes: list[str] = []
    if args.data:
        feeds = feeds_from_any(args.data, a, args.preprocess, args.tokenizer, args.max_length)
    else:
        feeds, notes = accepted_random_feeds(a, _parse_dims(args.dim), _parse_shapes(args.shape), n=8, seed=0)
    if args.max_val:
        feeds = feeds.take(args.max_val)
    rep = compare_models(a, b, feeds, progress=_progress(args), task=args.task)
    problems = structural_problems(b)
    size_a, size_b = io.file_size_on_disk(args.a), io.file_size_on_disk(args.b)
    lat = measure_latency({"a": a, "b": b}, feeds.first(), budget_s=args.latency_budget)
    for n, m in rep.outputs.items():  # NaN/inf: say whose, the metrics alone read "nan"
        bad = m.get("nonfinite_values")
        if bad:
            notes.append(f"output {n!r}: {args.a} produced {bad['original']} and {args.b} {bad['compressed']} "
                         "non-finite value(s) (NaN/inf) on these feeds")
    from onnxcompress.validate import constant_outputs_note

    if (const := constant_outputs_note(rep.to_dict())) is not None:
        notes.append(const)
    out = {"fidelity": rep.to_dict(), "bytes": {"a": size_a, "b": size_b}, "latency_ms": lat,
           "problems_b": problems, "notes": notes}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    for note in notes:  # what was made up (random values, guessed dims, pinned integer inputs), NaN/inf outputs
        print(f"warning: {note}", file=sys.stderr)
    keys = ["max_abs", "rel_max_abs", "mean_abs", "cosine", "cosine_min", "sqnr_db", "top1_agreement",
            "top5_agreement"]
    _print_table(["output"] + keys, [[n] + [fmt_metric(m[k]) if k in m else "-" for k in keys]
                                     for n, m in rep.outputs.items()])
    tm = rep.task_metric()
    if tm is not None:
        print(f"task metric: {tm['title']} {tm['value']:.4f} (output {tm['output']}, {tm['task']})")
    print(f"feeds: {rep.feeds} from {rep.source}")
    print(f"size: {human(size_a)} -> {human(size_b)} ({size_b / size_a:.3f}x)")
    print(f"latency (ORT CPU, 1 thread): {lat['a']:.3f} ms -> {lat['b']:.3f} ms ({lat['b'] / lat['a']:.2f}x)")
    for p in problems:
        print(f"structural problem in {args.b}: {p}")
    return 0


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def cmd_passes(args: argparse.Namespace) -> int:
    """``onnxcompress passes``: every registered pass with its options, defaults and help."""
    from onnxcompress.pass_base import option_fields, option_help, registered_passes

    for name, cls in registered_passes().items():
        kind = "exact" if cls.exact else "lossy"
        print(f"{name}  [{kind}]  {cls.description}")
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            helptext = option_help(cls)[f.name]
            print(f"    {f.name}: {_type_name(hints.get(f.name))} = {default!r}" + (f"  -- {helptext}" if helptext
                                                                                      else ""))
        print()
    return 0


# ----------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from onnxcompress.validate import TASKS

    ap = argparse.ArgumentParser(prog="onnxcompress", description="Compress ONNX models, measured against onnxruntime.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="run a pipeline of passes and write the compressed model + report")
    c.add_argument("input")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--passes", help='pipeline text, e.g. "cleanup,quantize{mode=static}"')
    c.add_argument("--recipe", help="a shipped recipe by name (see `onnxcompress recipes`) or a TOML recipe file")
    c.add_argument("--calib", help="calibration data: .npz/.npy (arrays named like the inputs), a folder of .npz/.npy "
                   "files, a folder of images (see --preprocess) or a .txt of sentences (see --tokenizer)")
    c.add_argument("--val", help="validation data for the fidelity report (default: the calibration data)")
    c.add_argument("--preprocess", help='how images become tensors, e.g. "resize=224,mean=0.485:0.456:0.406,'
                   'std=0.229:0.224:0.225,layout=NCHW,bgr=false" (default: the model\'s H/W, pixels/255)')
    c.add_argument("--tokenizer", help="tokenizer.json (HuggingFace tokenizers) for a .txt of sentences")
    c.add_argument("--max-length", type=int, default=128, help="truncate sentences to this many tokens")
    c.add_argument("--task", choices=TASKS, default="auto",
                   help="the task metric per output: auto = from the graph (ctc: a [N, T, C] Softmax -> CTC string "
                   "agreement; detect: a YOLO box+Sigmoid Concat -> box F1; classify: class scores -> top-1/top-5 "
                   "agreement; embed: anything else -> per-sample cosine); a kind = that kind for every output that "
                   "fits it; none = no task metric")
    c.add_argument("--report", help="report JSON path (default OUTPUT.report.json; Markdown and HTML beside it)")
    c.add_argument("--shape", action="append", help="concrete input shape: name=1x3x224x224 (repeatable)")
    c.add_argument("--dim", action="append", help="bind a symbolic input dim: name=value (repeatable)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-val", type=int, default=None, help="validate on at most this many feeds")
    c.add_argument("--no-validate", action="store_true", help="skip the final fidelity measurement")
    c.add_argument("--validate-each", action="store_true", help="measure fidelity after every pass")
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    c.add_argument("--latency-budget", type=float, default=3.0, help="seconds spent measuring latency")
    c.add_argument("--latency-profile", help="replay the latency measurements of an earlier run (its report JSON): "
                   "the same input, options and data then give the same output")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    c.add_argument("-v", "--verbose", action="count", default=0, help="log what the passes do (-vv: debug)")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="ops, params, MACs, bytes, weights, sparsity, channel groups, removable units")
    i.add_argument("input")
    i.add_argument("--shape", action="append", help="concrete input shape: name=1x3x224x224 (repeatable)")
    i.add_argument("--dim", action="append")
    i.add_argument("--top", type=int, default=15)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("validate", help="fidelity, size and latency of B against A on the same feeds")
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--data", help="feeds, in any form --calib takes (default: random, with a warning)")
    v.add_argument("--preprocess", help="how images become tensors (see compress --preprocess)")
    v.add_argument("--tokenizer", help="tokenizer.json for a .txt of sentences")
    v.add_argument("--max-length", type=int, default=128)
    v.add_argument("--task", choices=TASKS, default="auto", help="the task metric per output (see compress --task)")
    v.add_argument("--shape", action="append", help="concrete input shape: name=1x3x224x224 (repeatable)")
    v.add_argument("--dim", action="append")
    v.add_argument("--max-val", type=int, default=None)
    v.add_argument("--latency-budget", type=float, default=3.0)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_validate)

    p = sub.add_parser("passes", help="every pass with its options and defaults")
    p.set_defaults(func=cmd_passes)

    r = sub.add_parser("recipes", help="the shipped recipes (use one with compress --recipe NAME)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recipes)

    from onnxcompress.tune.commands import add_parsers as add_tune_parsers  # `tune` and `batch`

    add_tune_parsers(sub)
    return ap


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (main() may run many times in one process,
    each with its own stderr, as under a test runner's capture)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def _configure_logging(args: argparse.Namespace):
    """Levels for this run: -q errors only, default warnings, -v info, -vv/--debug debug. Progress lines (pass
    start/end) go to stderr as plain lines; long loops get heartbeat lines when stderr is not a terminal (CI, pipes)
    and tqdm bars in a terminal (``_progress``). Returns a function that puts the loggers back as they were (main() may run many times in one
    process)."""
    verbose, quiet = getattr(args, "verbose", 0), getattr(args, "quiet", False)
    level = (logging.DEBUG if args.debug or verbose > 1 else logging.INFO if verbose else
             logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    package, progress_log = logging.getLogger("onnxcompress"), logging.getLogger("onnxcompress.progress")
    saved = (package.level, progress_log.level, progress_log.propagate, list(progress_log.handlers))
    package.setLevel(level)
    if quiet:
        progress_log.setLevel(logging.WARNING)
    else:
        progress_log.setLevel(logging.INFO)  # pass start/end lines everywhere; heartbeats only outside a terminal
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("onnxcompress: %(message)s"))
        progress_log.handlers[:] = [handler]
        progress_log.propagate = False

    def restore() -> None:
        package.setLevel(saved[0])
        progress_log.setLevel(saved[1])
        progress_log.propagate = saved[2]
        progress_log.handlers[:] = saved[3]

    return restore


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv``, run the subcommand, turn errors into one line and an exit code."""
    args = build_parser().parse_args(argv)
    restore_logging = _configure_logging(args)
    if not args.debug:
        os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    previous = _interrupt_on_sigterm()
    try:
        return args.func(args)
    except OnnxCompressError as exc:
        if args.debug:
            raise
        print(f"onnxcompress: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `onnxcompress inspect m.onnx | head`: the reader left, nothing is wrong
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout must stay writable for interpreter exit
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        signum = _received_signal[0] or signal.SIGINT
        print(f"onnxcompress: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # a bug: still one line, with how to see more
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()
        print(f"onnxcompress: internal error: {type(exc).__name__}: {msg[0] if msg else ''} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        _received_signal[0] = None
        if previous is not _NOT_SET:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        restore_logging()


_received_signal: list[int | None] = [None]
_NOT_SET = object()


def _interrupt_on_sigterm():
    """SIGTERM (CI timeouts, ``kill``) unwinds like Ctrl-C: a KeyboardInterrupt, so every temp file is removed on the
    way out. Returns the previous handler (``_NOT_SET`` outside the main thread, where signals cannot be set)."""

    def handler(signum, frame):
        _received_signal[0] = signum
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return _NOT_SET


if __name__ == "__main__":
    sys.exit(main())
