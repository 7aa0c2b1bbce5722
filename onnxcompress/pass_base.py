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

Searchable options (``onnxcompress tune``) say so beside the field with ``search=``:

- a list of choices: ``mode: str = option("static", "...", search=["static", "dynamic"])``
  (``None`` may be a choice: "option off");
- a range ``(low, high)``, ``(low, high, "log")`` or ``(low, high, step)``: ints give an int range, floats a float
  range; ``step`` makes it a grid ``low, low + step, ...`` (never past ``high``).

``search_space(cls)`` returns the declared dimensions (``SearchDim``), validated when the class is defined.

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


@dataclass(frozen=True)
class SearchDim:
    """One searchable option: ``choices`` (a categorical dimension) or a ``low..high`` range (``kind`` "int" or
    "float"; ``log`` for a log-uniform range, ``step`` for a grid)."""

    name: str
    kind: str  # "choice" | "int" | "float"
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def grid(self, points: int = 3) -> list[Any]:
        """``points`` values spread over the dimension (every choice of a categorical one), ascending."""
        if self.kind == "choice":
            return list(self.choices)
        import numpy as np

        lo, hi = float(self.low), float(self.high)
        vals = np.geomspace(lo, hi, points) if self.log else np.linspace(lo, hi, points)
        return sorted({self.snap(v) for v in vals})

    def snap(self, value: float) -> Any:
        """A value of the range rounded onto the dimension (its step grid, its int type, inside its bounds)."""
        lo, hi = float(self.low), float(self.high)
        v = min(max(float(value), lo), hi)
        if self.step:
            v = lo + round((v - lo) / self.step) * self.step
            v = min(v, lo + int((hi - lo) / self.step + 1e-9) * self.step)
        return int(round(v)) if self.kind == "int" else round(v, 10)

    def describe(self) -> str:
        if self.kind == "choice":
            return "{" + ", ".join("none" if c is None else str(c) for c in self.choices) + "}"
        extra = " log" if self.log else f" step {self.step:g}" if self.step else ""
        return f"[{self.low:g}, {self.high:g}]{extra} ({self.kind})"


def parse_search(name: str, spec: Any) -> SearchDim:
    """``search=`` metadata -> ``SearchDim``; ``ValueError`` when it is not a valid list of choices or range."""
    if isinstance(spec, SearchDim):
        return spec
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"option {name}: search choices are empty")
        return SearchDim(name, "choice", tuple(spec))
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        low, high = spec[0], spec[1]
        extra = spec[2] if len(spec) == 3 else None
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in (low, high)):
            raise ValueError(f"option {name}: search range bounds must be numbers, got {spec!r}")
        if not low < high:
            raise ValueError(f"option {name}: search range needs low < high, got {spec!r}")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        if extra == "log":
            if low <= 0:
                raise ValueError(f"option {name}: a log range needs low > 0, got {spec!r}")
            return SearchDim(name, kind, low=low, high=high, log=True)
        if extra is None:
            return SearchDim(name, kind, low=low, high=high)
        if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not 0 < extra <= high - low:
            raise ValueError(f"option {name}: search step must be a number in (0, high - low], got {extra!r}")
        return SearchDim(name, kind, low=low, high=high, step=extra)
    raise ValueError(f"option {name}: search= takes a list of choices or (low, high[, 'log' | step]), got {spec!r}")


def option(default: Any, help: str, *, search: Any = None, **kwargs: Any) -> Any:  # noqa: A002 - "help" reads best
    """A pass option with its one-line help: ``ratio: float = option(0.3, "fraction of channels removed")``.

    ``search`` declares the option searchable by ``onnxcompress tune`` (see the module docstring); it is checked
    here, so a bad range fails when the pass is defined. Mutable defaults (lists, dicts) are given as
    ``default_factory=...`` in ``kwargs`` with ``default=None``."""
    metadata: dict[str, Any] = {"help": help}
    if search is not None:
        metadata["search"] = parse_search("?", search)
    if "default_factory" in kwargs:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def option_fields(cls: type[Pass]) -> Iterable[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def option_help(cls: type[Pass]) -> dict[str, str]:
    """Option name -> its help text (empty where a field has none: a test keeps that from happening)."""
    legacy = cls.__dict__.get("option_help_legacy", {})
    return {f.name: f.metadata.get("help", "") or legacy.get(f.name, "") for f in option_fields(cls)}


def search_space(cls: type[Pass]) -> dict[str, SearchDim]:
    """The options ``cls`` declares searchable (``option(..., search=...)``), by option name, in field order."""
    out = {}
    for f in option_fields(cls):
        dim = f.metadata.get("search")
        if dim is not None:
            out[f.name] = dataclasses.replace(dim, name=f.name)
    return out
