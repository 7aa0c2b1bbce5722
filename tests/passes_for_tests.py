"""Passes that exist only for the core's tests (registered under names starting with 'test-')."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.errors import PassError
from onnxcompress.pass_base import Pass, PassResult, option, register


@register
@dataclass(frozen=True)
class OptionsPass(Pass):
    name = "test-options"
    description = "does nothing; has one option of each kind"
    exact = True
    count: int = option(3, "an integer")
    ratio: float = option(0.5, "a fraction in [0, 1]")
    flag: bool = option(False, "a switch")
    label: str = option("abc", "a string")
    mode: Literal["fast", "slow"] = option("fast", "one of two choices")
    exclude: tuple[str, ...] = option((), "names to leave alone")
    limit: int | None = option(None, "an optional integer")

    def __post_init__(self):
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        return PassResult(False, {"count": self.count})


@register
@dataclass(frozen=True)
class FailingPass(Pass):
    name = "test-fail"
    description = "fails in the phase it is told to"
    exact = True
    phase: str = option("run", "where to fail: requires, run or ensures")

    def requires(self, graph, ctx):
        if self.phase == "requires":
            raise PassError("graph has no Conv")

    def run(self, graph, ctx):
        if self.phase == "run":
            raise RuntimeError("boom")
        return PassResult(False)

    def ensures(self, graph, ctx):
        if self.phase == "ensures":
            raise PassError("postcondition broken")


@register
@dataclass(frozen=True)
class ScaleWeightsPass(Pass):
    """Multiplies every float weight by ``factor``: changes outputs (used to test exactness checks)."""

    name = "test-scale"
    description = "scales all float weights"
    factor: float = option(1.01, "the weight multiplier")
    claim_exact: bool = option(False, "declare the pass exact (to test the exactness check)")
    preserve: tuple[str, ...] = option((), "analyses the pass claims to preserve")

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.claim_exact

    def run(self, graph, ctx):
        n = 0
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and t.values.size > 1:
                t.values = (t.values * np.float32(self.factor)).astype(np.float32)  # new array, never in place
                n += 1
        return PassResult(n > 0, {"scaled": n}, frozenset(self.preserve))
