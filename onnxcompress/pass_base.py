"""Pass interface and registry.

A pass is a frozen dataclass: its fields are its options, ``dataclasses.asdict`` is the configuration recorded in the
report, and ``dataclasses.replace`` derives variants for sweeps. A pass mutates an onnx-graphsurgeon ``Graph`` in
place inside ``run`` and returns a ``PassResult``.

Contract enforced by the ``PassManager``::

    requires(graph, ctx)  -> raises PassError if the graph is not fit for the pass
    run(graph, ctx)       -> PassResult(modified, stats, preserved)
    ensures(graph, ctx)   -> raises PassError if the pass broke its own postcondition

``exact = True`` declares that the pass must leave the model's outputs numerically unchanged (cleanup, folding);
lossy passes are measured against the original instead.

Weights are graphsurgeon ``Constant`` tensors. Never write into ``Constant.values`` in place: Graph.copy() shares the
arrays, so assign a new array instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

    from onnxcompress.context import PassContext


@dataclass
class PassResult:
    """What a pass reports back.

    modified:  whether the graph changed at all.
    stats:     pass-specific counters (JSON-serialisable) that go into the ledger, e.g. {"bn_folded": 3}.
    preserved: names of analyses that are still valid after the pass ("all" keeps everything).
    """

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    preserved: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Pass:
    """Base class for all passes. Subclasses are frozen dataclasses registered with ``@register``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    #: option name -> one-line help, shown by ``onnxcompress passes``.
    option_help: ClassVar[dict[str, str]] = {}

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise ``PassError`` if the pass cannot run on this graph. Default: no precondition."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise ``PassError`` if the pass's postcondition does not hold. Default: none."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        """Pipeline text for this pass with its non-default options, e.g. ``quantize{mode=static}``."""
        from onnxcompress.pipeline import format_pass

        return format_pass(self)


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` to pipelines, recipes and the CLI."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no 'name'")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__qualname__} must be a (frozen) dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {cls.name!r} registered twice ({existing.__qualname__}, {cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[Pass]:
    _ensure_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        from onnxcompress.errors import BadInputError

        raise BadInputError(f"unknown pass {name!r}; known passes: {known}") from None


def registered_passes() -> dict[str, type[Pass]]:
    _ensure_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def _ensure_builtin_passes() -> None:
    # The core never imports a concrete pass module by name; importing the package registers them all.
    import importlib

    importlib.import_module("onnxcompress.passes")


def option_fields(cls: type[Pass]) -> Iterable[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]
