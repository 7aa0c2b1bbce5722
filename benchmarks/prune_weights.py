"""Weight sparsity on real models: ``prune-weights`` by magnitude / wanda / obs, with and without ``distill``.

    python -m benchmarks.prune_weights                           # the reduced grid below, every model
    python -m benchmarks.prune_weights --models minilm_l3 --sparsities 0.3,0.5,0.7 --patterns 2:4
    python -m benchmarks.prune_weights --render                  # rewrite prune_weights.md from the JSON
    python -m benchmarks.prune_weights --models ddddocr_det --train-feeds 384 --add \
        --pipelines "prune-weights{sparsity=0.5 score=obs samples=32},distill{samples=32};
                     prune-weights{sparsity=0.5 score=obs samples=32},distill{mode=refit+train samples=32 ...}"

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

Recovery by training (``--pipelines``, ``--train-feeds N``, ``--add``): explicit pipelines instead of the grid;
the run builds N calibration inputs (every benchmark input set is generated), of which ``prune-weights{samples=K}``
and ``distill{samples=K}`` read the first K and the training ``distill{mode=train train_samples=N}`` all N; ``--add``
puts the rows beside the model's existing ones (each row keeps its own run's FP32 latency, load average and
calibration count). ``--flips``: for nudenet, which classes / boxes a kept candidate loses against FP32 (``--keep``).

Goals checked (``goal``): unstructured 50% with obs keeps the task metric >= 0.99 (MiniLM: embedding cosine),
2:4 >= 0.98; obs beats magnitude at every (model, sparsity/pattern, distill) cell; nudenet 70% obs + distill +
quantize: zipped <= 0.12x FP32 at box F1 >= 0.97 (``SIZE_GOAL``).

Writes ``benchmarks/results/prune_weights.json`` (harness records + table rows) and ``prune_weights.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import anchors
from benchmarks.measure import run_passes_in_place
from benchmarks.run import RESULTS, RunConfig, _json_default, benchmark_model, load_specs, versions
from benchmarks.variant_rows import chosen_models, variant_rows

log = logging.getLogger("benchmarks.prune_weights")

MODELS = ["minilm_l3", "minilm_l6", "ppocrv4_rec", "nudenet_320n", "ddddocr_det"]
TRANSFORMERS = {"minilm_l3", "minilm_l6"}
#: calibration inputs per model: MiniLM feeds are sentences (~27 tokens), the CNN feeds are whole images
#: (128: the Gram accumulation costs one d x d product per feed and key, ~0.4 s per sentence on MiniLM-L3 here)
N_CALIB = {"minilm_l3": 128, "minilm_l6": 128}
GOAL = {"unstructured_0.5": 0.99, "2:4": 0.98}
#: 70% obs + distill + int8 on nudenet: zipped bytes vs FP32's zipped bytes, and the box F1 kept
SIZE_GOAL = {"model": "nudenet_320n", "zip": 0.12, "metric": 0.97}

_SPARSITY = re.compile(r"sparsity=([0-9.]+)")
_PATTERN = re.compile(r"pattern=(\d+:\d+)")
_SCORE = re.compile(r"score=(\w+)")
_ALLOCATION = re.compile(r"allocation=(\w+)")
_DISTILL = re.compile(r"distill(?:\{([^}]*)\})?")


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
            "recovery": recovery(pipeline), "quantize": "quantize" in pipeline, "prune_options": prune_options(pipeline),
            "storage": "auto" if "storage=auto" in pipeline else "dense",
            "allocation": alloc[0] if alloc else ("uniform" if pat else "auto")}


def prune_options(pipeline: str) -> str:
    """prune-weights options beyond the cell, score, allocation and calibration count ('' for none)."""
    m = re.search(r"prune-weights\{([^}]*)\}", pipeline)
    skip = ("sparsity=", "pattern=", "score=", "allocation=", "samples=")
    return " ".join(o for o in (m.group(1).split() if m else []) if not o.startswith(skip))


def recovery(pipeline: str) -> str:
    """What follows the pruning: 'no', or each distill as its mode with its options ('refit', 'refit (samples=32)',
    'refit+train (samples=32 train_samples=384 max_minutes=5)'), joined by ' + '."""
    out = []
    for opts in _DISTILL.findall(pipeline):
        items = (opts or "").split()
        mode = next((o.split("=", 1)[1] for o in items if o.startswith("mode=")), "refit")
        rest = " ".join(o for o in items if not o.startswith("mode="))
        out.append(f"{mode} ({rest})" if rest else mode)
    return " + ".join(out) if out else "no"


def rows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    return variant_rows(record, describe, lambda m, row: {
        "coo_ratio": m.get("coo_ratio"), "load": m.get("load_average"), "n_calib": m.get("n_calib"),
        "train": (m.get("info") or {}).get("distill_train"), "flips": m.get("flips")})


def goal(row: dict[str, Any]) -> bool | None:
    if row.get("score") != "obs" or row.get("metric") is None or row.get("storage") != "dense" or row.get(
            "quantize"):
        return None
    bar = GOAL["2:4"] if row["cell"] == "2:4" else GOAL["unstructured_0.5"] if row["cell"] == "0.5" else None
    return None if bar is None else row["metric"] >= bar


def size_goal(row: dict[str, Any]) -> bool | None:
    """``SIZE_GOAL`` for a nudenet 70% row with distill and quantize (None elsewhere)."""
    if (row.get("model") != SIZE_GOAL["model"] or row.get("cell") != "0.7" or not row.get("quantize")
            or not row.get("distill") or row.get("metric") is None or row.get("zip_ratio") is None):
        return None
    return row["zip_ratio"] <= SIZE_GOAL["zip"] and row["metric"] >= SIZE_GOAL["metric"]


def obs_beats_magnitude(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, cell, distill): obs's metric against magnitude's (None where one is missing)."""
    by = {(r["model"], r["cell"], r["distill"], r["score"]): r for r in rows
          if r.get("storage") == "dense" and r.get("allocation", "uniform") == "uniform" and not r.get("error")
          and r.get("recovery", "refit" if r["distill"] else "no") in ("no", "refit") and not r.get("quantize")}
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
    lines += ["## Goals", "", "obs at 50% unstructured: metric >= 0.99; obs at 2:4: >= 0.98. Rows marked *one "
              "process* are the stages of `--chain` runs (section at the end).", "",
              "| model | cell | recovery | metric | goal |", "|---|---|---|---|---|"]
    for r in rows:
        g = goal(r)
        if g is not None:
            alloc = "" if r.get("allocation", "uniform") == "uniform" else f" ({r['allocation']})"
            lines.append(f"| {r['model']} | {r['cell']}{alloc} | {_recovery(r)} | "
                         f"{r['metric_name']} {_f(r['metric'])} | {'met' if g else 'not met'} |")
    chained = [{**describe(r["pipeline"]), **r} for r in meta.get("chain_rows", [])]
    for r in chained:
        g = goal(r)
        if g is not None:
            opts = f" {r['prune_options']}" if r.get("prune_options") else ""
            lines.append(f"| {r['model']} | {r['cell']} ({r['allocation']}{opts}; one process, `{r['stage']}`) | "
                         f"{_recovery(r)} | {r['metric_name']} {_f(r['metric'])} | {'met' if g else 'not met'} |")
    lines += ["", f"nudenet 70% obs + distill + int8: zipped <= {SIZE_GOAL['zip']}x FP32 at box F1 >= "
              f"{SIZE_GOAL['metric']}.", "", "| model | pipeline | metric | zip | goal |", "|---|---|---|---|---|"]
    for r in [*rows, *chained]:
        g = size_goal(r)
        if g is not None:
            lines.append(f"| {r['model']} | `{r['pipeline']}` | {r['metric_name']} {_f(r['metric'])} | "
                         f"{_f(r['zip_ratio'])} | {'met' if g else 'not met'} |")
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
            head = f"| | {r['cell']} | {r['score']}{alloc} | {_recovery(r)}{' + int8' if r.get('quantize') else ''} |"
            if r.get("error"):
                lines.append(f"{head} error: {r['error']} | | | | | | | |")
                continue
            lines.append(f"{head} {r['metric_name']} {_f(r['metric'])} | {_f(r['cosine'], '{:.4f}')} | "
                         f"{_f(r['sqnr_db'], '{:.1f}')} | {_f(r['size_ratio'], '{:.2f}')} | "
                         f"{_f(r['zip_ratio'], '{:.2f}')} | {_f(r['coo_ratio'], '{:.2f}')} | "
                         f"{_f(r['latency_ratio'], '{:.2f}')} | "
                         f"{_f(r['tool_s'], '{:.0f}')} |")
    lines += render_training(rows)
    lines += render_flips(rows)
    lines += render_chain(meta.get("chain_rows", []))
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", f"Versions: {meta.get('versions')}. Total time {meta.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def _recovery(r: dict[str, Any]) -> str:
    return r.get("recovery") or ("refit" if r.get("distill") else "no")


def render_training(rows: list[dict[str, Any]]) -> list[str]:
    """Rows recovered by training (distill mode=train / refit+train) beside the same model's pruned and refit rows
    of the same runs: tool time, peak memory, load average, calibration feeds."""
    trained = {r["model"] for r in rows if "train" in _recovery(r)}
    if not trained:
        return []
    lines = ["", "## Recovery by training (`distill{mode=train}`) beside the closed-form refit", "",
             "Rows of one model with the same *calib* come from one run (same calibration and evaluation feeds; the "
             "run built *calib* inputs, the pruning and the refit read the first `samples=K`, the training draws "
             "from `train_samples=N`). *load*: 1-minute load average at the start / end of the model's run "
             "(2 shared cores). *steps / stop*: the training's optimizer steps, why it stopped, its held-out loss at the start and best.", "",
             "| model | cell | recovery | int8 | metric | cos | zip | tool s | peak MB | calib | load | steps / stop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] not in trained or r.get("n_calib") is None:
            continue
        tr = r.get("train") or {}
        steps = (f"{tr.get('steps', '-')} / {tr.get('stopped_by', '-')}, held-out loss "
                 f"{tr.get('heldout_loss_start', float('nan')):.3g} -> {tr.get('heldout_loss_best', float('nan')):.3g}"
                 if tr else "-")
        load = r.get("load")
        load_s = "-" if load is None else (f"{load[0]:.1f}-{load[1]:.1f}" if isinstance(load, list) else f"{load:.1f}")
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['cell']} | {_recovery(r)} | | error: {r['error']} | | | | | "
                         f"{r.get('n_calib')} | {load_s} | |")
            continue
        lines.append(f"| {r['model']} | {r['cell']} ({r.get('allocation')}) | {_recovery(r)} | "
                     f"{'yes' if r.get('quantize') else 'no'} | {r['metric_name']} {_f(r['metric'])} | "
                     f"{_f(r['cosine'], '{:.4f}')} | {_f(r['zip_ratio'], '{:.3f}')} | {_f(r['tool_s'], '{:.0f}')} | "
                     f"{_f(r.get('tool_peak_mb'), '{:.0f}')} | {r.get('n_calib')} | {load_s} | {steps} |")
    return lines


def render_flips(rows: list[dict[str, Any]]) -> list[str]:
    """``flip_analysis`` of the rows that have one: where a detector's lost boxes come from."""
    have = [r for r in rows if r.get("flips")]
    if not have:
        return []
    lines = ["", "## Why nudenet's box F1 drops at output cosine 0.9999", "",
             "The output [1, 22, 2100] holds 4 box coordinates in pixels (0..320) and 18 class scores in [0, 1] per "
             "anchor: the coordinates carry almost all of its energy, so the whole-output cosine (and the relative "
             "squared error that `allocation=sensitivity` and distill's normalized-MSE loss minimise) barely sees "
             "the class scores, and the boxes appear and vanish through those scores at the 0.25 threshold. "
             "*cos xywh* / *cos scores*: cosine of the coordinate rows / of the score rows (anchors whose best FP32 "
             "class score >= 0.05). *lost* / *gained*: FP32 boxes without a same-class match at IoU 0.5 / "
             "candidate boxes without one; *lost near thr*: lost boxes whose FP32 score was < 0.35; *score shift*: "
             "median (candidate - FP32) best-class score on those anchors.", "",
             "| model | pipeline | boxes FP32 / cand | lost | gained | lost near thr | cos xywh | cos scores | "
             "score shift | lost by class |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in have:
        f = r["flips"]
        by = ", ".join(f"{k} {v}" for k, v in sorted(f["lost_by_class"].items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"| {r['model']} | `{r['pipeline']}` | {f['n_ref']} / {f['n_cand']} | {f['lost']} | "
                     f"{f['gained']} | {f['lost_near_threshold']} | {f['cos_xywh']:.5f} | {f['cos_scores']:.4f} | "
                     f"{f['score_shift_median']:+.3f} | {by} |")
    return lines


def write(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    rows = [r for rec in records for r in rows_of(rec)]
    for r in rows:
        r["goal"] = goal(r)
        r["size_goal"] = size_goal(r)
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


def flip_analysis(fp32: Path, cand: Path, feeds: list[dict]) -> dict[str, Any]:
    """nudenet (YOLOv8 head [1, 4 + K, A]): the boxes a candidate loses / gains against FP32 and where the output
    error sits (coordinate rows vs class-score rows)."""
    import numpy as np

    from benchmarks.measure import run_outputs
    from benchmarks.vision import NUDE_SCORE, yolov8_boxes
    from onnxcompress.task_metrics import box_iou

    _, ref = run_outputs(fp32, feeds, threads=1)
    _, out = run_outputs(cand, feeds, threads=1)
    lost_by: dict[str, int] = {}
    n_ref = n_cand = lost = gained = near = 0
    xy_r, xy_c, sc_r, sc_c, shifts = [], [], [], [], []
    for a, b in zip(ref, out, strict=True):
        ya, yb = np.asarray(a[0], np.float64)[0], np.asarray(b[0], np.float64)[0]
        live = ya[4:].max(0) >= 0.05
        xy_r.append(ya[:4].ravel())
        xy_c.append(yb[:4].ravel())
        sc_r.append(ya[4:, live].ravel())
        sc_c.append(yb[4:, live].ravel())
        k = ya[4:, live].argmax(0)  # each live anchor's best FP32 class: how far the candidate moved its score
        shifts.append(yb[4:, live][k, np.arange(k.size)] - ya[4:, live][k, np.arange(k.size)])
        rb, rs, rc = yolov8_boxes(a[0])
        cb, cs, cc = yolov8_boxes(b[0])
        n_ref, n_cand = n_ref + len(rb), n_cand + len(cb)
        iou = box_iou(rb, cb) if len(rb) and len(cb) else np.zeros((len(rb), len(cb)))
        same = (iou >= 0.5) & (rc[:, None] == cc[None, :])
        miss = ~same.any(1) if len(rb) else np.zeros(0, bool)
        lost += int(miss.sum())
        gained += int((~same.any(0)).sum()) if len(cb) else 0
        near += int((miss & (rs < NUDE_SCORE + 0.1)).sum())
        for c in rc[miss]:
            lost_by[str(int(c))] = lost_by.get(str(int(c)), 0) + 1

    def cos(x: list, y: list) -> float:
        u, v = np.concatenate(x), np.concatenate(y)
        return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-30))

    shift = np.concatenate(shifts) if shifts else np.zeros(0)
    return {"n_ref": n_ref, "n_cand": n_cand, "lost": lost, "gained": gained, "lost_near_threshold": near,
            "lost_by_class": lost_by, "cos_xywh": cos(xy_r, xy_c), "cos_scores": cos(sc_r, sc_c),
            "score_shift_median": float(np.median(shift)) if shift.size else 0.0}


def flip_rows(spec, record: dict[str, Any], n_eval: int) -> None:
    """``flip_analysis`` of every kept nudenet candidate, into its method entry."""
    if record.get("model") != "nudenet_320n":
        return
    from benchmarks.fetch import cache_dir

    feeds = spec.make_inputs(n_eval, "eval")
    fp32 = Path(spec.fetch(cache_dir()))
    for name, m in record.get("methods", {}).items():
        if name.startswith("ours:") and not m.get("error") and m.get("path") and Path(m["path"]).exists():
            try:
                m["flips"] = flip_analysis(fp32, Path(m["path"]), feeds)
            except Exception as exc:  # an analysis figure only
                log.warning("%s: flip analysis failed (%s)", name, exc)


# ----------------------------------------------------------------------------- one process: prune once, then recover
def chain(spec: Any, prune: str, refit: str, trains: list[str], n_calib: int, n_eval: int, train_feeds: int,
          then: str = "", keep: Path | None = None, on_row: Any = None) -> list[dict[str, Any]]:
    """``prune`` once, snapshot; ``refit`` on it, snapshot; each of ``trains`` (distill{mode=train ...}) from the
    refit student, snapshot; ``then`` (e.g. ``quantize``) also applied to a copy of every snapshot. One process, one
    context, the same calibration (``max(n_calib, train_feeds)`` built; the pruning and the refit read their
    ``samples=`` prefix) and evaluation feeds for every stage: the training rows differ from the refit row by the
    training alone. Per stage: task metric and worst-output cosine vs FP32 (``benchmarks.distill_train.score``),
    raw / zipped bytes vs FP32, wall and CPU seconds of the stage, the process's peak RSS so far, load average."""
    import resource

    import onnx

    from benchmarks.distill_train import score
    from benchmarks.fetch import cache_dir
    from benchmarks.measure import model_figures
    from onnxcompress import io
    from onnxcompress.context import PassContext
    from onnxcompress.data import load_feeds
    from onnxcompress.runtime import Session

    path = Path(spec.fetch(cache_dir()))
    fp32 = onnx.load(str(path))
    calib, evals = spec.make_inputs(max(n_calib, train_feeds), "calib"), spec.make_inputs(n_eval, "eval")
    with Session(fp32, threads=2) as sess:
        ref = [sess.run(f) for f in evals]
    base = model_figures(path, evals[0])
    working = onnx.ModelProto()
    working.CopyFrom(fp32)
    io.prepare_for_import(working)
    ctx = PassContext(calibration=load_feeds(calib, fp32), original_bytes=fp32.SerializeToString(),
                      model_template=working)
    graph = io.to_graph(working)
    scratch = keep or Path(tempfile.mkdtemp(prefix="pw-chain-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def apply(pipeline: str, g: Any) -> dict[str, Any]:
        return run_passes_in_place(pipeline, g, ctx)

    def snapshot(stage: str, pipeline: str, model: Any, t0: float, c0: float, stats: dict) -> None:
        out = scratch / f"{spec.name}_{len(rows)}.onnx"
        io.save_model(model, out)
        figs = model_figures(out, evals[0])
        row = {"model": spec.name, "stage": stage, "pipeline": pipeline, "seconds": time.perf_counter() - t0,
               "cpu_seconds": time.process_time() - c0,
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
               "load_average": round(os.getloadavg()[0], 2), "n_calib": n_calib, "calib_built": len(calib),
               "size_ratio": figs["bytes_raw"] / base["bytes_raw"], "zip_ratio": figs["bytes_zip"] / base["bytes_zip"],
               **score(spec, model, evals, ref), "metric_name": spec.primary_metric}
        train = (stats.get("distill") or {}).get("train")
        if train:
            row["train"] = {k: train.get(k) for k in ("steps", "stopped_by", "seconds", "heldout_loss_start",
                                                      "heldout_loss_best", "train_feeds", "losses", "backoffs")}
        pw = stats.get("prune-weights")
        if pw:
            row["sparsity"] = pw.get("sparsity_pruned_tensors")
        if spec.name == "nudenet_320n":
            row["flips"] = flip_analysis(path, out, evals)
        if keep is None:
            out.unlink(missing_ok=True)
        rows.append(row)
        if on_row is not None:  # written after every stage: a run cut short keeps its stages
            on_row(rows)
        log.info("%s %s: %s %.4f (cos %.5f), zip %.3f, %.0f s wall, %.0f s cpu, peak %.0f MB, load %.1f",
                 spec.name, stage, spec.primary_metric, row["metric"], row["cosine"], row["zip_ratio"],
                 row["seconds"], row["cpu_seconds"], row["peak_mb"], row["load_average"])

    def stage(name: str, pipeline: str, g: Any, step: str) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        stats = apply(step, g)
        model = ctx.export(g)
        snapshot(name, pipeline, model, t0, c0, stats)
        if then:
            g2 = io.to_graph(model)
            t0, c0 = time.perf_counter(), time.process_time()
            stats2 = apply(then, g2)
            snapshot(f"{name}+{then}", f"{pipeline},{then}", ctx.export(g2), t0, c0, stats2)
        return model

    stage("pruned", prune, graph, prune)
    refit_model = stage("refit", f"{prune},{refit}", graph, refit) if refit else ctx.export(graph)
    for t in trains:
        g = io.to_graph(refit_model)
        stage("refit+train" if refit else "train", f"{prune},{refit + ',' if refit else ''}{t}", g, t)
    if keep is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def render_chain(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Recovery by training: prune once, then refit, then train (one process per model)", "",
             "`python -m benchmarks.prune_weights --chain ...` (commands in the JSON's `chain_args`): the pruning runs "
             "once, the closed-form refit (`distill{samples=K}`) on its result, and each training "
             "(`distill{mode=train ...}`) from the refit student; every stage scored on the same evaluation inputs "
             "against FP32 (task metric, worst-output cosine), same calibration inputs (the pruning and the refit "
             "read the first K of the *calib* built, the training `train_samples=N`). *s*: the stage's own wall "
             "seconds (CPU seconds in brackets); *peak MB*: the process's RSS high-water mark so far; *load*: "
             "1-minute load average at the end of the stage (2 shared cores). Sizes vs FP32; training changes "
             "values only (zeros stay zero: `masks=true`).", "",
             "| model | stage | pipeline | metric | cos | zip | s (cpu) | peak MB | calib | load | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = r.get("train") or {}
        steps = (f"{tr.get('steps')} steps ({tr.get('stopped_by')}), held-out {tr.get('heldout_loss_start'):.4g} "
                 f"-> {tr.get('heldout_loss_best'):.4g}" if tr.get("heldout_loss_start") is not None else "")
        lines.append(f"| {r['model']} | {r['stage']} | `{r['pipeline']}` | {r['metric_name']} {r['metric']:.3f} | "
                     f"{r['cosine']:.5f} | {r['zip_ratio']:.3f} | {r['seconds']:.0f} ({r['cpu_seconds']:.0f}) | "
                     f"{r['peak_mb']:.0f} | {r.get('calib_built')} | {r['load_average']:.1f} | {steps} |")
    flips = [r for r in rows if r.get("flips")]
    if flips:
        lines += render_flips([{"model": r["model"], "pipeline": r["pipeline"], "flips": r["flips"]}
                               for r in flips])
    return lines


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
    ap.add_argument("--pipelines", help="';'-separated pipelines instead of the grid (e.g. the training rows)")
    ap.add_argument("--train-feeds", type=int, default=None, metavar="N",
                    help="build N calibration inputs (prune-weights{samples=K} / distill{samples=K} read the first "
                         "K; distill{mode=train train_samples=N} all N)")
    ap.add_argument("--add", action="store_true", help="add the rows to the model's record in the existing JSON "
                                                       "(beside its earlier rows) instead of replacing it")
    ap.add_argument("--keep", type=Path, default=None, help="keep the candidate models in this folder")
    ap.add_argument("--flips", action="store_true", help="nudenet: which boxes / classes each candidate loses")
    ap.add_argument("--chain", help="one process: this prune-weights pipeline once, then --refit, then each "
                                    "';'-separated --trains from the refit student (rows into the JSON's chain)")
    ap.add_argument("--refit", default="distill{samples=32}", help="with --chain: the closed-form stage ('' none)")
    ap.add_argument("--trains", default="", help="with --chain: ';'-separated training stages")
    ap.add_argument("--then", default="", help="with --chain: also apply this to a copy of every stage (quantize)")
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
    if args.chain:
        saved = json.loads((out / "prune_weights.json").read_text())
        this = " ".join(argv if argv is not None else sys.argv[1:])
        saved["meta"]["chain_args"] = saved["meta"].get("chain_args", []) + [this]
        before = list(saved["meta"].get("chain_rows", []))

        def on_row(new: list[dict[str, Any]]) -> None:
            done = {(x["model"], x["pipeline"]) for x in new}
            saved["meta"]["chain_rows"] = [r for r in before if (r["model"], r["pipeline"]) not in done] + new
            write(out, saved["records"], saved["meta"])

        for name in names:
            chain(specs[name], args.chain, args.refit, [t.strip() for t in args.trains.split(";") if t.strip()],
                  N_CALIB.get(name, args.n_calib), args.n_eval, args.train_feeds or 0, args.then, args.keep, on_row)
            before = list(saved["meta"]["chain_rows"])
        print(f"wrote {out}/prune_weights.md")
        return 0
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    extra = f" {args.options}" if args.options else ""
    if args.pipelines:
        pipelines = [" ".join(x.split()) for x in args.pipelines.split(";") if x.strip()]
    else:
        pipelines = variants([float(s) for s in split(args.sparsities)], split(args.patterns), split(args.scores),
                             split(args.distill_scores), extra,
                             split(args.distill_cells) if args.distill_cells is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads((out / "prune_weights.json").read_text()) if (args.merge or args.add) and (
        out / "prune_weights.json").exists() else {}
    old = saved.get("records", [])
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    for name in names:
        methods = {"fp32": anchors.fp32_method} | {f"ours:{p}": anchors.ours(p) for p in pipelines}
        keep = args.keep or Path(tempfile.mkdtemp(prefix="bench-pw-"))
        n_calib = max(N_CALIB.get(name, args.n_calib), args.train_feeds or 0)
        cfg = RunConfig(methods=list(methods), n_calib=n_calib, n_eval=args.n_eval,
                        threads=(1,), latency_budget_s=args.latency_budget, session_rss=False, keep_models=keep)
        log.info("== %s (%d variants, %d calibration inputs)", name, len(pipelines), n_calib)
        load0 = round(os.getloadavg()[0], 2)
        rec = benchmark_model(specs[name], cfg, methods)
        load = [load0, round(os.getloadavg()[0], 2)]
        for m in rec.get("methods", {}).values():
            m.setdefault("load_average", load)
            m.setdefault("n_calib", n_calib)
        coo_sizes(rec)
        if args.flips:
            flip_rows(specs[name], rec, args.n_eval)
        if args.keep is None:
            shutil.rmtree(keep, ignore_errors=True)
        records.append(rec)
        this = " ".join(argv if argv is not None else sys.argv[1:])
        if args.add:
            merged = combine([old, records])
            meta = saved.get("meta", {}) | {"args": " ; ".join(x for x in (saved.get("meta", {}).get("args"), this)
                                                                if x),
                                            "seconds": saved.get("meta", {}).get("seconds", 0)
                                            + time.perf_counter() - t0}
        else:
            by = {r["model"]: r for r in old} | {r["model"]: r for r in records}
            merged = [by[m] for m in dict.fromkeys([*MODELS, *by]) if m in by]
            meta = {"args": this, "n_calib": args.n_calib,
                    "n_eval": args.n_eval, "versions": versions(), "seconds": time.perf_counter() - t0}
        write(out, merged, meta)
    print(f"wrote {out}/prune_weights.md ({len(records)} models, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
