"""Which weights ``prune-weights`` zeroes, and how each is seen as a matrix.

A target is one float constant read as the weight of Conv / ConvTranspose / Gemm / MatMul (and, on request, the
table of an embedding Gather). Every weight is viewed as a matrix V [rows, cols] whose rows are outputs and whose
columns are the reduction (input) dimension of the layer, y_row = Σ_col V[row, col] · x_col, with the N:M axis
fastest along the columns:

- MatMul x @ B, B [K, N]: V = B^T (cols: K); MatMul A @ x, A [M, K]: V = A (cols: K);
- Gemm: V = B^T, or B with transB (cols: K);
- Conv W [Cout, Cin/g, k...]: V = W moved to [Cout, k..., Cin/g] (cols: kernel position major, input channel minor,
  so M consecutive columns are M input channels at one kernel position — the N:M pattern sparse kernels expect);
  group g's columns read the input channels [g·Cin/g, (g+1)·Cin/g);
- ConvTranspose W [Cin, Cout/g, k...] (group 1): V = W moved to [Cout, k..., Cin] flattened to [Cout·k, Cin];
- Gather(table [V, D], ids) with axis 0 (``embeddings``): V = table (cols: D; no activation-aware score).

The design rows X of a layer (the activation-aware scores' statistics: X^T X, from the shared
``ActivationStatistics`` store) are built so that y = X V^T on those rows: the input's channels-last rows for
MatMul / Gemm / ConvTranspose, im2col patches of random output positions for a Conv
(``onnxcompress.analyses.conv_rows``) with the same (kernel position, channel) column order as V.

Skip rules (each skip with its reason): a weight that is not a float constant (a graph input, an activation,
DequantizeLinear output), the first and last weighted layers (``keep_first_last``: layers no weighted layer feeds /
layers that feed no weighted layer), fewer than ``min_params`` elements, depthwise convolutions, names matching
``exclude``, and for N:M a reduction axis not divisible by M.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.channel_groups import toposort
from onnxcompress.analyses.conv_rows import conv_output_spatial, conv_rows

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_KINDS = "f"


@dataclass
class Target:
    """One prunable weight: the constant, the node reading it, and its matrix view."""

    const: gs.Constant
    node: gs.Node
    kind: str  # matmul, matmul_left, gemm, conv, convT, embedding
    groups: int = 1
    #: the length of the reduction sub-axis N:M groups run along (Cin/g, K, Cin, D)
    nm_len: int = 0
    #: key and builder of the design rows (None: no activation-aware score for this weight)
    rows_key: str | None = None
    rows_fn: Callable[[np.ndarray], np.ndarray] | None = None
    x_name: str | None = None
    #: columns of the full Gram matrix that group g reads (grouped Conv); None: all columns, one group
    group_cols: list[np.ndarray] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.const.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.asarray(self.const.values).shape)

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as V [rows, cols] (see the module docstring)."""
        if self.kind == "matmul":
            return w.T
        if self.kind == "gemm":
            return w if self.extra.get("trans_b") else w.T
        if self.kind == "conv":
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        if self.kind == "convT":
            return np.moveaxis(w, 0, -1).reshape(-1, w.shape[0])
        return w  # matmul_left, embedding

    def from_matrix(self, v: np.ndarray) -> np.ndarray:
        shape = self.shape
        if self.kind == "matmul":
            return v.T
        if self.kind == "gemm":
            return v if self.extra.get("trans_b") else v.T
        if self.kind == "conv":
            return np.moveaxis(v.reshape((shape[0], *shape[2:], shape[1])), -1, 1)
        if self.kind == "convT":
            return np.moveaxis(v.reshape((*shape[1:], shape[0])), -1, 0)
        return v

    def row_groups(self, n_rows: int) -> list[np.ndarray]:
        """Rows of V per group (grouped Conv: output channels of group g; else all rows)."""
        return [np.arange(n_rows)] if self.groups == 1 else np.array_split(np.arange(n_rows), self.groups)


def _float_const(t) -> bool:
    return isinstance(t, gs.Constant) and np.asarray(t.values).dtype.kind in FLOAT_KINDS


def _rng_for(key: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _last_axis_rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def _make_target(node: gs.Node, rows_per_feed: int, seed: int) -> tuple[Target | None, str]:
    """The target a node reads as its weight, or (None, why not) — ("" when the node has no weight at all)."""
    op = node.op
    if node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
        return None, ""
    if op == "MatMul":
        a, b = node.inputs[0], node.inputs[1]
        if _float_const(b) and np.asarray(b.values).ndim == 2 and not isinstance(a, gs.Constant):
            k = np.asarray(b.values).shape[0]
            return Target(b, node, "matmul", nm_len=k, rows_key=f"rows:{a.name}", rows_fn=_last_axis_rows,
                          x_name=a.name), ""
        if _float_const(a) and np.asarray(a.values).ndim == 2 and not isinstance(b, gs.Constant):
            k = np.asarray(a.values).shape[1]
            return Target(a, node, "matmul_left", nm_len=k, rows_key=f"cols:{b.name}",
                          rows_fn=lambda x: np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2]), x_name=b.name), ""
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
            return None, "constant operand is not a 2-D float matrix"
        return None, "weight is a graph input" if (isinstance(b, gs.Variable) and not b.inputs) else ""
    w = node.inputs[1]
    if not _float_const(w):
        return None, "weight is not a float constant"
    wv = np.asarray(w.values)
    x = node.inputs[0]
    if op == "Gemm":
        trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
        k = wv.shape[1] if trans_b else wv.shape[0]
        rows = (lambda a: a.T) if trans_a else (lambda a: a)
        return Target(w, node, "gemm", nm_len=k, rows_key=f"gemm{int(trans_a)}:{x.name}", rows_fn=rows,
                      x_name=x.name, extra={"trans_b": trans_b}), ""
    group = int(node.attrs.get("group", 1))
    if op == "Conv":
        if wv.ndim < 3:
            return None, "Conv weight of rank < 3"
        cin_g = wv.shape[1]
        depthwise = group > 1 and cin_g == 1
        key = (f"im2col:{x.name}:{wv.shape[2:]}:{node.attrs.get('strides')}:{node.attrs.get('dilations')}:"
               f"{node.attrs.get('pads')}:{node.attrs.get('auto_pad')}")
        rng = _rng_for(key, seed)

        def conv_design_rows(a: np.ndarray, node=node, shape=wv.shape, rng=rng) -> np.ndarray:
            out = conv_output_spatial(node, shape, a.shape[2:])
            patches, _ = conv_rows(a, node, shape, out, rows_per_feed, rng)
            return np.moveaxis(patches, 1, -1).reshape(patches.shape[0], -1)

        t = Target(w, node, "conv", groups=group, nm_len=cin_g, rows_key=key, rows_fn=conv_design_rows,
                   x_name=x.name, extra={"depthwise": depthwise})
        if group > 1:
            k = int(np.prod(wv.shape[2:]))
            cin = cin_g * group
            t.group_cols = [(np.arange(k)[:, None] * cin + g * cin_g + np.arange(cin_g)[None, :]).reshape(-1)
                            for g in range(group)]
        return t, ""
    if op == "ConvTranspose":
        if wv.ndim < 3:
            return None, "ConvTranspose weight of rank < 3"
        if group != 1:
            return Target(w, node, "convT", groups=1, nm_len=wv.shape[0], extra={"grouped": True}), ""
        return Target(w, node, "convT", nm_len=wv.shape[0], rows_key=f"pixels:{x.name}",
                      rows_fn=lambda a: np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]), x_name=x.name), ""
    return None, ""


def _embedding_target(node: gs.Node) -> Target | None:
    if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or not node.inputs:
        return None
    table = node.inputs[0]
    if not _float_const(table) or np.asarray(table.values).ndim != 2:
        return None
    return Target(table, node, "embedding", nm_len=np.asarray(table.values).shape[1])


def find_targets(graph: gs.Graph, *, embeddings: bool, keep_first_last: bool, min_params: int,
                 skip_depthwise: bool, exclude: tuple[str, ...], nm: tuple[int, int] | None,
                 rows_per_feed: int, seed: int = 0) -> tuple[list[Target], dict[str, str]]:
    """The weights to prune (in topological order) and the skipped ones: {weight or node name: reason}."""
    order = toposort(graph)
    found: list[Target] = []
    skipped: dict[str, str] = {}
    for node in order:
        t, why = _make_target(node, rows_per_feed, seed) if node.op in WEIGHT_OPS else (None, "")
        if t is None and embeddings and node.op == "Gather":
            t = _embedding_target(node)
        if t is None:
            if why:
                skipped[node.inputs[1].name or node.name] = why
            continue
        found.append(t)
    first, last = _first_last(order, {id(t.node) for t in found if t.kind != "embedding"})
    by_const: dict[int, list[Target]] = {}
    for t in found:
        by_const.setdefault(id(t.const), []).append(t)
    kept: list[Target] = []
    for t in found:
        reason = ""
        size = int(np.prod(t.shape))
        if len(by_const[id(t.const)]) > 1 or len({id(n) for n in t.const.outputs}) > 1:
            reason = "weight shared by several nodes"
        elif exclude and any(fnmatch.fnmatchcase(n, p) for p in exclude for n in (t.name, t.node.name or "")):
            reason = "excluded by name"
        elif keep_first_last and id(t.node) in first:
            reason = "first layer (keep_first_last)"
        elif keep_first_last and id(t.node) in last:
            reason = "last layer (keep_first_last)"
        elif size < min_params:
            reason = f"fewer than min_params={min_params} elements"
        elif skip_depthwise and t.extra.get("depthwise"):
            reason = "depthwise convolution"
        elif nm is not None and t.nm_len % nm[1]:
            reason = f"reduction axis of {t.nm_len} not divisible by M={nm[1]}"
        if reason:
            skipped[t.name] = reason
        else:
            kept.append(t)
    return kept, skipped


def _first_last(order: list[gs.Node], weighted: set[int]) -> tuple[set[int], set[int]]:
    """Weighted nodes with no weighted node upstream (first) / downstream (last): two linear sweeps."""
    after_weighted: set[str] = set()  # tensors downstream of a weighted node
    first: set[int] = set()
    for node in order:
        up = any(t.name in after_weighted for t in node.inputs if isinstance(t, gs.Variable))
        if id(node) in weighted and not up:
            first.add(id(node))
        if up or id(node) in weighted:
            after_weighted.update(t.name for t in node.outputs)
    feeds_weighted: set[str] = set()  # tensors with a weighted node downstream
    last: set[int] = set()
    for node in reversed(order):
        down = any(t.name in feeds_weighted for t in node.outputs)
        if id(node) in weighted and not down:
            last.add(id(node))
        if down or id(node) in weighted:
            feeds_weighted.update(t.name for t in node.inputs if isinstance(t, gs.Variable))
    return first, last
