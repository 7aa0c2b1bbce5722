"""A clustered weight read back from its decode subgraph, and new shared values written into it (for ``distill``).

``cluster`` stores a weight W as shared values decoded in the graph. Every form it writes for a MatMul / Gemm /
Conv weight is a chain

    Gather(axis 0: codebook T, idx) -> Reshape / Transpose / Gather(axis 1: act-order columns) -> Mul(scales s) -> ...

with T a scalar codebook [n] (per tensor, or per channel with global indices into one flat T) or a vector codebook
[k, d] (``matrix_vector``), float32 or float16 + Cast (``half_books``); idx and the column order integers computed
from constants alone (int32 constants with ``storage=unpacked``, bit streams unpacked by integer ops otherwise); s
the channel scales (absent without scales). Whatever the layout steps, W is linear in T for fixed s:

    W[p] = s[p] · T_flat[labels[p]]          (every position p of W)

``labels`` and s (broadcast to W's shape) are found by replaying the chain in NumPy on probes: T_flat = 0, 1, 2, ..
with s = 1 gives the labels (exact in float64), T = 1 gives s. So one least-squares refit over T (``onnxcompress.codebook_refit``,
vector codebooks included: their k·d values are the unknowns) serves every form. ``read_decode(graph, t)``
returns that ``Decode`` for the weight tensor ``t`` (None for anything else: hot-row table stages, tied decodes),
``set(T', s')`` writes new values into the stored constants (their own dtype; a constant read elsewhere is copied
first), so the indices — the sharing — never change. A weight clustered with ``storage=snap`` (values replaced in
place) is viewed the same way by ``snapped_values``: T its distinct values, no scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.constant_eval import integer_constant_values

#: layout steps a decode may take between its codebook Gather and the weight
LAYOUT_OPS = ("Reshape", "Transpose", "Gather", "Mul")


@dataclass
class Decode:
    """W = s · T_flat[labels] (module docstring): the stored codebook and scale constants and how to replay them."""

    book_holder: tuple[gs.Node, int]  # (node, input slot) holding the stored codebook constant
    scale_holder: tuple[gs.Node, int] | None  # (node, slot) holding the stored scale constant
    steps: list  # replay: ("gather0", idx) then ("reshape", shape) / ("transpose", perm) / ("gather", idx, axis) /
    #              ("mul",) in order from the codebook to the weight
    labels: np.ndarray  # int64 in W's shape: the flat codebook entry of every weight

    @staticmethod
    def _read(holder: tuple[gs.Node, int]) -> np.ndarray:
        node, slot = holder
        return np.asarray(node.inputs[slot].values)

    def codebook(self) -> np.ndarray:
        """T flattened (float64)."""
        return self._read(self.book_holder).astype(np.float64).reshape(-1)

    def scales(self) -> np.ndarray:
        """s broadcast to W's shape (ones without scales)."""
        if self.scale_holder is None:
            return np.ones(self.labels.shape)
        book = np.ones(self._read(self.book_holder).shape)
        return replay(self.steps, book, self._read(self.scale_holder).astype(np.float64))

    def scale_shape(self) -> tuple[int, ...] | None:
        return None if self.scale_holder is None else self._read(self.scale_holder).shape

    def weight(self) -> np.ndarray:
        scale = None if self.scale_holder is None else self._read(self.scale_holder).astype(np.float64)
        return replay(self.steps, self._read(self.book_holder).astype(np.float64), scale)

    def set(self, codebook: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Store new shared values T (flat) and, given, scales in the stored scale's shape; returns the decoded
        weight the graph now computes with (after rounding to the stored dtypes)."""
        _store(*self.book_holder, np.asarray(codebook))
        if scale is not None and self.scale_holder is not None:
            _store(*self.scale_holder, scale)
        return self.weight()


class SnappedValues:
    """A weight clustered with ``storage=snap`` (its values replaced in place): a constant with few distinct values
    in the whole tensor (one codebook) or in each output row (channel scales or per-channel codebooks make the rows'
    values differ), viewed as T = those values (per row: the rows' value sets one after the other), labels = which
    one each weight is, no scales. ``set`` writes T[labels] back into the constant (its dtype; copied first if read
    elsewhere), so each tensor, or each row, keeps at most as many values as it had."""

    def __init__(self, node: gs.Node, slot: int, book: np.ndarray, labels: np.ndarray):
        self.holder = (node, slot)
        self._book, self.labels = book.astype(np.float64), labels.astype(np.int64)
        self.scale_holder = None

    def codebook(self) -> np.ndarray:
        return self._book.copy()

    def scales(self) -> np.ndarray:
        return np.ones(self.labels.shape)

    def scale_shape(self) -> None:
        return None

    def weight(self) -> np.ndarray:
        return self._book[self.labels]

    def set(self, codebook: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        node, slot = self.holder
        dtype = np.asarray(node.inputs[slot].values).dtype
        self._book = np.asarray(codebook, np.float64).reshape(-1).astype(dtype).astype(np.float64)
        _store(node, slot, self._book[self.labels])
        return self.weight()


def _row_values(v: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each row's distinct values along ``axis`` (rows = positions on that axis), flattened row after row, the
    flat index of every weight, and the most values a row has."""
    moved = np.moveaxis(v, axis, 0)
    m = moved.reshape(moved.shape[0], -1)
    order = np.argsort(m, axis=1, kind="stable")
    srt = np.take_along_axis(m, order, axis=1)
    first = np.ones(srt.shape, bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    counts = first.sum(axis=1)
    ids_sorted = np.cumsum(first, axis=1) - 1 + (np.cumsum(counts) - counts)[:, None]
    ids = np.empty_like(ids_sorted)
    np.put_along_axis(ids, order, ids_sorted, axis=1)
    return srt[first], np.moveaxis(ids.reshape(moved.shape), 0, axis), int(counts.max())


def weight_output_axis(node: gs.Node) -> int:
    """The output-channel axis of a layer's weight (input 1): Conv 0, MatMul / ConvTranspose 1, Gemm by transB."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1 if node.op in ("MatMul", "ConvTranspose") else 0


def _few_valued_candidate(node: gs.Node, slot: int, axis: int, max_values: int, min_size: int) -> np.ndarray | None:
    """The float constant at ``node.inputs[slot]`` if it can hold few values per row: at least 2-D, ``min_size``
    elements, and its first row along ``axis`` has at most ``max_values`` distinct values (a row with more rules out
    both the tensor's and every row's limit, without sorting the whole tensor); else None."""
    t = node.inputs[slot]
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.dtype.kind != "f" or v.ndim < 2 or v.size < min_size:
        return None
    return v if len(np.unique(np.moveaxis(v, axis, 0)[0])) <= max_values else None


def snapped_rows(node: gs.Node, slot: int, axis: int, max_values: int = 256, min_row_use: int = 4,
                 min_size: int = 32) -> SnappedValues | None:
    """The ``SnappedValues`` view of the float constant at ``node.inputs[slot]`` when every output row (along
    ``axis``) has at most ``max_values`` distinct values, each used ``min_row_use`` times in its row on average
    (``storage=snap`` with channel scales), else None."""
    v = _few_valued_candidate(node, slot, axis, max_values, min_size)
    if v is None:
        return None
    book, labels, most = _row_values(v, axis)
    return SnappedValues(node, slot, book, labels) if most <= max_values and v.size >= min_row_use * book.size \
        else None


def snapped_values(node: gs.Node, slot: int, axis: int, max_values: int = 256, min_use: int = 16,
                   min_row_use: int = 4) -> SnappedValues | None:
    """The ``SnappedValues`` view of the float constant at ``node.inputs[slot]`` (output rows along ``axis``) when
    the tensor has at most ``max_values`` distinct values, each used ``min_use`` times on average, else when every
    row has (``snapped_rows``) (what ``storage=snap`` leaves; a trained float weight has as many values as
    weights), else None."""
    v = _few_valued_candidate(node, slot, axis, max_values, 2 * min_use)
    if v is None:
        return None
    uniq, inv = np.unique(v, return_inverse=True)
    if len(uniq) <= max_values and v.size >= min_use * len(uniq):
        return SnappedValues(node, slot, uniq, inv.reshape(v.shape))
    return snapped_rows(node, slot, axis, max_values, min_row_use, 2 * min_use)


def replay(steps: list, book: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The decode chain evaluated in NumPy (float64) on codebook ``book`` and scales ``scale``."""
    out = book
    for step in steps:
        kind = step[0]
        if kind == "gather0":
            out = np.take(out, step[1], axis=0)
        elif kind == "reshape":
            out = out.reshape(step[1])
        elif kind == "transpose":
            out = np.transpose(out, step[1])
        elif kind == "gather":
            out = np.take(out, step[1], axis=step[2])
        elif kind == "mul" and scale is not None:
            out = out * scale
    return out


def _store(node: gs.Node, slot: int, value: np.ndarray) -> None:
    t = node.inputs[slot]
    old = np.asarray(t.values)
    new = np.asarray(value, dtype=np.float64).reshape(old.shape).astype(old.dtype)
    if len({id(c) for c in t.outputs}) > 1:  # read elsewhere too: this decode gets its own copy
        node.inputs[slot] = gs.Constant(f"{t.name}_distilled_{id(node) % 100000}", new)
    else:
        t.values = new


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _float_constant_holder(node: gs.Node, slot: int) -> tuple[gs.Node, int] | None:
    """Where the float constant read at ``node.inputs[slot]`` is stored: that slot, or the float16 constant behind a
    Cast to float32 read by this node alone."""
    t = node.inputs[slot]
    if isinstance(t, gs.Constant):
        return (node, slot) if np.asarray(t.values).dtype.kind == "f" else None
    cast = _producer(t)
    if cast is not None and cast.op == "Cast" and int(cast.attrs.get("to", 0)) == onnx.TensorProto.FLOAT \
            and len(t.outputs) == 1 and isinstance(cast.inputs[0], gs.Constant) \
            and np.asarray(cast.inputs[0].values).dtype == np.float16:
        return (cast, 0)
    return None


def _integers(t: gs.Tensor, folded: dict[str, np.ndarray]) -> np.ndarray | None:
    v = np.asarray(t.values) if isinstance(t, gs.Constant) else folded.get(t.name)
    return v.astype(np.int64) if v is not None and v.dtype.kind in "iu" else None


def _step(node: gs.Node, folded: dict[str, np.ndarray]) -> tuple[tuple | None, gs.Tensor | None, tuple | None]:
    """One layout step read backwards: (replay step, the tensor it reads, the scale holder of a Mul); None: not a
    decode step."""
    if node.op == "Reshape" and len(node.inputs) == 2:
        shape = _integers(node.inputs[1], folded)
        if shape is None or (shape == 0).any():
            return None, None, None
        return ("reshape", tuple(int(v) for v in shape)), node.inputs[0], None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return (("transpose", tuple(perm)) if perm is not None else None), node.inputs[0], None
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) != 0:
        idx = _integers(node.inputs[1], folded)
        return (("gather", idx, int(node.attrs["axis"])) if idx is not None else None), node.inputs[0], None
    if node.op == "Mul" and len(node.inputs) == 2:
        for slot in (1, 0):
            holder = _float_constant_holder(node, slot)
            if holder is not None and not isinstance(node.inputs[1 - slot], gs.Constant):
                return ("mul",), node.inputs[1 - slot], holder
    return None, None, None


def read_decode(graph: gs.Graph, t: gs.Tensor, folded: dict[str, np.ndarray] | None = None) -> Decode | None:
    """The decode that computes weight ``t`` from shared values, or None. ``folded``:
    ``integer_constant_values(graph)`` when the caller reads several weights (evaluated here otherwise)."""
    if isinstance(t, gs.Constant):
        return None
    folded = integer_constant_values(graph) if folded is None else folded
    steps: list = []
    scale_holder = None
    cur = t
    for _ in range(8):
        node = _producer(cur)
        if node is None:
            return None
        if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
            book_holder = _float_constant_holder(node, 0)
            idx = _integers(node.inputs[1], folded)
            if book_holder is None or idx is None:
                return None
            steps.append(("gather0", idx))
            steps.reverse()
            book = np.asarray(book_holder[0].inputs[book_holder[1]].values)
            if book.ndim not in (1, 2) or book.size >= 1 << 50:
                return None
            try:
                probe = replay(steps, np.arange(book.size, dtype=np.float64).reshape(book.shape), None)
                dec = Decode(book_holder, scale_holder, steps, probe.astype(np.int64))
                if dec.scales().shape != probe.shape:
                    return None
            except (ValueError, IndexError):
                return None
            return dec
        if node.op not in LAYOUT_OPS or len(cur.outputs) != 1:
            return None
        step, src, holder = _step(node, folded)
        if step is None or (holder is not None and scale_holder is not None):
            return None  # not a layout step, or a second scale
        scale_holder = holder or scale_holder
        steps.append(step)
        cur = src
    return None


__all__ = ["Decode", "SnappedValues", "read_decode", "replay", "snapped_rows", "snapped_values", "weight_output_axis"]
