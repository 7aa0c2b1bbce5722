"""What a tune run writes beside ``-o OUT.onnx``:

- ``OUT.onnx``: the best trial's model (the bytes that trial produced and validated);
- ``OUT.recipe.toml``: its pipeline, with the target and measured values as comments;
- ``OUT.tune.profile.json``: the study's latency profile (every measurement any trial's passes or the tuner took):
  ``onnxcompress compress IN -o X --recipe OUT.recipe.toml --calib C --latency-profile OUT.tune.profile.json``
  replays them and writes the same model byte for byte;
- ``OUT.tune.md`` / ``OUT.tune.json``: the target, every trial (pipeline text, phase, status, values, seconds),
  the Pareto front (objective vs metric), and ``OUT.tune.png`` (the front over all trials) when matplotlib is
  installed; ``OUT.tune.html``: the same tables with the plot inlined, one self-contained file.

No model or recipe is written when no trial met the target (the reports are, with the closest trial).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from onnxcompress.tune.result import TuneResult

log = logging.getLogger(__name__)
COLUMNS = ("latency", "size", "zip", "macs", "metric", "cosine")


def fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def trial_rows(records: list[dict]) -> list[list[str]]:
    return [[str(r["number"]), r.get("phase", ""), r["status"]] + [fmt(r["values"].get(k)) for k in COLUMNS]
            + [f"{r.get('seconds', 0):.1f}", r["pipeline"]] for r in records]


TRIAL_HEADER = ["#", "phase", "status", *COLUMNS, "s", "pipeline"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_title(result: TuneResult) -> str:
    """What ``metric`` measured in this study, e.g. "CTC string agreement of output 'y' vs FP32"."""
    return f"{result.metric_name} vs FP32" if result.metric_name else "the task metric vs FP32"


def summary_line(result: TuneResult) -> str:
    t = result.target
    if result.best is not None:
        b = result.best
        vals = ", ".join(f"{k} {b['values'][k]:.4g}" for k in COLUMNS if k in b["values"])
        return f"best trial {b['number']} meets {t.text()}: {vals} -- {b['pipeline']}"
    c = result.closest
    if c is None:
        return f"no trial finished; target {t.text()} not reached"
    return (f"target {t.text()} not reached in {len(result.records)} trials; closest: trial {c['number']} "
            f"({c['pipeline']}) missed {t.describe_misses(c['values'])}")


def to_markdown(result: TuneResult, source: str | None) -> str:
    t = result.target
    parts = [f"# onnxcompress tune: {source or 'model'}", "",
             f"Target `{t.text()}`; sampler {result.sampler}; {len(result.records)} trials "
             f"({result.new_trials} run now, {result.retried} retried after a crash/time-out) on {result.workers} "
             f"{result.executor} workers, {result.wall_seconds:.0f} s wall.", "", summary_line(result), "",
             "Values are ratios to FP32 (latency, size = serialized bytes, zip = zipped initializer bytes, MACs) and "
             f"similarities to FP32 (metric = {metric_title(result)}; cosine = the worst output's cosine)."
             " Every row is a real compress + ORT validation trial; `stopped` trials were ended once a bound was "
             "missed (the rest not measured).", "", "## Pareto front", "",
             _table(TRIAL_HEADER, trial_rows(result.pareto)) if result.pareto else "(no finished trial)", "",
             "## Every trial", "", _table(TRIAL_HEADER, trial_rows(result.records)), "",
             "Reproduce any row: `onnxcompress compress IN -o X --passes '<pipeline>' --calib C "
             "--latency-profile OUT.tune.profile.json`."]
    errors = [r for r in result.records if r.get("error")]
    if errors:
        parts += ["", "## Failed trials", ""] + [f"- {r['number']}: {r['error']}" for r in errors]
    return "\n".join(parts) + "\n"


def to_html(result: TuneResult, source: str | None, png: bytes | None) -> str:
    import base64
    import html

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in TRIAL_HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    img = (f'<img alt="Pareto front" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png
           else "<p>(install matplotlib for the plot)</p>")
    return ("<!doctype html><meta charset='utf-8'><title>onnxcompress tune</title><style>body{font-family:sans-serif}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"<h1>onnxcompress tune: {html.escape(source or 'model')}</h1><p>{html.escape(summary_line(result))}</p>"
            f"<p>metric = {html.escape(metric_title(result))}</p>"
            f"<h2>Pareto front ({html.escape(result.target.minimize)} vs metric)</h2>{img}"
            f"{table(trial_rows(result.pareto))}<h2>Every trial</h2>{table(trial_rows(result.records))}")


def _atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)


def recipe_text(result: TuneResult, source: str | None, calibration: Any) -> str:
    b = result.best
    vals = ", ".join(f"{k} {b['values'][k]:.4g}" for k in COLUMNS if k in b["values"])
    calib = f" --calib {calibration}" if isinstance(calibration, (str, Path)) else ""
    return (f"# onnxcompress tune: best pipeline for target {result.target.text()}\n"
            f"# trial {b['number']} ({b.get('phase', '')}): {vals}\n"
            f"# reproduce: onnxcompress compress {source or 'IN.onnx'} -o OUT.onnx --recipe THIS{calib} "
            f"--latency-profile <the .tune.profile.json beside it>\n"
            f"passes = {json.dumps(b['pipeline'])}\n")


def plot(result: TuneResult, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    key = result.target.minimize
    pts = [r for r in result.records if key in r["values"] and "metric" in r["values"]]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["values"][key] for r in pts], [r["values"]["metric"] for r in pts], s=14, c="0.6",
               label="trials")
    front = result.pareto
    ax.plot([r["values"][key] for r in front], [r["values"]["metric"] for r in front], "o-", c="C0",
            label="Pareto front")
    for k, bound in result.target.bounds.items():
        if k == key:
            ax.axvline(bound, ls="--", c="C3", lw=1)
        elif k == "metric":
            ax.axhline(bound, ls="--", c="C3", lw=1)
    ax.set_xlabel(f"{key} (x FP32)")
    ax.set_ylabel(metric_title(result) if len(metric_title(result)) < 60 else "metric (vs FP32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: TuneResult, paths: dict[str, Path], source: str | Path | None,
                  calibration: Any) -> dict[str, str]:
    from onnxcompress import io

    written: dict[str, str] = {}
    src = str(source) if source is not None else None
    if result.best is not None and result.best_model is not None:
        import onnx

        io.save_model(onnx.load_model_from_string(result.best_model), paths["model"])
        _atomic(paths["recipe"], recipe_text(result, src, calibration))
        written["model"], written["recipe"] = str(paths["model"]), str(paths["recipe"])
    _atomic(paths["profile"], json.dumps(dict(sorted(result.profile.items())), indent=1, default=str))
    _atomic(paths["report"], to_markdown(result, src))
    data = {"target": result.target.text(), "metric": metric_title(result), "sampler": result.sampler, "workers": result.workers,
            "executor": result.executor, "wall_seconds": result.wall_seconds, "new_trials": result.new_trials,
            "retried": result.retried, "best": result.best, "closest": result.closest,
            "pareto": [r["number"] for r in result.pareto], "trials": result.records}
    _atomic(paths["json"], json.dumps(data, indent=1, default=str))
    written.update(profile=str(paths["profile"]), report=str(paths["report"]), json=str(paths["json"]),
                   journal=str(paths["journal"]))
    png = None
    if plot(result, paths["plot"]):
        written["plot"] = str(paths["plot"])
        png = paths["plot"].read_bytes()
    html_path = paths["report"].with_suffix(".html")
    _atomic(html_path, to_html(result, src, png))
    written["html"] = str(html_path)
    return written
