"""Benchmark records -> ``summary.md`` (one table row per model x method) and matplotlib plots.

    python -m benchmarks.report [benchmarks/results]      # rebuild summary.md and plots from the <model>.json files

Columns (every ratio is candidate / FP32 measured in the same run; lower is better for size, latency, memory):

- size, zip: serialised model bytes, raw and zlib-compressed
- lat t1, lat t2: median latency ratio at 1 and 2 intra-op threads (interleaved with FP32)
- mem: peak-RSS increase of building + running an ORT session for the candidate, over FP32's
- primary: the model's own task metric of the candidate vs FP32 (``spec.primary_metric``)
- cos / SQNR: worst output's cosine similarity and SQNR (dB) vs FP32 on the eval feeds
- tool: the tool's wall time (s) and peak-RSS increase (MB) while producing the model

Plots: ``plot_size.png`` (primary metric vs size ratio) and ``plot_latency.png`` (primary metric vs latency ratio
at 1 thread), one panel per model, one point per method; methods that failed are absent from the plots and listed
in the table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "–"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return fmt.format(x)


def _lat(row: dict, key: str) -> float | None:
    return (row.get("latency") or {}).get(key, {}).get("ratio")


def primary_value(rec: dict, row: dict) -> float | None:
    metrics = row.get("metrics") or {}
    return metrics.get(rec.get("primary_metric"))


def _short(text: str, limit: int = 180) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _memory_hint(rec: dict, row: dict) -> str:
    """Say so when a tool ran out of memory under the harness's per-tool address-space limit."""
    err = row.get("error") or ""
    limit = (rec.get("config") or {}).get("tool_mem_limit_gb")
    if limit and ("allocate memory" in err or "MemoryError" in err or "bad_alloc" in err):
        return f" (out of memory under the {limit:g} GB per-tool limit)"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(records: list[dict]) -> str:
    head = (
        "| model | method | size | zip | lat t1 | lat t2 | mem | primary | cos / SQNR dB | tool s / MB | "
        "error or notes |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rec in records:
        if rec.get("error"):
            lines.append(f"| {rec['model']} | – | | | | | | | | | **{_cell(rec['error'])}** |")
            continue
        for name, row in rec.get("methods", {}).items():
            tool = row.get("tool") or {}
            tool_txt = (
                "–"
                if not tool
                else f"{_f(tool.get('seconds'), '{:.1f}')} / {_f(tool.get('delta_rss_mb'), '{:.0f}')}"
            )
            worst = (row.get("fidelity") or {}).get("worst", {})
            fid = (
                "–"
                if not worst
                else f"{_f(worst.get('cosine'), '{:.4f}')} / {_f(worst.get('sqnr_db'), '{:.1f}')}"
            )
            if row.get("error"):
                note = f"**{_cell(_short(row['error']))}**{_memory_hint(rec, row)}"
            else:
                note = "; ".join(_cell(n) for n in row.get("notes", []))
                lat_err = row.get("latency_error")
                if lat_err:
                    note += f" latency: {lat_err}"
            prim = primary_value(rec, row)
            lines.append(
                f"| {rec['model']} | {name} | {_f(row.get('size_ratio'))} | {_f(row.get('zip_ratio'))} | "
                f"{_f(_lat(row, 't1'))} | {_f(_lat(row, 't2'))} | {_f(row.get('session_rss_ratio'))} | "
                f"{_f(prim, '{:.3f}')} | {fid} | {tool_txt} | {note} |"
            )
    return "\n".join(lines)


def markdown(records: list[dict], seconds: float | None = None) -> str:
    parts = ["# Benchmark summary", ""]
    if records:
        v = records[0].get("versions", {})
        cfg = records[0].get("config", {})
        parts.append(
            "All ratios are candidate / FP32 in the same run (lower is better for size, latency and memory). "
            f"Calibration inputs: {cfg.get('n_calib')}, evaluation inputs: {cfg.get('n_eval')}, latency budget "
            f"{cfg.get('latency_budget_s')} s per model and thread count. "
            + ", ".join(f"{k} {val}" for k, val in v.items())
            + "."
        )
        if seconds is not None:
            parts.append(f"Run time: {seconds:.0f} s.")
        elif all("seconds" in r for r in records):
            parts.append(f"Run time (sum over models): {sum(r['seconds'] for r in records):.0f} s.")
        floor = _noise_floor(records)
        if floor:
            parts.append(
                "Latency noise floor: the `fp32` row times the FP32 model against a second session of itself; "
                f"its ratios in this run span {floor}. Latency differences inside that band are noise."
            )
        parts.append("")
        parts.append(
            "Primary metric per model: "
            + "; ".join(f"{r['model']}: `{r.get('primary_metric')}`" + _fp32_score(r) for r in records)
            + "."
        )
        parts.append("")
    parts.append(table(records))
    parts += [
        "",
        "Columns: size/zip = serialised bytes raw/zlib; lat t1/t2 = median latency at 1/2 threads; "
        "mem = ORT session peak-RSS increase; primary = task metric vs FP32; cos/SQNR = worst output vs FP32; "
        "tool = wall time and peak-RSS increase of the tool producing the model.",
        "",
        "![metric vs size](plot_size.png)",
        "",
        "![metric vs latency](plot_latency.png)",
        "",
    ]
    return "\n".join(parts)


def _noise_floor(records: list[dict]) -> str:
    spans = []
    for key in ("t1", "t2"):
        vals = [_lat(r["methods"]["fp32"], key) for r in records if "fp32" in r.get("methods", {})]
        vals = [v for v in vals if v is not None]
        if vals:
            spans.append(f"{min(vals):.2f}-{max(vals):.2f} at {key}")
    return " and ".join(spans)


def _fp32_score(rec: dict) -> str:
    fp = (rec.get("methods", {}).get("fp32") or {}).get("metrics") or {}
    own = {k: v for k, v in fp.items() if k.startswith("fp32_")}
    return " (" + ", ".join(f"{k} {_f(v, '{:.3f}')}" for k, v in own.items()) + ")" if own else ""


def plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if not r.get("error") and r.get("methods")]
    if not recs:
        return []
    written = []
    method_names = sorted({m for r in recs for m in r["methods"]})
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(method_names)}
    marks = "os^Dv<>PX*"
    markers = {
        m: marks[i % len(marks)] for i, m in enumerate(method_names)
    }  # overlapping points stay visible
    for fname, xlabel, xget in (
        ("plot_size.png", "size ratio (candidate / FP32)", lambda row: row.get("size_ratio")),
        ("plot_latency.png", "latency ratio at 1 thread (candidate / FP32)", lambda row: _lat(row, "t1")),
    ):
        n = len(recs)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        for ax, rec in zip(axes.flat, recs, strict=False):
            for name, row in rec["methods"].items():
                x, y = xget(row), primary_value(rec, row)
                if row.get("error") or x is None or y is None:
                    continue
                ax.scatter([x], [y], color=colors[name], marker=markers[name], label=name, s=36, alpha=0.75)
            ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
            ax.set_title(rec["model"], fontsize=9)
            ax.set_xlabel(xlabel, fontsize=7)
            ax.set_ylabel(str(rec.get("primary_metric")), fontsize=7)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(useOffset=False, style="plain")
        for ax in list(axes.flat)[len(recs) :]:
            ax.axis("off")
        handles = [
            plt.Line2D([], [], marker=markers[m], ls="", color=colors[m], label=m) for m in method_names
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
        legend_h = (
            0.25 + 0.18 * math.ceil(len(handles) / 4)
        ) / fig.get_figheight()  # inches -> figure fraction
        fig.tight_layout(rect=(0, legend_h, 1, 1))
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(records: list[dict], out: Path, seconds: float | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    try:
        plots(records, out)
    except ImportError:  # matplotlib missing: the table still gets written
        pass
    path = out / "summary.md"
    path.write_text(markdown(records, seconds))
    return path


def load_records(folder: Path) -> list[dict]:
    """The per-model records of ``benchmarks.run`` in ``folder`` (other JSON files there are skipped)."""
    records = []
    for p in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(rec, dict) and "model" in rec and "primary_metric" in rec:
            records.append(rec)
    return records


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    recs = load_records(folder)
    print(write_report(recs, folder))
