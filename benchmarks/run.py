"""Real-model benchmark: every method on every model, FP32 side by side in the same run, ratios only.

    python -m benchmarks.run --quick                       # 4 models, 6 methods, few eval inputs (< 5 min, 2 cores)
    python -m benchmarks.run                               # every model in benchmarks.models.MODELS, every method
    python -m benchmarks.run --models ppocr_cls --methods "fp32,ort_dynamic,ours:cleanup,quantize{mode=static}"

Per model: fetch it, build ``n_calib`` calibration and ``n_eval`` evaluation inputs (disjoint), run the FP32 model once
on the eval feeds, then for every method: produce the candidate (one subprocess per method: crashes and OOM kills
become error rows, the tool's wall time and peak RSS are its own), measure it (``benchmarks.measure``), and finally
time FP32 and all candidates together in one interleaved latency call per thread count. Writes
``<out>/<model>.json`` after each model, then ``<out>/summary.md`` and the plots (``benchmarks.report``).

``--quick`` writes to ``benchmarks/results/quick`` unless ``--out`` is given, so the full run's files stay apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import anchors, measure
from benchmarks.anchors import Method, MethodResult
from benchmarks.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent

log = logging.getLogger("benchmarks.run")

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_MODELS = ["ppocrv4_rec", "ppocr_cls", "minilm_l3", "nudenet_320n"]
REFERENCE = "__fp32_reference__"


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: list(anchors.METHODS))
    n_calib: int = 64
    n_eval: int = 32
    threads: tuple[int, ...] = (1, 2)
    latency_budget_s: float = 5.0
    latency_min_rounds: int = 5
    eval_threads: int = 2
    isolate: bool = True  # one subprocess per method
    session_rss: bool = True
    tool_timeout_s: float = 1800.0
    #: address-space limit of each tool subprocess (RLIMIT_AS); a tool that needs more fails with MemoryError and
    #: that becomes its error row. ORT's histogram calibration (Percentile/Entropy) holds every calibration
    #: activation: 7 GB RSS on ppocrv4_rec with 32 samples. None = no limit.
    tool_mem_limit_gb: float | None = 10.0
    keep_models: Path | None = None  # keep candidate models here (default: a temporary folder, deleted)


def load_specs() -> dict[str, ModelSpec]:
    """``benchmarks.models.MODELS``; while a spec module is missing, whatever modules import (with a warning)."""
    try:
        from benchmarks.models import MODELS

        return dict(MODELS)
    except ImportError as exc:
        log.warning("benchmarks.models incomplete (%s); using the spec modules that import", exc)
    specs: dict[str, ModelSpec] = {}
    for mod in ("vision", "speech_text"):
        try:
            module = __import__(f"benchmarks.{mod}", fromlist=["SPECS"])
            specs.update({s.name: s for s in module.SPECS})
        except ImportError as exc:
            log.warning("benchmarks.%s not importable: %s", mod, exc)
    return specs


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    out = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import onnxslim

        out["onnxslim"] = getattr(onnxslim, "__version__", "?")
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------------ produce
def produce(
    name: str, method: Method, fp32: Path, calib_file: Path, calib: list, out: Path, cfg: RunConfig
) -> dict[str, Any]:
    """Run one method -> {MethodResult fields, tool: {seconds, peak_rss_mb, delta_rss_mb, isolated}}."""
    if name == "fp32":
        return MethodResult("fp32", str(fp32)).to_dict() | {"tool": None}
    resolvable = True
    try:
        anchors.resolve_method(name)
    except KeyError:
        resolvable = False
    if not (cfg.isolate and resolvable):  # in-process (a callable only this process knows, or isolate=False)
        t0 = time.perf_counter()
        res = anchors.run_method(name, method, fp32, calib, out)
        return res.to_dict() | {"tool": {"seconds": time.perf_counter() - t0, "isolated": False}}
    res = run_isolated(name, fp32, calib_file, out, cfg.tool_timeout_s, cfg.tool_mem_limit_gb, cwd=REPO)
    tool = res.pop("tool") | {"isolated": True}
    if "peak_rss_mb" in tool:
        tool["delta_rss_mb"] = tool["peak_rss_mb"] - tool["base_rss_mb"]
    if "failed" in res:
        return MethodResult(name, error=res["failed"]).to_dict() | {"tool": tool}
    return res | {"tool": tool}


def run_isolated(method: str, fp32: Path, calib_file: Path, out: Path, timeout_s: float, mem_gb: float | None,
                 cwd: Path) -> dict[str, Any]:
    """``python -m benchmarks.anchors`` for one method in a subprocess (cwd ``cwd``, address space capped at
    ``mem_gb``) -> its MethodResult payload + ``tool`` {seconds, process_seconds, peak_rss_mb, base_rss_mb}, or
    {"failed": why, "tool": {seconds: wall time}} when it timed out or died."""
    res_file = out.with_suffix(".result.json")
    cmd = [sys.executable, "-m", "benchmarks.anchors", "--method", method, "--model", str(fp32)]
    cmd += ["--calib", str(calib_file), "--out", str(out), "--result", str(res_file)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(cwd), env=env,
                              preexec_fn=limit_memory(mem_gb))
    except subprocess.TimeoutExpired:
        return {"failed": f"timeout: the tool ran over {timeout_s:.0f} s", "tool": {"seconds": time.perf_counter() - t0}}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not res_file.exists():
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {"failed": f"tool process died ({why}) {tail}".strip(), "tool": {"seconds": wall}}
    payload = json.loads(res_file.read_text())
    res_file.unlink()
    tool = {key: payload.pop(key) for key in ("seconds", "peak_rss_mb", "base_rss_mb")}
    return payload | {"tool": tool | {"process_seconds": wall}}


# ---------------------------------------------------------------------------------------------- one model
def benchmark_model(
    spec: ModelSpec, cfg: RunConfig, methods: dict[str, Method] | None = None, cache: Path | None = None
) -> dict[str, Any]:
    """Benchmark every method on one model; never raises for a method's failure (it becomes the row's error)."""
    from benchmarks.fetch import cache_dir

    methods = methods if methods is not None else {m: anchors.resolve_method(m) for m in cfg.methods}
    t_model = time.perf_counter()
    record: dict[str, Any] = {
        "model": spec.name,
        "family": spec.family,
        "primary_metric": spec.primary_metric,
        "config": _jsonable(asdict(cfg) | {"methods": list(methods)}),
        "versions": versions(),
        "methods": {},
    }
    try:
        fp32 = Path(spec.fetch(cache or cache_dir()))
        calib = spec.make_inputs(cfg.n_calib, "calib")
        evals = spec.make_inputs(cfg.n_eval, "eval")
        if not evals:
            raise RuntimeError("make_inputs returned no eval feeds")
    except Exception as exc:
        record["error"] = f"setup: {anchors.first_line(exc)}"
        log.error("%s: %s", spec.name, record["error"])
        return record
    record["n_calib"], record["n_eval"] = len(calib), len(evals)
    lat_feed = evals[0]
    record["latency_feed_shapes"] = {k: list(v.shape) for k, v in lat_feed.items()}

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{spec.name}-"))
    out_dir = cfg.keep_models / spec.name if cfg.keep_models else tmp
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        calib_file = anchors.save_feeds(calib, tmp / "calib.npz")
        feed_file = anchors.save_feeds([lat_feed], tmp / "feed.npz")
        try:
            record["fp32"] = measure.model_figures(fp32, lat_feed)
            names, ref_outs = measure.run_outputs(fp32, evals, threads=cfg.eval_threads)
            if cfg.session_rss:
                record["fp32"]["session_rss"] = measure.session_rss(fp32, feed_file)
        except Exception as exc:
            record["error"] = f"fp32: {anchors.first_line(exc)}"
            log.error("%s: %s", spec.name, record["error"])
            return record
        record["output_names"] = names

        candidates: dict[str, Path] = {}
        for name, method in methods.items():
            t0 = time.perf_counter()
            row = produce(name, method, fp32, calib_file, calib, out_dir / f"{_fname(name)}.onnx", cfg)
            if row.get("error") is None:
                _measure_row(row, spec, fp32, record, evals, names, ref_outs, feed_file, cfg)
                if row.get("error") is None:
                    candidates[name] = Path(row["path"])
            record["methods"][name] = row
            log.info(
                "%s / %s: %s (%.1f s)", spec.name, name, row.get("error") or "ok", time.perf_counter() - t0
            )

        for t in cfg.threads:
            _latency(record, fp32, candidates, lat_feed, t, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record["seconds"] = time.perf_counter() - t_model
    return record


def _measure_row(
    row: dict,
    spec: ModelSpec,
    fp32: Path,
    record: dict,
    evals: list,
    names: list[str],
    ref_outs: list,
    feed_file: Path,
    cfg: RunConfig,
) -> None:
    path = Path(row["path"])
    stage = "figures"
    try:
        figs = measure.model_figures(path, evals[0])
        ref = record["fp32"]
        row["figures"] = figs
        row["size_ratio"] = figs["bytes_raw"] / ref["bytes_raw"]
        row["zip_ratio"] = figs["bytes_zip"] / ref["bytes_zip"]
        if figs.get("macs") and ref.get("macs"):
            row["macs_ratio"] = figs["macs"] / ref["macs"]
        weights = figs["params"] + figs["int_params"]
        row["int_weight_fraction"] = figs["int_params"] / weights if weights else 0.0
        if _is_quantizer(row["method"]) and figs["int_params"] == 0:
            row.setdefault("notes", []).append("no weight was quantized (0 int8 weight elements)")
        stage = "run"
        _, cand_outs = measure.run_outputs(path, evals, names, threads=cfg.eval_threads)
        stage = "evaluate"
        row["metrics"] = {k: float(v) for k, v in spec.evaluate(evals, ref_outs, cand_outs).items()}
        stage = "fidelity"
        row["fidelity"] = measure.fidelity(names, ref_outs, cand_outs)
        del cand_outs
        if cfg.session_rss:
            stage = "session_rss"
            row["session_rss"] = measure.session_rss(path, feed_file)
            base = record["fp32"].get("session_rss", {}).get("delta_mb")
            if base:
                row["session_rss_ratio"] = row["session_rss"]["delta_mb"] / base
    except Exception as exc:
        row["error"] = f"{stage}: {anchors.first_line(exc)}"
        row["error_stage"] = stage


def _latency(
    record: dict, fp32: Path, candidates: dict[str, Path], feed: dict, threads: int, cfg: RunConfig
) -> None:
    key = f"t{threads}"
    models = {REFERENCE: fp32} | candidates
    try:
        res = measure.latency_ratios(
            models, REFERENCE, feed, threads, cfg.latency_budget_s, cfg.latency_min_rounds
        )
    except Exception as exc:  # one bad candidate: fall back to pairs so the others still get numbers
        log.warning(
            "%s: joint latency run failed (%s); timing each candidate against FP32 alone",
            record["model"],
            anchors.first_line(exc),
        )
        res = {REFERENCE: {}}
        for name, path in candidates.items():
            try:
                pair = measure.latency_ratios(
                    {REFERENCE: fp32, name: path},
                    REFERENCE,
                    feed,
                    threads,
                    cfg.latency_budget_s / max(len(candidates), 1),
                    cfg.latency_min_rounds,
                )
                res[name] = pair[name]
            except Exception as exc2:
                record["methods"][name].setdefault("latency_error", {})[key] = anchors.first_line(exc2)
    record.setdefault("fp32", {}).setdefault("latency_ms", {})[key] = res.get(REFERENCE, {}).get("ms")
    for name in candidates:
        if name in res:
            record["methods"][name].setdefault("latency", {})[key] = res[name]


def limit_memory(gb: float | None):
    """A ``preexec_fn`` that caps the child's address space at ``gb`` GiB (None: no cap)."""
    if not gb:
        return None

    def apply() -> None:
        import resource

        limit = int(gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _is_quantizer(name: str) -> bool:
    return any(k in name for k in ("static", "dynamic", "int8", "int4", "quant"))


def _fname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------------------------------ run
def run(
    specs: list[ModelSpec],
    cfg: RunConfig,
    out: Path,
    methods: dict[str, Method] | None = None,
    cache: Path | None = None,
) -> list[dict[str, Any]]:
    from benchmarks import report

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = []
    for spec in specs:
        log.info("== %s", spec.name)
        rec = benchmark_model(spec, cfg, methods, cache)
        (out / f"{spec.name}.json").write_text(json.dumps(rec, indent=1, default=_json_default))
        records.append(rec)
    report.write_report(records, out, seconds=time.perf_counter() - t0)
    return records


def _json_default(o: Any) -> Any:
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def split_methods(text: str) -> list[str]:
    """``fp32,ours:cleanup,quantize{mode=static},ort_dynamic`` -> the pipeline keeps its commas: a piece that is
    not a method name continues the ``ours:`` pipeline before it (braces may hold commas too)."""
    out: list[str] = []
    depth = 0
    for piece in text.split(","):
        continues = (
            out
            and out[-1].startswith("ours:")
            and piece not in anchors.METHODS
            and not piece.startswith("ours:")
        )
        if out and (depth > 0 or continues):
            out[-1] += "," + piece
        else:
            out.append(piece)
        depth += piece.count("{") - piece.count("}")
    return [m for m in out if m]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 models, 6 methods, few eval inputs (< 5 min)")
    ap.add_argument("--models", help="comma-separated model names (default: all, or the quick set)")
    ap.add_argument("--methods", help="comma-separated method names; 'ours:<pipeline>' runs any pipeline")
    ap.add_argument("--n-calib", type=int, default=None, help="calibration inputs (default 64; quick 32)")
    ap.add_argument("--n-eval", type=int, default=None, help="evaluation inputs (default 64; quick 12)")
    ap.add_argument("--latency-budget", type=float, default=None, help="seconds per model and thread count")
    ap.add_argument("--no-rss", action="store_true", help="skip the session-memory subprocesses")
    ap.add_argument(
        "--tool-mem-limit-gb",
        type=float,
        default=10.0,
        help="address-space limit per tool subprocess (0: none); above it the tool's row is an error",
    )
    ap.add_argument("--keep-models", type=Path, help="keep the candidate models in this folder")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)

    specs = load_specs()
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else list(specs))
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(
            f"unknown model(s): {', '.join(unknown)}; known: {', '.join(specs) or '(none)'}", file=sys.stderr
        )
        return 2
    method_names = (
        split_methods(args.methods)
        if args.methods
        else (anchors.QUICK_METHODS if args.quick else list(anchors.METHODS))
    )
    try:
        methods = {m: anchors.resolve_method(m) for m in method_names}
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    cfg = RunConfig(
        methods=method_names,
        n_calib=args.n_calib or (32 if args.quick else 64),
        n_eval=args.n_eval or (12 if args.quick else 64),
        latency_budget_s=args.latency_budget or (1.5 if args.quick else 8.0),
        session_rss=not args.no_rss,
        keep_models=args.keep_models,
        tool_mem_limit_gb=args.tool_mem_limit_gb or None,
    )
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    t0 = time.perf_counter()
    records = run([specs[n] for n in names], cfg, out, methods)
    print(f"wrote {out}/summary.md ({len(records)} models, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
