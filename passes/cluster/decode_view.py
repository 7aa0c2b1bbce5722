"""A clustered weight read back from its decode subgraph, and new shared values written into it (for ``distill``).

``cluster`` stores a weight W of shape ``shape`` as scalar shared values decoded in the graph:

    W = reshape(c[idx], shape) * s

with c the codebook (float32, or float16 + Cast: ``half_books``), idx integers computed from constants alone (an
int32 constant with ``storage=unpacked``, bit streams unpacked by integer ops with ``storage=codebook``; a per-channel
codebook uses global indices into one flat c) and s the channel scales broadcast over W (absent without scales).
``scalar_decode(t)`` recognises that chain ending at the weight tensor ``t`` and returns a ``ScalarDecode``:
``labels`` (idx in W's shape), ``codebook()``, ``scales()`` (s broadcast to W), ``weight()`` = c[labels] * s, and
``set(c', s')`` writes new values into the stored constants (their own dtype; a constant read elsewhere is copied
first), so the packed indices — the sharing — never change. Vector codes, act-order and hot-row decodes are not
scalar: None (their layers are left to ``distill{mode=train}``, which trains any decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxcompress.passes.cleanup.constant_folding import integer_constant_values


@dataclass
class ScalarDecode:
    """W = reshape(c[labels], shape) * s, read from the graph (see the module docstring)."""

    gather: gs.Node
    book_holder: tuple[gs.Node, int]  # (node, input slot) holding the stored codebook constant
    labels: np.ndarray  # int64, W's shape
    scale_holder: tuple[gs.Node, int] | None  # (Mul, slot) holding the scale constant

    def codebook(self) -> np.ndarray:
        node, slot = self.book_holder
        return np.asarray(node.inputs[slot].values).astype(np.float64).reshape(-1)

    def scales(self) -> np.ndarray:
        if self.scale_holder is None:
            return np.ones(self.labels.shape)
        node, slot = self.scale_holder
        s = np.asarray(node.inputs[slot].values).astype(np.float64)
        return np.broadcast_to(s, self.labels.shape)

    def weight(self) -> np.ndarray:
        return self.codebook()[self.labels] * self.scales()

    def set(self, codebook: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Store new shared values (and scales, given the stored scale's shape); returns the decoded weight the
        graph now computes with (after rounding to the stored dtypes)."""
        _store(*self.book_holder, np.asarray(codebook).reshape(-1))
        if scale is not None and self.scale_holder is not None:
            _store(*self.scale_holder, scale)
        return self.weight()


def _store(node: gs.Node, slot: int, value: np.ndarray) -> None:
    t = node.inputs[slot]
    old = np.asarray(t.values)
    new = np.asarray(value, dtype=np.float64).reshape(old.shape).astype(old.dtype)
    if len({id(c) for c in t.outputs}) > 1:  # read elsewhere too: this decode gets its own copy
        node.inputs[slot] = gs.Constant(f"{t.name}_distilled_{id(node) % 100000}", new)
    else:
        t.values = new


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].op == op else None


def _float_constant_holder(node: gs.Node, slot: int) -> tuple[gs.Node, int] | None:
    """Where the float constant read at ``node.inputs[slot]`` is stored: that slot, or the float16 constant behind a
    Cast to float32."""
    t = node.inputs[slot]
    if isinstance(t, gs.Constant):
        return (node, slot) if np.asarray(t.values).dtype.kind == "f" else None
    cast = _producer(t, "Cast")
    if cast is not None and int(cast.attrs.get("to", 0)) == onnx.TensorProto.FLOAT and len(t.outputs) == 1 \
            and isinstance(cast.inputs[0], gs.Constant) and np.asarray(cast.inputs[0].values).dtype == np.float16:
        return (cast, 0)
    return None


def scalar_decode(graph: gs.Graph, t: gs.Tensor, folded: dict[str, np.ndarray] | None = None) -> ScalarDecode | None:
    """The scalar decode that computes ``t``, or None. ``folded``: ``integer_constant_values(graph)`` when the caller
    reads several weights (evaluated here otherwise)."""
    if isinstance(t, gs.Constant):
        return None
    scale_holder = None
    mul = _producer(t, "Mul")
    if mul is not None:
        if len(mul.inputs) != 2:
            return None
        slot = next((i for i in (1, 0) if _producer(mul.inputs[1 - i], "Reshape") is not None), None)
        scale_holder = _float_constant_holder(mul, slot) if slot is not None else None
        if scale_holder is None:
            return None
        t = mul.inputs[1 - slot]
        if len(t.outputs) != 1:
            return None
    reshape = _producer(t, "Reshape")
    if reshape is None or not isinstance(reshape.inputs[1], gs.Constant) or len(reshape.inputs[0].outputs) != 1:
        return None
    gather = _producer(reshape.inputs[0], "Gather")
    if gather is None or int(gather.attrs.get("axis", 0)) != 0:
        return None
    book_holder = _float_constant_holder(gather, 0)
    if book_holder is None or np.asarray(book_holder[0].inputs[book_holder[1]].values).ndim != 1:
        return None
    idx = gather.inputs[1]
    if isinstance(idx, gs.Constant):
        flat = np.asarray(idx.values)
    else:
        folded = integer_constant_values(graph) if folded is None else folded
        flat = folded.get(idx.name)
    if flat is None or flat.dtype.kind not in "iu":
        return None
    try:
        labels = np.reshape(flat.astype(np.int64), np.asarray(reshape.inputs[1].values).astype(np.int64))
    except ValueError:
        return None
    dec = ScalarDecode(gather, book_holder, labels, scale_holder)
    if scale_holder is not None:
        s = np.asarray(scale_holder[0].inputs[scale_holder[1]].values)
        try:
            if np.broadcast_shapes(s.shape, labels.shape) != labels.shape:
                return None
        except ValueError:
            return None
    return dec


__all__ = ["ScalarDecode", "scalar_decode"]
