"""Ledger figures for one model: parameters, bytes (raw and zip-compressed), op histogram, node count, MACs.

- params: elements of every weight tensor (initializers and Constant values, subgraphs included), float and integer
  (quantized int8/int4 weights are still parameters); ``float_params`` / ``int_params`` split them; shape-plumbing
  integer constants (<= 16 elements) are not parameters.
- bytes_raw: the serialised model (protobuf) size; bytes_zip: its zlib (level 6) size, which is what clustering and
  pruning buy when the file is shipped compressed; zip of > 2 GB models is estimated on the weights alone.
  Models with memory-mapped weights (``mmap_weights``): bytes_raw = the size the proto would have with them loaded;
  bytes_zip = zip of that proto + each mapped tensor zipped on its own from its file (above 8 MiB estimated from 8
  evenly spaced 1 MiB samples: ``mmap_weights.zipped_size``; cached while the file is unchanged); ``streamed=True`` takes that road for any model
  (the manager asks for it on runs of memory-mapped models). Nothing serialises a > 2 GB proto.
- ops / nodes: histogram of op types over the graph and its subgraphs.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxcompress import io, mmap_weights
from onnxcompress.analyses.macs import count_macs

_INT_PARAM_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class ModelStats:
    params: int = 0
    float_params: int = 0
    int_params: int = 0
    bytes_raw: int = 0
    bytes_zip: int = 0
    nodes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    macs: int | None = None
    macs_unknown: int = 0
    opset: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _elements(t: onnx.TensorProto) -> int:
    return int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                feed: dict[str, np.ndarray] | None = None, with_zip: bool = True,
                streamed: bool = False) -> ModelStats:
    """The figures of the module docstring. ``streamed``: never serialise the whole model (the runs of memory-mapped
    models ask for it): bytes from the proto's size, zip per tensor."""
    st = ModelStats(opset=io.default_opset(model))
    for t in io.iter_tensors(model):
        if t.data_type in _FLOAT_TYPES:
            st.float_params += _elements(t)
        elif t.data_type in _INT_PARAM_TYPES and _elements(t) > 16:
            st.int_params += _elements(t)
    st.params = st.float_params + st.int_params
    ops: Counter[str] = Counter()
    for g in io.iter_graphs(model.graph):
        for n in g.node:
            ops[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"] += 1
    st.ops = dict(ops.most_common())
    st.nodes = sum(ops.values())
    if streamed or mmap_weights.has_mapped(model):
        st.bytes_raw = mmap_weights.serialized_size(model)
        if with_zip:
            st.bytes_zip = _zip_with_mapped(model)
    elif io.needs_external_data(model):
        st.bytes_raw = mmap_weights.serialized_size(model)  # ByteSize() would serialise the > 2 GB proto
        if with_zip:
            comp = zlib.compressobj(6)
            total = 0
            for t in io.iter_tensors(model):
                total += len(comp.compress(t.raw_data))
            st.bytes_zip = total + len(comp.flush())
    else:
        data = model.SerializeToString()
        st.bytes_raw = len(data)
        if with_zip:
            st.bytes_zip = len(zlib.compress(data, 6))
    if input_shapes is not None:
        # streamed: shape inference on the weightless stand-in (it would copy and serialise every weight)
        macs = count_macs(mmap_weights.checkable(model) if streamed else model, input_shapes, feed)
        st.macs = macs.total
        st.macs_unknown = len(macs.unknown)
    return st


def _zip_with_mapped(model: onnx.ModelProto) -> int:
    """zlib size of the proto (raw tensors in it, mapped ones as references) plus each mapped tensor's own."""
    comp = zlib.compressobj(6)
    total = 0
    for g in io.iter_graphs(model.graph):
        for node in g.node:
            total += len(comp.compress(node.SerializeToString()))
        for t in g.initializer:
            if mmap_weights.is_mapped(t):
                total += mmap_weights.zipped_size(t)
            else:
                total += len(comp.compress(t.SerializeToString()))
    return total + len(comp.flush())
