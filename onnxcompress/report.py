"""Ledger -> JSON and Markdown.

The Markdown report has one row per stage (the original, then each pass): nodes, parameters, bytes raw and zipped,
MACs, each as a value and as a ratio to the original, plus the pass's wall time and counters; then the final
fidelity per output and the measured latency ratio. The pipeline text at the top reproduces the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def human_bytes(n: float | None) -> str:
    """Bytes as B / KB / MB / GB (powers of 1000), '-' for None."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_count(n: float | None) -> str:
    """A count as k / M / G (powers of 1000), '-' for None."""
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _ratio(v: float | None, base: float | None) -> str:
    if v is None or not base:
        return ""
    return f" ({v / base:.2f}x)"


def fmt_metric(v: Any) -> str:
    """A fidelity metric for a table: 4 decimals, scientific when tiny or huge, 'inf' for infinity."""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def ledger_rows(report: dict, stats_width: int | None = 120) -> list[list[str]]:
    """One row per stage; the pass's scalar stats joined (cut at ``stats_width`` characters for a console, whole
    with None)."""
    ledger = report["ledger"]
    base = ledger[0]["model"] if ledger and ledger[0]["model"] else {}
    rows = []
    for row in ledger:
        m = row["model"] or {}
        stats = _joined([f"{k}={v}" for k, v in row["pass_stats"].items() if not isinstance(v, (dict, list))],
                        stats_width)
        rows.append([
            row["stage"],
            f"{m.get('nodes', '-')}{_ratio(m.get('nodes'), base.get('nodes'))}",
            f"{human_count(m.get('params'))}{_ratio(m.get('params'), base.get('params'))}",
            f"{human_bytes(m.get('bytes_raw'))}{_ratio(m.get('bytes_raw'), base.get('bytes_raw'))}",
            f"{human_bytes(m.get('bytes_zip'))}{_ratio(m.get('bytes_zip'), base.get('bytes_zip'))}",
            f"{human_count(m.get('macs'))}{_ratio(m.get('macs'), base.get('macs'))}",
            f"{row['seconds']:.2f}s" if row["stage"] != "original" else "",
            stats,
        ])
    return rows


#: record fields that name what a pass decided about (first one present wins)
NAME_FIELDS = ("layer", "name", "node", "tensor", "group", "output")


def pass_reasons(report: dict) -> list[tuple[str, str, str, str]]:
    """Every decision a pass explained in its statistics, as (stage, statistic, what, reason) rows.

    By shape, not by pass: a list of records with a ``reason`` field (named by its ``layer``/``name``/... field), or
    a dict of name -> text (e.g. ``layers_kept_float: {conv1: "..."}``). The same (stage, what, reason) is listed once.
    """
    rows: list[tuple[str, str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for row in report.get("ledger", [])[1:]:
        stage = row["stage"]
        found: list[tuple[str, str, str]] = []
        for key, value in (row.get("pass_stats") or {}).items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                for rec in value:
                    if isinstance(rec.get("reason"), str):
                        what = next((str(rec[f]) for f in NAME_FIELDS if f in rec), "?")
                        found.append((key, what, rec["reason"]))
            elif isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
                found += [(key, str(name), text) for name, text in value.items()]
        for key, what, reason in found:
            if (stage, what, reason) not in seen:
                seen.add((stage, what, reason))
                rows.append((stage, key, what, reason))
    return rows


def _joined(items: list[str], width: int | None) -> str:
    """``items`` joined by ", "; with a ``width``, whole items only, then "(+N more)" (never a number cut in two)."""
    if width is None:
        return ", ".join(items)
    out: list[str] = []
    used = 0
    for i, item in enumerate(items):
        if used + len(item) + 2 > width and out:
            return ", ".join(out) + f", ... (+{len(items) - i} more in the reports)"
        out.append(item)
        used += len(item) + 2
    return ", ".join(out)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table from a header and string rows."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def to_markdown(report: dict) -> str:
    """The run report (``CompressResult.to_dict()``) as Markdown: ledger, fidelity per output, latency, notes."""
    lines = [f"# onnxcompress report: {report.get('input', '')}", "", f"pipeline: `{report['pipeline']}`", ""]
    lines.append(markdown_table(["stage", "nodes", "params", "bytes", "bytes zipped", "MACs", "time", "changes"],
                                ledger_rows(report, stats_width=None)))
    fid = report.get("fidelity")
    if fid:
        lines += ["", f"Fidelity vs the original on {fid['feeds']} feeds from {fid['source']}"
                  + (" (RANDOM inputs: says little about real inputs)" if fid.get("synthetic") else "") + ":", ""]
        keys = ["max_abs", "rel_max_abs", "mean_abs", "cosine", "cosine_min", "sqnr_db", "top1_agreement",
                "top5_agreement"]
        rows = [[name] + [fmt_metric(m[k]) if k in m else "-" for k in keys] for name, m in fid["outputs"].items()]
        lines.append(markdown_table(["output"] + keys, rows))
        ref = fid.get("input_noise_reference")
        if ref:
            lines += ["", noise_reference_line(fid, ref)]
        from onnxcompress.validate import constant_outputs_note

        if (note := constant_outputs_note(fid)) is not None:
            lines += ["", f"**Warning**: {note}."]
    reasons = pass_reasons(report)
    if reasons:
        lines += ["", "What the passes decided, with their reasons:", ""]
        lines.append(markdown_table(["stage", "statistic", "what", "reason"],
                                    [[_md(c) for c in r] for r in reasons]))
    lat = report.get("latency_ms")
    if lat:
        lines += ["", f"Latency (ORT CPU, {lat.get('threads', 1)} thread, median of interleaved runs): original "
                  f"{lat['original']:.3f} ms, compressed {lat['compressed']:.3f} ms, ratio "
                  f"{lat['compressed'] / lat['original']:.2f}x"]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def noise_reference_line(fid: dict, ref: dict) -> str:
    """One line setting the compressed model's fidelity beside the original's own under input noise below the
    rounding of its pixels (``onnxcompress.input_noise``)."""
    worst, ours, theirs = fid.get("worst", {}), [], []
    for key, unit in (("sqnr_db", " dB"), ("cosine", "")):
        if key in ref["worst"] and key in worst:
            title = "SQNR" if key == "sqnr_db" else key
            fmt = (lambda v: f"{v:.1f}") if key == "sqnr_db" else fmt_metric
            theirs.append(f"{title} {fmt(ref['worst'][key])}{unit}")
            ours.append(f"{fmt(worst[key])}{unit}")
    task, own = ref.get("task_metric"), fid.get("task_metric")
    if task and own:
        theirs.append(f"{task['title']} {task['value']:.4f}")
        ours.append(f"{own['value']:.4f}")
    return (f"input-noise reference (the original on the same {ref['feeds']} inputs + noise of "
            f"{ref['sigma_levels']:g} pixel level, below their rounding): " + ", ".join(theirs)
            + "; compressed: " + ", ".join(ours))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_json_text(report: dict) -> str:
    """The run report as indented JSON (NumPy values converted, infinities kept as Infinity)."""
    return json.dumps(report, indent=2, default=_json_default, allow_nan=True)


def write_json(report: dict, path: Path) -> None:
    """Write the JSON report atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json_text(report))
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)
