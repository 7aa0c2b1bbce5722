"""What the static-mode stages see of one quantization run: ``QuantizeRun`` (a Protocol) and ``Built``.

``static_run.StaticRun`` drives the stages (calibrate, smooth, equalize, round, correct biases, search float
layers ...) and each stage reads and fills the run's shared state (ranges, bias shifts, rounded weights) and asks
it for candidate builds. The stages type their ``run`` parameter against this Protocol instead of importing
``StaticRun``, which imports them: the package's imports run one way (stages -> run_view, options, leaves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import onnx
import onnx_graphsurgeon as gs

from .placement import Plan

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.analyses.calibration import TensorStats
    from onnxcompress.context import PassContext
    from onnxcompress.data import FeedSet

    from .options import QuantizeOptions
    from .qparams_math import QType, QuantizedWeight


class Built(NamedTuple):
    """One quantized candidate: the Q/DQ graph, the placement it realises, and the insertion counters."""

    graph: gs.Graph
    plan: Plan
    counters: dict[str, int]
    #: per If/Loop/Scan body: what was stored int8 there and what stayed float (``subgraphs.body_stats``)
    bodies: dict[str, str] = {}


class QuantizeRun(Protocol):
    """The state one static quantization shares between its stages (``StaticRun`` implements it)."""

    p: QuantizeOptions
    ctx: PassContext
    qt: QType
    stats: dict
    per_channel: bool
    depthwise: bool
    #: the range rule the ranges are computed with
    method: str
    calib_seconds: float
    #: the prepared float graph every build starts from, and its export
    base: gs.Graph
    float_model: onnx.ModelProto
    tstats: dict[str, TensorStats]
    minmax: dict[str, tuple[float, float]]
    ranges: dict[str, tuple[float, float]]
    full_range: set[str]
    bias_shift: dict
    channel_gain: dict
    auto_float: dict[str, str]
    float_details: dict[str, dict]
    rounded: dict[str, QuantizedWeight]
    all_int8: tuple[str, Plan, onnx.ModelProto] | None
    smooth_alpha: float | None
    smooth_rms: dict | None

    def feeds(self, n: int) -> FeedSet: ...

    def build(self, float_nodes=(), reasons=()) -> Built: ...

    def export(self, g: gs.Graph) -> onnx.ModelProto: ...


__all__ = ["Built", "QuantizeRun"]
