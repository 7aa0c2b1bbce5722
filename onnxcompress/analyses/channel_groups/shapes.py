"""The static shapes the channel-group analysis works at.

``static_shapes``: every tensor's shape at given input shapes, from onnx shape inference, and for the tensors it
cannot tell, from one onnxruntime run (on the caller's feed, else a seeded ``random_feed``). ``input_shapes_for``
picks the input shapes of a run: the first calibration feed's, else the user's dim bindings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                  feed: dict[str, np.ndarray] | None = None) -> dict[str, list[int]]:
    """Shapes of every tensor at ``input_shapes``: ONNX inference, then one ORT run for what it could not tell."""
    from onnxcompress.analyses.macs import infer_shapes, ort_shapes

    shapes = infer_shapes(model, input_shapes)
    init = {t.name for t in model.graph.initializer}
    missing = sorted({o for n in model.graph.node for o in n.output if o and o not in shapes and o not in init})
    if missing:
        if feed is None:
            feed = random_feed(model, input_shapes)
        shapes.update(ort_shapes(model, missing, feed))
    return shapes


def random_feed(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A seeded feed (seed 0) at ``input_shapes``: standard normal floats, ones for other dtypes; symbolic dims
    not in ``input_shapes`` are 1. Only used to measure shapes, never to judge fidelity."""
    from onnxcompress.data import model_inputs

    rng = np.random.default_rng(0)
    feed = {}
    for spec in model_inputs(model):
        shape = input_shapes.get(spec.name, tuple(d if isinstance(d, int) else 1 for d in spec.shape))
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
    return feed


def input_shapes_for(model: onnx.ModelProto, ctx: PassContext | None) -> tuple[dict[str, tuple[int, ...]],
                                                                           dict[str, np.ndarray] | None]:
    """Input shapes to analyse ``model`` at, and the feed that gave them: the first calibration feed when there is
    one, else the user's ``--dim`` / ``--shape`` bindings (``data.bind_dims``; the feed is then None)."""
    from onnxcompress.data import bind_dims, feed_shapes, model_inputs

    if ctx is not None and ctx.calibration is not None:
        feed = ctx.calibration.first()
        return feed_shapes(feed), feed
    dims = ctx.dims if ctx is not None else {}
    shapes = ctx.input_shapes if ctx is not None else {}
    return bind_dims(model_inputs(model), dims, shapes), None


