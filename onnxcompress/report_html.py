"""Run report dict (``CompressResult.to_dict()``) -> one self-contained HTML file.

The file needs nothing beside itself: CSS is inline, plots are PNGs embedded as ``data:`` URIs, there is no script
and no external link. It holds, in order: the header (input, sha256, pipeline, versions, data sources with sample
counts, seed), the ledger (one row per stage: nodes, parameters, bytes raw and zipped, MACs, each with its ratio to the
original, wall time and worst fidelity), the op counts per stage, the final fidelity per output (every metric the
report carries, plus any per-output label such as the metric kind), latency, notes, the summary plots (size, MACs,
ratios, latency and fidelity per pass), then one section per stage with its options, model facts, fidelity and full
pass statistics.

Statistics are rendered by shape, never by key name, and never cut:
- a scalar is a ``key | value`` row;
- a dict of name -> scalar is a two-column table (and, when every value is a number, a bar chart);
- a dict of name -> dict, or a list of dicts, is a record table whose columns are the union of the records' keys
  (and one bar chart per numeric column);
- a list of scalars is written out in full; anything deeper nests the same rules.

matplotlib (the ``report`` extra) is imported inside ``draw_plots`` only and drawn on an Agg canvas without pyplot,
so no global backend state changes; without it the report is written without plots and says so.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from onnxcompress.report import fmt_metric, human_bytes, human_count, noise_reference_line

log = logging.getLogger(__name__)

#: fidelity metrics in display order; metrics not listed follow in the order the report has them
METRIC_ORDER = ("max_abs", "rel_max_abs", "mean_abs", "cosine", "cosine_min", "sqnr_db", "top1_agreement",
                "top5_agreement", "mismatched_elements")
#: ledger model facts with their own ledger column (everything else goes to the stage's model table)
LEDGER_COLUMNS = (("nodes", "nodes", str), ("params", "params", human_count), ("bytes_raw", "bytes raw", human_bytes),
                  ("bytes_zip", "bytes zipped", human_bytes), ("macs", "MACs", human_count))
#: top-level report keys rendered by a dedicated section (the rest go to "Other report fields")
HANDLED_KEYS = frozenset({"input", "input_sha256", "output", "pipeline", "versions", "seed", "calibration",
                          "validation", "input_shapes", "seconds", "ledger", "fidelity", "latency_ms", "notes",
                          "tolerated_problems", "counters", "latency_profile"})
#: a bar chart with more entries than this draws bars by position without per-bar names (the table has them)
MAX_NAMED_BARS = 60
NO_MATPLOTLIB = ("Plots omitted: matplotlib is not installed "
                 "(<code>pip install 'onnxcompress[report]'</code>).")

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:1.5em;margin-bottom:4px}h2{border-bottom:1px solid #d0d7de;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{border:1px solid #d0d7de;padding:3px 8px;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td table{margin:0}.ratio{color:#57606a;font-size:.85em}.warn{color:#9a3412;font-weight:600}
code{background:#f6f8fa;padding:1px 4px;border-radius:3px;word-break:break-all}
.plot{max-width:100%;border:1px solid #eaeef2;margin:4px 8px 8px 0}.worst td{font-weight:600}
section.stage{border-left:3px solid #d0d7de;padding-left:12px;margin:12px 0}
"""


def to_html(report: dict) -> str:
    """The whole report as one HTML document (str). Plots are included when matplotlib is importable."""
    plots = draw_plots(report)
    ledger = report.get("ledger") or []
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>onnxcompress report: {esc(report.get('input', ''))}</title><style>{CSS}</style></head><body>",
             f"<h1>onnxcompress report: {esc(report.get('input', ''))}</h1>",
             header_html(report),
             "<h2 id=\"ledger-title\">Ledger</h2>", ledger_html(ledger), ops_html(ledger)]
    parts += ["<h2>Fidelity</h2>", fidelity_html(report.get("fidelity"), "fidelity")]
    parts += ["<h2>Latency</h2>", latency_html(report.get("latency_ms"))]
    parts += ["<h2>Notes</h2>", list_html(report.get("notes"), "notes")]
    if report.get("tolerated_problems"):
        parts += ["<h3>Tolerated problems</h3>", list_html(report["tolerated_problems"], "tolerated")]
    parts.append("<h2>Plots</h2>")
    if plots is None:
        parts.append(f"<p class=\"warn\" id=\"plots-missing\">{NO_MATPLOTLIB}</p>")
    else:
        parts += [img_html(title, png) for title, png in plots["summary"]]
    parts.append("<h2>Passes</h2>")
    for i, row in enumerate(ledger):
        parts.append(stage_html(i, row, plots["stages"].get(i, []) if plots else []))
    for key, title in (("counters", "Counters"), ("latency_profile", "Latency profile")):
        parts += [f"<h2>{title}</h2>", render_value(report.get(key) or {})]
    other = {k: v for k, v in report.items() if k not in HANDLED_KEYS}
    if other:
        parts += ["<h2>Other report fields</h2>", render_mapping(other)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: dict, path: str | os.PathLike) -> Path:
    """Write ``to_html(report)`` to ``path`` atomically (a temporary file beside it, then ``os.replace``); the
    folder must exist. Returns the path written."""
    target = Path(path)
    text = to_html(report)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.debug("wrote HTML report %s (%d bytes)", target, len(text))
    return target


# ---------------------------------------------------------------- sections


def header_html(report: dict) -> str:
    rows: list[tuple[str, str]] = [("input", esc(report.get("input", "-"))),
                                   ("input sha256", f"<code>{esc(report.get('input_sha256', '-'))}</code>")]
    if "output" in report:
        rows.append(("output", esc(report["output"])))
    rows.append(("pipeline", f"<code id=\"pipeline\">{esc(report.get('pipeline', ''))}</code>"))
    if "seconds" in report:
        rows.append(("total time", esc(f"{report['seconds']:.2f} s")))
    rows.append(("seed", esc(fmt_scalar(report.get("seed")))))
    for key in ("calibration", "validation"):
        rows.append((key, data_source_html(report.get(key))))
    for key in ("input_shapes", "versions"):
        if key in report:
            rows.append((key.replace("_", " "), render_value(report[key])))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table id=\"header\">{body}</table>"


def data_source_html(source: Any) -> str:
    if not source:
        return "none"
    if not isinstance(source, dict):
        return render_value(source)
    line = esc(fmt_scalar(source.get("source", "-")))
    if "samples" in source:
        line += f" &mdash; {esc(fmt_scalar(source['samples']))} samples"
    if source.get("synthetic"):
        line += " <span class=\"warn\">(synthetic: random inputs)</span>"
    rest = {k: v for k, v in source.items() if k not in ("source", "samples", "synthetic")}
    return line + (render_mapping(rest) if rest else "")


def ledger_html(ledger: list[dict]) -> str:
    base = (ledger[0].get("model") or {}) if ledger else {}
    head = ["#", "stage", "modified", "exact"] + [t for _, t, _ in LEDGER_COLUMNS] + ["time", "worst cosine",
                                                                                      "worst SQNR dB"]
    out = ["<table id=\"ledger\"><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, row in enumerate(ledger):
        model = row.get("model") or {}
        cells = [f"<td class=\"num\">{i}</td>", f"<td><a href=\"#stage-{i}\">{esc(row.get('stage', ''))}</a></td>",
                 f"<td>{esc(fmt_scalar(row.get('modified')))}</td>", f"<td>{esc(fmt_scalar(row.get('exact')))}</td>"]
        for key, _, fmt in LEDGER_COLUMNS:
            value = model.get(key)
            text = "-" if value is None else fmt(value)
            cells.append(f"<td class=\"num\">{esc(text)}{ratio_html(value, base.get(key)) if i else ''}</td>")
        seconds = row.get("seconds")
        cells.append(f"<td class=\"num\">{esc(f'{seconds:.3f} s') if i and seconds is not None else ''}</td>")
        worst = (row.get("fidelity") or {}).get("worst") or {}
        for key in ("cosine", "sqnr_db"):
            cells.append(f"<td class=\"num\">{esc(fmt_scalar(worst[key])) if key in worst else ''}</td>")
        out.append(f"<tr class=\"ledger-row\" data-stage=\"{esc(row.get('stage', ''))}\">{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def ops_html(ledger: list[dict]) -> str:
    ops: list[str] = []
    for row in ledger:
        ops += [op for op in ((row.get("model") or {}).get("ops") or {}) if op not in ops]
    if not ops:
        return ""
    head = "".join(f"<th>{i}: {esc(r.get('stage', ''))}</th>" for i, r in enumerate(ledger))
    body = []
    for op in ops:
        counts = [((r.get("model") or {}).get("ops") or {}).get(op, 0) for r in ledger]
        body.append(f"<tr><th>{esc(op)}</th>" + "".join(f"<td class=\"num\">{c}</td>" for c in counts) + "</tr>")
    return f"<h3>Op counts per stage</h3><table id=\"ops\"><tr><th>op</th>{head}</tr>{''.join(body)}</table>"


def fidelity_html(fid: dict | None, table_id: str) -> str:
    if not fid:
        return "<p>Not measured.</p>"
    outputs: dict[str, dict] = fid.get("outputs") or {}
    text = f"Against the original on {esc(fmt_scalar(fid.get('feeds')))} feeds from {esc(fid.get('source', '-'))}."
    if fid.get("synthetic"):
        text += " <span class=\"warn\">RANDOM inputs: says little about real inputs.</span>"
    # per-output labels kept beside the metrics, e.g. {"metric_kinds": {"logits": "class scores"}}
    labels = {k: v for k, v in fid.items() if k not in ("outputs", "worst") and isinstance(v, dict) and v
              and set(v) <= set(outputs)}
    rest = {k: v for k, v in fid.items() if k not in ("outputs", "worst", "feeds", "source", "synthetic",
                                                      "input_noise_reference", *labels)}
    metrics = ordered_keys([m for m in outputs.values()] + [fid.get("worst") or {}], METRIC_ORDER)
    head = ["output", *labels, *metrics]
    out = [f"<p>{text}</p>", f"<table id=\"{esc(table_id)}\"><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
           + "</tr>"]
    for name, values in outputs.items():
        cells = [f"<td>{esc(name)}</td>"] + [f"<td>{render_value(labels[k].get(name, '-'))}</td>" for k in labels]
        cells += [metric_cell(values, m) for m in metrics]
        out.append(f"<tr class=\"output-row\" data-output=\"{esc(name)}\">{''.join(cells)}</tr>")
    if fid.get("worst") and len(outputs) != 1:
        cells = ["<td>worst over outputs</td>"] + ["<td></td>" for _ in labels]
        out.append(f"<tr class=\"worst\">{''.join(cells + [metric_cell(fid['worst'], m) for m in metrics])}</tr>")
    out.append("</table>")
    if fid.get("input_noise_reference"):
        out.append(f"<p class=\"noise-reference\">{esc(noise_reference_line(fid, fid['input_noise_reference']))}</p>")
    if rest:
        out.append(render_mapping(rest))
    return "".join(out)


def metric_cell(values: dict, key: str) -> str:
    if key not in values:
        return "<td>-</td>"
    value = values[key]
    cls = "num" if is_number(value) else ""
    return f"<td class=\"{cls}\">{render_value(value)}</td>"


def latency_html(lat: dict | None) -> str:
    if not lat:
        return "<p>Not measured.</p>"
    rows = []
    for key in ("original", "compressed"):
        if key in lat:
            rows.append((f"{key} (ms, median)", f"{lat[key]:.4f}"))
    if lat.get("original") and "compressed" in lat:
        rows.append(("ratio compressed / original", f"{lat['compressed'] / lat['original']:.3f}x"))
    body = "".join(f"<tr><th>{esc(k)}</th><td class=\"num\">{esc(v)}</td></tr>" for k, v in rows)
    rest = {k: v for k, v in lat.items() if k not in ("original", "compressed")}
    body += "".join(f"<tr><th>{esc(k)}</th><td>{render_value(v)}</td></tr>" for k, v in rest.items())
    return f"<p>ORT CPU, median of interleaved runs.</p><table id=\"latency\">{body}</table>"


def list_html(items: list | None, list_id: str) -> str:
    if not items:
        return "<p>None.</p>"
    return f"<ul id=\"{esc(list_id)}\">" + "".join(f"<li>{render_value(x)}</li>" for x in items) + "</ul>"


def stage_html(index: int, row: dict, plots: list[tuple[str, str]]) -> str:
    flags = f"modified: {fmt_scalar(row.get('modified'))}, exact: {fmt_scalar(row.get('exact'))}"
    if index:
        flags += f", {row.get('seconds', 0.0):.3f} s"
    out = [f"<section class=\"stage\" id=\"stage-{index}\"><h3>{index}: {esc(row.get('stage', ''))}</h3>",
           f"<p>{esc(flags)}</p>"]
    model = {k: v for k, v in (row.get("model") or {}).items() if k != "ops"}
    out += ["<h4>Model</h4>", render_mapping(model)]
    if row.get("options"):
        out += ["<h4>Options</h4>", render_mapping(row["options"])]
    if row.get("fidelity"):
        out += ["<h4>Fidelity after this pass</h4>", fidelity_html(row["fidelity"], f"fidelity-{index}")]
    out += ["<h4>Pass statistics</h4>", f"<div class=\"stats\" id=\"stats-{index}\">"
            + render_mapping(row.get("pass_stats") or {}) + "</div>"]
    out += [img_html(title, png) for title, png in plots]
    extra = {k: v for k, v in row.items()
             if k not in ("stage", "modified", "seconds", "model", "pass_stats", "options", "exact", "fidelity")}
    if extra:
        out += ["<h4>Other fields</h4>", render_mapping(extra)]
    out.append("</section>")
    return "\n".join(out)


def img_html(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class=\"plot\" alt=\"{esc(title)}\" title=\"{esc(title)}\" src=\"data:image/png;base64,{data}\">"


# ---------------------------------------------------------------- generic rendering (by shape, never truncated)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    """A number a plot can draw (an infinite SQNR of identical outputs is shown in the tables, not drawn)."""
    return is_number(v) and math.isfinite(v)


def is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list, tuple))


def fmt_scalar(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else fmt_metric(v)
    return str(v)


def ratio_html(value: Any, base: Any) -> str:
    if not is_number(value) or not is_number(base) or not base:
        return ""
    return f" <span class=\"ratio\">({value / base:.2f}x)</span>"


def ordered_keys(records: list[dict], first: tuple[str, ...] = ()) -> list[str]:
    """The union of the records' keys: ``first`` (those present) in its order, then the rest as they appear."""
    seen: list[str] = []
    for rec in records:
        seen += [k for k in rec if k not in seen]
    return [k for k in first if k in seen] + [k for k in seen if k not in first]


def as_records(value: Any) -> tuple[str, list[str], list[dict]] | None:
    """(label column, labels, records) for a dict of name -> dict or a non-empty list of dicts; else None."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return "name", [str(k) for k in value], list(value.values())
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        return "#", [str(i) for i in range(len(value))], list(value)
    return None


def render_value(value: Any) -> str:
    if isinstance(value, dict):
        return render_mapping(value)
    if isinstance(value, (list, tuple)):
        return render_sequence(value)
    return esc(fmt_scalar(value))


def render_mapping(mapping: dict) -> str:
    if not mapping:
        return "<p>(none)</p>"
    if as_records(mapping):
        return records_table(mapping)
    rows = []
    for key, value in mapping.items():
        cls = " class=\"num\"" if is_number(value) else ""
        rows.append(f"<tr><th>{esc(key)}</th><td{cls}>{render_value(value)}</td></tr>")
    return f"<table class=\"kv\">{''.join(rows)}</table>"


def render_sequence(seq: list | tuple) -> str:
    if not seq:
        return "(empty)"
    if as_records(seq):
        return records_table(seq)
    if all(is_scalar(v) for v in seq):
        return esc(", ".join(fmt_scalar(v) for v in seq))
    return "<ol start=\"0\">" + "".join(f"<li>{render_value(v)}</li>" for v in seq) + "</ol>"


def records_table(value: dict | list) -> str:
    label, labels, records = as_records(value)  # type: ignore[misc]
    columns = ordered_keys(records)
    head = f"<tr><th>{esc(label)}</th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
    body = []
    for name, rec in zip(labels, records, strict=True):
        cells = "".join(metric_cell(rec, c) for c in columns)
        body.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return f"<table class=\"records\">{head}{''.join(body)}</table>"


# ---------------------------------------------------------------- plots


def draw_plots(report: dict) -> dict[str, Any] | None:
    """PNG plots as {"summary": [(title, png bytes)], "stages": {ledger index: [(title, png bytes)]}}; None when
    matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: the HTML report has no plots (pip install 'onnxcompress[report]')")
        return None

    def figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()

    ledger = report.get("ledger") or []
    labels = [textwrap.fill(f"{i}: {r.get('stage', '')}", 24) for i, r in enumerate(ledger)]
    models = [r.get("model") or {} for r in ledger]
    summary: list[tuple[str, bytes]] = []

    def per_stage(title: str, series: dict[str, list], ylabel: str) -> None:
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        if not series or not ledger:
            return
        fig, (ax,) = figure(max(6.0, 1.3 * len(ledger)), 3.4)
        for name, values in series.items():
            ax.plot(range(len(values)), [math.nan if v is None else v for v in values], marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set(title=title, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        summary.append((title, png(fig)))

    per_stage("Size per pass", {k: [m.get(k) and m[k] / 1e3 for m in models] for k in ("bytes_raw", "bytes_zip")},
              "kB")
    per_stage("MACs per pass", {"MACs": [m.get("macs") for m in models]}, "MACs")
    base = models[0] if models else {}
    per_stage("Ratio to the original per pass",
              {k: [m[k] / base[k] if is_finite(m.get(k)) and base.get(k) else None for m in models]
               for k in ("nodes", "params", "bytes_raw", "bytes_zip", "macs")}, "x original")

    lat = report.get("latency_ms") or {}
    bars = {k: lat[k] for k in ("original", "compressed") if is_finite(lat.get(k))}
    bars.update({lab: r["latency_ms"] for lab, r in zip(labels, ledger, strict=True) if is_finite(r.get("latency_ms"))})
    if bars:
        fig, (ax,) = figure(max(4.0, 1.2 * len(bars)), 3.2)
        ax.bar(range(len(bars)), list(bars.values()), color=["#6e7781", "#2f81f7"] + ["#8250df"] * len(bars))
        ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
        for x, v in enumerate(bars.values()):
            ax.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set(title="Latency (ms, median)", ylabel="ms")
        summary.append(("Latency", png(fig)))

    fid_rows = [(lab, r["fidelity"]) for lab, r in zip(labels, ledger, strict=True) if r.get("fidelity")]
    if not fid_rows and report.get("fidelity"):
        fid_rows = [("final", report["fidelity"])]
    outs = ordered_keys([f.get("outputs") or {} for _, f in fid_rows])
    metrics = [m for m in ordered_keys([o for _, f in fid_rows for o in (f.get("outputs") or {}).values()],
                                       METRIC_ORDER)
               if any(is_finite((f.get("outputs") or {}).get(o, {}).get(m)) for _, f in fid_rows for o in outs)]
    if metrics:
        ncols = min(4, len(metrics))
        nrows = math.ceil(len(metrics) / ncols)
        fig, axes = figure(max(8.0, 3.2 * ncols), 2.8 * nrows, nrows, ncols)
        width = 0.8 / max(1, len(outs))
        for ax, metric in zip(axes, metrics, strict=False):
            for j, out in enumerate(outs):
                ys = [(f.get("outputs") or {}).get(out, {}).get(metric) for _, f in fid_rows]
                ax.bar([x + j * width for x in range(len(fid_rows))],
                       [y if is_finite(y) else math.nan for y in ys], width, label=out)
            ax.set_xticks([x + width * (len(outs) - 1) / 2 for x in range(len(fid_rows))],
                          [lab for lab, _ in fid_rows], fontsize=7)
            ax.set_title(metric, fontsize=9)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        if len(outs) > 1:
            axes[0].legend(fontsize=7)
        summary.append(("Fidelity per pass", png(fig)))

    stages: dict[int, list[tuple[str, bytes]]] = {}
    for i, row in enumerate(ledger):
        for key, value in (row.get("pass_stats") or {}).items():
            title = f"{row.get('stage', '')}: {key}"
            if isinstance(value, dict) and value and all(is_finite(v) for v in value.values()):
                fig, (ax,) = figure(*bar_size(len(value)))
                draw_bars(ax, [str(k) for k in value], list(value.values()), title)
                stages.setdefault(i, []).append((title, png(fig)))
            elif (recs := as_records(value)) is not None:
                _, names, records = recs
                columns = [c for c in ordered_keys(records) if any(is_finite(r.get(c)) for r in records)]
                if not columns:
                    continue
                ncols = min(3, len(columns))
                w, h = bar_size(len(names))
                fig, axes = figure(max(w, 3.6 * ncols), h * math.ceil(len(columns) / ncols),
                                   math.ceil(len(columns) / ncols), ncols)
                for ax, col in zip(axes, columns, strict=False):
                    vals = [r.get(col) if is_finite(r.get(col)) else math.nan for r in records]
                    draw_bars(ax, names, vals, col)
                for ax in axes[len(columns):]:
                    ax.set_visible(False)
                fig.suptitle(title, fontsize=10)
                stages.setdefault(i, []).append((title, png(fig)))
    return {"summary": summary, "stages": stages}


def bar_size(n: int) -> tuple[float, float]:
    """Figure (width, height) in inches for a bar chart of n entries."""
    if n > MAX_NAMED_BARS:
        return 9.0, 3.0
    return 6.0, min(12.0, 0.8 + 0.24 * n)


def draw_bars(ax, names: list[str], values: list[float], title: str) -> None:
    """Horizontal named bars; past MAX_NAMED_BARS entries, vertical bars by position (the table names them)."""
    if len(names) > MAX_NAMED_BARS:
        ax.bar(range(len(values)), values, width=1.0)
        ax.set_xlabel(f"entry (of {len(values)}, in table order)", fontsize=8)
    else:
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(names)), [textwrap.shorten(n, 40, placeholder="...") for n in names], fontsize=7)
        ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
