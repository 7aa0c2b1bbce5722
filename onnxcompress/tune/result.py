"""What a tuning study returns: ``TuneResult`` (its trials, the best and closest, the Pareto front, the written paths).

Its own module so that ``study`` (which makes it) and ``output`` (which writes it) both import it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onnxcompress.tune.space import Space
from onnxcompress.tune.targets import Target


@dataclass
class TuneResult:
    target: Target
    records: list[dict]
    best: dict | None
    closest: dict | None
    pareto: list[dict]
    wall_seconds: float
    new_trials: int
    workers: int
    executor: str
    retried: int
    sampler: str
    space: Space
    best_model: bytes | None = None
    paths: dict[str, str] = field(default_factory=dict)
    #: what ``metric`` is for this model (e.g. "CTC string agreement of output 'y'")
    metric_name: str = ""
    profile: dict[str, Any] = field(default_factory=dict)


__all__ = ["TuneResult"]
