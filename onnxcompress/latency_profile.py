"""Latency measurements that pass decisions depend on, recorded so a run can be replayed exactly.

A pass that chooses by measured time (quantize's latency guard, prune-channels' latency model) never reads the
clock directly: it asks ``ctx.latency.measure(key, fn)``. ``key`` names *what* is measured and is a pure function of
the pass's inputs (e.g. ``"quantize/model-ratio/<sha256 of the candidate model>"``); ``fn`` measures it and returns a
JSON value. A key already in the profile returns the recorded value without measuring. The profile of a run is
written into its report (``latency_profile``), and ``--latency-profile FILE`` (that report, or a bare profile)
feeds it back: the same model + options + data + profile give the same output, byte for byte. Tests pass a stub.

With ``replay_only=True`` a key missing from the profile is an error instead of a measurement (a strict replay).

**Per-machine cache** (``MachineCache``, opted into by a pass with ``with profile.machine_cache(cache): ...``): a
timing decides a pass's output, and two timings of the same thing differ run to run, so two runs could disagree
byte for byte. Inside the ``with`` block a key missing from the run's profile is looked up in a JSON file kept per
machine — ``<folder>/<machine>.json``, the folder ``$ONNXCOMPRESS_LATENCY_CACHE`` or else
``$ONNXCOMPRESS_CACHE/latency`` (``~/.cache/onnxcompress/latency`` by default), ``<machine>`` a
digest of the CPU model, the core count, the OS and the onnxruntime version — and only measured (then stored there)
when absent. Keys name what is measured (model fingerprints, a Conv's op/shape/attribute signature, thread count),
so the same input, options and seed give the same decisions, hence the same bytes, in every later run on the
machine. Lookup order: the run's profile (``--latency-profile`` replays override everything), then the machine
cache, then a measurement. ``refresh=True`` measures every key again; hysteresis: a fresh value replaces the cached
one only when they differ by more than ``HYSTERESIS`` (absolute; every cached value is a ratio or a difference in
units of one model's latency), so a refresh does not flip decisions on noise. Writes hold an exclusive lock
(``fcntl``) and replace the file atomically; concurrent runs merge their entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
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


#: a refreshed measurement replaces the cached value only when they differ by more than this (absolute, in units of
#: one model's latency: every cached value is a latency ratio or a difference of ratios)
HYSTERESIS = 0.05


def latency_cache_dir() -> Path:
    """``$ONNXCOMPRESS_LATENCY_CACHE``, else ``$ONNXCOMPRESS_CACHE/latency``, else ``~/.cache/onnxcompress/latency``."""
    if os.environ.get("ONNXCOMPRESS_LATENCY_CACHE"):
        return Path(os.environ["ONNXCOMPRESS_LATENCY_CACHE"])
    return Path(os.environ.get("ONNXCOMPRESS_CACHE") or Path.home() / ".cache" / "onnxcompress") / "latency"


def machine_signature() -> dict[str, str]:
    """What a kernel's speed depends on beyond the measured graph: CPU model, core count, OS, onnxruntime."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": str(os.cpu_count()),
            "os": platform.system(), "onnxruntime": onnxruntime.__version__}


class MachineCache:
    """Latency values measured once on this machine and reused by every later run (module docstring)."""

    def __init__(self, path: str | Path, *, refresh: bool = False):
        self.path = Path(path)
        self.refresh = refresh
        self.entries: dict[str, Any] = {} if refresh else self._read()
        self.hits = 0
        self.stored = 0

    @classmethod
    def default(cls, *, refresh: bool = False) -> MachineCache:
        sig = machine_signature()
        return cls(latency_cache_dir() / f"{fingerprint(*(f'{k}={v}' for k, v in sorted(sig.items())))}.json",
                   refresh=refresh)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("entries", {}) if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {}

    def lookup(self, key: str) -> tuple[bool, Any]:
        if key in self.entries:
            self.hits += 1
            return True, self.entries[key]
        return False, None

    def store(self, key: str, value: Any) -> Any:
        """Record ``value`` under ``key`` and return the value decisions must use: the cached one when a refresh
        lands within ``HYSTERESIS`` of it (numbers only)."""
        try:
            with self._locked():
                on_disk = self._read()
                old = on_disk.get(key)
                if (isinstance(old, (int, float)) and isinstance(value, (int, float))
                        and abs(float(value) - float(old)) <= HYSTERESIS):
                    value = old
                on_disk[key] = value
                self._write(on_disk)
        except OSError as exc:  # a read-only home must not fail a run: decisions then hold for this run only
            log.warning("latency cache %s not written (%s)", self.path, exc)
        self.entries[key] = value
        self.stored += 1
        return value

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            try:
                import fcntl
            except ImportError:  # pragma: no cover (Windows: atomic replace only)
                yield
                return
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"machine": machine_signature(), "entries": dict(sorted(entries.items()))}, f, indent=0)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class LatencyProfile:
    def __init__(self, entries: dict[str, Any] | None = None, *, replay_only: bool = False):
        self.entries: dict[str, Any] = dict(entries or {})
        self.replay_only = replay_only
        self.measured = 0  # measurements taken in this run (0 on a full replay)
        self.replayed = 0
        self.cached = 0  # values read from the machine cache
        self.cache: MachineCache | None = None

    @contextlib.contextmanager
    def machine_cache(self, cache: MachineCache | None) -> Iterator[MachineCache | None]:
        """Within the block, keys missing from the profile go through ``cache`` (None: measured, as outside)."""
        before = self.cache
        self.cache = cache
        try:
            yield cache
        finally:
            self.cache = before

    def measure(self, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.replayed += 1
            return self.entries[key]
        if self.replay_only:
            raise PassError(f"latency profile has no entry {key!r} (replay_only)")
        if self.cache is not None:
            found, value = self.cache.lookup(key)
            if found:
                self.entries[key] = value
                self.cached += 1
                return value
        value = fn()
        json.dumps(value)  # must be recordable
        if self.cache is not None:
            value = self.cache.store(key, value)
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
