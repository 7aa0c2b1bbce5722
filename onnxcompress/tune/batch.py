"""``onnxcompress batch manifest.toml``: many models through ``compress`` or ``tune``, one summary.

Manifest (paths relative to the manifest's folder; ``[defaults]`` fills what a model leaves out)::

    [defaults]
    trials = 8
    [[model]]
    name = "rec"                      # output name (default: the file's stem)
    path = "rec.onnx"
    calib = "rec_calib.npz"
    val = "rec_val.npz"               # optional
    target = "latency<=0.5,metric>=0.99"   # -> tune (with trials, sampler, search_passes, seed)
    [[model]]
    path = "det.onnx"
    passes = "cleanup,quantize"       # -> compress (or recipe = "r.toml"); an optional target is then checked

Compress entries run as trials on one executor (the local pool, or Ray with ``--ray``), in parallel; tune entries run
one after another, each with the pool's workers. A model whose run fails is reported with its error and the others
go on. Each model's outputs go to ``OUT_DIR/<name>.onnx`` (+ reports / recipe beside it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from onnxcompress.errors import BadInputError, OnnxCompressError
from onnxcompress.tune.targets import Target

log = logging.getLogger(__name__)
KEYS = {"name", "path", "calib", "val", "target", "passes", "recipe", "trials", "sampler", "search_passes", "seed",
        "max_val"}


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    from onnxcompress.pipeline import read_toml

    p = Path(path)
    data = read_toml(p, "manifest")
    defaults = data.get("defaults", {})
    models = data.get("model")
    if not isinstance(models, list) or not models:
        raise BadInputError(f"manifest {p}: expected [[model]] tables")
    out = []
    for i, m in enumerate(models):
        entry = {**defaults, **m}
        unknown = set(entry) - KEYS
        if unknown:
            raise BadInputError(f"manifest {p}: model {i + 1} has unknown keys {sorted(unknown)}; known: {sorted(KEYS)}")
        if "path" not in entry:
            raise BadInputError(f"manifest {p}: model {i + 1} has no path")
        if not (entry.get("target") or entry.get("passes") or entry.get("recipe")):
            raise BadInputError(f"manifest {p}: model {i + 1} needs target (tune) or passes / recipe (compress)")
        for key in ("path", "calib", "val", "recipe"):
            if entry.get(key):
                entry[key] = str((p.parent / entry[key]).resolve())
        if entry.get("target"):
            Target.parse(entry["target"])  # bad targets are bad input before anything runs
        entry.setdefault("name", Path(entry["path"]).stem)
        entry["mode"] = "compress" if entry.get("passes") or entry.get("recipe") else "tune"
        out.append(entry)
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise BadInputError(f"manifest {p}: model names repeat ({names}); give each a name")
    return out


def _row(e: dict, status: str, values: dict, text: str) -> list[str]:
    cells = [f"{values[k]:.3f}" if k in values else "-" for k in ("latency", "size", "metric")]
    return [e["name"], e["mode"], e.get("target") or "-", status, *cells, text]


def run_manifest(manifest: str | Path, output_dir: str | Path | None = None, *, workers: int | None = None,
                 ray: str | None = None) -> tuple[list[list[str]], bool]:
    """Run every model; returns the summary rows (model, mode, target, status, latency, size, metric, pipeline or
    error) and whether every model met its target (and none failed)."""
    from onnxcompress import io
    from onnxcompress.tune.executor import default_workers, make_executor
    from onnxcompress.tune.study import tune
    from onnxcompress.tune.trial import TrialTask

    entries = read_manifest(manifest)
    out_dir = Path(output_dir) if output_dir else Path(manifest).parent / "batch_out"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {}
    all_ok = True
    compress_entries = [e for e in entries if e["mode"] == "compress"]
    if compress_entries:
        size = max(Path(e["path"]).stat().st_size if Path(e["path"]).is_file() else 0 for e in compress_entries)
        ex = make_executor(ray, workers or default_workers(size), None)
        pending = {}
        try:
            for i, e in enumerate(compress_entries):
                pipeline = e.get("passes") or e["recipe"]
                task = TrialTask(i, pipeline, e["path"], e.get("calib"), e.get("val"),
                                 Target.parse(e.get("target") or "minimize=size"), full=True,
                                 max_validation=e.get("max_val"), seed=e.get("seed", 0))
                while ex.capacity() <= 0:
                    for rec in ex.wait():
                        pending[rec["number"]] = rec
                ex.submit(task)
            while ex.running:
                for rec in ex.wait():
                    pending[rec["number"]] = rec
        finally:
            ex.close()
        for i, e in enumerate(compress_entries):
            rec = pending.get(i, {"status": "failed", "error": "no result", "values": {}})
            if rec["status"] != "ok":
                all_ok = False
                rows[e["name"]] = _row(e, rec["status"], {}, rec.get("error", ""))
                continue
            import onnx

            io.save_model(onnx.load_model_from_string(rec["model_bytes"]), out_dir / f"{e['name']}.onnx")
            met = Target.parse(e["target"]).feasible(rec["values"]) if e.get("target") else True
            all_ok &= met
            rows[e["name"]] = _row(e, "met" if met else "not met", rec["values"], rec["pipeline"])
    for e in entries:
        if e["mode"] != "tune":
            continue
        try:
            res = tune(e["path"], e["target"], out_dir / f"{e['name']}.onnx", calibration=e.get("calib"),
                       validation=e.get("val"), trials=int(e.get("trials", 16)), workers=workers,
                       sampler=e.get("sampler", "auto"), seed=int(e.get("seed", 0)), ray=ray,
                       search_passes=e.get("search_passes"), max_validation=e.get("max_val"))
        except OnnxCompressError as exc:
            all_ok = False
            rows[e["name"]] = _row(e, "error", {}, io.first_line(exc))
            continue
        if res.best is not None:
            rows[e["name"]] = _row(e, f"met ({len(res.records)} trials)", res.best["values"], res.best["pipeline"])
        else:
            all_ok = False
            c = res.closest or {"values": {}, "pipeline": "-"}
            rows[e["name"]] = _row(e, "not met", c["values"],
                                   f"closest {c['pipeline']}: {res.target.describe_misses(c['values'])}")
    return [rows[e["name"]] for e in entries], all_ok
