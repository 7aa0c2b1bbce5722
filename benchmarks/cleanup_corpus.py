"""Exact cleanup on every real model, side by side with onnxslim (the anchor), plus the conformance figure.

    python -m benchmarks.cleanup_corpus [--models a,b] [--n-eval 16] [--out benchmarks/results]

Per model and tool: nodes after/before (subgraphs included; Constant nodes count as nodes in the original, as the
user sees them), bytes ratio, correctness on real evaluation inputs (every output's shape equal and max-abs
<= 1e-4 of the output's scale), latency ratio (ORT CPU, 1 thread, interleaved medians of FP32 and both tools in
one call), and the tool's wall time. Writes ``cleanup.json`` and ``cleanup.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.fetch import cache_dir
from benchmarks.models import MODELS
from onnxcompress import compress, io
from onnxcompress.analyses.model_stats import model_stats
from onnxcompress.latency import measure_latency
from onnxcompress.runtime import Session

TOLERANCE = 1e-4


def _outputs(model, feeds):
    with Session(model) as s:
        return [s.run(f) for f in feeds]


def _correct(ref, cand) -> tuple[bool, float]:
    worst = 0.0
    for r_list, c_list in zip(ref, cand, strict=True):
        for r, c in zip(r_list, c_list, strict=True):
            r, c = np.asarray(r), np.asarray(c)
            if r.shape != c.shape:
                return False, float("inf")
            if r.size == 0:
                continue
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(r, c):
                    return False, float("inf")
                continue
            scale = max(float(np.max(np.abs(r))), 1e-12)
            worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - c))) / scale)
    return worst <= TOLERANCE, worst


def _onnxslim(path: Path) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(str(path))


def run_model(name: str, n_eval: int, latency_budget: float) -> dict:
    spec = MODELS[name]
    path = spec.fetch(cache_dir())
    original = io.read_model(path)
    feeds = spec.make_inputs(n_eval, "eval")
    ref = _outputs(original, feeds)
    row: dict = {"model": name, "nodes": model_stats(original, with_zip=False).nodes,
                 "bytes": original.ByteSize()}
    candidates = {"original": original}
    for tool in ("onnxcompress", "onnxslim"):
        t0 = time.perf_counter()
        try:
            if tool == "onnxcompress":
                out = compress(original, "cleanup", validate=False, measure=False).model
            else:
                out = _onnxslim(path)
        except Exception as exc:  # an anchor crash is a result, not a harness failure
            row[tool] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        seconds = time.perf_counter() - t0
        try:
            ok, err = _correct(ref, _outputs(out, feeds))
        except Exception as exc:
            row[tool] = {"error": f"does not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        stats = model_stats(out, with_zip=False)
        row[tool] = {"nodes": stats.nodes, "node_ratio": stats.nodes / row["nodes"],
                     "bytes_ratio": out.ByteSize() / row["bytes"], "correct": ok, "rel_max_abs": err,
                     "seconds": seconds}
        candidates[tool] = out
    lat = measure_latency(candidates, feeds[0], threads=1, budget_s=latency_budget)
    for tool in ("onnxcompress", "onnxslim"):
        if tool in lat and "error" not in row[tool]:
            row[tool]["latency_ratio"] = lat[tool] / lat["original"]
    return row


def to_markdown(rows: list[dict], conformance: dict | None) -> str:
    lines = ["# Exact cleanup on the real corpus: onnxcompress vs onnxslim", "",
             f"Correct = every output's shape equal and max-abs <= {TOLERANCE:g} of the output's scale on real "
             "evaluation inputs. Nodes include subgraphs; the original's Constant nodes count as nodes. Latency: ORT "
             "CPU, 1 thread, interleaved medians, ratio to the original measured in the same call.", "",
             "| model | nodes | ours nodes | ours correct (rel max-abs) | ours latency | onnxslim nodes | "
             "onnxslim correct | onnxslim latency |", "|---|---|---|---|---|---|---|---|"]
    totals = {"onnxcompress": [0, 0, 0], "onnxslim": [0, 0, 0]}
    for r in rows:
        cells = [r["model"], str(r["nodes"])]
        for tool in ("onnxcompress", "onnxslim"):
            t = r.get(tool, {})
            if "error" in t:
                cells += [f"FAILED: {t['error'][:60]}", "-", "-"]
                continue
            totals[tool][0] += t["nodes"]
            totals[tool][1] += r["nodes"]
            totals[tool][2] += int(t["correct"])
            cells += [f"{t['nodes']} ({t['node_ratio']:.2f}x)", f"{'yes' if t['correct'] else 'NO'} "
                      f"({t['rel_max_abs']:.1e})", f"{t.get('latency_ratio', float('nan')):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for tool, (after, before, correct) in totals.items():
        if before:
            lines.append(f"- {tool}: {correct}/{len(rows)} correct, nodes after/before (total) {after / before:.2f}")
    if conformance:
        lines.append(f"- onnx backend node cases: {conformance['passed']} of {conformance['total']} ORT-passing cases "
                     f"unchanged after cleanup ({conformance['generated']} generated)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cleanup_corpus")
    ap.add_argument("--models", default="")
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--latency-budget", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-conformance", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [n for n in args.models.split(",") if n] or list(MODELS)
    rows = []
    for name in names:
        try:
            rows.append(run_model(name, args.n_eval, args.latency_budget))
        except Exception as exc:
            print(f"{name}: harness could not run the model: {exc}", file=sys.stderr)
            continue
        r = rows[-1]
        ours, slim = r.get("onnxcompress", {}), r.get("onnxslim", {})
        print(f"{name:26s} nodes {r['nodes']:4d} ours {ours.get('nodes', 'ERR')} correct={ours.get('correct')} "
              f"lat={ours.get('latency_ratio', float('nan')):.2f}  onnxslim {slim.get('nodes', 'ERR')} "
              f"correct={slim.get('correct')} {slim.get('error', '')[:60]}", flush=True)
    conformance = None
    if not args.no_conformance:
        from benchmarks import conformance as conf

        root = conf.default_root()
        cases = conf.generate_cases(root)
        passing = conf.ort_passing_cases(root)
        res = conf.sweep(conf.TRANSFORMS["cleanup"], passing, root=root)
        conformance = {"generated": len(cases), "total": res["total"], "passed": res["passed"],
                       "failures": res["failures"], "errors": res["error_cases"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cleanup.json").write_text(json.dumps({"rows": rows, "conformance": conformance}, indent=2, default=str))
    (out / "cleanup.md").write_text(to_markdown(rows, conformance))
    print((out / "cleanup.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
