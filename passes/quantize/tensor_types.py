"""The element type of every tensor of the float graph, which the static placement needs (only float32 tensors
are quantized; an int64 shape or a bool mask never is).

Rule: constants carry their own dtype; every other tensor takes the type ONNX shape inference gives it from the
graph inputs (declared ``value_info`` is dropped first: exported models sometimes declare stale types); whatever
inference cannot type (custom ops, ops it does not know) is read off one real calibration feed run through ORT with
those tensors exposed as outputs, ``chunk`` tensors per session so memory stays bounded.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.data import Feed

log = logging.getLogger(__name__)


def probe_dtypes(base: gs.Graph, float_model: onnx.ModelProto, feed: Feed, chunk: int = 256) -> dict[str, np.dtype]:
    """Tensor name -> element type for ``base`` (``float_model`` is its export; ``feed`` one calibration feed)."""
    from onnxcompress.analyses.activations import expose_outputs
    from onnxcompress.runtime import Session

    dtypes: dict[str, np.dtype] = {}
    for t in base.tensors().values():
        if isinstance(t, gs.Constant):
            dtypes[t.name] = np.asarray(t.values).dtype
    try:
        m = onnx.ModelProto()
        m.CopyFrom(float_model)
        del m.graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            et = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            if et:
                dtypes.setdefault(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)))
    except Exception as exc:  # inference is best effort; the probe below covers the rest
        log.debug("type inference failed: %s", exc)
    names = [
        t.name
        for t in base.tensors().values()
        if isinstance(t, gs.Variable) and t.name and t.name not in dtypes
    ]
    for i in range(0, len(names), chunk):
        part = names[i : i + chunk]
        with Session(expose_outputs(float_model, part), optimize=False, what="probe model") as s:
            for n, a in zip(part, s.run(feed, part), strict=True):
                dtypes[n] = np.asarray(a).dtype
    return dtypes
