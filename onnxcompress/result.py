"""What a compression run returns: the model, the per-pass ledger, fidelity, latency, notes, and how to save them.

``CompressResult.save(path)`` writes the model and its reports (JSON + Markdown beside it, or at ``report``)
atomically: every file goes to a temporary name first and is renamed into place only when all of them were written,
so a failure leaves no output at all.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcompress.errors import BadInputError
from onnxcompress.validate import FidelityReport


@dataclass
class LedgerRow:
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

    def to_dict(self) -> dict[str, Any]:
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

    def save(self, path: str | os.PathLike, report: str | os.PathLike | None = None) -> tuple[Path, Path]:
        """Write the model to ``path`` and the report to ``report`` (default ``path.report.json``) with a Markdown
        twin beside it; all or nothing. Returns (model path, report path)."""
        from onnxcompress import io
        from onnxcompress.report import to_json_text, to_markdown

        out = Path(path)
        report_path = Path(report) if report is not None else out.with_name(out.name + ".report.json")
        for target in (out, report_path):
            folder = target.parent if str(target.parent) else Path(".")
            if not folder.is_dir():
                raise BadInputError(f"output folder {folder} does not exist (create it first)")
            if target.is_dir():
                raise BadInputError(f"output {target} is a folder; give a file name")
        data = {**self.to_dict(), "output": str(out)}
        md_path = report_path.with_suffix(".md")
        staged: list[tuple[Path, Path]] = []
        try:
            for target, text in ((report_path, to_json_text(data)), (md_path, to_markdown(data))):
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_text(text)
                staged.append((tmp, target))
            io.save_model(self.model, out)  # itself atomic (temp file + rename)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, target in staged:
            os.replace(tmp, target)
        return out, report_path
