"""How pruned weights are stored: dense with zeros, or COO (ONNX ``SparseTensorProto``).

COO holds the non-zero values (raw bytes, the tensor's own type) and their linear indices into the flattened
tensor (INT64, sorted, as ONNX requires for 1-D indices), written as ``int64_data``: protobuf packs repeated
integers as varints, so an index below 2^21 costs 3 bytes, not 8. A tensor of n elements with z zeros therefore
takes about (n - z) · (itemsize + ~3) bytes against n · itemsize dense: COO wins below ~55-60% density for float32.
Dense zeros shrink under zip instead; both sizes are reported.

Two forms, both loaded by onnxruntime, which densifies them at session start (no sparse kernels on CPU: size only,
no speed-up):

- ``Constant(sparse_value=COO)`` nodes (``store_sparse``, the pass's ``storage=sparse|auto``): valid under
  onnx's full checker, so it passes the structural gate. The weight is then no longer a graph constant: passes
  after this one (distill, quantize) do not see it — use it in the last pass of a pipeline.
- ``graph.sparse_initializer`` (``to_sparse_initializers``, on a finished ModelProto): the same COO bytes; onnx's
  strict shape inference (onnx 1.23) types a sparse initializer as a sparse tensor and rejects it as a MatMul / Conv
  input ("Input tensors of wrong rank (0)"), so such a model fails ``onnx.checker.check_model(full_check=True)``
  although onnxruntime runs it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxcompress.graph_utils import replace_input


def coo_tensor(values: np.ndarray, name: str) -> onnx.SparseTensorProto:
    """The COO form of a dense array: non-zeros with their linear indices."""
    flat = np.ascontiguousarray(values).reshape(-1)
    idx = np.flatnonzero(flat)
    vals = numpy_helper.from_array(flat[idx], name)
    ind = helper.make_tensor(f"{name}_indices", onnx.TensorProto.INT64, [idx.size], idx.astype(np.int64).tolist())
    return helper.make_sparse_tensor(vals, ind, list(values.shape))


def dense_bytes(values: np.ndarray) -> int:
    return int(values.size * values.dtype.itemsize)


def coo_bytes(values: np.ndarray) -> int:
    """Serialized size of the COO form (values + varint indices + dims)."""
    return int(coo_tensor(values, "w").ByteSize())


def densify(sp: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a COO ``SparseTensorProto`` (1-D linear or 2-D coordinate indices)."""
    from onnxcompress.analyses.sparsity import dense_of_sparse

    return dense_of_sparse(sp)


def store_sparse(graph: gs.Graph, consts: list[gs.Constant], mode: str) -> dict[str, int]:
    """Replace each constant whose COO form is smaller (``auto``) or every one (``sparse``) by a
    ``Constant(sparse_value=...)`` node. Returns {"tensors", "dense_bytes", "stored_bytes"} of the changed ones."""
    out = {"tensors": 0, "dense_bytes": 0, "stored_bytes": 0}
    if mode == "dense":
        return out
    for c in consts:
        values = np.asarray(c.values)
        sp = coo_tensor(values, c.name)
        dense, stored = dense_bytes(values), int(sp.ByteSize())
        if mode == "auto" and stored >= dense:
            continue
        users = list(c.outputs)
        name = c.name
        c.name = f"{name}__dense"
        var = gs.Variable(name, dtype=values.dtype, shape=list(values.shape))
        for node in users:
            replace_input(node, c, var)
        graph.nodes.append(gs.Node("Constant", name=f"{name}__coo", attrs={"sparse_value": sp}, outputs=[var]))
        out["tensors"] += 1
        out["dense_bytes"] += dense
        out["stored_bytes"] += stored
    if out["tensors"]:
        graph.toposort()
    return out


def to_sparse_initializers(model: onnx.ModelProto, names: set[str] | None = None,
                           mode: str = "auto") -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` whose main-graph initializers (``names``, or all) move to ``graph.sparse_initializer``
    where their COO form is smaller (``auto``) or always (``sparse``)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, stats = [], {"tensors": 0, "dense_bytes": 0, "stored_bytes": 0}
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t) if (names is None or t.name in names) else None
        if arr is None or arr.dtype.kind != "f":
            keep.append(t)
            continue
        sp = coo_tensor(arr, t.name)
        if mode == "auto" and sp.ByteSize() >= dense_bytes(arr):
            keep.append(t)
            continue
        m.graph.sparse_initializer.append(sp)
        stats["tensors"] += 1
        stats["dense_bytes"] += dense_bytes(arr)
        stats["stored_bytes"] += int(sp.ByteSize())
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m, stats
