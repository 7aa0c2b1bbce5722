"""Which layers ``distill`` refits, and in which stage.

A layer is a weighted node whose output the teacher has under the same name: Conv (``conv``), depthwise Conv
(``dwconv``: one small system per channel), Gemm (``gemm``), MatMul with a constant 2-D weight (``matmul``, with the
bias of the Add that follows it); grouped Conv and ConvTranspose get bias correction only (``bias``). A weight
``cluster`` stores as shared values (a scalar decode, ``analyses.shared_values``) counts as the layer's weight: its
shared values and channel scales are refit (``layer_solve``), a depthwise one with a Gram per channel. A layer is
refit when its input differs from the teacher's (downstream of a cut or of modified weights: "changed" tensors
propagate through the graph in topological order) or its own weights differ beyond the slicing the channel map
describes (pruned, quantized); ``layers=all`` refits every layer.

Stage of a layer = 1 + the largest stage of the refit layers upstream of it (its input's depth): a stage is refit
only after every earlier one, on inputs the already refit student produces, so errors do not pile up.

Residual targets (``compensate``): a layer whose output only feeds Add(y, other), other an activation, is fit to
teacher(Add) - student(other); when every consumer of that sum is a LayerNormalization over the last axis, the
rows are weighted by 1 / std of the teacher's sum (``ln_weight``; see ``stage_statistics``).

Tied weights (``_tie``): the refit layers that read one weight tensor (ALBERT's shared layers) form a group
(``Layer.tied``) refit once, at the stage of its last reader, from the sum of its readers' normal equations
(``tied_solve``); a reader that is unchanged on its own is refit with them. Each reader fits the teacher's own
output, not a residual target: the teacher's weight meets all its readers' own targets at once, while the error
each residual target asks a reader to absorb is its block's own (one matrix cannot supply a different correction
per block) and moves as the shared weight upstream changes. A small ALBERT (3 layers sharing 6 weights) after
prune-channels{target_macs=0.7}: SQNR 30.0 dB pruned, 30.7 refit on residual targets, 41.4 on plain ones (41.7
untied, at 1.6x the parameters). A weight also read by something that is
not such a layer keeps its values (refitting it for one reader would copy it: the file would grow back).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import mmap_weights
from onnxcompress.analyses.channel_groups import toposort
from onnxcompress.analyses.shared_values import SnappedValues, read_decode
from onnxcompress.constant_eval import integer_constant_values

from .normal_equations import Normal
from .weight_refs import WeightRef


@dataclass
class Layer:
    node: gs.Node
    kind: str  # conv, dwconv, gemm, matmul, bias (bias correction only)
    x: str  # student input activation
    y: str  # output tensor matched against the teacher
    out_axis: int
    w: WeightRef | None
    b: WeightRef | None = None
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: bool = False
    trans_b: bool = False
    kept_out: np.ndarray | None = None  # teacher channel per student output channel
    res_out: str | None = (
        None  # residual Add this layer feeds (target: teacher(res_out) - student(res_other))
    )
    res_other: str | None = None
    ln_axis: int | None = None  # res_out is normalised over this axis (LayerNormalization): rows weigh 1/std
    stage: int = 0
    reason: str = ""
    stats: Normal | None = None
    hold: Normal | None = None  # statistics of the held-out feeds (ridge selection)
    bias_sum: np.ndarray | None = None
    bias_count: int = 0
    tied: list[Layer] | None = field(default=None, compare=False, repr=False)  # every reader of this layer's (tied) weight, refit together (``tied_solve``)


def find_layers(graph: gs.Graph, teacher: onnx.ModelProto, cmap: dict, *, layers: str = "changed",
                compensate: bool = True, ln_weight: bool = True) -> tuple[list[Layer], Counter]:
    """The layers to refit, each with its stage, and why others were skipped (reason -> count). ``cmap``: the
    run's channel map (tensor -> axis -> kept teacher positions). Readers of one tied weight are grouped
    (``Layer.tied``, see ``_tie``); a reader that would not be refit on its own is refit with the others (and what
    follows it counts as changed)."""
    forced: set[int] = set()
    while True:
        found, skipped, candidates = _discover(graph, teacher, cmap, layers, compensate, ln_weight, forced)
        more = _tie(found, candidates)
        if not more - forced:
            return found, skipped
        forced |= more


def _discover(graph: gs.Graph, teacher: onnx.ModelProto, cmap: dict, layers: str, compensate: bool,
              ln_weight: bool, forced: set[int]) -> tuple[list[Layer], Counter, dict[int, Layer]]:
    """One walk of the graph: the refit layers with their stages, the skip reasons, and every layer the teacher
    has an output for (node id -> Layer, refit or not); nodes in ``forced`` (ids) are refit whatever they read."""
    teacher_outputs = {o for n in teacher.graph.node for o in n.output if o}
    teacher_weights = _teacher_weights(teacher)
    skipped: Counter = Counter()
    changed: set[str] = set(cmap)
    depth: dict[str, int] = {}
    found: list[Layer] = []
    candidates: dict[int, Layer] = {}
    tensors = graph.tensors()
    decodes = _decode_reader(graph)
    graph_out = {id(t) for t in graph.outputs}
    for node in toposort(graph):
        d_in = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        in_changed = any(t.name in changed for t in node.inputs if isinstance(t, gs.Variable))
        L = _make_layer(node, decodes)
        node_changed = in_changed
        refit = False
        if L is not None:
            if L.y not in teacher_outputs:
                skipped["output not in the teacher"] += 1
                L = None
        if L is not None:
            candidates[id(node)] = L
            L.kept_out = _kept(cmap, L.y, L.out_axis)
            if compensate:
                _residual_target(L, tensors, graph_out, teacher_outputs, ln_weight)
            modified = _weights_modified(L, teacher_weights, cmap) or id(node) in forced
            node_changed = node_changed or modified
            if layers == "all" or in_changed or modified:
                L.stage = d_in + 1
                found.append(L)
                refit = True
        out_depth = L.stage if refit else d_in
        for t in node.outputs:
            depth[t.name] = out_depth
            if node_changed:
                changed.add(t.name)
        if L is not None and L.y != node.outputs[0].name:  # MatMul + bias Add: the Add output too
            depth[L.y] = out_depth
            if node_changed:
                changed.add(L.y)
    return found, skipped, candidates


TIED_KINDS = ("conv", "gemm", "matmul")


def _tie(found: list[Layer], candidates: dict[int, Layer]) -> set[int]:
    """Group the refit layers that read one weight (a constant, or one DequantizeLinear of an integer constant,
    read by several nodes: ALBERT's shared layers, tied projections) into ``Layer.tied`` (readers in graph order),
    all at the stage of the last reader, so the weight is refit once from its readers' summed normal equations
    (``tied_solve``) and stays one tensor. A group every reader of which is a layer of one kind and layout
    (conv, gemm, matmul) is refit; otherwise its readers keep their weights (``Layer.reason``: refitting one of
    them would untie it). Returns the ids of readers that are layers but not refit yet (to be forced)."""
    by_key: dict[int, list[Layer]] = {}
    for L in found:
        if L.kind == "bias":
            continue  # bias correction only: the weight is never written
        t = L.node.inputs[L.w.index]
        users = [(n, i) for n in t.outputs for i, x in enumerate(n.inputs) if x is t]
        shared_q = L.w.dq is not None and len({id(n) for n in L.w.dq.inputs[0].outputs}) > 1
        if len(users) > 1 or shared_q:
            by_key.setdefault(id(t), []).append(L)
    force: set[int] = set()
    for group in by_key.values():
        t = group[0].node.inputs[group[0].w.index]
        users = [(n, i) for n in t.outputs for i, x in enumerate(n.inputs) if x is t]
        readers = [candidates.get(id(n)) for n, _ in users]
        why = _untieable(group[0], users, readers)
        if why is None:
            missing = {id(n) for n, _ in users} - {id(L.node) for L in group}
            if missing:
                force |= missing
                continue
            stage = max(L.stage for L in group)
            for L in group:  # the teacher's own outputs as targets: see the module docstring
                L.stage, L.tied = stage, group
                L.res_out = L.res_other = L.ln_axis = None
        else:
            for L in group:
                L.reason = f"tied weight {why}: kept"
    return force


def _untieable(first: Layer, users: list, readers: list) -> str | None:
    """Why a tied weight's readers cannot be refit together (None: they can)."""
    if first.w.dq is not None and len({id(n) for n in first.w.dq.inputs[0].outputs}) > 1:
        return "read through several DequantizeLinear"
    for (n, i), R in zip(users, readers, strict=True):
        if R is None or R.w is None or R.w.index != i:
            return f"also read by {n.op} {n.name!r}"
        if R.kind not in TIED_KINDS or R.w.decode is not None:
            return f"read by a {R.kind} layer{' (clustered)' if R.w.decode is not None else ''}"
        if R.kind != first.kind or (R.alpha, R.trans_b) != (first.alpha, first.trans_b):
            return "read in different layouts"
    return None


def _decode_reader(graph: gs.Graph):
    """Reads a clustered weight's scalar decode (``analyses.shared_values``); the integer constants of the graph (the
    unpacked indices) are evaluated once, on the first weight that is not a constant."""
    folded: dict | None = None

    def read(t: gs.Tensor):
        nonlocal folded
        if folded is None:
            folded = integer_constant_values(graph)
        return read_decode(graph, t, folded)

    return read


def _make_layer(node: gs.Node, decodes=None) -> Layer | None:
    op = node.op
    if (
        node.domain not in (None, "", "ai.onnx")
        or not node.inputs
        or not isinstance(node.inputs[0], gs.Variable)
    ):
        return None
    x = node.inputs[0].name
    if op == "Conv":
        w = WeightRef.resolve(node, 1, decodes)
        if w is None:
            return None
        wv = w.get()
        group = int(node.attrs.get("group", 1))
        b = WeightRef.resolve(node, 2)
        if group == 1:
            kind = "conv"
        elif wv.shape[1] == 1:
            kind = "dwconv"
        else:
            kind = "bias"
        return Layer(node, kind, x, node.outputs[0].name, 1, w, b)
    if op == "ConvTranspose":
        w = WeightRef.resolve(node, 1)
        if w is None:
            return None
        return Layer(node, "bias", x, node.outputs[0].name, 1, w, WeightRef.resolve(node, 2))
    if op == "Gemm":
        w = WeightRef.resolve(node, 1, decodes)
        if w is None:
            return None
        b = WeightRef.resolve(node, 2)
        n = w.get().shape[0 if node.attrs.get("transB", 0) else 1]
        if b is not None and b.get().size != n:
            return None  # a C that varies along M cannot be refit per output
        return Layer(
            node,
            "gemm",
            x,
            node.outputs[0].name,
            1,
            w,
            b,
            alpha=float(node.attrs.get("alpha", 1.0)),
            beta=float(node.attrs.get("beta", 1.0)),
            trans_a=bool(node.attrs.get("transA", 0)),
            trans_b=bool(node.attrs.get("transB", 0)),
        )
    if op == "MatMul":
        w = WeightRef.resolve(node, 1, decodes)
        if w is None or w.get().ndim != 2:
            return None
        y = node.outputs[0]
        b = None
        yname = y.name
        if len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            other = 1 if add.inputs[0] is y else 0
            ref = WeightRef.resolve(add, other)
            if ref is not None and ref.get().size == w.get().shape[1] and ref.get().ndim == 1:
                b = ref
                yname = add.outputs[0].name
        return Layer(node, "matmul", x, yname, -1, w, b)
    return None


def _residual_target(L: Layer, tensors: dict, graph_out: set[int], teacher_outputs: set[str],
                     ln_weight: bool = True) -> None:
    """If the layer's output only feeds Add(y, other) with ``other`` an activation, fit teacher(sum) - other; note
    the LayerNormalization axis when every consumer of the sum normalises it over one axis."""
    y = tensors.get(L.y)
    if y is None or len(y.outputs) != 1 or y.outputs[0].op != "Add" or id(y) in graph_out:
        return
    add = y.outputs[0]
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    out = add.outputs[0].name
    if isinstance(other, gs.Variable) and other.name and out in teacher_outputs:
        L.res_out, L.res_other = out, other.name
        total = add.outputs[0]
        users = total.outputs
        if ln_weight and users and all(u.op == "LayerNormalization" and u.inputs[0] is total for u in users):
            axes = {int(u.attrs.get("axis", -1)) for u in users}
            if axes == {-1} or (total.shape is not None and axes == {len(total.shape) - 1}):
                L.ln_axis = -1


def _kept(cmap: dict, name: str, axis: int) -> np.ndarray | None:
    entry = cmap.get(name)
    if not entry:
        return None
    if axis >= 0:
        return entry.get(axis)
    return entry.get(max(entry)) if len(entry) == 1 else None


def _teacher_weights(teacher: onnx.ModelProto) -> dict[str, np.ndarray]:
    """output tensor name -> weight of the node producing it (Conv/ConvTranspose/Gemm/MatMul)."""
    inits = {t.name: t for t in teacher.graph.initializer}
    out = {}
    for n in teacher.graph.node:
        if (
            n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and len(n.input) > 1
            and n.input[1] in inits
        ):
            out[n.output[0]] = inits[n.input[1]]
    return out


def _weights_modified(L: Layer, teacher_weights: dict, cmap: dict) -> bool:
    """Whether the layer's weights differ from the teacher's beyond slicing (pruned weights, quantization...)."""
    if L.w.quantized or L.w.decode is not None and not isinstance(L.w.decode, SnappedValues):
        return True  # a decode in the graph: the teacher's weight is a plain constant
    t = teacher_weights.get(L.node.outputs[0].name)
    if t is None:
        return False
    tw = mmap_weights.tensor_array(t)
    sw = np.asarray(L.node.inputs[1].values)
    if tw.shape == sw.shape:
        return not np.array_equal(tw, sw)
    # sliced: compare on the kept positions when the maps are known
    kin = _kept(cmap, L.x, 1 if L.kind != "matmul" else -1)
    kout = L.kept_out
    try:
        if L.kind in ("conv", "dwconv", "bias"):
            if kout is not None:
                tw = tw[kout]
            if kin is not None and L.kind == "conv":
                tw = tw[:, kin]
        elif L.kind == "matmul":
            if kin is not None:
                tw = tw[kin]
            if kout is not None:
                tw = tw[:, kout]
        else:
            return True
    except IndexError:
        return True
    return tw.shape != sw.shape or not np.array_equal(tw, sw)
