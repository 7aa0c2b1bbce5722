"""Structured pruning to a fidelity floor: ``prune-channels{min_fidelity=X}`` on real models, with and without
``distill``.

    python -m benchmarks.prune_fidelity                                  # ppocr_cls, ppocrv4_rec; floors below
    python -m benchmarks.prune_fidelity --models ppocrv4_rec --floors 0.99 --merge
    python -m benchmarks.prune_fidelity --render                         # rewrite prune_fidelity.md from .json

Per model, ONE harness call (``benchmarks.run.benchmark_model``): FP32 and, per floor X in ``FLOORS``,
``cleanup,prune-channels{min_fidelity=X}`` and the same followed by ``distill``. The candidate is built in this
process (a method the harness does not know by name runs in-process: its info keeps the pass's stats — the floor,
the fidelity reached on the held-out calibration feeds, the trials cut -> fidelity, what stopped the cut), then
measured on the model's evaluation inputs (disjoint from calibration) against FP32 with the task metric
(``ModelSpec.evaluate``) and the worst output's cosine, and timed at 1 intra-op thread interleaved with FP32 and
the other variants in one latency call (the ``fp32`` row is that call's noise band). The 1-minute load average is
recorded with each call.

Writes ``benchmarks/results/prune_fidelity.json`` (records + rows) and ``prune_fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import anchors
from benchmarks.prune import noise_band
from benchmarks.run import RESULTS, RunConfig, _json_default, benchmark_model, load_specs, versions
from benchmarks.variant_rows import chosen_models, variant_rows

log = logging.getLogger("benchmarks.prune_fidelity")

MODELS = ["ppocr_cls", "ppocrv4_rec"]
FLOORS = (0.99, 0.97, 0.95)
PREFIX = "floor:"
#: the pass's stats copied into a variant's info
STAT_KEYS = ("min_fidelity", "fidelity_confidence", "fidelity", "macs_ratio_estimate", "stopped_by", "fidelity_feeds", "fidelity_trials",
             "skipped", "units_removed", "allocation")
_FLOOR = re.compile(r"min_fidelity=([0-9.]+)")
_CONF = re.compile(r"fidelity_confidence=([0-9.]+)")


def variants(floors: tuple[float, ...], options: str = "") -> list[str]:
    out = []
    for f in floors:
        cut = f"cleanup,prune-channels{{min_fidelity={f:g}{(' ' + options.strip()) if options.strip() else ''}}}"
        out += [cut, f"{cut},distill"]
    return out


def floor_method(pipeline: str) -> anchors.Method:
    """The pipeline run in this process; its prune-channels stats go into the result's info."""

    def run(fp32: Path, calib: list, out: Path) -> anchors.MethodResult:
        from onnxcompress import io
        from onnxcompress.api import compress

        res = compress(fp32, pipeline, calibration=calib, validate=False, measure=False)
        io.save_model(res.model, out)
        st = next((r.pass_stats or {} for r in res.ledger if r.stage.startswith("prune-channels")), {})
        secs = {r.stage: round(r.seconds, 2) for r in res.ledger if hasattr(r, "seconds")}
        return anchors.MethodResult(f"{PREFIX}{pipeline}", str(out),
                                    info={"prune": {k: st[k] for k in STAT_KEYS if k in st}, "stage_seconds": secs})

    return run


def rows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    def describe(pipeline: str) -> dict[str, Any]:
        fl, conf = _FLOOR.search(pipeline), _CONF.search(pipeline)
        return {"floor": float(fl.group(1)) if fl else None, "distill": pipeline.endswith("distill"),
                "confidence": float(conf.group(1)) if conf else None, "fp32_noise": noise_band(record),
                "load": record.get("load")}

    def extra(m: dict[str, Any], _row: dict[str, Any]) -> dict[str, Any]:
        info = m.get("info") or {}
        return {"prune": info.get("prune") or {}, "stage_seconds": info.get("stage_seconds")}

    return variant_rows(record, describe, extra, prefix=PREFIX)


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "" if v is None else fmt.format(v)


def render(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Structured pruning to a fidelity floor (`prune-channels{min_fidelity=X}`)", "",
             f"`python -m benchmarks.prune_fidelity {meta.get('args', '')}`".replace(" `", "`")]
    for extra in meta.get("extra", []):
        lines.append(f"plus `python -m benchmarks.prune_fidelity {extra}`")
    calib = {r["model"]: r.get("n_calib") for r in records}
    lines += ["", f"Calibration inputs per model: {calib}; evaluation inputs: {meta.get('n_eval')} (disjoint). "
              "*fidelity (held-out calib)*: the pass's own measurement — the worst output's cosine of the cut model "
              "against FP32 on calibration feeds the scores did not read, before distill; *cos (eval)*: the same "
              "measure by the harness on the evaluation inputs. *MACs*: measured on the written model. Latency: 1 "
              "intra-op thread, FP32 and every variant of the model interleaved in one call (medians); *FP32 vs "
              "FP32* is that call's noise band; *load*: 1-minute load average during the call. *tool s*: the whole "
              "pipeline (cleanup, the search, distill).", "",
              "| model | floor | distill | fidelity (held-out calib) | stopped by | MACs | latency | metric | "
              "cos (eval) | trials | tool s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        if rec.get("error"):
            lines.append(f"| **{rec['model']}** | error: {rec['error']} | | | | | | | | | |")
            continue
        load = f" (load {rec['load']:.1f})" if rec.get("load") is not None else ""
        lines.append(f"| **{rec['model']}** | FP32 vs FP32{load} | | | | 1.00 | {_f(noise_band(rec), '{:.2f}')} | | | "
                     "| |")
        for r in rows_of(rec):
            if r.get("error"):
                lines.append(f"| | {r['floor']} | {'yes' if r['distill'] else 'no'} | error: {r['error'][:200]} "
                             "| | | | | | | |")
                continue
            p = r["prune"]
            stop = p.get("stopped_by", "")
            if p.get("skipped"):
                stop = "unchanged: " + p["skipped"]
            lines.append(
                f"| | {r['floor']}{_f(r.get('confidence'), ' (lower bound {:g})')} | {'yes' if r['distill'] else 'no'} | "
                f"{_f(p.get('fidelity'), '{:.4f}')} | "
                f"{stop} | {_f(r.get('macs_ratio'), '{:.3f}')} | {_f(r.get('latency_ratio'), '{:.2f}')} | "
                f"{r.get('metric_name')} {_f(r.get('metric'))} | {_f(r.get('cosine'), '{:.4f}')} | "
                f"{len(p.get('fidelity_trials') or [])} | {_f(r.get('tool_s'), '{:.0f}')} |")
    lines += ["", "## The trials (cut -> fidelity on the held-out calibration feeds)", ""]
    for rec in records:
        for r in rows_of(rec):
            p = r.get("prune") or {}
            if r.get("distill") or not p.get("fidelity_trials"):
                continue
            pts = ", ".join(f"{t['macs']:.3f} -> {t['fidelity']:.4f}"
                            + (f" [{t['lower_bound']:.4f}]" if t.get("lower_bound") is not None else "")
                            + ("" if t["holds"] else " x") for t in p["fidelity_trials"])
            conf = f" (lower bound {r['confidence']:g}: in brackets)" if r.get("confidence") else ""
            lines.append(f"- {rec['model']} floor {r['floor']}{conf}: MACs kept -> worst cosine ({pts}); x: below "
                         f"the floor; feeds: {p.get('fidelity_feeds')}")
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", f"Versions: {meta.get('versions')}. Total time {meta.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def write(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    rows = [r for rec in records for r in rows_of(rec)]
    (out / "prune_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows, "records": records}, indent=1,
                                                        default=_json_default))
    (out / "prune_fidelity.md").write_text(render(records, meta))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prune_fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--floors", default=",".join(f"{f:g}" for f in FLOORS))
    ap.add_argument("--options", default="", help="more prune-channels options, e.g. 'fidelity_confidence=0.95'")
    ap.add_argument("--no-distill", action="store_true", help="only the cuts")
    ap.add_argument("--only-distill", action="store_true", help="only the cuts followed by distill")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--latency-budget", type=float, default=4.0, help="seconds of latency timing per model")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", action="store_true", help="keep the existing json's records of other runs")
    ap.add_argument("--render", action="store_true", help="only rewrite prune_fidelity.md from the json")
    args = ap.parse_args(argv)
    out = args.out
    saved = json.loads((out / "prune_fidelity.json").read_text()) if (args.merge or args.render) and (
        out / "prune_fidelity.json").exists() else {}
    if args.render:
        write(out, saved["records"], saved["meta"])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    logging.getLogger("onnxcompress.passes.prune_channels.fidelity_floor").setLevel(logging.INFO)
    specs = load_specs()
    names = chosen_models(args.models, MODELS, specs)
    if names is None:
        return 2
    floors = tuple(float(f) for f in args.floors.split(",") if f)
    pipes = [p for p in variants(floors, args.options) if not (args.no_distill and p.endswith("distill"))
             and not (args.only_distill and not p.endswith("distill"))]
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = list(saved.get("records", [])) if args.merge else []
    meta = {"args": " ".join(argv if argv is not None else sys.argv[1:]), "n_calib": args.n_calib,
            "n_eval": args.n_eval, "versions": versions()}
    if saved.get("meta") and args.merge:
        meta = saved["meta"] | {"extra": saved["meta"].get("extra", []) + [meta["args"]]}
    for name in names:
        methods = {"fp32": anchors.fp32_method, **{f"{PREFIX}{p}": floor_method(p) for p in pipes}}
        cfg = RunConfig(methods=list(methods), n_calib=args.n_calib, n_eval=args.n_eval, threads=(1,),
                        latency_budget_s=args.latency_budget, session_rss=False)
        log.info("== %s: %d variants", name, len(pipes))
        load0 = os.getloadavg()[0]
        rec = benchmark_model(specs[name], cfg, methods)
        rec["load"] = round((load0 + os.getloadavg()[0]) / 2, 2)
        records.append(rec)
        meta["seconds"] = meta.get("seconds", 0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        write(out, records, meta)
    print(f"wrote {out}/prune_fidelity.md ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
