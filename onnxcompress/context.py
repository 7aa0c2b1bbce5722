"""PassContext: what every pass may read besides the graph.

- ``calibration``: a re-iterable ``FeedSet`` of input feeds (dicts name -> array), or None.
- ``seed``: the seed every stochastic step derives its generator from (``ctx.rng(salt)``).
- ``target_opset``: the default-domain opset a pass may upgrade to when it needs newer ops (None: leave it).
- ``dims`` / ``input_shapes``: user bindings for symbolic input dims (``--dim batch=1``, ``--shape x=1x3x48x192``).
- analyses: computed lazily and cached by name (``ctx.analysis(ChannelGroupsAnalysis, graph)``); the PassManager
  drops the ones a pass did not preserve (LLVM's preserved-analyses idea). An analysis is a class with a ``name`` and
  a ``compute(graph, ctx)`` (the ``Analysis`` protocol); the context imports none of them.
- ``channel_map``: provenance a pass leaves for later ones (``prune-channels`` records which original channel every
  kept channel is; ``distill`` matches student to teacher with it). A declared result, not a cached analysis: it
  describes the run, not the current graph, and survives every invalidation.
- ``latency``: the ``LatencyProfile`` every latency-driven decision goes through (recorded, replayable).
- ``counters``: run-wide counters (e.g. ``calibration_runs``: how many times calibration feeds were streamed
  through a model to collect statistics), reported in the ledger.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np

from onnxcompress.latency_profile import LatencyProfile

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import onnx_graphsurgeon as gs

    from onnxcompress.data import FeedSet

log = logging.getLogger(__name__)

T = TypeVar("T")


@runtime_checkable
class Analysis(Protocol[T]):
    """A fact about the current graph, computed on demand and cached in the context under ``name``."""

    name: ClassVar[str]

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> T: ...


@dataclass
class ChannelMap:
    """Kept channel positions per pruned tensor: tensor name -> {axis: indices into the ORIGINAL tensor}."""

    positions: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def record(self, mapping: dict[str, dict[int, np.ndarray]]) -> None:
        """Compose a new pruning with the earlier ones of the run: positions keep indexing the original."""
        for name, axes in mapping.items():
            for axis, idx in axes.items():
                prev = self.positions.get(name, {}).get(axis)
                self.positions.setdefault(name, {})[axis] = prev[idx] if prev is not None else idx

    def __bool__(self) -> bool:
        return bool(self.positions)


@dataclass
class PassContext:
    """Everything a pass may read besides the graph (module docstring): data, seed, shapes, cached analyses."""
    calibration: FeedSet | None = None
    seed: int = 0
    target_opset: int | None = None
    dims: dict[str, int] = field(default_factory=dict)
    #: explicit concrete input shapes (``--shape``), used when there is no data to bind symbolic dims
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: the original model, serialised once at import (None for > 2 GB models and models with memory-mapped weights:
    #: then ``original_proto`` (the caller's, read-only) or ``original_path`` is used).
    original_bytes: bytes | None = None
    original_path: str | None = None
    original_proto: onnx.ModelProto | None = None
    #: the ModelProto the current graph was imported from (opset imports, metadata) - read-only for passes.
    model_template: onnx.ModelProto | None = None
    #: ``progress(iterable, total=..., desc=...)`` wrapper (a tqdm bar in the CLI) or None; pass it on to
    #: ``stream_activations(..., progress=ctx.progress)`` and other long loops
    progress: Callable | None = None
    channel_map: ChannelMap = field(default_factory=ChannelMap)
    latency: LatencyProfile = field(default_factory=LatencyProfile)
    counters: Counter = field(default_factory=Counter)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    #: results valid for the whole run, never invalidated (e.g. the original model's activation statistics)
    run_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded from ``seed`` and a salt, so each pass gets an independent, reproducible stream."""
        digest = hashlib.sha256(f"{self.seed}:{salt}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def analysis(self, kind: type[Analysis[T]], graph: gs.Graph) -> T:
        """The cached result of analysis ``kind`` on ``graph``, computed now if no valid one is cached."""
        if kind.name not in self._cache:
            log.debug("computing analysis %s", kind.name)
            self._cache[kind.name] = kind.compute(graph, self)
        return self._cache[kind.name]

    def cached_analyses(self) -> list[str]:
        return sorted(self._cache)

    def invalidate(self, preserved: frozenset[str] | set[str] = frozenset()) -> None:
        """Drop every cached analysis not named in ``preserved`` ("all" keeps everything)."""
        if "all" in preserved:
            return
        for key in list(self._cache):
            if key not in preserved:
                del self._cache[key]

    def export(self, graph: gs.Graph) -> onnx.ModelProto:
        """The current graph as a ModelProto (opset imports and metadata from the original) - e.g. to run it in ORT."""
        from onnxcompress import io

        template = self.model_template
        if template is None:
            return io.to_model(graph)
        opset = graph.opset if graph.opset and graph.opset != io.default_opset(template) else None
        return io.to_model(graph, template, opset=opset)

    def original_model(self) -> onnx.ModelProto:
        """The untouched original (a fresh copy each call; the teacher for distillation)."""
        import onnx as _onnx

        if self.original_bytes is not None:
            return _onnx.load_model_from_string(self.original_bytes)
        if self.original_proto is not None:  # memory-mapped weights: the copy holds file references only
            copy = _onnx.ModelProto()
            copy.CopyFrom(self.original_proto)
            return copy
        if self.original_path is not None:
            from onnxcompress import io

            return io.read_model(self.original_path)
        raise RuntimeError("the context holds no original model")

    def opset(self) -> int:
        """Default-domain opset of the model being compressed."""
        if self.model_template is None:
            return 17
        for imp in self.model_template.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 17
