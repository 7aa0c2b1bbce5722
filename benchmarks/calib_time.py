"""Calibration time, method for method: ORT ``quantize_static`` vs our ``quantize{mode=static}``.

    python -m benchmarks.calib_time [--models a,b] [--methods minmax,percentile,entropy] [--n-eval 32]

For every model and every range rule ``X`` in minmax / percentile / entropy, two tools quantize the FP32 model from
the **same** ``n_calib`` (64) calibration feeds of the model's ``ModelSpec``:

- ``ort_static_X``: onnxruntime ``quantize_static`` (QDQ, per-channel, ``CalibrationMethod.X``), exactly as the
  benchmark anchors call it (opset upgrade and ``quant_pre_process`` included: what a user has to run);
- ``ours_int8_X``: ``cleanup,quantize{mode=static,calibration=X,auto_float_db=0}`` — the same rule, our automatic
  float-layer search off (bias correction and the latency guard stay, they are part of every run);

and, separately, our default ``ours_int8`` (``calibration=auto`` + the leave-one-out float-layer search).

Each tool runs end to end in its own subprocess (``python -m benchmarks.anchors``; time = the tool call's wall
time inside it, without interpreter start-up and feed loading; with ``--repeat N`` the fastest of N runs, as the
machine is shared — a crash is not retried), with a temporary working directory (ORT writes
files there) and the harness's address-space limit, so a crash or an out-of-memory failure is a row with its error,
not a missing row. Each candidate is then scored on ``n_eval`` evaluation feeds with the model's task metric
(``ModelSpec.evaluate``) against the FP32 outputs. With ``--latency``, the candidates' 1-thread latency ratio vs FP32
(interleaved medians) is measured too.

Writes ``benchmarks/results/calib_time.json`` (every row) and ``calib_time.md`` (one table per model + a summary of
ours/ORT time ratios per method).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import anchors
from benchmarks.run import run_isolated
from benchmarks.spec import ModelSpec

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"

DEFAULT_MODELS = ("ppocrv4_rec", "ppocrv4_det", "ppocr_cls", "nudenet_320n", "ddddocr_det", "minilm_l3")
RULES = ("minmax", "percentile", "entropy")


def method_names(rules: tuple[str, ...], default: bool = True) -> list[str]:
    """Rows of one model: per rule ORT then ours, then our default."""
    names = [m for r in rules for m in (f"ort_static_{r}", f"ours_int8_{r}")]
    return names + (["ours_int8"] if default else [])


def run_tool(
    method: str, fp32: Path, calib_file: Path, work: Path, timeout_s: float, mem_gb: float | None
) -> dict[str, Any]:
    """One method in a subprocess with ``work`` as its cwd -> MethodResult dict + ``tool`` timings."""
    res = run_isolated(method, fp32, calib_file, work / f"{method}.onnx", timeout_s, mem_gb, cwd=work)
    if "failed" in res:
        return {"method": method, "error": res["failed"],
                "tool": {"seconds": None, "process_seconds": res["tool"]["seconds"]}}
    return res


def benchmark_model(
    name: str, rules: tuple[str, ...], cfg: argparse.Namespace, spec: ModelSpec | None = None
) -> dict[str, Any]:
    from benchmarks import measure
    from benchmarks.fetch import cache_dir
    from benchmarks.models import get

    spec = spec or get(name)
    fp32 = Path(spec.fetch(cache_dir()))
    calib = spec.make_inputs(cfg.n_calib, "calib")
    evals = spec.make_inputs(cfg.n_eval, "eval")
    record: dict[str, Any] = {
        "model": name,
        "primary_metric": spec.primary_metric,
        "n_calib": len(calib),
        "n_eval": len(evals),
        "rows": {},
    }
    out_names, ref = measure.run_outputs(fp32, evals, threads=2)
    work = Path(tempfile.mkdtemp(prefix=f"calib-time-{name}-"))
    try:
        calib_file = anchors.save_feeds(calib, work / "calib.npz")
        done: dict[str, Path] = {}
        for method in method_names(rules, cfg.default):
            if cfg.only and method not in cfg.only:
                continue
            row = run_tool(method, fp32, calib_file, work, cfg.timeout, cfg.mem_gb)
            runs = [row["tool"].get("seconds")]
            for _ in range(cfg.repeat - 1):  # the machine is shared: the fastest of N runs is the tool's time
                if row.get("error"):
                    break  # a crash or an out-of-memory failure is not retried
                again = run_tool(method, fp32, calib_file, work, cfg.timeout, cfg.mem_gb)
                runs.append(again["tool"].get("seconds"))
                if not again.get("error") and again["tool"]["seconds"] < row["tool"]["seconds"]:
                    row = again
            row["tool"]["runs_seconds"] = runs
            if not row.get("error"):
                try:
                    _, cand = measure.run_outputs(Path(row["path"]), evals, out_names, threads=2)
                    metrics = spec.evaluate(evals, ref, cand)
                    row["metrics"] = {k: float(v) for k, v in metrics.items()}
                    row["primary"] = float(metrics[spec.primary_metric])
                    done[method] = Path(row["path"])
                except Exception as exc:
                    row["error"] = f"evaluation: {anchors.first_line(exc)}"
            record["rows"][method] = row
            sec = row["tool"].get("seconds")
            log.info(
                "%s / %s: %s  %s  %s",
                name,
                method,
                f"{sec:.1f} s" if sec is not None else "-",
                row.get("primary", ""),
                row.get("error") or "",
            )
        if cfg.latency and done:
            lat = measure.latency_ratios({"fp32": fp32, **done}, "fp32", evals[0], 1, cfg.latency_budget)
            for m in done:
                record["rows"][m]["latency_ratio"] = lat[m]["ratio"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------------------------- report
def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _quant_seconds(row: dict) -> float | None:
    q = (row.get("info") or {}).get("quantize") or {}
    return q.get("seconds_calibration")


def render(records: list[dict], rules: tuple[str, ...]) -> str:
    lines = [
        "# Calibration time: ORT quantize_static vs ours, same range rule, same calibration feeds",
        "",
        "Generated by `python -m benchmarks.calib_time`. Seconds = the tool call's wall time in its own subprocess "
        "(the fastest of the runs listed in the JSON's `runs_seconds`) "
        "(ORT: opset upgrade + quant_pre_process + quantize_static; ours: cleanup + quantize, end to end). "
        "`calib s` = our statistics-collection share. Metric = the model's task metric vs FP32 on the eval feeds. "
        "Errors are ORT's own crashes / out-of-memory under the harness's address-space limit.",
        "",
    ]
    summary: list[tuple[str, str, float | None, float | None, Any, Any]] = []
    for rec in records:
        lines += [
            f"## {rec['model']} ({rec['primary_metric']}; {rec['n_calib']} calib, {rec['n_eval']} eval)",
            "",
        ]
        lines += ["| method | seconds | calib s | peak RSS MB | metric | latency ratio | error |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for m, row in rec["rows"].items():
            tool = row.get("tool") or {}
            lines.append(
                f"| {m} | {_fmt(tool.get('seconds'), 1)} | {_fmt(_quant_seconds(row), 1)} | "
                f"{_fmt(tool.get('peak_rss_mb'), 0)} | {_fmt(row.get('primary'))} | "
                f"{_fmt(row.get('latency_ratio'), 2)} | {(row.get('error') or '')[:90]} |"
            )
        lines.append("")
        for r in rules:
            o, u = rec["rows"].get(f"ort_static_{r}", {}), rec["rows"].get(f"ours_int8_{r}", {})
            summary.append(
                (
                    rec["model"],
                    r,
                    (o.get("tool") or {}).get("seconds") if not o.get("error") else None,
                    (u.get("tool") or {}).get("seconds") if not u.get("error") else None,
                    o.get("primary"),
                    u.get("primary"),
                )
            )
    lines += [
        "## Summary: ours / ORT time for the same rule",
        "",
        "| model | rule | ORT s | ours s | ours/ORT | ORT metric | ours metric |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, r, ts_o, ts_u, mo, mu in summary:
        ratio = ts_u / ts_o if ts_o and ts_u else None
        lines.append(
            f"| {model} | {r} | {_fmt(ts_o, 1) if ts_o else 'failed'} | {_fmt(ts_u, 1)} | {_fmt(ratio, 2)} | "
            f"{_fmt(mo)} | {_fmt(mu)} |"
        )
    lines += [
        "",
        "## Summary: our default (calibration=auto + float-layer search) vs ORT's best rule",
        "",
        "| model | ORT best metric (rule) | ORT MinMax s | ours default s | ours default metric | latency ratio |",
        "|---|---|---|---|---|---|",
    ]
    for rec in records:
        rows = rec["rows"]
        ok = {r: rows[f"ort_static_{r}"] for r in rules if rows.get(f"ort_static_{r}", {}).get("primary") is not None}
        best = max(ok, key=lambda r: ok[r]["primary"]) if ok else None
        d = rows.get("ours_int8", {})
        lines.append(
            f"| {rec['model']} | {_fmt(ok[best]['primary']) + f' ({best})' if best else 'failed'} | "
            f"{_fmt((rows.get('ort_static_minmax', {}).get('tool') or {}).get('seconds'), 1)} | "
            f"{_fmt((d.get('tool') or {}).get('seconds'), 1)} | {_fmt(d.get('primary'))} | "
            f"{_fmt(d.get('latency_ratio'), 2)} |"
        )
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.calib_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--methods", default=",".join(RULES), help="range rules (minmax,percentile,entropy)")
    ap.add_argument("--no-default", dest="default", action="store_false", help="skip our default (auto) row")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--only", help="re-measure only these rows (e.g. ours_int8); the others come from --out's JSON")
    ap.add_argument("--repeat", type=int, default=1, help="run each tool N times, keep the fastest (not crashes)")
    ap.add_argument("--latency", action="store_true", help="also measure 1-thread latency ratios vs FP32")
    ap.add_argument("--latency-budget", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--mem-gb", type=float, default=10.0, help="address-space limit per tool (0: none)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    rules = tuple(r.strip() for r in args.methods.split(",") if r.strip())
    bad = [r for r in rules if r not in RULES]
    if bad:
        print(f"unknown rule(s) {bad}; known: {RULES}", file=sys.stderr)
        return 2
    args.only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else []
    previous = {}
    if args.only and (args.out / "calib_time.json").exists():  # re-measure some rows, keep the others
        previous = {r["model"]: r for r in json.loads((args.out / "calib_time.json").read_text())}
    records = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            rec = benchmark_model(name, rules, args)
            if name in previous:
                rows = dict(previous[name]["rows"])
                rows.update(rec["rows"])
                rec["rows"] = {m: rows[m] for m in method_names(rules, args.default) if m in rows}
            records.append(rec)
        except Exception as exc:  # keep the other models
            log.error("%s: %s", name, anchors.first_line(exc))
            records.append({"model": name, "error": anchors.first_line(exc), "rows": {}, "primary_metric": "-",
                            "n_calib": 0, "n_eval": 0})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calib_time.json").write_text(json.dumps(records, indent=1, default=str))
    (args.out / "calib_time.md").write_text(render(records, rules))
    print(f"wrote {args.out}/calib_time.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
