"""One table row per ``ours:<pipeline>`` method of a harness record, shared by the per-pass benchmarks.

``benchmark_model`` (benchmarks/run.py) returns a record ``{"model", "primary_metric", "fp32", "methods": {name: m}}``;
each pass benchmark (prune, prune_weights, prune_layers, cluster) tabulates the same measured figures of every
``ours:`` method — task metric, worst-output cosine / SQNR, size (raw, zipped), MACs, latency at one thread, tool
time and peak memory — plus the columns its ``describe(pipeline)`` reads off the pipeline text. A method that failed
keeps only its description and its error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

PREFIX = "ours:"


def measured_figures(m: dict[str, Any], primary: str | None) -> dict[str, Any]:
    """The figures every pass table shows, from one harness method entry (None where not measured)."""
    worst = (m.get("fidelity") or {}).get("worst", {})
    tool = m.get("tool") or {}
    return {
        "metric_name": primary,
        "metric": (m.get("metrics") or {}).get(primary),
        "cosine": worst.get("cosine"),
        "sqnr_db": worst.get("sqnr_db"),
        "macs_ratio": m.get("macs_ratio"),
        "size_ratio": m.get("size_ratio"),
        "zip_ratio": m.get("zip_ratio"),
        "latency_ratio": ((m.get("latency") or {}).get("t1") or {}).get("ratio"),
        "tool_s": tool.get("seconds"),
        "tool_peak_mb": tool.get("peak_rss_mb"),
    }


def variant_rows(record: dict[str, Any], describe: Callable[[str], dict[str, Any]],
                 extra: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
                 prefix: str = PREFIX) -> list[dict[str, Any]]:
    """Rows of every ``<prefix><pipeline>`` method (``ours:`` by default): model, pipeline, ``describe(pipeline)``,
    then the error or the measured figures and ``extra(method, row)`` (pass-specific columns)."""
    primary = record.get("primary_metric")
    rows = []
    for name, m in record.get("methods", {}).items():
        if not name.startswith(prefix):
            continue
        pipeline = name[len(prefix):]
        row: dict[str, Any] = {"model": record["model"], "pipeline": pipeline, **describe(pipeline)}
        if m.get("error"):
            rows.append(row | {"error": m["error"]})
            continue
        row.update(measured_figures(m, primary))
        if extra is not None:
            row.update(extra(m, row))
        rows.append(row)
    return rows


def chosen_models(arg: str | None, default: list[str], known: dict[str, Any]) -> list[str] | None:
    """The ``--models`` list (comma-separated; ``default`` when empty), or None after printing the unknown names."""
    names = [n for n in (arg or "").split(",") if n] or list(default)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return None
    return names
