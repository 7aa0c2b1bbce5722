"""``tune()``: search pipelines of the registered passes for the best one that meets a target.

Phases, in one trial budget (``trials``, counting the trials of a resumed study):

1. ``sensitivity`` (``plan.sensitivity_configs``): baseline + each pass alone; at most 60% of the budget when a
   model-based phase follows, 75% otherwise;
2. ``combine`` (``plan.predict_combinations``): combinations predicted from phase 1, verified by real trials;
3. ``model`` (``model_search``): Optuna TPE / NSGA-II for the rest of the budget (sampler ``optuna`` / ``nsga2``;
   ``auto`` uses TPE when Optuna is installed; ``cheap`` never does: it measures the rest of the curves, then
   the neighbours of the best trial, ``plan.neighbours``, while the budget lasts).

A pipeline already measured (an earlier phase, or the journal of a resumed study) is not run again. Every trial is a
real ``compress`` + ORT validation (``trial.run_trial``) in a worker process (``executor``); the best trial's model
bytes are the ones written. Results: ``TuneResult`` (``output.write_outputs`` writes model, recipe, profile and
reports).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from onnxcompress.errors import BadInputError
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.tune import plan
from onnxcompress.tune.executor import default_workers, make_executor
from onnxcompress.tune.journal import Journal
from onnxcompress.tune.result import TuneResult
from onnxcompress.tune.space import build_space
from onnxcompress.tune.targets import Target
from onnxcompress.tune.trial import TrialTask, run_trial

log = logging.getLogger(__name__)
SAMPLERS = ("auto", "cheap", "optuna", "nsga2")


def study_paths(output: str | Path) -> dict[str, Path]:
    out = Path(output)
    stem = out.name[: -len(".onnx")] if out.name.endswith(".onnx") else out.name
    side = out.with_name
    return {"model": out, "journal": side(stem + ".tune.jsonl"), "db": side(stem + ".tune.db"),
            "best": side(f".{stem}.tune.best.onnx"), "recipe": side(stem + ".recipe.toml"),
            "profile": side(stem + ".tune.profile.json"), "report": side(stem + ".tune.md"),
            "json": side(stem + ".tune.json"), "plot": side(stem + ".tune.png")}


def _portable(source: Any, proto: onnx.ModelProto) -> Any:
    """Feeds a worker process can receive: a path stays a path; anything else becomes a list of feeds."""
    from onnxcompress.data import load_feeds

    if source is None or isinstance(source, (str, Path)):
        return None if source is None else str(source)
    feeds = load_feeds(source, proto)
    return list(feeds) if feeds is not None else None


def pareto_front(records: list[dict], target: Target) -> list[dict]:
    """Finished trials not dominated in (objective down, metric up), by objective."""
    pts = [r for r in records if r["status"] == "ok" and target.minimize in r["values"] and "metric" in r["values"]]
    front = []
    for r in pts:
        o, m = r["values"][target.minimize], r["values"]["metric"]
        dominated = any(q["values"][target.minimize] <= o and q["values"]["metric"] >= m and
                        (q["values"][target.minimize] < o or q["values"]["metric"] > m) for q in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["values"][target.minimize], -r["values"]["metric"], r["number"]))


class Study:
    def __init__(self, model, target: Target, output, *, calibration, validation, trials: int, workers: int | None,
                 sampler: str, seed: int, ray: str | None, timeout: float | None, resume: bool,
                 search_passes: list[str] | None, latency_profile, latency_budget: float,
                 max_validation: int | None, dims, shapes, trial_fn: Callable, task: str = "auto"):
        from onnxcompress import io

        if sampler not in SAMPLERS:
            raise BadInputError(f"--sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
        if trials < 1:
            raise BadInputError("--trials must be >= 1")
        from onnxcompress.validate import TASKS

        if task not in TASKS:
            raise BadInputError(f"--task {task!r}: one of {', '.join(TASKS)}")
        self.task = task
        if sampler in ("optuna", "nsga2"):
            from onnxcompress.tune.model_search import import_optuna

            import_optuna()
        elif sampler == "auto":
            try:
                import optuna  # noqa: F401
                sampler = "optuna"
            except ImportError:
                sampler = "cheap"
        self.sampler, self.target, self.trials, self.seed = sampler, target, trials, seed
        self.proto = model if isinstance(model, onnx.ModelProto) else io.read_model(model)
        model_bytes = self.proto.SerializeToString() if not io.needs_external_data(self.proto) else b""
        sha = hashlib.sha256(model_bytes or str(model).encode()).hexdigest()
        self.model_ref = model if isinstance(model, onnx.ModelProto) else str(model)
        self.calibration = _portable(calibration, self.proto)
        self.validation = _portable(validation, self.proto)
        self.space = build_space()
        if search_passes:
            self.space = self.space.restrict(search_passes)
        self.paths = study_paths(output)
        self.paths["model"].parent.mkdir(parents=True, exist_ok=True)
        space_id = hashlib.sha256(self.space.fingerprint().encode()).hexdigest()[:16]
        self.study_name = f"onnxcompress-{sha[:16]}-{hashlib.sha256(target.text().encode()).hexdigest()[:8]}"
        header = {"model_sha256": sha, "target": target.text(), "space": space_id, "seed": seed}
        self.journal = Journal(self.paths["journal"], header, resume)
        if not resume and self.paths["db"].exists():
            self.paths["db"].unlink()
        if isinstance(latency_profile, (str, Path)):
            latency_profile = LatencyProfile.load(latency_profile)
        self.profile = latency_profile if latency_profile is not None else LatencyProfile()
        self.profile.entries.update(self.journal.profile())
        self.task_defaults = dict(seed=seed, latency_budget=latency_budget, max_validation=max_validation,
                                  dims=dims, shapes=shapes)
        size = len(model_bytes) or 1 << 28
        self.executor = make_executor(ray, workers or default_workers(size), timeout, trial_fn)
        # several trials at once: each single-threaded (BLAS too), so N workers fill N cores without contention
        self.task_defaults.update(task=task, blas_threads=1 if self.executor.workers > 1 else None)
        self.by_pipeline = {r["pipeline"]: r for r in self.journal.final() if self._reusable(r)}
        self.finished = {r["number"] for r in self.journal.final() if r["pipeline"] in self.by_pipeline}
        self.next_number = max(self.finished, default=-1) + 1
        self.in_flight: dict[int, tuple[str, dict, Any]] = {}
        self.in_flight_pipelines: dict[int, str] = {}  # trial number -> pipeline of the trials running now
        self.best_model: bytes | None = None
        self.best_number: int | None = None
        self.new_trials = 0
        self._load_best()

    # ------------------------------------------------------------------------------------------- bookkeeping
    def _reusable(self, rec: dict) -> bool:
        """A journaled trial answers this study's target when it failed for good, already misses one of its bounds,
        or measured every quantity the target needs (a study resumed with another target re-runs the rest)."""
        if rec.get("retried"):  # its retry never reported back (the study was interrupted): run it again
            return False
        if rec["status"] in ("failed", "crashed", "timeout"):
            return True
        if rec.get("task", "auto") != self.task and "metric" in rec["values"]:
            return False  # its metric was another task's
        values = rec["values"]
        needed = set(self.target.bounds) | {self.target.minimize, "metric"}
        return bool(self.target.misses(values)) or needed <= set(values)

    def _load_best(self) -> None:
        best = self.best()
        path = self.paths["best"]
        if best is not None and path.is_file() and path.with_suffix(".number").is_file():
            if path.with_suffix(".number").read_text().strip() == str(best["number"]):
                self.best_model, self.best_number = path.read_bytes(), best["number"]

    def records(self) -> list[dict]:
        """One record per pipeline (its latest trial), by trial number."""
        latest = {r["pipeline"]: r for r in self.journal.final()}
        return sorted(latest.values(), key=lambda r: r["number"])

    def best(self) -> dict | None:
        feasible = [r for r in self.records() if r["status"] == "ok" and self.target.feasible(r["values"])]
        return min(feasible, key=lambda r: (*self.target.rank_key(r["values"]), r["number"]), default=None)

    def budget_left(self) -> int:
        return self.trials - len(self.finished) - len(self.in_flight)

    def _finish(self, rec: dict) -> dict | None:
        """Record a returned trial; returns it when final (not a crash about to be retried)."""
        phase, config, tag = self.in_flight[rec["number"]]
        rec["phase"], rec["config"] = phase, config
        model_bytes = rec.pop("model_bytes", None)
        self.profile.entries.update(rec.get("profile") or {})
        self.journal.append(rec)
        if rec.get("retried"):
            return None
        del self.in_flight[rec["number"]]
        self.in_flight_pipelines.pop(rec["number"], None)
        self.finished.add(rec["number"])
        self.by_pipeline[rec["pipeline"]] = rec
        self.new_trials += 1
        best = self.best()
        if model_bytes is not None and best is not None and best["number"] == rec["number"]:
            self.best_model, self.best_number = model_bytes, rec["number"]
            tmp = self.paths["best"].with_name(self.paths["best"].name + ".tmp")
            tmp.write_bytes(model_bytes)
            tmp.replace(self.paths["best"])
            self.paths["best"].with_suffix(".number").write_text(str(rec["number"]))
        v = rec["values"]
        log.info("trial %d [%s] %s: %s %s", rec["number"], phase, rec["status"],
                 ", ".join(f"{k} {x:.4g}" for k, x in sorted(v.items())), rec["pipeline"])
        return rec

    def _task(self, pipeline: str, number: int, full: bool = False) -> TrialTask:
        prof = copy.copy(self.profile)
        prof.entries = dict(self.profile.entries)
        return TrialTask(number, pipeline, self.model_ref, self.calibration, self.validation, self.target,
                         profile=prof, full=full, **self.task_defaults)

    def drive(self, configs: Iterator[tuple[dict, Any]], phase: str,
              on_final: Callable[[Any, dict | None], None] | None = None, max_skips: int = 200) -> None:
        """Run the configs (each with a tag handed back to ``on_final``) within the budget, in parallel."""
        skips = 0
        exhausted = False
        while True:
            while not exhausted and self.executor.capacity() > 0 and self.budget_left() > 0 and skips < max_skips:
                item = next(configs, None)
                if item is None:
                    exhausted = True
                    break
                config, tag = item
                try:
                    pipeline = self.space.pipeline(config)
                except BadInputError as exc:
                    log.debug("config not buildable (%s): %s", exc, config)
                    skips += 1
                    if on_final:
                        on_final(tag, None)
                    continue
                if pipeline in self.by_pipeline or pipeline in self.in_flight_pipelines.values():
                    skips += 1
                    if on_final and pipeline in self.by_pipeline:
                        on_final(tag, self.by_pipeline[pipeline])
                    elif on_final:
                        on_final(tag, None)
                    continue
                number = self.next_number
                self.next_number += 1
                self.in_flight[number] = (phase, config, tag)
                self.in_flight_pipelines[number] = pipeline
                self.executor.submit(self._task(pipeline, number, full=phase == "sensitivity"))
            if not self.executor.running:
                return
            for rec in self.executor.wait():
                tag = self.in_flight[rec["number"]][2]
                final = self._finish(rec)
                if final is not None and on_final:
                    on_final(tag, final)

    # --------------------------------------------------------------------------------------------------- run
    def run(self) -> TuneResult:
        t0 = time.perf_counter()
        try:
            share = 0.75 if self.sampler == "cheap" else 0.6
            first = plan.sensitivity_configs(self.space)
            cap = max(2, math.ceil(share * self.trials))
            self.drive(iter([(c, None) for c in first[:cap]]), "sensitivity")
            limit = self.budget_left() if self.sampler == "cheap" else max(1, self.budget_left() // 2)
            combos = plan.predict_combinations(self.space, self.records(), self.target, limit)
            self.drive(iter([(c, None) for c in combos]), "combine")
            if self.sampler in ("optuna", "nsga2") and self.budget_left() > 0:
                self._model_phase()
            else:  # no model-based phase: the rest of the curves, then the neighbours of the best
                self.drive(iter([(c, None) for c in first[cap:]]), "sensitivity")
                self._refine()
        finally:
            self.executor.close()
        return self._result(time.perf_counter() - t0)

    def _refine(self) -> None:
        while self.budget_left() > 0:
            centre = self.best()
            if centre is None:
                measured = [r for r in self.records() if r["values"] and r.get("config")]
                centre = min(measured, key=lambda r: (self.target.shortfall(r["values"]), r["number"]), default=None)
            if centre is None or not centre.get("config"):
                return
            before = len(self.finished)
            self.drive(iter([(c, None) for c in plan.neighbours(self.space, centre["config"])]), "refine")
            if len(self.finished) == before:  # every neighbour already measured: a local optimum
                return

    def _model_phase(self) -> None:
        import warnings

        from onnxcompress.tune.model_search import ModelSearch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for constraints / multivariate
            ms = ModelSearch(self.space, self.target, self.paths["db"], self.study_name, self.seed, self.sampler,
                             self.executor.workers)
            ms.seed_with(self.records())

            def asks() -> Iterator[tuple[dict, Any]]:
                while True:
                    number, config = ms.ask()
                    yield config, number

            try:
                self.drive(asks(), "model", on_final=lambda tag, rec: ms.tell(tag, rec),
                           max_skips=4 * self.trials)
            finally:
                ms.abandon()

    def _result(self, wall: float) -> TuneResult:
        records = self.records()
        best = self.best()
        closest = None
        if best is None:
            measured = [r for r in records if r["status"] in ("ok", "stopped") and r["values"]]
            closest = min(measured, key=lambda r: (self.target.shortfall(r["values"]), r["number"]), default=None)
        if best is not None and self.best_number != best["number"]:
            log.info("re-running trial %d for its model (not kept by this session)", best["number"])
            rec = run_trial(replace(self._task(best["pipeline"], best["number"]), blas_threads=None))
            self.best_model = rec.get("model_bytes")
        names = [r["metric_name"] for r in records if r.get("metric_name")]
        return TuneResult(self.target, records, best, closest, pareto_front(records, self.target), wall,
                          self.new_trials, self.executor.workers, self.executor.kind, self.executor.retried,
                          self.sampler, self.space, self.best_model if best else None,
                          profile=dict(self.profile.entries), metric_name=max(set(names), key=names.count)
                          if names else "")


def tune(model, target: str | Target, output: str | Path, *, calibration=None, validation=None, trials: int = 16,
         workers: int | None = None, sampler: str = "auto", seed: int = 0, ray: str | None = None,
         timeout: float | None = None, resume: bool = False, search_passes: list[str] | None = None,
         latency_profile: LatencyProfile | str | Path | None = None, latency_budget: float = 1.5,
         max_validation: int | None = None, dims: dict[str, int] | None = None,
         shapes: dict[str, tuple[int, ...]] | None = None, trial_fn: Callable = run_trial,
         write: bool = True, task: str = "auto") -> TuneResult:
    """Search pipelines for ``target`` (see ``onnxcompress.tune.targets``); write the outputs beside ``output``.

    ``task``: what ``metric`` measures (``onnxcompress.validate.TASKS``; "auto" detects it from the graph)."""
    tgt = target if isinstance(target, Target) else Target.parse(target)
    study = Study(model, tgt, output, calibration=calibration, validation=validation, trials=trials,
                  workers=workers, sampler=sampler, seed=seed, ray=ray, timeout=timeout, resume=resume,
                  search_passes=search_passes, latency_profile=latency_profile, latency_budget=latency_budget,
                  max_validation=max_validation, dims=dims, shapes=shapes, trial_fn=trial_fn, task=task)
    result = study.run()
    if write:
        from onnxcompress.tune.output import write_outputs

        result.paths = write_outputs(result, study.paths, model if isinstance(model, (str, Path)) else None,
                                     calibration)
    return result
