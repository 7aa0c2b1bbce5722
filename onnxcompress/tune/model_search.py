"""The model-based phase: Optuna's TPE (one objective, the target's bounds as constraints) or NSGA-II (two
objectives: the target's ``minimize`` quantity down, the metric up; the same constraints).

Parameters are define-by-run, so options of a pass that is off are not sampled: ``<pass>.enabled`` in
{false, true}, then ``<pass>.<option>`` over the option's ``SearchDim``. The study lives in a SQLite file beside
the output (``OUT.tune.db``): resuming loads it, marks the trials an interrupt left running as failed, and goes on.
Trials of the cheap phases are added to the study once (``journal_number`` user attribute) so the sampler starts
from everything measured.

Constraint values (Optuna: <= 0 is feasible): ``value / bound − 1`` for ratios, ``bound − value`` for similarities,
1 for a bound a trial did not get to measure (stopped early). The objective of a trial that stopped before it was
measured is 2 (worse than FP32's 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from onnxcompress.errors import BadInputError
from onnxcompress.pass_base import SearchDim
from onnxcompress.tune.space import Space
from onnxcompress.tune.targets import RATIOS, Target

log = logging.getLogger(__name__)
UNMEASURED = 2.0


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise BadInputError("--sampler optuna/nsga2 needs Optuna: pip install 'onnxcompress[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def constraints(target: Target, values: dict[str, Any]) -> list[float]:
    out = []
    for key, bound in target.bounds.items():
        v = values.get(key)
        if v is None:
            out.append(1.0)
        else:
            out.append(v / bound - 1.0 if key in RATIOS else bound - v)
    return out or [0.0]


def _distribution(optuna, dim: SearchDim):
    d = optuna.distributions
    if dim.kind == "choice":
        return d.CategoricalDistribution(list(dim.choices))
    if dim.kind == "int":
        return d.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    if dim.step:
        high = dim.snap(dim.high)
        return d.FloatDistribution(float(dim.low), float(high), step=float(dim.step))
    return d.FloatDistribution(float(dim.low), float(dim.high), log=dim.log)


class ModelSearch:
    def __init__(self, space: Space, target: Target, storage: Path, study_name: str, seed: int, sampler: str,
                 workers: int):
        optuna = self.optuna = import_optuna()
        self.space, self.target = space, target
        self.multi = sampler == "nsga2"
        cf = self._constraints_of
        if self.multi:
            s = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cf, population_size=max(4, 2 * workers))
            directions = ["minimize", "maximize"]
        else:
            s = optuna.samplers.TPESampler(seed=seed, constraints_func=cf, n_startup_trials=4,
                                           constant_liar=workers > 1, multivariate=True, group=True)
            directions = ["minimize"]
        self.study = optuna.create_study(storage=f"sqlite:///{storage}", study_name=study_name, sampler=s,
                                         directions=directions, load_if_exists=True)
        running = optuna.trial.TrialState.RUNNING
        for t in self.study.get_trials(deepcopy=False, states=(running,)):
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        self.seeded = {t.user_attrs.get("journal_number") for t in self.study.get_trials(deepcopy=False)}
        self.pending: dict[int, Any] = {}

    @staticmethod
    def _constraints_of(frozen) -> list[float]:
        return frozen.user_attrs.get("constraints", [1.0])

    def _values(self, rec: dict) -> list[float]:
        v = rec["values"]
        obj = v.get(self.target.minimize, UNMEASURED)
        return [obj, v.get("metric", 0.0)] if self.multi else [obj]

    def distributions(self, config: dict) -> dict[str, Any]:
        params, dists = {}, {}
        for p in self.space.passes:
            if p.always:
                continue
            on = config.get(p.name) is not None
            params[f"{p.name}.enabled"] = on
            dists[f"{p.name}.enabled"] = self.optuna.distributions.CategoricalDistribution([False, True])
            for opt, value in (config.get(p.name) or {}).items():
                if opt in p.dims:
                    params[f"{p.name}.{opt}"] = value
                    dists[f"{p.name}.{opt}"] = _distribution(self.optuna, p.dims[opt])
        return {"params": params, "distributions": dists}

    def seed_with(self, records: list[dict]) -> None:
        """Add finished trials of the cheap phases (once) so the sampler learns from them."""
        ft = self.optuna.trial
        for rec in records:
            if rec["number"] in self.seeded or rec.get("phase") == "model" or "config" not in rec:
                continue
            if rec["status"] not in ("ok", "stopped"):
                continue
            try:
                self.study.add_trial(ft.create_trial(
                    values=self._values(rec), user_attrs={"journal_number": rec["number"],
                                                          "constraints": constraints(self.target, rec["values"])},
                    **self.distributions(rec["config"])))
            except ValueError as exc:  # a value outside today's space (an older journal): not seeded
                log.debug("not seeding trial %s: %s", rec["number"], exc)
            self.seeded.add(rec["number"])

    def ask(self) -> tuple[int, dict]:
        trial = self.study.ask()
        config: dict[str, Any] = {}
        for p in self.space.passes:
            if p.always:
                config[p.name] = {}
                continue
            if not trial.suggest_categorical(f"{p.name}.enabled", [False, True]):
                config[p.name] = None
                continue
            opts = {}
            for opt, dim in p.dims.items():
                key = f"{p.name}.{opt}"
                if dim.kind == "choice":
                    opts[opt] = trial.suggest_categorical(key, list(dim.choices))
                elif dim.kind == "int":
                    opts[opt] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log,
                                                  step=int(dim.step or 1))
                else:
                    dist = _distribution(self.optuna, dim)
                    opts[opt] = dim.snap(trial.suggest_float(key, dist.low, dist.high, log=dist.log,
                                                             step=dist.step))
            config[p.name] = opts
        self.pending[trial.number] = trial
        return trial.number, config

    def tell(self, optuna_number: int, rec: dict | None) -> None:
        """``rec`` None: the config could not be built (fails the Optuna trial)."""
        trial = self.pending.pop(optuna_number)
        if rec is None or rec["status"] not in ("ok", "stopped"):
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            return
        trial.set_user_attr("journal_number", rec["number"])
        trial.set_user_attr("constraints", constraints(self.target, rec["values"]))
        self.seeded.add(rec["number"])
        self.study.tell(trial, self._values(rec))

    def abandon(self) -> None:
        for number in list(self.pending):
            try:
                self.study.tell(self.pending.pop(number), state=self.optuna.trial.TrialState.FAIL)
            except Exception as exc:  # the storage went away with an interrupt: resume marks them failed
                log.debug("could not fail optuna trial %d: %s", number, exc)
