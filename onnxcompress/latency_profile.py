"""Latency measurements that pass decisions depend on, recorded so a run can be replayed exactly.

A pass that chooses by measured time (quantize's latency guard, prune-channels' latency model) never reads the
clock directly: it asks ``ctx.latency.measure(key, fn)``. ``key`` names *what* is measured and is a pure function of
the pass's inputs (e.g. ``"quantize/model-ratio/<sha256 of the candidate model>"``); ``fn`` measures it and returns a
JSON value. A key already in the profile returns the recorded value without measuring. The profile of a run is
written into its report (``latency_profile``), and ``--latency-profile FILE`` (that report, or a bare profile)
feeds it back: the same model + options + data + profile give the same output, byte for byte. Tests pass a stub.

With ``replay_only=True`` a key missing from the profile is an error instead of a measurement (a strict replay).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxcompress.errors import BadInputError, PassError

log = logging.getLogger(__name__)


def fingerprint(*parts: bytes | str) -> str:
    """A short stable digest of the bytes/strings that determine a measurement (e.g. a serialised model)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


class LatencyProfile:
    def __init__(self, entries: dict[str, Any] | None = None, *, replay_only: bool = False):
        self.entries: dict[str, Any] = dict(entries or {})
        self.replay_only = replay_only
        self.measured = 0  # measurements taken in this run (0 on a full replay)
        self.replayed = 0

    def measure(self, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.replayed += 1
            return self.entries[key]
        if self.replay_only:
            raise PassError(f"latency profile has no entry {key!r} (replay_only)")
        value = fn()
        json.dumps(value)  # must be recordable
        self.entries[key] = value
        self.measured += 1
        log.debug("latency profile: measured %s", key)
        return value

    def to_dict(self) -> dict[str, Any]:
        return dict(sorted(self.entries.items()))

    @classmethod
    def load(cls, path: str | Path, *, replay_only: bool = False) -> LatencyProfile:
        """From a bare profile JSON (key -> value) or a run report that holds one under ``latency_profile``."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read latency profile {path}: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("latency_profile"), dict):
            data = data["latency_profile"]
        if not isinstance(data, dict):
            raise BadInputError(f"latency profile {path}: expected a JSON object")
        return cls(data, replay_only=replay_only)
