"""Weight sparsity on real models: ``prune-weights`` by magnitude / wanda / obs, with and without ``distill``.

    python -m benchmarks.prune_weights                           # the reduced grid below, every model
    python -m benchmarks.prune_weights --models minilm_l3 --sparsities 0.3,0.5,0.7 --patterns 2:4
    python -m benchmarks.prune_weights --render                  # rewrite prune_weights.md from the JSON

Every variant is an ``ours:<pipeline>`` method of the benchmark harness (``benchmarks.run.benchmark_model``): the
candidate is produced in its own subprocess (tool time = the pipeline's wall time), scored on the model's evaluation
inputs (disjoint from its calibration inputs) against FP32 with the model's task metric, and timed at 1 intra-op
thread interleaved with FP32 in one latency call; an ``fp32`` row gives the FP32-vs-FP32 noise band of that call.

Grid per model (``variants``): for each sparsity in ``--sparsities`` (unstructured) and each pattern in
``--patterns`` (N:M), the scores in ``--scores``, without distill; ``--distill-scores`` also with ``,distill``.
Sizes vs FP32: ``size`` raw bytes (zeros stored dense), ``zip`` zipped bytes, ``coo`` raw bytes of the same model with
every weight whose COO form is smaller moved to ``graph.sparse_initializer`` (``storage.to_sparse_initializers``,
what ``storage=auto`` stores; measured on the candidate file, no second pruning run). Unstructured and N:M zeros give no speed-up on
ORT CPU (size only): the latency column shows it is unchanged.

Goals checked (``goal``): unstructured 50% with obs keeps the task metric >= 0.99 (MiniLM: embedding cosine),
2:4 >= 0.98; obs beats magnitude at every (model, sparsity/pattern, distill) cell.

Writes ``benchmarks/results/prune_weights.json`` (harness records + table rows) and ``prune_weights.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import anchors
from benchmarks.run import RESULTS, RunConfig, _json_default, benchmark_model, load_specs, versions
from benchmarks.variant_rows import chosen_models, variant_rows

log = logging.getLogger("benchmarks.prune_weights")

MODELS = ["minilm_l3", "minilm_l6", "ppocrv4_rec", "nudenet_320n", "ddddocr_det"]
TRANSFORMERS = {"minilm_l3", "minilm_l6"}
#: calibration inputs per model: MiniLM feeds are sentences (~27 tokens), the CNN feeds are whole images
#: (128: the Gram accumulation costs one d x d product per feed and key, ~0.4 s per sentence on MiniLM-L3 here)
N_CALIB = {"minilm_l3": 128, "minilm_l6": 128}
GOAL = {"unstructured_0.5": 0.99, "2:4": 0.98}

_SPARSITY = re.compile(r"sparsity=([0-9.]+)")
_PATTERN = re.compile(r"pattern=(\d+:\d+)")
_SCORE = re.compile(r"score=(\w+)")
_ALLOCATION = re.compile(r"allocation=(\w+)")


def variants(sparsities: list[float], patterns: list[str], scores: list[str], distill_scores: list[str],
             extra: str = "", distill_cells: list[str] | None = None) -> list[str]:
    """Pipelines: every cell (sparsity or N:M pattern) x score; ``distill_scores`` also with distill, in the
    cells named by ``distill_cells`` ("0.5", "2:4"; None: every cell)."""
    cells = [(f"{s:g}", f"sparsity={s:g}") for s in sparsities] + [(p, f"pattern={p}") for p in patterns]
    out = []
    for label, cell in cells:
        for score in scores:
            out.append(f"prune-weights{{{cell} score={score}{extra}}}")
        if distill_cells is None or label in distill_cells:
            for score in distill_scores:
                out.append(f"prune-weights{{{cell} score={score}{extra}}},distill")
    return out


def describe(pipeline: str) -> dict[str, Any]:
    sp = _SPARSITY.findall(pipeline)
    pat = _PATTERN.findall(pipeline)
    score = _SCORE.findall(pipeline)
    alloc = _ALLOCATION.findall(pipeline)
    cell = pat[0] if pat else f"{float(sp[0]) if sp else 0.5:g}"
    return {"cell": cell, "score": score[0] if score else "auto", "distill": "distill" in pipeline,
            "storage": "auto" if "storage=auto" in pipeline else "dense",
            "allocation": alloc[0] if alloc else ("uniform" if pat else "auto")}


def rows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    return variant_rows(record, describe, lambda m, row: {"coo_ratio": m.get("coo_ratio")})


def goal(row: dict[str, Any]) -> bool | None:
    if row.get("score") != "obs" or row.get("metric") is None or row.get("storage") != "dense":
        return None
    bar = GOAL["2:4"] if row["cell"] == "2:4" else GOAL["unstructured_0.5"] if row["cell"] == "0.5" else None
    return None if bar is None else row["metric"] >= bar


def obs_beats_magnitude(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, cell, distill): obs's metric against magnitude's (None where one is missing)."""
    by = {(r["model"], r["cell"], r["distill"], r["score"]): r for r in rows
          if r.get("storage") == "dense" and r.get("allocation", "uniform") == "uniform" and not r.get("error")}
    out = []
    for (model, cell, dist, score), r in by.items():
        if score != "obs":
            continue
        mag = by.get((model, cell, dist, "magnitude"))
        if mag is None or r.get("metric") is None or mag.get("metric") is None:
            continue
        out.append({"model": model, "cell": cell, "distill": dist, "obs": r["metric"], "magnitude": mag["metric"],
                    "beats": r["metric"] > mag["metric"] or (r["metric"] == mag["metric"] == 1.0)})
    return out


def noise_band(record: dict[str, Any]) -> float | None:
    return (((record.get("methods") or {}).get("fp32") or {}).get("latency") or {}).get("t1", {}).get("ratio")


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(records: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Weight sparsity on real models (`prune-weights`, `distill`)", "",
             f"`python -m benchmarks.prune_weights {meta.get('args', '')}`".replace(" `", "`"), ""]
    lines.append(
        f"{meta.get('n_calib')} calibration inputs per model (MiniLM: {N_CALIB.get('minilm_l3')} sentences) / "
        f"{meta.get('n_eval')} evaluation inputs (disjoint); every ratio vs FP32 in the same run. *metric*: the "
        "model's task metric vs FP32 (embedding cosine, string agreement, box F1); *size* / *zip*: raw / zipped "
        "bytes vs FP32; *latency*: 1 intra-op thread, interleaved with FP32, medians. **Size only, no speed-up on "
        "ORT CPU**: the zeros are stored in dense tensors that ORT's dense kernels multiply like any other value "
        "(COO storage is densified at session start).")
    lines.append("")
    bands = [b for b in (noise_band(r) for r in records) if b is not None]
    if bands:
        lines.append(f"Noise band: FP32 timed against itself in the same call gave {min(bands):.2f}-"
                     f"{max(bands):.2f}.")
        lines.append("")
    lines += ["## Goals", "", "obs at 50% unstructured: metric >= 0.99; obs at 2:4: >= 0.98.", "",
              "| model | cell | distill | metric | goal |", "|---|---|---|---|---|"]
    for r in rows:
        g = goal(r)
        if g is not None:
            alloc = "" if r.get("allocation", "uniform") == "uniform" else f" ({r['allocation']})"
            lines.append(f"| {r['model']} | {r['cell']}{alloc} | {'yes' if r['distill'] else 'no'} | "
                         f"{r['metric_name']} {_f(r['metric'])} | {'met' if g else 'not met'} |")
    lines += ["", "obs against magnitude at the same cell:", "", "| model | cell | distill | obs | magnitude | "
              "obs better |", "|---|---|---|---|---|---|"]
    for c in obs_beats_magnitude(rows):
        lines.append(f"| {c['model']} | {c['cell']} | {'yes' if c['distill'] else 'no'} | {c['obs']:.4f} | "
                     f"{c['magnitude']:.4f} | {'yes' if c['beats'] else 'NO'} |")
    lines += ["", "## All variants", "",
              "| model | sparsity / pattern | score | distill | metric | cos | SQNR dB | size | zip | coo | "
              "latency | tool s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        if rec.get("error"):
            lines.append(f"| **{rec['model']}** | error: {rec['error']} | | | | | | | | | | |")
            continue
        lines.append(f"| **{rec['model']}** | FP32 vs FP32 | | | | | | 1.00 | 1.00 | 1.00 | "
                     f"{_f(noise_band(rec), '{:.2f}')} | |")
        for r in (x for x in rows if x["model"] == rec["model"]):
            alloc = "" if r.get("allocation", "uniform") == "uniform" else f" ({r['allocation']})"
            head = f"| | {r['cell']} | {r['score']}{alloc} | {'yes' if r['distill'] else 'no'} |"
            if r.get("error"):
                lines.append(f"{head} error: {r['error']} | | | | | | | |")
                continue
            lines.append(f"{head} {r['metric_name']} {_f(r['metric'])} | {_f(r['cosine'], '{:.4f}')} | "
                         f"{_f(r['sqnr_db'], '{:.1f}')} | {_f(r['size_ratio'], '{:.2f}')} | "
                         f"{_f(r['zip_ratio'], '{:.2f}')} | {_f(r['coo_ratio'], '{:.2f}')} | "
                         f"{_f(r['latency_ratio'], '{:.2f}')} | "
                         f"{_f(r['tool_s'], '{:.0f}')} |")
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", f"Versions: {meta.get('versions')}. Total time {meta.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def write(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    rows = [r for rec in records for r in rows_of(rec)]
    for r in rows:
        r["goal"] = goal(r)
    (out / "prune_weights.json").write_text(json.dumps({"meta": meta, "rows": rows, "records": records}, indent=1,
                                                       default=_json_default))
    (out / "prune_weights.md").write_text(render(records, rows, meta))


def combine(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Records of several runs, one per model: the variants of later runs added to a model's earlier ones (each
    variant's latency stays against the FP32 of its own run; the model's FP32 row is the first run's)."""
    by: dict[str, dict[str, Any]] = {}
    for records in runs:
        for rec in records:
            base = by.get(rec["model"])
            if base is None or base.get("error"):
                by[rec["model"]] = rec
                continue
            base["methods"] = dict(base.get("methods", {})) | {
                k: v for k, v in rec.get("methods", {}).items() if k != "fp32"}
    return [by[m] for m in dict.fromkeys([*MODELS, *by]) if m in by]


def coo_sizes(record: dict[str, Any]) -> None:
    """``coo_ratio`` of every candidate: its raw size with COO storage where smaller, vs FP32's raw bytes."""
    import onnx
    from onnxcompress.passes.prune_weights.storage import to_sparse_initializers

    fp32 = (record.get("fp32") or {}).get("bytes_raw")
    for name, m in record.get("methods", {}).items():
        if not name.startswith("ours:") or m.get("error") or not m.get("path") or not fp32:
            continue
        try:
            model, _ = to_sparse_initializers(onnx.load(m["path"]), mode="auto")
            m["coo_ratio"] = model.ByteSize() / fp32
        except Exception as exc:  # a size figure only: never fail the record for it
            log.warning("%s: COO size not measured (%s)", name, exc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prune_weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--sparsities", default="0.5", help="unstructured sparsities (default 0.5)")
    ap.add_argument("--patterns", default="2:4", help="N:M patterns (default 2:4; '' for none)")
    ap.add_argument("--scores", default="magnitude,wanda,obs")
    ap.add_argument("--distill-scores", default="obs", help="scores also run with distill after ('' for none)")
    ap.add_argument("--distill-cells", default=None, help="cells run with distill, e.g. '0.5' (default: all)")
    ap.add_argument("--options", default="", help="extra prune-weights options, e.g. 'stages=4'")
    ap.add_argument("--n-calib", type=int, default=32, help="calibration inputs (MiniLM: N_CALIB)")
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--latency-budget", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", action="store_true", help="keep the other models' records of an existing JSON")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    ap.add_argument("--notes", type=Path, help="with --combine: a text file, one note per line, for the Markdown")
    ap.add_argument("--combine", help="comma-separated folders of earlier runs' prune_weights.json: merge their "
                                      "records (a model's variants from several runs side by side) into --out")
    args = ap.parse_args(argv)
    out = args.out or RESULTS
    if args.render:
        saved = json.loads((out / "prune_weights.json").read_text())
        write(out, saved["records"], saved["meta"])
        return 0
    if args.combine:
        runs = [json.loads((Path(d) / "prune_weights.json").read_text()) for d in args.combine.split(",")]
        records = combine([r["records"] for r in runs])
        meta = runs[0]["meta"] | {"args": " ; ".join(r["meta"].get("args", "") for r in runs),
                                  "seconds": sum(r["meta"].get("seconds", 0) for r in runs)}
        if args.notes:
            meta["notes"] = [x.strip() for x in args.notes.read_text().splitlines() if x.strip()]
        out.mkdir(parents=True, exist_ok=True)
        write(out, records, meta)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    specs = load_specs()
    names = chosen_models(args.models, MODELS, specs)
    if names is None:
        return 2
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    extra = f" {args.options}" if args.options else ""
    pipelines = variants([float(s) for s in split(args.sparsities)], split(args.patterns), split(args.scores),
                         split(args.distill_scores), extra,
                         split(args.distill_cells) if args.distill_cells is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads((out / "prune_weights.json").read_text()) if args.merge and (
        out / "prune_weights.json").exists() else {}
    old = saved.get("records", [])
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    for name in names:
        methods = {"fp32": anchors.fp32_method} | {f"ours:{p}": anchors.ours(p) for p in pipelines}
        keep = Path(tempfile.mkdtemp(prefix="bench-pw-"))
        cfg = RunConfig(methods=list(methods), n_calib=N_CALIB.get(name, args.n_calib), n_eval=args.n_eval,
                        threads=(1,), latency_budget_s=args.latency_budget, session_rss=False, keep_models=keep)
        log.info("== %s (%d variants)", name, len(pipelines))
        rec = benchmark_model(specs[name], cfg, methods)
        coo_sizes(rec)
        shutil.rmtree(keep, ignore_errors=True)
        records.append(rec)
        by = {r["model"]: r for r in old} | {r["model"]: r for r in records}
        merged = [by[m] for m in dict.fromkeys([*MODELS, *by]) if m in by]
        meta = {"args": " ".join(argv if argv is not None else sys.argv[1:]), "n_calib": args.n_calib,
                "n_eval": args.n_eval, "versions": versions(), "seconds": time.perf_counter() - t0}
        write(out, merged, meta)
    print(f"wrote {out}/prune_weights.md ({len(records)} models, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
