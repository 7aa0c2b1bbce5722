"""Feedback on long runs: bars in a terminal, plain log lines anywhere else (CI, pipes, files).

Everything goes through the ``onnxcompress.progress`` logger at INFO, so a library caller sees nothing unless it
enables that logger, and the CLI decides: in a terminal, tqdm bars that stay on screen as a summary; otherwise one
line per pass start and end with the elapsed time, and for every long loop (calibration, sensitivity, refit) a
heartbeat line at most every ``HEARTBEAT_S`` seconds: ``calibrate: 120/512 (23%), 14.2s``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("onnxcompress.progress")
HEARTBEAT_S = 10.0

Progress = Callable[..., Iterable]


def heartbeat(interval_s: float | None = None) -> Progress:
    """A ``progress(iterable, total=, desc=)`` wrapper that logs a line every ``interval_s`` seconds (default
    ``HEARTBEAT_S``, read when called) and a closing line when the loop took longer than that."""
    interval_s = HEARTBEAT_S if interval_s is None else interval_s

    def wrap(it: Iterable, total: int | None = None, desc: str | None = None) -> Iterator:
        name = desc or "working"
        t0 = last = time.perf_counter()
        i = 0
        for i, item in enumerate(it, 1):  # noqa: B007 - i is read after the loop
            yield item
            now = time.perf_counter()
            if now - last >= interval_s:
                last = now
                share = f" ({100 * i / total:.0f}%)" if total else ""
                log.info("%s: %d/%s%s, %.1fs", name, i, total if total else "?", share, now - t0)
        if time.perf_counter() - t0 >= interval_s:
            log.info("%s: done, %d in %.1fs", name, i, time.perf_counter() - t0)

    return wrap


def terminal_bars() -> Progress | None:
    """tqdm bars on stderr that stay as a summary line (None when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None

    def wrap(it: Iterable, total: int | None = None, desc: str | None = None) -> Any:
        return tqdm(it, total=total, desc=desc, leave=True, file=sys.stderr, dynamic_ncols=True)

    return wrap


def pass_started(label: str, index: int, count: int, elapsed: float) -> None:
    """Log the start of pass ``index`` of ``count`` at ``elapsed`` seconds into the run."""
    log.info("[%6.1fs] pass %d/%d %s: start", elapsed, index, count, label)


def pass_finished(label: str, index: int, count: int, elapsed: float, seconds: float, modified: bool) -> None:
    """Log the end of a pass: whether it changed the graph and how long it took."""
    log.info("[%6.1fs] pass %d/%d %s: %s in %.2fs", elapsed, index, count, label,
             "modified" if modified else "unchanged", seconds)
