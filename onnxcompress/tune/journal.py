"""The study journal: one JSON line per finished trial, appended (and flushed) as trials finish, so an interrupted
study loses at most the trials that were running.

Line 1 is the header: the input model's sha256, the target, the space's fingerprint, the seed. ``--resume`` reads
the journal back; a header whose model hash differs is a resume file from another model (``BadInputError``); a
different target or space is allowed (the measurements stay true) and logged. Every trial line holds its pipeline
text, its config, its values, its status, the latency-profile entries it measured (the study's profile is the union
of them, so a resumed study replays them instead of measuring again) and its wall time.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from onnxcompress.errors import BadInputError

log = logging.getLogger(__name__)
VERSION = 1


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Journal:
    def __init__(self, path: Path, header: dict[str, Any], resume: bool):
        self.path = Path(path)
        self.records: list[dict] = []
        if resume:
            self._load(header)
        else:
            if self.path.exists():
                log.info("starting a new study: %s replaced (use --resume to continue it)", self.path)
            self.path.write_text(json.dumps({"journal": VERSION, **header}) + "\n")

    def _load(self, header: dict[str, Any]) -> None:
        if not self.path.is_file():
            raise BadInputError(f"--resume: no study journal at {self.path} (run tune once without --resume)")
        lines = self.path.read_text().splitlines()
        try:
            head = json.loads(lines[0])
            if head.get("journal") != VERSION:
                raise ValueError("not a tune journal")
        except (IndexError, ValueError) as exc:
            raise BadInputError(f"--resume: {self.path} is not a tune journal ({exc})") from None
        if head.get("model_sha256") != header["model_sha256"]:
            raise BadInputError(f"--resume: {self.path} is the study of another model (sha256 "
                                f"{str(head.get('model_sha256'))[:12]}..., this model {header['model_sha256'][:12]}...)")
        for key in ("target", "space"):
            if head.get(key) != header.get(key):
                log.warning("--resume: the %s changed since the journal was started; its trials are reused", key)
        for line in lines[1:]:
            try:
                self.records.append(json.loads(line))
            except ValueError:  # a line cut by the interrupt
                log.warning("--resume: skipped a truncated journal line")
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a line cut by the interrupt: the next record starts a new line
            with open(self.path, "a") as f:
                f.write("\n")

    def append(self, rec: dict) -> None:
        rec = {k: v for k, v in rec.items() if k != "model_bytes"}
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(rec), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def profile(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rec in self.records:
            out.update(rec.get("profile") or {})
        return out

    def final(self) -> list[dict]:
        """The trials that count: one record per trial number (its last attempt), crashed-and-retried ones
        replaced by their retry."""
        last: dict[int, dict] = {}
        for rec in self.records:
            last[rec["number"]] = rec
        return [last[n] for n in sorted(last)]
