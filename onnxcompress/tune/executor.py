"""Where trials run: a local pool of worker processes (default) or a Ray cluster.

Both executors have the same face: ``capacity()`` free slots, ``submit(task)``, ``wait()`` -> the records of the
trials that finished (at least one; blocks). A trial whose worker dies (killed, out of memory, a crash in native
code) or runs past ``timeout`` seconds is recorded (``status`` "crashed" / "timeout") and submitted once more
(``attempt`` 2); the other trials' results are never lost, each runs in its own process.

Local pool: one process per trial from a ``forkserver`` (started once with onnxcompress preloaded: a clean process,
no inherited ORT threads, cheap forks), at most ``workers`` at a time. ``default_workers`` bounds the pool by the
cores and by the memory available (MemAvailable / an estimate of one trial's peak: 12x the model file + 256 MB).

Ray: each trial a Ray task (``num_cpus=1``); the model and feeds are read here and go into the object store once
(workers on other machines do not see this machine's files), every task gets the references; results stream back
as tasks finish (``ray.wait``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait as mp_wait
from typing import Any

from onnxcompress.errors import BadInputError
from onnxcompress.tune.trial import TrialTask, run_trial

log = logging.getLogger(__name__)

RETRYABLE = ("crashed", "timeout")


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_workers(model_bytes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_trial = 12 * model_bytes + (256 << 20)
    mem = available_memory()
    by_memory = max(1, mem // per_trial) if mem else cores
    return int(max(1, min(cores, by_memory)))


def _noop() -> None:
    pass


def _child(trial_fn: Callable[[TrialTask], dict], task: TrialTask, conn) -> None:
    try:
        conn.send(trial_fn(task))
    finally:
        conn.close()


def _failed(task: TrialTask, status: str, error: str, seconds: float) -> dict[str, Any]:
    return {"number": task.number, "pipeline": task.pipeline, "attempt": task.attempt, "values": {},
            "status": status, "error": error, "seconds": seconds, "profile": {}}


class LocalExecutor:
    kind = "local"

    def __init__(self, workers: int, timeout: float | None = None, trial_fn: Callable = run_trial):
        self.workers = max(1, int(workers))
        self.timeout = timeout
        self.trial_fn = trial_fn
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["onnxcompress"])
        self.running: dict[int, tuple[Any, Any, TrialTask, float]] = {}
        self.retried = 0
        # boot the fork server now (imports onnxcompress once): its start-up is not charged to a trial's timeout
        warm = self.ctx.Process(target=_noop, daemon=True)
        warm.start()
        warm.join()

    def capacity(self) -> int:
        return self.workers - len(self.running)

    def submit(self, task: TrialTask) -> None:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(self.trial_fn, task, send), daemon=True)
        proc.start()
        send.close()
        self.running[task.number] = (proc, recv, task, time.perf_counter())

    def _retry(self, rec: dict, task: TrialTask) -> dict:
        if rec["status"] in RETRYABLE and task.attempt == 1:
            rec["retried"] = True
            self.retried += 1
            log.warning("trial %d %s (%s); retrying once", task.number, rec["status"], rec.get("error", ""))
            self.submit(replace(task, attempt=2))
        return rec

    def wait(self) -> list[dict]:
        if not self.running:
            return []
        while True:
            now = time.perf_counter()
            waits = [r[1] for r in self.running.values()] + [r[0].sentinel for r in self.running.values()]
            deadline = None
            if self.timeout is not None:
                deadline = max(0.0, min(start + self.timeout - now for _, _, _, start in self.running.values()))
            ready = set(mp_wait(waits, timeout=deadline))
            done = []
            for number, (proc, conn, task, start) in list(self.running.items()):
                elapsed = time.perf_counter() - start
                rec = None
                if conn in ready or proc.sentinel in ready:
                    try:
                        rec = conn.recv() if conn.poll() else None
                    except (EOFError, OSError):
                        rec = None
                    proc.join(5)
                    if rec is None:
                        rec = _failed(task, "crashed", f"worker process exited with code {proc.exitcode}", elapsed)
                elif self.timeout is not None and elapsed >= self.timeout:
                    proc.kill()
                    proc.join(5)
                    rec = _failed(task, "timeout", f"no result after {self.timeout:g} s (killed)", elapsed)
                if rec is not None:
                    conn.close()
                    del self.running[number]
                    done.append(self._retry(rec, task))
            if done:
                return done

    def close(self) -> None:
        for proc, conn, _, _ in self.running.values():
            proc.kill()
            proc.join(5)
            conn.close()
        self.running.clear()


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if address.startswith("ray://"):
        host, _, port = address[len("ray://"):].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError):
        raise BadInputError(f"Ray address {address!r} does not answer (expected host:port of a running cluster)") \
            from None


class RayExecutor:
    """Trials as Ray tasks. ``address``: "auto" (a running cluster, else a local one with ``workers`` CPUs) or
    host:port of a cluster head."""

    kind = "ray"

    def __init__(self, address: str, workers: int, timeout: float | None = None, trial_fn: Callable = run_trial):
        try:
            import ray
        except ImportError:
            raise BadInputError("--ray needs Ray: pip install 'onnxcompress[distributed]'") from None
        self.ray = ray
        self.timeout = timeout
        self.workers = max(1, int(workers))
        self.owns = False
        if not ray.is_initialized():
            if address == "auto":
                try:
                    ray.init(address="auto", log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError):
                    ray.init(num_cpus=self.workers, log_to_driver=False, include_dashboard=False)
                    self.owns = True
            else:
                _check_address(address)
                try:
                    ray.init(address=address, log_to_driver=False)
                except Exception as exc:
                    raise BadInputError(f"Ray address {address!r}: cannot join the cluster ({exc})") from None
        cpus = int(ray.cluster_resources().get("CPU", self.workers))
        self.workers = max(1, cpus)
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_ray_trial)
        self.fn_ref = ray.put(trial_fn)
        self.shared: dict[int, Any] = {}
        self.running: dict[Any, tuple[TrialTask, float]] = {}
        self.retried = 0

    def capacity(self) -> int:
        return self.workers - len(self.running)

    def _put_once(self, key: Any, make: Callable[[], Any]) -> Any:
        """Inputs into the object store once per study (a file is read here: workers on other machines do not
        see this machine's paths)."""
        if key not in self.shared:
            self.shared[key] = self.ray.put(make())
        return self.shared[key]

    def submit(self, task: TrialTask) -> None:
        from onnxcompress import io
        from onnxcompress.data import load_feeds

        def model():
            return io.read_model(task.model) if isinstance(task.model, (str, os.PathLike)) else task.model

        model_ref = self._put_once(("model", id(task.model) if not isinstance(task.model, str) else task.model),
                                   model)
        refs = []
        for source in (task.calibration, task.validation):
            if source is None:
                refs.append(None)
                continue
            key = ("feeds", source if isinstance(source, str) else id(source))
            refs.append(self._put_once(key, lambda s=source: list(load_feeds(s, self.ray.get(model_ref)))))
        slim = replace(task, model=None, calibration=None, validation=None)
        ref = self.remote.remote(self.fn_ref, slim, model_ref, refs[0], refs[1])
        self.running[ref] = (task, time.perf_counter())

    def wait(self) -> list[dict]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=self.timeout)
        done = []
        for ref in ready:
            task, start = self.running.pop(ref)
            try:
                rec = self.ray.get(ref)
            except Exception as exc:  # the worker died or the task raised: a crash, retried once
                rec = _failed(task, "crashed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                              time.perf_counter() - start)
            done.append(self._retry(rec, task))
        if self.timeout is not None:
            now = time.perf_counter()
            for ref, (task, start) in list(self.running.items()):
                if now - start >= self.timeout:
                    self.ray.cancel(ref, force=True)
                    del self.running[ref]
                    done.append(self._retry(_failed(task, "timeout", f"no result after {self.timeout:g} s",
                                                    now - start), task))
        return done

    def _retry(self, rec: dict, task: TrialTask) -> dict:
        if rec["status"] in RETRYABLE and task.attempt == 1:
            rec["retried"] = True
            self.retried += 1
            self.submit(replace(task, attempt=2))
        return rec

    def close(self) -> None:
        for ref in list(self.running):
            self.ray.cancel(ref, force=True)
        self.running.clear()
        if self.owns:
            self.ray.shutdown()


def _ray_trial(trial_fn: Callable, task: TrialTask, model: Any, calibration: Any, validation: Any) -> dict:
    return trial_fn(replace(task, model=model, calibration=calibration, validation=validation))


def make_executor(ray: str | None, workers: int, timeout: float | None, trial_fn: Callable = run_trial):
    if ray:
        return RayExecutor(ray, workers, timeout, trial_fn)
    return LocalExecutor(workers, timeout, trial_fn)
