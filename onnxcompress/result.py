"""What a compression run returns: the model, the per-pass ledger, fidelity, latency, notes, and how to save them.

``CompressResult.save(path)`` writes the model and its reports (JSON, Markdown and a self-contained HTML file beside
it, or at ``report``) atomically: every file goes to a temporary name first and is renamed into place only when all
of them were written, so a failure (or an interrupt) leaves no output and no temporary file behind.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcompress.errors import BadInputError
from onnxcompress.validate import FidelityReport


def report_paths(model_path: Path, report: Path | None = None, html: bool = True) -> list[Path]:
    """Where ``save`` writes the reports: JSON at ``report`` (default ``<model>.report.json``), Markdown and HTML
    beside it with the suffix replaced."""
    json_path = Path(report) if report is not None else model_path.with_name(model_path.name + ".report.json")
    return [json_path, json_path.with_suffix(".md"), *([json_path.with_suffix(".html")] if html else [])]


@dataclass
class LedgerRow:
    """One stage of a run: the pass label, whether it changed the graph, its wall time, the model facts after it
    (``model_stats``), the pass's full statistics and options, whether it is exact, and its fidelity (when measured)."""
    stage: str
    modified: bool = False
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    pass_stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    exact: bool | None = None
    fidelity: dict[str, Any] | None = None


@dataclass
class CompressResult:
    """What ``compress()`` / ``PassManager.run`` return; ``to_dict()`` is the JSON report, ``save()`` writes it all."""
    model: onnx.ModelProto
    pipeline: str
    ledger: list[LedgerRow]
    fidelity: FidelityReport | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tolerated_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: median latency (ms) of the original and the compressed model, measured interleaved (None: not measured)
    latency_ms: dict[str, float] | None = None
    #: things the user must know about this run (random feeds, guesses, measurements that were skipped)
    notes: list[str] = field(default_factory=list)
    #: every latency measurement a pass decision used (feed it back with ``latency_profile=`` to replay the run)
    latency_profile: dict[str, Any] = field(default_factory=dict)
    #: run-wide counters, e.g. ``calibration_runs``
    counters: dict[str, int] = field(default_factory=dict)
    #: where the model and the data came from (input path, calibration/validation source and counts, seed)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: write the model with external data (None: only when it is over the protobuf limit). ``compress`` sets it
    #: when the input's weights were memory-mapped from an external data file.
    external_data: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The run report as a JSON-ready dict: provenance, pipeline, ledger, fidelity, latency, notes, counters."""
        out = {
            **self.provenance,
            "pipeline": self.pipeline,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "seconds": self.seconds,
            "ledger": [asdict(r) for r in self.ledger],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "tolerated_problems": self.tolerated_problems,
            "notes": list(self.notes),
            "counters": dict(self.counters),
            "latency_profile": dict(self.latency_profile),
        }
        if self.latency_ms is not None:
            out["latency_ms"] = dict(self.latency_ms)
        return out

    def save(self, path: str | os.PathLike, report: str | os.PathLike | None = None,
             html: bool = True) -> tuple[Path, Path]:
        """Write the model to ``path`` and the reports: JSON at ``report`` (default ``path.report.json``), Markdown
        (``.md``) and, with ``html``, HTML (``.html``) beside it; all or nothing. The folders must exist.
        Returns (model path, JSON report path)."""
        from onnxcompress import io
        from onnxcompress.report import to_json_text, to_markdown

        out = Path(path)
        paths = report_paths(out, Path(report) if report is not None else None, html)
        report_path = paths[0]
        if len({p.resolve() for p in (out, *paths)}) < 1 + len(paths):
            raise BadInputError(f"the model {out} and its reports {', '.join(map(str, paths))} must be different files")
        data = {**self.to_dict(), "output": str(out)}
        texts = [(paths[0], lambda: to_json_text(data)), (paths[1], lambda: to_markdown(data))]
        if html:
            from onnxcompress.report_html import to_html

            texts.append((paths[2], lambda: to_html(data)))
        for target in (out, *(t for t, _ in texts)):
            folder = target.parent if str(target.parent) else Path(".")
            if not folder.is_dir():
                raise BadInputError(f"output folder {folder} does not exist (create it first)")
            if target.is_dir():
                raise BadInputError(f"output {target} is a folder; give a file name")
        staged: list[tuple[Path, Path]] = []
        placed: list[Path] = []
        try:
            for target, text in texts:
                tmp = target.with_name(f".{target.name}.tmp")
                staged.append((tmp, target))
                tmp.write_text(text(), encoding="utf-8")
            io.save_model(self.model, out, external_data=self.external_data)  # atomic (temp folder + rename)
            placed += [out, out.with_name(out.name + ".data")]
            for tmp, target in staged:
                os.replace(tmp, target)
                placed.append(target)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            for target in placed:  # a half-written set is no output: take back what was placed
                target.unlink(missing_ok=True)
            raise
        return out, report_path
