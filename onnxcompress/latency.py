"""Latency of several models on the same feed, measured interleaved so machine noise hits all of them alike.

Each round runs every model once (order rotated per round); the result per model is the median over rounds, in
milliseconds, after ``warmup`` untimed rounds. Rounds stop at ``max_rounds`` or when ``budget_s`` is spent (at least
``min_rounds``). Ratios between models measured in the same call are what to report; absolute times on a shared
machine are noise. Intra-op pools do not spin: with spinning on, the idle pool of one session steals the CPU from
the session timed next (two sessions of the SAME model measured 1.8-2.6x apart at 2 threads on 2 cores).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from onnxcompress.runtime import Session


def measure_latency(
    models: dict[str, Any],
    feed: dict[str, np.ndarray],
    *,
    threads: int = 1,
    warmup: int = 2,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 5.0,
) -> dict[str, float]:
    """Median wall time (ms) per model on the same feed: ``warmup`` runs each, then rounds that run every model once
    in a rotating order (so drift hits all alike) until ``budget_s`` seconds and ``min_rounds`` are reached (at most
    ``max_rounds``); ``threads`` intra-op threads, no spinning."""
    sessions = {name: Session(m, threads=threads, what=name, spin=False) for name, m in models.items()}
    try:
        names = list(sessions)
        for _ in range(warmup):
            for n in names:
                sessions[n].run(feed)
        times: dict[str, list[float]] = {n: [] for n in names}
        start = time.perf_counter()
        for r in range(max_rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                t0 = time.perf_counter()
                sessions[n].run(feed)
                times[n].append(time.perf_counter() - t0)
            if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
                break
        return {n: float(np.median(t)) * 1e3 for n, t in times.items()}
    finally:
        for s in sessions.values():
            s.close()
