"""Targets: what a tuned pipeline must meet and what it minimises.

Grammar: comma-separated terms ``KEY OP NUMBER`` and at most one ``minimize=QUANTITY``::

    latency<=0.5,metric>=0.99            size<=0.3,cosine>=0.999,minimize=latency

Quantities, all relative to the FP32 model on the same data and machine:

- ``latency`` = t(candidate) / t(FP32), 1 thread, interleaved medians on one validation feed;
- ``size``    = serialized bytes (candidate) / serialized bytes (FP32);
- ``macs``    = MACs (candidate) / MACs (FP32) at the feed shapes;
- ``metric``  = the model's task metric relative to FP32 (FP32 vs itself = 1.0), as validation computes it for
  the study's ``task`` (``onnxcompress.validate``; auto-detected from the outputs): CTC string agreement for
  sequence recognisers, box F1 at IoU 0.5 for YOLO-style detectors, top-1 agreement for class scores, else the
  mean per-sample cosine (the worst output's when several have one);
- ``cosine``  = the worst output's cosine with FP32.

Ratios take ``<=`` (lower is better), similarities ``>=``. The objective (``minimize=``) defaults to the first
ratio named in a constraint, else ``size``. Among trials that meet every constraint the best has the lowest
objective (ties: the higher metric). A trial's *shortfall* sums its misses relative to each bound
(``max(0, value/bound - 1)`` for ratios, ``max(0, bound - value)`` for similarities): the closest trial of an
unreachable target is the one with the least shortfall.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from onnxcompress.errors import BadInputError

RATIOS = ("latency", "size", "macs")
SIMILARITIES = ("metric", "cosine")
_TERM = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|=)\s*([^\s]+)\s*$")


@dataclass(frozen=True)
class Target:
    bounds: dict[str, float] = field(default_factory=dict)
    minimize: str = "size"

    @classmethod
    def parse(cls, text: str) -> Target:
        bounds: dict[str, float] = {}
        minimize = None
        for term in [t for t in text.split(",") if t.strip()]:
            m = _TERM.match(term)
            if not m:
                raise BadInputError(f"target term {term.strip()!r}: expected e.g. latency<=0.5 or metric>=0.99")
            key, op, raw = m.groups()
            if key == "minimize":
                if op != "=" or raw not in RATIOS:
                    raise BadInputError(f"target {term.strip()!r}: minimize= takes one of {', '.join(RATIOS)}")
                minimize = raw
                continue
            if key not in RATIOS + SIMILARITIES:
                raise BadInputError(f"target {term.strip()!r}: unknown metric {key!r}; known: "
                                    f"{', '.join(RATIOS + SIMILARITIES)} (and minimize=)")
            want = "<=" if key in RATIOS else ">="
            if op != want:
                raise BadInputError(f"target {term.strip()!r}: {key} is bounded with {want}")
            try:
                value = float(raw)
            except ValueError:
                raise BadInputError(f"target {term.strip()!r}: {raw!r} is not a number") from None
            if not (math.isfinite(value) and value > 0) or (key in SIMILARITIES and value > 1):
                raise BadInputError(f"target {term.strip()!r}: the bound must be > 0 (and <= 1 for {key})")
            bounds[key] = value
        if not bounds and minimize is None:
            raise BadInputError("empty target: give e.g. --target 'latency<=0.5,metric>=0.99'")
        if minimize is None:
            minimize = next((k for k in bounds if k in RATIOS), "size")
        return cls(bounds, minimize)

    def text(self) -> str:
        terms = [f"{k}{'<=' if k in RATIOS else '>='}{v:g}" for k, v in self.bounds.items()]
        return ",".join(terms + [f"minimize={self.minimize}"])

    def needs_latency(self) -> bool:
        return "latency" in self.bounds or self.minimize == "latency"

    def misses(self, values: dict[str, Any]) -> dict[str, float]:
        """Bound -> relative shortfall for every bound the values miss (unknown values are not counted)."""
        out = {}
        for key, bound in self.bounds.items():
            v = values.get(key)
            if v is None:
                continue
            miss = max(0.0, v / bound - 1.0) if key in RATIOS else max(0.0, bound - v)
            if miss > 0:
                out[key] = miss
        return out

    def violates_known(self, values: dict[str, Any]) -> list[str]:
        """Bounds already missed by the values measured so far (for stopping a trial early)."""
        return sorted(self.misses(values))

    def feasible(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) is not None for k in self.bounds) and not self.misses(values)

    def shortfall(self, values: dict[str, Any]) -> float:
        unknown = sum(1.0 for k in self.bounds if values.get(k) is None)
        return sum(self.misses(values).values()) + unknown

    def rank_key(self, values: dict[str, Any]) -> tuple[float, float]:
        """Sort key of a feasible trial: objective, then the higher metric first."""
        obj = values.get(self.minimize)
        return (obj if obj is not None else math.inf, -(values.get("metric") or 0.0))

    def describe_misses(self, values: dict[str, Any]) -> str:
        parts = []
        for key, bound in self.bounds.items():
            v = values.get(key)
            if v is None:
                parts.append(f"{key} not measured (stopped early)")
            elif key in self.misses(values):
                parts.append(f"{key} {v:.4g} {'>' if key in RATIOS else '<'} {bound:g}")
        return "; ".join(parts)
