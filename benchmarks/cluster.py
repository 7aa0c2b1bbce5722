"""Weight clustering and the shipped recipes on real models, against FP32 in the same run.

    python -m benchmarks.cluster                                   # every model below, cluster variants + recipes
    python -m benchmarks.cluster --models ppocrv4_rec --set cluster
    python -m benchmarks.cluster --models minilm_l6 --pipelines "cleanup,cluster{bits=4 refit=true}" --merge
    python -m benchmarks.cluster --render                          # rewrite cluster.md from cluster.json

Every variant is an ``ours:<pipeline>`` method of the benchmark harness (``benchmarks.run.benchmark_model``): the
candidate is produced in its own subprocess, measured on the model's evaluation inputs (disjoint from calibration)
against FP32 with the model's task metric, its size on disk raw and zipped, the RSS an ORT session holds after
load and 3 runs (``benchmarks.measure.session_rss``: the codebook decode is folded at load, so the session holds
float weights whatever the file holds), and timed at 1 intra-op thread interleaved with FP32.

Variant sets (``--set``): ``cluster`` — ``cluster{bits=b}`` for b in ``BITS`` (codebook storage where smaller),
4-bit with ``activation_aware``, with ``refit`` (error-feedback assignment + least squares over the shared values on
calibration data: the codebook-preserving form of ``distill``), with both, with ``max_error`` (more bits for the
tensors whose output error stays above it) and with ``target_error`` in ``TARGETS`` (mixed bit-widths from each
tensor's measured effect on the model's outputs); ``recipes`` — every recipe in ``recipes/`` by name
(``deep-compression`` is ``cluster{bits=1 ... size_ratio=12}``: 1-8 bits per tensor bought for a 12x smaller file).

Goals (``goals``): 4-bit clustering (+refit) keeps >= 0.99 of FP32's metric on every model; ``deep-compression``
makes MiniLM and >= 2 CNNs >= 12x smaller on disk (raw) at >= 0.99 of FP32's metric.

Writes ``benchmarks/results/cluster.json`` (harness records + table rows) and ``cluster.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import anchors
from benchmarks.prune import merge_methods, merge_records, noise_band
from benchmarks.run import RESULTS, RunConfig, _json_default, benchmark_model, load_specs, versions
from benchmarks.variant_rows import chosen_models, variant_rows

log = logging.getLogger("benchmarks.cluster")

MODELS = ["minilm_l3", "minilm_l6", "ppocrv4_rec", "nudenet_320n", "ddddocr_common"]
#: every CNN of the corpus counts for the deep-compression goal (``--models`` runs any of them)
CNNS = {"ppocrv4_rec", "nudenet_320n", "ddddocr_common", "ddddocr_det", "ppocrv4_det", "ppocr_cls", "mtcnn_onet",
        "mtcnn_rnet", "mtcnn_pnet", "efficientnet_lite2", "ddddocr_old"}
BITS = (2, 3, 4, 6, 8)
RECIPES = ("int8", "int8-accurate", "fast", "small", "deep-compression")
N_CALIB = {"minilm_l6": 256, "minilm_l3": 256}
#: target_error values of the mixed-precision variants (4-bit base, more bits / float where measured to matter);
#: the error a task metric tolerates differs per model (MiniLM 0.012, nudenet 1e-5: results/cluster.md)
TARGETS = ("0.012", "0.0003", "0.00003", "0.00001")
GOAL_METRIC = 0.99
GOAL_DEEP_X = 12.0


def cluster_variants() -> list[str]:
    out = [f"cleanup,cluster{{bits={b}}}" for b in BITS]
    out += ["cleanup,cluster{bits=4 activation_aware=true}", "cleanup,cluster{bits=4 refit=true}",
            "cleanup,cluster{bits=4 activation_aware=true refit=true}",
            "cleanup,cluster{bits=4 refit=true max_error=0.003}", "cleanup,cluster{bits=3 refit=true max_error=0.003}"]
    out += [f"cleanup,cluster{{bits=4 activation_aware=true refit=true target_error={t}}}" for t in TARGETS]
    return out


def variants(which: str) -> list[str]:
    return (cluster_variants() if which in ("cluster", "all") else []) + (
        list(RECIPES) if which in ("recipes", "all") else [])


def deep_pipeline() -> str:
    """The deep-compression recipe's pipeline text as shipped (rows run with that text count as the recipe)."""
    import tomllib

    from onnxcompress.recipes import recipe_path

    return str(tomllib.loads(recipe_path("deep-compression").read_text())["passes"])


def rows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    fp32 = record.get("fp32") or {}
    base_rss = (fp32.get("session_rss") or {}).get("delta_mb")

    def extra(m: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        rss = (m.get("session_rss") or {}).get("delta_mb")
        return {"x_raw": 1.0 / m["size_ratio"] if m.get("size_ratio") else None,
                "x_zip": 1.0 / m["zip_ratio"] if m.get("zip_ratio") else None,
                "bytes_raw": (m.get("figures") or {}).get("bytes_raw"),
                "session_mb": rss, "session_ratio": rss / base_rss if rss and base_rss else None}

    return variant_rows(record, lambda pipeline: {}, extra)


def _keep_best(best: dict[str, tuple[float, float, str]], row: dict[str, Any], label: str) -> None:
    """``best[model]`` = (x raw, metric, the row's label) of the highest-metric row at >= GOAL_DEEP_X."""
    if row.get("x_raw", 0) >= GOAL_DEEP_X and (row["model"] not in best or row["metric"] > best[row["model"]][1]):
        best[row["model"]] = (row["x_raw"], row["metric"], label.rstrip(")"))


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals, from the table rows."""
    four: dict[str, float] = {}
    uniform: dict[str, float] = {}
    deep: dict[str, tuple[float, float]] = {}
    more_text: dict[str, tuple[float, float, str]] = {}  # MiniLM: the recipe on more calibration text
    trained: dict[str, tuple[float, float, str]] = {}  # MiniLM: the recipe's clustering + distill{mode=train}
    deep_names = {"deep-compression", deep_pipeline()}  # rows run by name or by the recipe's own text
    # the recipe's embedding_vector acts on Gather tables only, matrix_vector on MatMul / Gemm where its codes pay
    # (MTCNN: identical rows measured): a CNN's rows of the text without them are the recipe's
    no_tables = deep_pipeline().replace(" embedding_vector=8", "").replace(" matrix_vector=true", "")
    for r in rows:
        if r.get("error") or r.get("metric") is None:
            continue
        if "bits=4" in r["pipeline"] and "cluster" in r["pipeline"]:
            four[r["model"]] = max(four.get(r["model"], 0.0), r["metric"])
            if "max_error" not in r["pipeline"] and "target_error" not in r["pipeline"]:
                uniform[r["model"]] = max(uniform.get(r["model"], 0.0), r["metric"])
        if (r["pipeline"] in deep_names or r["model"] in CNNS and r["pipeline"] == no_tables) and r.get("x_raw"):
            deep[r["model"]] = (r["x_raw"], r["metric"])
        elif r["model"].startswith("minilm") and r["pipeline"].startswith("deep-compression ("):
            _keep_best(more_text, r, r["pipeline"].split(" (", 1)[1])  # the recipe on more calibration text
        if r["model"].startswith("minilm") and "distill{mode=train" in r["pipeline"]:
            _keep_best(trained, r, r["pipeline"].rsplit(" (", 1)[-1])
    deep_ok = {m: x >= GOAL_DEEP_X and v >= GOAL_METRIC for m, (x, v) in deep.items()}
    return {
        "cluster4_best_metric": four,
        "cluster4_goal": bool(four) and all(v >= GOAL_METRIC for v in four.values()),
        "cluster4_uniform_best_metric": uniform,
        "deep_compression": {m: {"x_raw": x, "metric": v, "ok": deep_ok[m]} for m, (x, v) in deep.items()},
        "deep_more_text": more_text,
        "deep_trained": trained,
        "deep_goal": any(ok for m, ok in deep_ok.items() if m.startswith("minilm"))
        and sum(ok for m, ok in deep_ok.items() if m in CNNS) >= 2,
    }


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(records: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    g = goals(rows)
    lines = [
        "# cluster and recipes on real models (vs FP32, same run)", "",
        f"Run: `python -m benchmarks.cluster {meta.get('args', '')}`"
        + "".join(f"; `{e}`" for e in meta.get("extra", [])) + ".",
        f"Versions: {json.dumps(meta.get('versions', {}))}. Calibration inputs: {meta.get('n_calib')} "
        f"(MiniLM: {N_CALIB} sentences unless the row names more); evaluation inputs: {meta.get('n_eval')} (disjoint).", "",
        "x raw / x zip: FP32 bytes / candidate bytes on disk (raw file, zip -9). session: RSS an ORT session adds "
        "after load + 3 runs, vs FP32's (the codebook decode is constant-folded at load, so the session holds float "
        "weights). latency: 1 thread, interleaved with FP32 (fp32 vs fp32 noise band in brackets). metric: the "
        "model's task metric against FP32's outputs (1.0 = identical).", "",
        *[f"Note: {n}" for n in meta.get("notes", [])], *([""] if meta.get("notes") else []),
        f"Goals: 4-bit cluster (+refit) >= {GOAL_METRIC} of FP32 on every model: "
        f"**{'met' if g['cluster4_goal'] else 'not met'}** (best 4-bit-base row per model, mixed bits allowed: "
        + ", ".join(f"{m} {v:.3f}" for m, v in g["cluster4_best_metric"].items()) + "; every tensor at 4 bits: "
        + ", ".join(f"{m} {v:.3f}" for m, v in g.get("cluster4_uniform_best_metric", {}).items()) + "). "
        f"deep-compression >= {GOAL_DEEP_X:g}x raw at >= {GOAL_METRIC} on MiniLM and >= 2 CNNs: "
        f"**{'met' if g['deep_goal'] else 'not met'}** ("
        + ", ".join(f"{m} {d['x_raw']:.1f}x / {d['metric']:.3f}" for m, d in g["deep_compression"].items()) + ")"
        + "".join(f"; {m} with more calibration text: {x:.1f}x / {v:.3f} ({why})"
                  for m, (x, v, why) in g.get("deep_more_text", {}).items())
        + "".join(f"; {m} clustered as the recipe + distill{{mode=train}}: {x:.2f}x / {v:.3f} ({why})"
                  for m, (x, v, why) in g.get("deep_trained", {}).items()) + ".",
        "",
    ]
    for rec in records:
        model = rec["model"]
        fp32 = rec.get("fp32") or {}
        lines += [f"## {model} ({rec.get('primary_metric')})", ""]
        if rec.get("error"):
            lines += [f"error: {rec['error']}", ""]
            continue
        nb = noise_band(rec)
        lines += [f"FP32: {_f(fp32.get('bytes_raw'), '{:,}')} bytes, session "
                  f"{_f((fp32.get('session_rss') or {}).get('delta_mb'), '{:.0f}')} MB; noise band "
                  f"{_f(nb)}.", "",
                  "| pipeline | x raw | x zip | session | latency | metric | worst cosine | tool s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["model"] != model:
                continue
            if r.get("error"):
                lines.append(f"| `{r['pipeline']}` | error: {r['error'][:90]} | | | | | | |")
                continue
            lines.append(
                f"| `{r['pipeline']}` | {_f(r['x_raw'], '{:.1f}')} | {_f(r['x_zip'], '{:.1f}')} | "
                f"{_f(r['session_ratio'], '{:.2f}')} | {_f(r['latency_ratio'], '{:.2f}')} | {_f(r['metric'])} | "
                f"{_f(r['cosine'], '{:.4f}')} | {_f(r['tool_s'], '{:.0f}')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    rows = [r for rec in records for r in rows_of(rec)]
    (out / "cluster.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals(rows),
                                                  "records": records}, indent=1, default=_json_default))
    (out / "cluster.md").write_text(render(records, rows, meta))


def with_text_pool(spec, extra: int):
    """``spec`` whose calibration feeds (split "calib") end with ``extra`` stdlib sentences (MiniLM only)."""
    if not extra or spec.name not in N_CALIB:
        return spec
    from benchmarks.distill_train import text_calibration_feeds

    def make_inputs(n: int, split: str, base=spec.make_inputs):
        feeds = base(n, split)
        return feeds + text_calibration_feeds(spec, "stdlib", extra, None) if split == "calib" else feeds

    return dataclasses.replace(spec, make_inputs=make_inputs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--set", default="all", choices=("cluster", "recipes", "all"), help="variant set")
    ap.add_argument("--pipelines", help="';'-separated pipelines (or recipe names) instead of --set")
    ap.add_argument("--n-calib", type=int, default=64, help="calibration inputs (MiniLM: N_CALIB)")
    ap.add_argument("--calib-text-extra", type=int, default=0,
                    help="MiniLM: append this many stdlib sentences (benchmarks.text_corpus, the pool's last ones) "
                         "to the calibration feeds: a user's larger unlabeled text, which cluster counts tokens on")
    ap.add_argument("--n-calib-text", type=int, default=0,
                    help="calibration sentences for the MiniLM models instead of N_CALIB (beyond 256 the split's "
                         "other sentences are appended: the first 256 stay the same)")
    ap.add_argument("--n-eval", type=int, default=48, help="evaluation inputs")
    ap.add_argument("--latency-budget", type=float, default=4.0, help="seconds of latency timing per model")
    ap.add_argument("--no-rss", action="store_true", help="skip the ORT session memory measurement")
    ap.add_argument("--tool-timeout", type=float, default=1800.0, help="seconds one pipeline may run (training rows)")
    ap.add_argument("--out", type=Path, default=None, help="folder for cluster.md/json (default results/)")
    ap.add_argument("--keep-models", type=Path, default=None, help="keep the compressed models in this folder")
    ap.add_argument("--merge", action="store_true", help="keep the other rows of an existing cluster.json")
    ap.add_argument("--render", action="store_true", help="only rewrite cluster.md from cluster.json")
    ap.add_argument("--merge-from", nargs="+", type=Path, default=None, metavar="DIR",
                    help="merge the rows of cluster.json files written elsewhere (--out DIR) into --out's, then render")
    args = ap.parse_args(argv)
    out = args.out or RESULTS
    if args.merge_from:
        saved = json.loads((out / "cluster.json").read_text())
        records, meta = saved["records"], saved["meta"]
        for d in args.merge_from:
            other = json.loads((d / "cluster.json").read_text())
            records = merge_methods(records, other["records"])
            meta = meta | {"extra": meta.get("extra", []) + [other["meta"].get("args", str(d))]}
        write(out, records, meta)
        return 0
    if args.render:
        saved = json.loads((out / "cluster.json").read_text())
        write(out, saved["records"], saved["meta"])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    specs = load_specs()
    names = chosen_models(args.models, MODELS, specs)
    if names is None:
        return 2
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads((out / "cluster.json").read_text()) if args.merge and (out / "cluster.json").exists() else {}
    old, old_meta = saved.get("records", []), saved.get("meta")
    pipelines = [p.strip() for p in args.pipelines.split(";") if p.strip()] if args.pipelines else variants(args.set)
    t0 = time.perf_counter()
    records = []
    for name in names:
        methods = {"fp32": anchors.fp32_method} | {f"ours:{p}": anchors.ours(p) for p in pipelines}
        n_calib = args.n_calib_text if name in N_CALIB and args.n_calib_text else N_CALIB.get(name, args.n_calib)
        cfg = RunConfig(methods=list(methods), n_calib=n_calib, n_eval=args.n_eval,
                        threads=(1,), latency_budget_s=args.latency_budget, session_rss=not args.no_rss,
                        tool_timeout_s=args.tool_timeout, keep_models=args.keep_models)
        log.info("== %s (%d variants)", name, len(pipelines))
        records.append(benchmark_model(with_text_pool(specs[name], args.calib_text_extra), cfg, methods))
        meta = {"args": " ".join(argv if argv is not None else sys.argv[1:]), "n_calib": args.n_calib,
                "n_eval": args.n_eval, "versions": versions(), "seconds": time.perf_counter() - t0}
        merged = merge_methods(old, records) if args.merge else merge_records(old, records)
        if args.merge and old_meta:
            meta = old_meta | {"extra": old_meta.get("extra", []) + [meta["args"]]}
        write(out, merged, meta)
    print(f"wrote {out}/cluster.md ({len(records)} models, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
