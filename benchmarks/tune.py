"""``onnxcompress tune`` on real models: what it finds for two budgets, next to the hand-written pipelines.

    nice -n 10 python -m benchmarks.tune --models ppocrv4_rec --no-scaling     # one model, both targets
    python -m benchmarks.tune --scaling                                        # 1 vs 2 workers only (one command)

Per model (calibration and evaluation inputs from its ``ModelSpec``, disjoint; written as folders of .npz feeds):

1. target A ``latency<=0.5,metric>=0.99`` with ``--trials-a`` trials over the model's ``SPACE_A``;
2. target B ``metric>=0.99,minimize=size``: the same study resumed (``--resume``: trials of A that measured what B
   needs are reused, not run again) up to ``trials-a + trials-b`` trials over ``SPACE_B``.

``metric`` is tune's: the model's task metric vs FP32 as ``onnxcompress.validate`` computes it (auto-detected:
CTC string agreement for PP-OCRv4 rec, box F1 @ 0.5 with class-wise NMS for NudeNet, mean per-sample cosine for
MiniLM). For each best pipeline the harness's own task metric (``ModelSpec.evaluate``: agreement, box F1 with
class-agnostic NMS, embedding cosine) is computed as well, the metric of the hand-written rows, which are parsed
from ``results/summary.md`` (``ours_*``), ``results/prune.md`` (distilled pruning) and ``results/cluster.md``.

Scaling (``--scaling``): one small model (``--scaling-model``, default ppocr_cls), the same fixed cheap plan
(``--sampler cheap``, seed 0; the two runs' trial lists are checked equal) with 1 and then 2 local workers (fresh
journals), both replaying the latency profile a first 1-worker run measured (without it, quantize's latency guard
decided differently under the two loads and the combination phase differed). With 2 workers every trial runs its ORT sessions and BLAS on 1 thread; with 1 worker ORT sessions are 1
thread too (tune's trials always are) and BLAS keeps its default pool. Reported: the wall-time ratio, per-trial
wall and CPU seconds, the load average before and after each run, and the time projected on N workers from the
measured 1-worker trial times (greedy list scheduling in submission order; the phase barrier between the
sensitivity and combination phases is ignored).

Writes ``benchmarks/results/tune.md`` and ``tune.json`` (a run of some models merges into the existing JSON).
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import RESULTS, load_specs, versions

log = logging.getLogger("benchmarks.tune")
MODELS = ["ppocrv4_rec", "nudenet_320n", "minilm_l6"]
TARGET_A = "latency<=0.5,metric>=0.99"
TARGET_B = "metric>=0.99,minimize=size"
#: the benchmark's search spaces. Target A (latency): quantize (static / dynamic, mixed-precision floor); cluster
#: is left out of A because it cannot lower latency (0.91-0.94x in the trial runs: the codebook is decoded by a
#: Gather at run time). Target B (size) adds cluster bits. prune-channels + distill trials take 2-9 minutes each on
#: these models on 2 shared cores (results/prune.md tool seconds), too many for a small-budget run; prune-weights
#: stores dense zeros (no raw-size or speed change).
#: per model (the trial budget is small: what the other result files say can pay on this model family first).
#: Cluster with error-feedback refit is cluster.md's best 4-bit row on rec and NudeNet (22-94 s per trial there);
#: on rec, OBS weight pruning (prune_weights.md: 50% keeps agreement 1.000, ~190 s) is the other half of the
#: hand-written ``small`` recipe (6.7x; tune adds ``distill`` after it). int8 on top of a 4-bit codebook lost
#: strings in the earlier runs (agreement 0.875-0.969), so rec's B space leaves quantize out;
#: on MiniLM refit costs 150-250 s per trial and never reached 0.99 there, so B searches plain bits and int8.
SPACES = {
    "ppocrv4_rec": (["quantize{mode=static|dynamic min_cosine=none|0.999}"],
                    ["cluster{bits=4 refit=true max_error=0.003}", "prune-weights{sparsity=0.5 allocation=uniform}"]),
    "nudenet_320n": (["quantize{mode=static min_cosine=none|0.999|0.995}"],
                     ["quantize{mode=static|weight_only min_cosine=none}",
                      "cluster{bits=8|6 refit=true max_error=0.001}"]),
    "minilm_l6": (["quantize{mode=static|dynamic min_cosine=none|0.999}"],
                  ["quantize{mode=static|dynamic|weight_only min_cosine=none}", "cluster{bits=8|6}"]),
}
DEFAULT_SPACES = (["quantize{mode=static|dynamic min_cosine=none|0.999}"],
                  ["quantize{mode=static|dynamic|weight_only min_cosine=none}", "cluster{bits=4|6|8}"])
SPACE_A, SPACE_B = DEFAULT_SPACES


def work_dir() -> Path:
    from benchmarks.fetch import cache_dir

    return cache_dir() / "tune_bench"


def write_feeds(feeds: list[dict], folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


def task_metric(spec, model_path: Path, candidate: Path, feeds: list[dict]) -> float | None:
    """The model's own task metric (``ModelSpec.evaluate``) of ``candidate`` vs FP32 on ``feeds``."""
    from onnxcompress.runtime import Session

    try:
        with Session(str(model_path), threads=2) as ref, Session(str(candidate), threads=2) as cand:
            r = [ref.run(f) for f in feeds]
            c = [cand.run(f) for f in feeds]
        return float(spec.evaluate(feeds, r, c)[spec.primary_metric])
    except Exception as exc:  # noqa: BLE001 - a benchmark row, not a crash
        log.warning("task metric of %s failed: %s", candidate, exc)
        return None


def hand_written(model: str) -> list[dict[str, Any]]:
    """The hand-written pipelines' rows for ``model`` from results/summary.md (ours_* methods) and results/prune.md
    (distilled variants)."""
    rows = []
    summary = (RESULTS / "summary.md").read_text() if (RESULTS / "summary.md").exists() else ""
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 8 and cells[0] == model and cells[1].startswith("ours_"):
            rows.append({"source": "summary.md", "pipeline": cells[1], "size": cells[2], "latency": cells[4],
                         "metric": cells[7], "cosine": cells[8].split("/")[0].strip()})
    prune = (RESULTS / "prune.md").read_text() if (RESULTS / "prune.md").exists() else ""
    current = None
    for line in prune.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9:
            continue
        if cells[0].startswith("**"):
            current = cells[0].strip("*")
            continue
        if current == model and cells[0] == "" and cells[2] == "yes":
            rows.append({"source": "prune.md", "pipeline": f"prune-channels {cells[1]} + distill", "size": cells[5],
                         "latency": cells[4], "metric": cells[6], "cosine": cells[8]})
    current = None
    cluster = (RESULTS / "cluster.md").read_text() if (RESULTS / "cluster.md").exists() else ""
    for line in cluster.splitlines():
        if line.startswith("## "):
            current = line[3:].split(" ")[0]
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current == model and len(cells) >= 7 and cells[0].startswith("`"):
            raw = cell_number(cells[1])
            rows.append({"source": "cluster.md", "pipeline": cells[0].strip("`"),
                         "size": f"{1 / raw:.2f}" if raw else "-", "latency": cells[4], "metric": cells[5],
                         "cosine": cells[6]})
    return rows


def cell_number(text: str) -> float | None:
    """The last number in a table cell ("box_f1 0.981" -> 0.981; "–" -> None)."""
    import re

    found = re.findall(r"-?\d+(?:\.\d+)?", str(text))
    return float(found[-1]) if found else None


def best_hand_written(rows: list[dict], target: str) -> dict[str, Any] | None:
    """The hand-written row that meets ``target`` with the lowest objective (None: none meets it)."""
    from onnxcompress.tune.targets import Target

    t = Target.parse(target)
    ok = []
    for h in rows:
        values = {k: cell_number(h[k]) for k in ("latency", "size", "metric")}
        if t.feasible({k: v for k, v in values.items() if v is not None}):
            ok.append((values[t.minimize], h))
    return min(ok, key=lambda x: x[0])[1] if ok else None


def verdict(row: dict[str, Any], hand: dict[str, Any] | None, objective: str) -> str:
    """tune's best against the best hand-written row meeting the same target (latency: 0.05 counts as noise)."""
    if hand is None:
        return "no hand-written row meets it" + ("; tune does" if row.get("met") else "")
    if not row.get("met"):
        return "worse: tune did not meet it"
    mine, theirs = row["values"].get(objective), cell_number(hand[objective])
    slack = 0.05 if objective == "latency" else 0.005
    if mine < theirs - slack:
        return "beats"
    return "matches" if mine <= theirs + slack else "worse"


def best_row(res, spec, model_path: Path, eval_feeds: list[dict], keep: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"target": res.target.text(), "trials": len(res.records), "new_trials": res.new_trials,
                           "wall_s": res.wall_seconds, "workers": res.workers, "metric_name": res.metric_name}
    if res.best is None:
        c = res.closest or {"values": {}, "pipeline": "-", "number": None}
        out.update(met=False, pipeline=c["pipeline"], values=c["values"], missed=res.target.describe_misses(
            c["values"]))
        return out
    shutil.copy(res.paths["model"], keep)
    out.update(met=True, pipeline=res.best["pipeline"], values=res.best["values"], number=res.best["number"],
               task_metric=task_metric(spec, model_path, keep, eval_feeds))
    return out


def run_model(name: str, args) -> dict[str, Any]:
    from benchmarks.models import fetch
    from onnxcompress.tune.study import tune
    from onnxcompress.tune.targets import Target

    spec = load_specs()[name]
    path = fetch(name)
    wd = work_dir() / name
    wd.mkdir(parents=True, exist_ok=True)
    calib = write_feeds(spec.make_inputs(args.n_calib, "calib"), wd / "calib")
    eval_feeds = spec.make_inputs(args.n_eval, "eval")
    val = write_feeds(eval_feeds, wd / "eval")
    out = wd / "tuned.onnx"
    common = dict(calibration=str(calib), validation=str(val), workers=args.workers, sampler=args.sampler,
                  timeout=args.timeout)
    space_a, space_b = SPACES.get(name, DEFAULT_SPACES)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    res_a = tune(str(path), TARGET_A, out, trials=args.trials_a, search_passes=space_a, **common)
    row_a = best_row(res_a, spec, path, eval_feeds, wd / "best_a.onnx")
    res_b = tune(str(path), TARGET_B, out, trials=args.trials_a + args.trials_b, resume=True,
                 search_passes=space_b, **common)
    row_b = best_row(res_b, spec, path, eval_feeds, wd / "best_b.onnx")
    trials = [{k: r.get(k) for k in ("number", "phase", "status", "pipeline", "values", "seconds", "cpu_seconds",
                                     "error")} for r in res_b.records]
    hand = hand_written(name)
    for row, target in ((row_a, TARGET_A), (row_b, TARGET_B)):
        best = best_hand_written(hand, target)
        row["hand_best"] = best
        row["verdict"] = verdict(row, best, Target.parse(target).minimize)
    return {"model": name, "primary_metric": spec.primary_metric, "A": row_a, "B": row_b, "trials": trials,
            "space_a": space_a, "space_b": space_b, "trials_a": args.trials_a, "trials_b": args.trials_b,
            "wall_s": time.perf_counter() - t0, "hand_written": hand,
            "loadavg": [list(load0), list(os.getloadavg())], "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime())}


def project(durations: list[float], workers: int) -> float:
    """Makespan of the trials (in submission order) greedily placed on ``workers`` workers."""
    heap = [0.0] * workers
    for d in durations:
        heapq.heapreplace(heap, heap[0] + d)
    return max(heap)


def scaling(name: str, args) -> dict[str, Any]:
    from benchmarks.models import fetch
    from onnxcompress.tune.commands import split_items
    from onnxcompress.tune.study import tune

    spec = load_specs()[name]
    path = fetch(name)
    wd = work_dir() / f"{name}_scaling"
    wd.mkdir(parents=True, exist_ok=True)
    calib = write_feeds(spec.make_inputs(args.n_calib, "calib"), wd / "calib")
    val = write_feeds(spec.make_inputs(args.n_eval, "eval"), wd / "eval")
    out: dict[str, Any] = {"model": name, "trials": args.scaling_trials, "space": args.scaling_space,
                           "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())}
    common = dict(calibration=str(calib), validation=str(val), trials=args.scaling_trials, sampler="cheap", seed=0,
                  search_passes=split_items(args.scaling_space))
    # a first 1-worker run measures every latency; both timed runs replay them, so the passes' latency-guarded
    # decisions (quantize keeps int8 only where it measured faster) and the trial list are the same in both
    t0 = time.perf_counter()
    tune(str(path), TARGET_A, wd / "w0.onnx", workers=1, **common)
    out["measure_run_s"] = time.perf_counter() - t0
    profile = wd / "w0.tune.profile.json"
    for workers in (1, 2):
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res = tune(str(path), TARGET_A, wd / f"w{workers}.onnx", workers=workers, latency_profile=str(profile),
                   **common)
        out[f"wall_{workers}"] = time.perf_counter() - t0
        out[f"trial_seconds_{workers}"] = [r["seconds"] for r in res.records]
        out[f"trial_cpu_{workers}"] = [r.get("cpu_seconds") for r in res.records]
        out[f"pipelines_{workers}"] = [r["pipeline"] for r in res.records]
        out[f"phases_{workers}"] = [r.get("phase", "") for r in res.records]
        out[f"loadavg_{workers}"] = [list(load0), list(os.getloadavg())]  # 1/5/15 min, before and after
    out["same_trials"] = sorted(out["pipelines_1"]) == sorted(out["pipelines_2"])
    out["ratio"] = out["wall_1"] / out["wall_2"]
    out["loadavg"] = out["loadavg_2"][1]
    per = out["trial_seconds_1"]
    out["overhead_1"] = out["wall_1"] - sum(per)  # study set-up, fork server, the parent's bookkeeping
    out["projected"] = {n: project(per, n) + out["overhead_1"] for n in (1, 2, 4, 8, 16)}
    out["projected_phased"] = {n: project_phased(per, out["phases_1"], n) + out["overhead_1"]
                               for n in (1, 2, 4, 8, 16)}
    out["plan_bound_2"] = out["wall_1"] / out["projected_phased"][2]
    return out


def project_phased(durations: list[float], phases: list[str], workers: int) -> float:
    """``project`` per phase, phases one after another: a phase starts when the one before has finished (the
    combinations are predicted from every sensitivity trial), as the study runs them."""
    total, start = 0.0, 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            total += project(durations[start:i], workers)
            start = i
    return total


# ------------------------------------------------------------------------------------------------- report
def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _load(pair) -> str:
    return " -> ".join(f"{p[0]:.1f}" for p in pair)


def render(data: dict[str, Any]) -> str:
    lines = ["# `onnxcompress tune` on real models", "",
             "Calibration / evaluation inputs (disjoint) per model as stated in its section; "
             f"{data['workers']} local workers on 2 cores shared with other jobs (the 1-minute load average before "
             "-> after each model's run is given; latency ratios are interleaved 1-thread medians taken while the "
             "other worker ran a trial: noisier than results/summary.md's).", "",
             f"Targets: A `{TARGET_A}` with `--trials-a` trials, then B `{TARGET_B}`: the same study resumed up "
             "to `--trials-a + --trials-b` trials (A's trials reused where they measured what B needs; budgets per "
             "model below). Cleanup is always on. *metric* = tune's metric: the model's task metric vs FP32 as "
             "validation computes it (named per model below); *harness* = the benchmark's own task metric "
             "(`ModelSpec.evaluate`) of the best pipeline on the same inputs, the metric of the hand-written rows. "
             "*vs hand-written*: against the best hand-written row that meets the same target (its numbers come "
             "from its own run: other inputs, other load).", ""]
    for m in data["models"]:
        metric = m["A"].get("metric_name") or m["B"].get("metric_name") or "?"
        budget = f"{m.get('trials_a', '?')} + {m.get('trials_b', '?')} trials"
        lines += [f"## {m['model']}", "", f"metric = {metric}; {budget}; search space A `{', '.join(m['space_a'])}`, B "
                  f"`{', '.join(m['space_b'])}`; {m.get('n_calib', data['n_calib'])} calibration / "
                  f"{m.get('n_eval', data['n_eval'])} evaluation inputs; run {m.get('date', '')}, load "
                  f"{_load(m.get('loadavg', []))}; "
                  f"command `{m.get('command', data.get('command', ''))}`.", "",
                  "| target | best pipeline | met | trials (new) | wall s | latency | size | metric | harness "
                  f"({m['primary_metric']}) | best hand-written meeting it | vs hand-written |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in ("A", "B"):
            r = m[key]
            v = r.get("values", {})
            h = r.get("hand_best")
            hand = (f"{h['pipeline']} ({h['source']}: latency {h['latency']}, size {h['size']}, {h['metric']})"
                    if h else "-")
            lines.append(f"| {r['target']} | `{r['pipeline']}` | {'yes' if r['met'] else 'no: ' + r['missed']} | "
                         f"{r['trials']} ({r['new_trials']}) | {r['wall_s']:.0f} | {_fmt(v.get('latency'), 2)} | "
                         f"{_fmt(v.get('size'), 3)} | {_fmt(v.get('metric'))} | {_fmt(r.get('task_metric'))} | "
                         f"{hand} | {r.get('verdict', '-')} |")
        lines += ["", "<details><summary>hand-written rows (from the other result files)</summary>", "",
                  "| pipeline | source | latency | size | task metric | cosine |", "|---|---|---|---|---|---|"]
        lines += [f"| {h['pipeline']} | {h['source']} | {h['latency']} | {h['size']} | {h['metric']} | "
                  f"{h['cosine']} |" for h in m["hand_written"]]
        lines += ["", "</details>", "", "<details><summary>every trial</summary>", "",
                  "| # | phase | status | latency | size | metric | cosine | wall s | CPU s | pipeline |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t['number']} | {t['phase']} | {t['status']} | {_fmt(t['values'].get('latency'), 2)} | "
                  f"{_fmt(t['values'].get('size'), 3)} | {_fmt(t['values'].get('metric'))} | "
                  f"{_fmt(t['values'].get('cosine'), 4)} | {t['seconds']:.0f} | {_fmt(t.get('cpu_seconds'), 0)} | "
                  f"`{t['pipeline']}`{' ' + t['error'] if t.get('error') else ''} |" for t in m["trials"]]
        lines += ["", "</details>", ""]
    if data.get("notes"):
        lines += ["## What this run shows", ""] + [f"- {n}" for n in data["notes"]] + [""]
    s = data.get("scaling")
    if s:
        lines += ["## 1 vs 2 workers", "",
                  f"`{data.get('scaling_command', '')}` ({s.get('date', '')}): {s['model']}, {s['trials']} trials of "
                  f"`--sampler cheap` (seed 0) over `{s['space']}`, fresh journal each, both replaying the latency "
                  "profile of a first 1-worker run (so latency-guarded pass decisions cannot differ; no trial "
                  "spends time timing), "
                  f"{'the same trials in both runs' if s.get('same_trials') else 'the trial lists DIFFER'}: "
                  f"1 worker {s['wall_1']:.0f} s, 2 workers {s['wall_2']:.0f} s: **{s['ratio']:.2f}x** (goal >= "
                  f"1.8x) on {s.get('cores', 2)} cores. 2 workers: each trial's ORT sessions and BLAS on 1 thread; "
                  "1 worker: ORT sessions 1 thread, BLAS its default pool.", "",
                  f"Load average (1 min) before -> after: 1 worker {_load(s.get('loadavg_1', []))}, 2 workers "
                  f"{_load(s.get('loadavg_2', []))}: a load above 2 on 2 cores means other jobs took CPU from "
                  "the workers, and the ratio is then a lower bound.", "",
                  "| workers | trial wall s | trial CPU s |", "|---|---|---|"]
        for w in (1, 2):
            lines.append(f"| {w} | {', '.join(f'{x:.1f}' for x in s[f'trial_seconds_{w}'])} | "
                         f"{', '.join(_fmt(x, 1) for x in s.get(f'trial_cpu_{w}', []))} |")
        phased = s.get("projected_phased", {})
        lines += ["", "| workers | projected wall s (phases in turn, as the study runs them) | projected wall s (no "
                  "phase barrier) |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(phased.get(n, phased.get(str(n))), 0)} | {t:.0f} |"
                  for n, t in s["projected"].items()]
        lines += ["", "Projection: the 1-worker trial wall times greedily scheduled on N workers in submission order "
                  "(no contention), plus the 1-worker run's fixed overhead (study set-up, fork server): with the "
                  "phases in turn (a phase waits for its longest trial: the combinations are predicted from every "
                  "sensitivity trial), and without that barrier. With fewer trials than workers the longest trial "
                  "is the floor."]
        if s.get("plan_bound_2"):
            lines += ["", f"The plan itself bounds 2 workers at **{s['plan_bound_2']:.2f}x** on these trial times "
                      f"(1-worker wall / phased projection); the measured {s['ratio']:.2f}x is "
                      f"{s['ratio'] / s['plan_bound_2']:.0%} of that bound."]
    lines += ["", f"Versions: {data['versions']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--trials-a", type=int, default=4)
    ap.add_argument("--trials-b", type=int, default=4)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sampler", default="cheap")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--scaling-model", default="ppocr_cls")
    ap.add_argument("--scaling-trials", type=int, default=7)
    #: trials of similar length in ONE phase (static int8 at four mixed-precision floors, after the baseline):
    #: what the executor gives, not the plan's phase barrier (a mixed space with one long trial per phase is
    #: bounded near 1.45x on 2 workers by the barrier alone, see tune.md)
    ap.add_argument("--scaling-space", default="quantize{mode=static min_cosine=none|0.99|0.995|0.999}")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling", "--scaling-only", dest="scaling_only", action="store_true",
                    help="only the 1 vs 2 workers run, merged into tune.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnxcompress.progress").setLevel(logging.WARNING)
    command = "python -m benchmarks.tune " + " ".join(argv if argv is not None else sys.argv[1:])
    json_path = RESULTS / "tune.json"
    data: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    if not data.get("models") or "space_a" not in data["models"][0]:
        data = {"models": []}  # an older layout: start afresh
    data.update({"n_calib": args.n_calib, "n_eval": args.n_eval, "workers": args.workers,
                 "trials_a": args.trials_a, "trials_b": args.trials_b, "versions": versions()})
    if not args.scaling_only:
        for name in [m for m in args.models.split(",") if m]:
            log.info("=== %s", name)
            row = run_model(name, args)
            row["command"] = command
            row["n_calib"], row["n_eval"] = args.n_calib, args.n_eval
            data["models"] = [m for m in data["models"] if m["model"] != name] + [row]
            data["models"].sort(key=lambda m: MODELS.index(m["model"]) if m["model"] in MODELS else 99)
            json_path.write_text(json.dumps(data, indent=1, default=str))  # readable if the run is cut short
            (RESULTS / "tune.md").write_text(render(data))
    if args.scaling_only or not args.no_scaling:
        data["scaling"] = scaling(args.scaling_model, args)
        data["scaling_command"] = command
    json_path.write_text(json.dumps(data, indent=1, default=str))
    (RESULTS / "tune.md").write_text(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
