"""One tune trial: a real ``compress`` of the model with one pipeline, then ORT validation and latency, in stages.

Stages, each a chance to stop a trial that can no longer meet the target (``status = "stopped"``):

1. ``compress(model, pipeline, calibration)`` (the structural gate included): size = serialized bytes / FP32's,
   macs = MACs / FP32's (ledger rows); stop here if a size or MAC bound is already missed;
2. validation on the validation feeds (``compare_models`` with the study's ``task``): metric = the model's task
   metric relative to FP32 (``FidelityReport.task_metric()``: CTC string agreement, box F1, top-1 agreement or
   mean per-sample cosine; its name goes into the record as ``metric_name``) and cosine (the worst output's);
   stop if a similarity bound is missed;
3. latency ratio t(candidate) / t(FP32), 1 thread, interleaved (``onnxcompress.latency.measure_latency``), taken
   through the study's latency profile under ``tune/latency-ratio/<fingerprint of both models and feed shapes>``
   so a replayed profile gives the same numbers (and decisions) without measuring.

With ``full=True`` (the sensitivity curves) every stage runs whatever was missed.

Threads: with ``blas_threads`` set (the study sets 1 when more than one trial runs at a time) the trial's process
limits BLAS / OpenMP pools (threadpoolctl when installed, torch's own pool when loaded) to that many threads, so N
workers on N cores do not oversubscribe them; every ORT session a trial opens is 1 intra-op thread in any case.
``cpu_seconds`` (the process's CPU time) is recorded beside ``seconds`` (wall).

A pass that fails (``OnnxCompressError`` or a bug) gives ``status = "failed"`` with its one-line reason: that is a
property of the pipeline, not of the machine, so it is not retried. Crashes and time-outs are the executor's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcompress.latency_profile import LatencyProfile, fingerprint
from onnxcompress.tune.targets import Target

log = logging.getLogger(__name__)


@dataclass
class TrialTask:
    """Everything a worker needs for one trial (picklable; the model and feeds by path or as loaded objects)."""

    number: int
    pipeline: str
    model: Any  # path or ModelProto
    calibration: Any
    validation: Any
    target: Target
    profile: dict[str, Any] | LatencyProfile = field(default_factory=dict)
    seed: int = 0
    latency_budget: float = 1.5
    max_validation: int | None = None
    dims: dict[str, int] | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    keep_model: bool = True
    attempt: int = 1
    #: measure every quantity even when a bound is already missed (the sensitivity curves)
    full: bool = False
    #: the validation's task kind (``onnxcompress.validate.TASKS``)
    task: str = "auto"
    #: cap BLAS / OpenMP threads in the trial's process (None: the libraries' defaults)
    blas_threads: int | None = None


def latency_key(original: bytes, candidate: bytes, feed: dict) -> str:
    import numpy as np

    shapes = sorted((name, tuple(int(d) for d in np.shape(a))) for name, a in feed.items())
    return f"tune/latency-ratio/{fingerprint(original, candidate, str(shapes), 'threads=1')}"


def task_metric(report) -> tuple[float, str]:
    """(value, name) of the model's task metric relative to FP32 (FP32 vs itself = 1.0) from a ``FidelityReport``;
    the worst output's cosine when no output has a task metric (``task="none"``)."""
    tm = report.task_metric()
    if tm is None:
        return float(report.worst().get("cosine", 0.0)), "worst output cosine"
    return tm["value"], f"{tm['title']} of output {tm['output']!r}"


_LIMITER: list = []  # the live threadpoolctl limiter of this process (kept so the limit holds)


def limit_threads(n: int | None) -> None:
    """Cap this process's BLAS / OpenMP thread pools at ``n`` (see the module docstring)."""
    import os
    import sys

    if n is None:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # libraries loaded later (torch for distill's training) read these
    try:
        from threadpoolctl import threadpool_limits

        _LIMITER[:] = [threadpool_limits(limits=n)]
    except ImportError:
        log.debug("threadpoolctl not installed: BLAS keeps its own thread count")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def run_trial(task: TrialTask) -> dict[str, Any]:
    """Run one trial; returns a JSON-able record (plus ``model_bytes`` when kept)."""
    from onnxcompress import io
    from onnxcompress.api import compress
    from onnxcompress.data import load_feeds
    from onnxcompress.errors import OnnxCompressError

    limit_threads(task.blas_threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    profile = task.profile if isinstance(task.profile, LatencyProfile) else LatencyProfile(dict(task.profile))
    before = set(profile.entries)
    rec: dict[str, Any] = {"number": task.number, "pipeline": task.pipeline, "attempt": task.attempt, "values": {}}
    values = rec["values"]

    def stop_for() -> list[str]:
        return [] if task.full else task.target.violates_known(values)

    try:
        proto = task.model if not isinstance(task.model, (str, Path)) else io.read_model(task.model)
        original = proto.SerializeToString()
        result = compress(task.model, task.pipeline, calibration=task.calibration, validation=task.validation,
                          dims=task.dims, shapes=task.shapes, seed=task.seed, validate=False, latency=False,
                          latency_profile=profile)
        candidate = result.model.SerializeToString()
        first, last = result.ledger[0].model, result.ledger[-1].model
        values["size"] = len(candidate) / len(original)
        if first.get("macs"):
            values["macs"] = last.get("macs", 0) / first["macs"]
        if first.get("bytes_zip"):
            values["zip"] = last.get("bytes_zip", 0) / first["bytes_zip"]
        if not stop_for():
            from onnxcompress.validate import compare_models

            feeds = load_feeds(task.validation if task.validation is not None else task.calibration, proto)
            if feeds is None:
                from onnxcompress.synthetic_feeds import accepted_random_feeds

                feeds, _ = accepted_random_feeds(proto, task.dims, task.shapes, n=4, seed=task.seed)
            if task.max_validation is not None:
                feeds = feeds.take(task.max_validation)
            report = compare_models(original, candidate, feeds, task=task.task)
            values["metric"], rec["metric_name"] = task_metric(report)
            values["cosine"] = float(report.worst().get("cosine", 0.0))
            if not stop_for():
                values["latency"] = measure_ratio(profile, original, candidate, feeds.first(), task.latency_budget)
        missed = task.target.violates_known(values)
        rec["status"] = "stopped" if missed and any(k not in values for k in task.target.bounds) else "ok"
        rec["missed"] = missed
        rec["pass_seconds"] = result.seconds
        if task.keep_model and rec["status"] == "ok":
            rec["model_bytes"] = candidate
    except OnnxCompressError as exc:
        rec["status"], rec["error"] = "failed", io.first_line(exc)
    except Exception as exc:  # a bug in a pass on this pipeline: recorded, the study goes on
        rec["status"], rec["error"] = "failed", f"{type(exc).__name__}: {io.first_line(exc)}"
    rec["seconds"] = time.perf_counter() - t0
    rec["cpu_seconds"] = time.process_time() - cpu0
    rec["task"] = task.task
    rec["profile"] = {k: profile.entries[k] for k in profile.entries if k not in before}
    return rec


def measure_ratio(profile: LatencyProfile, original: bytes, candidate: bytes, feed: dict, budget_s: float) -> float:
    def measure() -> float:
        from onnxcompress.latency import measure_latency

        lat = measure_latency({"original": original, "compressed": candidate}, feed, threads=1, budget_s=budget_s)
        return float(lat["compressed"] / lat["original"])

    return float(profile.measure(latency_key(original, candidate, feed), measure))
