"""Pass interface and registry.

A pass is a frozen dataclass: its fields are its options, ``dataclasses.asdict`` is the configuration recorded in the
report, and ``dataclasses.replace`` derives variants for sweeps. A pass mutates an onnx-graphsurgeon ``Graph`` in
place inside ``run`` and returns a ``PassResult``.

Contract enforced by the ``PassManager``::

    requires(graph, ctx)  -> raises PassError if the graph is not fit for the pass
    run(graph, ctx)       -> PassResult(modified, stats, preserved)
    ensures(graph, ctx)   -> raises PassError if the pass broke its own postcondition

Options carry their help beside them: ``ratio: float = option(0.3, "fraction of channels removed")``
(``dataclasses.field`` metadata), listed by ``onnxcompress passes``; a test checks every registered pass documents
every option.

Class-level declarations the manager reads before and after the run:

- ``needs``: what the pass needs from the run besides the graph (``"calibration"``): checked for every pass of the
  pipeline before the first one runs, so a missing ``--calib`` is a bad-input error, not a failure half-way.
- ``preserves``: names of the analyses still valid after the pass modified the graph (an unmodified graph keeps
  them all); ``PassResult.preserved`` may add more for one run.

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
    #: what the pass needs besides the graph, checked before the pipeline starts: "calibration"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: analyses (by name) that stay valid when this pass modifies the graph
    preserves: ClassVar[frozenset[str]] = frozenset()

    def needs_calibration(self) -> bool:
        """Whether this configuration of the pass needs calibration feeds (default: ``"calibration" in needs``)."""
        return "calibration" in self.needs

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise ``PassError`` if the pass cannot run on this graph. Default: no precondition."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise ``PassError`` if the pass's postcondition does not hold. Default: none."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """The registered pass called ``name`` (passes register when ``onnxcompress.passes`` is imported, which
    ``import onnxcompress`` does)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        from onnxcompress.errors import BadInputError

        raise BadInputError(f"unknown pass {name!r}; known passes: {known}") from None


def registered_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_REGISTRY.items()))


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - "help" reads best at the call site
    """A pass option with its one-line help: ``ratio: float = option(0.3, "fraction of channels removed")``.

    Mutable defaults (lists, dicts) are given as ``default_factory=...`` in ``kwargs`` with ``default=None``."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def option_fields(cls: type[Pass]) -> Iterable[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def option_help(cls: type[Pass]) -> dict[str, str]:
    """Option name -> its help text (empty where a field has none: a test keeps that from happening)."""
    legacy = cls.__dict__.get("option_help_legacy", {})
    return {f.name: f.metadata.get("help", "") or legacy.get(f.name, "") for f in option_fields(cls)}
