"""Per-tensor sparsity of any model (``onnxcompress inspect``): how many of each weight's elements are exactly zero.

Every float tensor the model holds is counted: initializers, ``sparse_initializer`` entries (COO: zeros = size -
stored values, minus any explicit zeros among them), and ``Constant`` nodes (``value`` or ``sparse_value``), in
the main graph and in subgraphs. For each: elements, zeros, sparsity = zeros / elements, the storage ("dense",
"sparse_initializer", "constant", "constant_sparse"), and whether the non-zeros form an N:M pattern along the
reduction axis of the op that reads it (2:4 or 4:8: at most N non-zeros in every M consecutive elements of axis 1
for a Conv weight, axis 0 for a MatMul right operand, the K axis of a Gemm B) — checked, not assumed.

``sparsity_table(model)`` returns one ``TensorSparsity`` per tensor (largest first); ``summary`` gives the totals
over the float weights: {"tensors", "elements", "zeros", "sparsity"}.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

#: N:M patterns checked, densest first
NM_PATTERNS = ((2, 4), (4, 8))


@dataclass
class TensorSparsity:
    name: str
    shape: tuple[int, ...]
    elements: int
    zeros: int
    storage: str
    nm: str | None = None  # "2:4" / "4:8" when every group along the reduction axis holds <= N non-zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape), "sparsity": round(self.sparsity, 6)}


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _iter_graphs(g)


def _reduction_axes(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> the reduction axis of the weight-reading op that consumes it."""
    axes: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in ("Conv",) and len(node.input) > 1:
            axes[node.input[1]] = 1
        elif node.op_type == "ConvTranspose" and len(node.input) > 1:
            axes[node.input[1]] = 0
        elif node.op_type == "MatMul" and len(node.input) > 1:
            axes.setdefault(node.input[1], -2)
            axes.setdefault(node.input[0], -1)
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axes[node.input[1]] = 1 if trans_b else 0
    return axes


def nm_pattern(values: np.ndarray, axis: int) -> str | None:
    """The densest N:M pattern (of ``NM_PATTERNS``) the non-zeros of ``values`` follow along ``axis``, or None."""
    if values.ndim == 0:
        return None
    a = np.moveaxis(values, axis, -1)
    for n, m in NM_PATTERNS:
        if a.shape[-1] % m == 0 and a.size and np.all(
                np.count_nonzero(a.reshape(-1, m), axis=1) <= n):
            return f"{n}:{m}"
    return None


def dense_of_sparse(sp: onnx.SparseTensorProto) -> np.ndarray:
    vals = numpy_helper.to_array(sp.values)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    dims = tuple(sp.dims)
    out = np.zeros(int(np.prod(dims)), dtype=vals.dtype)
    if idx.ndim == 2:
        idx = np.ravel_multi_index(tuple(idx.T), dims)
    out[idx] = vals
    return out.reshape(dims)


def _entry(name: str, values: np.ndarray, storage: str, axes: dict[str, int]) -> TensorSparsity | None:
    if values.dtype.kind != "f" or values.size == 0:
        return None
    axis = axes.get(name)
    nm = nm_pattern(values, axis) if axis is not None and values.ndim >= 2 else None
    return TensorSparsity(name, tuple(values.shape), int(values.size), int(values.size - np.count_nonzero(values)),
                          storage, nm)


def sparsity_table(model: onnx.ModelProto, min_elements: int = 1) -> list[TensorSparsity]:
    """Per-tensor sparsity of every float tensor of ``model`` with at least ``min_elements`` elements."""
    out: list[TensorSparsity] = []
    for g in _iter_graphs(model.graph):
        axes = _reduction_axes(g)
        found = [(t.name, numpy_helper.to_array(t), "dense") for t in g.initializer
                 if t.data_location != onnx.TensorProto.EXTERNAL or t.raw_data]
        found += [(sp.values.name, dense_of_sparse(sp), "sparse_initializer") for sp in g.sparse_initializer]
        for node in g.node:
            if node.op_type != "Constant" or not node.output:
                continue
            for a in node.attribute:
                if a.name == "value":
                    found.append((node.output[0], numpy_helper.to_array(a.t), "constant"))
                elif a.name == "sparse_value":
                    found.append((node.output[0], dense_of_sparse(a.sparse_tensor), "constant_sparse"))
        for name, values, storage in found:
            e = _entry(name, values, storage, axes)
            if e is not None and e.elements >= min_elements:
                out.append(e)
    return sorted(out, key=lambda e: -e.elements)


def summary(table: list[TensorSparsity]) -> dict:
    elements = sum(e.elements for e in table)
    zeros = sum(e.zeros for e in table)
    return {"tensors": len(table), "elements": elements, "zeros": zeros,
            "sparsity": round(zeros / elements, 6) if elements else 0.0}
