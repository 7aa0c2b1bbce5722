"""``cleanup``: exact graph simplification.

Every rewrite leaves the model's outputs equal (up to float rounding of the BN fold) and keeps the names, dtypes and
order of the graph outputs; graph inputs are never removed. Rewrites, repeated until none applies:

* **Dead code.** Nodes that contribute to no graph output are dropped (``Graph.cleanup``, subgraphs included). A
  tensor a subgraph reads from an enclosing scope counts as used. Initializers nobody reads are not exported.
* **Identity / inference Dropout.** ``y = Identity(x)`` and ``y = Dropout(x)`` (mask unused, ``training_mode``
  absent or constant false; opset < 7 only with ``is_test=1``) are bypassed: consumers of ``y`` read ``x``. When ``y``
  is an output of its graph the producer of ``x`` is made to produce ``y`` instead, so the output name survives; if
  ``x`` is a graph input, an initializer, another output, or comes from an enclosing scope, the node stays.
* **Constant folding.** A node whose inputs are all constants is evaluated with onnxruntime (all optimisations
  off, so the very same kernels produce the value) and replaced by an initializer, provided that
  ``bytes(outputs) <= bytes(inputs) + fold_size_limit`` (Tile/Expand/ConstantOfShape/Range/Cast-up do not inflate
  the file). Never folded: nodes with subgraphs, random ops, Q/DQ (weight-only and QDQ patterns must stay for ORT),
  sequence/optional ops, non-default domains, values that are graph outputs. ``Shape``/``Size`` of a main-graph
  tensor fold only when its shape is static by *computed* shape inference from the graph inputs' declared static dims
  (declared value_info and output shapes are stripped first: they can be wrong).
* **BatchNormalization into Conv / ConvTranspose / Gemm.** With ``s = γ / sqrt(σ² + ε)`` per output channel::

      W' = W · s   (Conv: axis 0 of [Cout, Cin/g, k..]; ConvTranspose: axis 1 of [Cin, Cout/g, k..] per group;
                    Gemm: the N axis of B, i.e. rows if transB else columns)
      b' = (b − μ) · s + β           (Gemm: b = beta·C, then beta := 1)

  computed in float64 and cast back to the weight dtype; only when the producer's output feeds the BN alone and
  every weight is an initializer (a weight that is a graph input is a skip reason in stats).
* **Duplicate initializers.** Constants with the same dtype, shape and bytes (blake2b over the raw bytes, then a
  byte comparison) are merged into the first one met (main graph first); subgraphs then read the outer copy.

Not done on purpose (they make ORT CPU slower): folding Pad into Conv, MatMul+Add into Gemm.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxcompress.context import PassContext
from onnxcompress.errors import PassError
from onnxcompress.pass_base import Pass, PassResult, register

from ._graph_utils import (
    all_graphs,
    all_tensor_names,
    detach,
    graph_input_ids,
    graph_output_ids,
    node_count,
    node_owner,
    redirect_consumers,
    unique_name,
)

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")

#: ops never constant-folded: non-deterministic, quantisation boundaries ORT pattern-matches, non-tensor values.
_NO_FOLD = frozenset(
    {
        "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
        "Dropout", "Constant",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength",
        "SequenceMap", "SplitToSequence", "ConcatFromSequence",
        "Optional", "OptionalGetElement", "OptionalHasElement",
        "If", "Loop", "Scan",
    }
)  # fmt: skip

_BN_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    """Exact simplification: dead code, Identity/Dropout, constant folding, BN folding, duplicate initializers."""

    name: ClassVar[str] = "cleanup"
    description: ClassVar[str] = (
        "dead nodes/initializers, Identity/Dropout, constant folding, BN folded into Conv/Gemm, duplicate "
        "initializers merged (exact)"
    )
    exact: ClassVar[bool] = True
    option_help: ClassVar[dict[str, str]] = {
        "remove_dead": "drop nodes that reach no graph output",
        "remove_identity": "bypass Identity nodes",
        "remove_dropout": "bypass inference-mode Dropout nodes",
        "fold_constants": "evaluate constant-only nodes with onnxruntime",
        "fold_shapes": "fold Shape/Size of tensors whose shape inference (from static inputs) is static",
        "fold_batchnorm": "fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm",
        "dedup_initializers": "merge initializers with equal dtype, shape and bytes",
        "fold_size_limit": "bytes a folded result may exceed its inputs by (else not folded)",
        "max_rounds": "upper bound on rewrite rounds before giving up on a fixed point",
    }

    remove_dead: bool = True
    remove_identity: bool = True
    remove_dropout: bool = True
    fold_constants: bool = True
    fold_shapes: bool = True
    fold_batchnorm: bool = True
    dedup_initializers: bool = True
    fold_size_limit: int = 65536
    max_rounds: int = 8

    def __post_init__(self) -> None:
        for f in ("remove_dead", "remove_identity", "remove_dropout", "fold_constants", "fold_shapes",
                  "fold_batchnorm", "dedup_initializers"):  # fmt: skip
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"cleanup: {f} must be true or false, got {getattr(self, f)!r}")
        if (
            isinstance(self.fold_size_limit, bool)
            or not isinstance(self.fold_size_limit, int)
            or self.fold_size_limit < 0
        ):
            raise ValueError(
                f"cleanup: fold_size_limit must be an integer >= 0, got {self.fold_size_limit!r}"
            )
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"cleanup: max_rounds must be an integer >= 1, got {self.max_rounds!r}")

    # ------------------------------------------------------------------------------------------------- driver
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        out_sig = [(t.name, t.dtype) for t in graph.outputs]
        in_names = [t.name for t in graph.inputs]
        graphs = all_graphs(graph)
        nodes_before = node_count(graphs)
        inits_before = _count_constants(graphs)
        stats: Counter[str] = Counter()
        #: id(node) -> why it was kept; overwritten every round so the last word counts.
        kept: dict[int, str] = {}
        modified = False
        for rnd in range(self.max_rounds):
            changed = self._round(graph, ctx, stats, kept)
            log.debug("cleanup round %d: changed=%s", rnd, changed)
            if not changed:
                break
            modified = True
        else:
            log.warning("cleanup: still changing after %d rounds; stopping", self.max_rounds)

        graphs = all_graphs(graph)
        alive = {id(n) for g in graphs for n in g.nodes}
        for nid, reason in kept.items():
            if nid in alive:
                stats[reason] += 1
        inits_after = _count_constants(graphs)
        if inits_before > inits_after:
            stats["initializers_removed"] = inits_before - inits_after
        stats["nodes_before"] = nodes_before
        stats["nodes_after"] = node_count(graphs)

        if [(t.name, t.dtype) for t in graph.outputs] != out_sig:
            raise PassError("cleanup changed the graph outputs (names, dtypes or order)")
        if [t.name for t in graph.inputs] != in_names:
            raise PassError("cleanup changed the graph inputs")
        log.info(
            "cleanup: %d -> %d nodes; %s",
            nodes_before,
            stats["nodes_after"],
            ", ".join(
                f"{k}={v}" for k, v in sorted(stats.items()) if k not in ("nodes_before", "nodes_after")
            ),
        )
        return PassResult(modified=modified, stats=dict(sorted(stats.items())), preserved=frozenset())

    def _round(self, graph: gs.Graph, ctx: PassContext, stats: Counter, kept: dict[int, str]) -> bool:
        changed = False
        if self.remove_dead:
            n = _remove_dead(graph)
            if n:
                stats["dead_nodes_removed"] += n
                changed = True
        if self.remove_identity or self.remove_dropout:
            changed |= self._bypass_identities(graph, stats, kept)
        if self.fold_constants:
            changed |= self._fold_constants(graph, ctx, stats, kept)
        if self.fold_batchnorm:
            changed |= self._fold_batchnorms(graph, stats, kept)
        if self.dedup_initializers:
            changed |= _dedup_initializers(graph, stats)
        return changed

    # ---------------------------------------------------------------------------------- Identity / Dropout
    def _bypass_identities(self, graph: gs.Graph, stats: Counter, kept: dict[int, str]) -> bool:
        graphs = all_graphs(graph)
        owner = node_owner(graphs)
        any_out = graph_output_ids(graphs)
        any_in = graph_input_ids(graphs)
        opset = graph.opset or 1
        removed: set[int] = set()
        for g in graphs:
            g_out = {id(t) for t in g.outputs}
            for node in g.nodes:
                if not _is_default_domain(node) or not node.inputs or not node.outputs:
                    continue
                if node.op == "Identity" and self.remove_identity:
                    key = "identity_removed"
                elif node.op == "Dropout" and self.remove_dropout:
                    why = _dropout_training(node, opset, any_out)
                    if why:
                        kept[id(node)] = why
                        continue
                    key = "dropout_removed"
                else:
                    continue
                x, y = node.inputs[0], node.outputs[0]
                if x.is_empty() or y.is_empty():
                    continue
                if id(y) in g_out:
                    reason = _rewire_producer_check(x, y, g, owner, any_out, any_in)
                    if reason:
                        kept[id(node)] = f"{key.split('_')[0]}_kept_{reason}"
                        continue
                    producer = x.inputs[0]
                    detach(node)
                    redirect_consumers(x, y)
                    idx = next(i for i, t in enumerate(producer.outputs) if t is x)
                    producer.outputs[idx] = y
                elif id(y) in any_out:
                    # y is the output of a nested subgraph as well: leave it, renaming it is not worth the risk
                    kept[id(node)] = f"{key.split('_')[0]}_kept_subgraph_output"
                    continue
                else:
                    detach(node)
                    redirect_consumers(y, x)
                removed.add(id(node))
                stats[key] += 1
        _purge(graphs, removed)
        return bool(removed)

    # ------------------------------------------------------------------------------------ constant folding
    def _fold_constants(
        self, graph: gs.Graph, ctx: PassContext, stats: Counter, kept: dict[int, str]
    ) -> bool:
        graphs = all_graphs(graph)
        any_out = graph_output_ids(graphs)
        imports = _opset_imports(graph, ctx)
        eval_imports = [i for i in imports if i.domain in _DEFAULT_DOMAINS]  # only default-domain nodes fold
        static = None
        if self.fold_shapes and any(
            n.op in ("Shape", "Size")
            and _is_default_domain(n)
            and n.inputs
            and not isinstance(n.inputs[0], gs.Constant)
            for n in graph.nodes
        ):
            static = _computed_static_shapes(graph, imports)
        folded_total = 0
        for g in graphs:
            folded_total += self._fold_graph(
                g, static if g is graph else None, any_out, eval_imports, stats, kept
            )
        if folded_total:
            stats["constants_folded"] += folded_total
        return folded_total > 0

    def _fold_candidates(
        self,
        g: gs.Graph,
        static: dict[str, tuple[tuple[int, ...], np.dtype | None]] | None,
        any_out: set[int],
        kept: dict[int, str],
        excluded: frozenset[int],
    ) -> tuple[list[gs.Node], dict[int, np.ndarray]]:
        """Nodes (topological order) whose inputs are constant or become constant, and the static Shape/Size
        values known without evaluation (tensor id -> value)."""
        cand: list[gs.Node] = []
        will_be_const: set[int] = set()
        direct: dict[int, np.ndarray] = {}
        for node in g.nodes:
            if not _is_default_domain(node) or node.op in _NO_FOLD or any(True for _ in node.subgraphs()):
                continue
            outs = [t for t in node.outputs if not t.is_empty()]
            ins = [t for t in node.inputs if not t.is_empty()]
            if not outs or not ins or any(id(t) in any_out for t in outs):
                continue
            if all(isinstance(t, gs.Constant) or id(t) in will_be_const for t in ins):
                if static is not None and _too_large_by_inference(node, static, self.fold_size_limit):
                    kept[id(node)] = "fold_skipped_too_large"
                    continue
                cand.append(node)
                will_be_const.update(id(t) for t in outs)
            elif (
                node.op in ("Shape", "Size")
                and static is not None
                and len(outs) == 1
                and id(node) not in excluded
            ):
                info = static.get(ins[0].name)
                val = _shape_value(node, info[0]) if info is not None else None
                if val is not None:
                    direct[id(outs[0])] = val
                    cand.append(node)
                    will_be_const.add(id(outs[0]))
        return cand, direct

    def _fold_graph(
        self,
        g: gs.Graph,
        static: dict[str, tuple[tuple[int, ...], np.dtype | None]] | None,
        any_out: set[int],
        imports: list[onnx.OperatorSetIdProto],
        stats: Counter,
        kept: dict[int, str],
    ) -> int:
        cand, direct = self._fold_candidates(g, static, any_out, kept, frozenset())
        if direct:
            # Shape/Size folds are the only values that become constant here but not in onnxruntime's own folding.
            # One that decides an If condition lets ORT inline a branch at load and re-run shape inference on it,
            # which rejects some graphs that ran fine (1-element tensors where the spec wants scalars): keep those.
            blocked = _feeding_if_conditions(cand, direct)
            if blocked:
                for nid in blocked:
                    kept[nid] = "fold_skipped_if_condition"
                cand, direct = self._fold_candidates(g, static, any_out, kept, frozenset(blocked))
        if not cand:
            return 0

        values = _evaluate([n for n in cand if id(n.outputs[0]) not in direct], direct, imports)

        foldable: set[int] = set()
        avail: dict[int, np.ndarray] = dict(direct)
        for node in cand:
            outs = [t for t in node.outputs if not t.is_empty()]
            if id(outs[0]) in direct:
                foldable.add(id(node))
                continue
            ins = [t for t in node.inputs if not t.is_empty()]
            if not all(isinstance(t, gs.Constant) or id(t) in avail for t in ins):
                continue
            res = [values.get(t.name) for t in outs]
            if any(r is None for r in res):
                kept[id(node)] = "fold_skipped_eval_failed"
                continue
            if any(not isinstance(r, np.ndarray) or r.dtype.kind not in "biufc" for r in res):
                kept[id(node)] = "fold_skipped_non_numeric"
                continue
            in_bytes = sum(_nbytes(t, avail) for t in ins)
            out_bytes = sum(int(r.nbytes) for r in res)
            if out_bytes > in_bytes + self.fold_size_limit:
                kept[id(node)] = "fold_skipped_too_large"
                continue
            foldable.add(id(node))
            for t, r in zip(outs, res, strict=True):
                avail[id(t)] = r

        if not foldable:
            return 0
        removed: set[int] = set()
        for node in cand:
            if id(node) not in foldable:
                continue
            for t in node.outputs:
                if t.is_empty():
                    continue
                if any(id(c) not in foldable for c in t.outputs):
                    const = gs.Constant(t.name, values=np.asarray(avail[id(t)]))
                    redirect_consumers(t, const, keep=foldable)
            removed.add(id(node))
        # detach only after every frontier value was redirected (foldable consumers still read their inputs above)
        for node in cand:
            if id(node) in removed:
                detach(node)
        _purge([g], removed)
        return len(removed)

    # -------------------------------------------------------------------------------------------- BN folding
    def _fold_batchnorms(self, graph: gs.Graph, stats: Counter, kept: dict[int, str]) -> bool:
        graphs = all_graphs(graph)
        owner = node_owner(graphs)
        any_out = graph_output_ids(graphs)
        io_ids = any_out | graph_input_ids(graphs)
        taken = all_tensor_names(graphs)
        removed: set[int] = set()
        for g in graphs:
            for bn in g.nodes:
                if bn.op != "BatchNormalization" or not _is_default_domain(bn):
                    continue
                reason = _fold_one_bn(bn, g, owner, any_out, io_ids, taken)
                if reason is None:
                    removed.add(id(bn))
                    stats["bn_folded"] += 1
                    kept.pop(id(bn), None)
                else:
                    kept[id(bn)] = f"bn_kept_{reason}"
        _purge(graphs, removed)
        return bool(removed)


# ====================================================================================================== helpers
def _purge(graphs: list[gs.Graph], removed: set[int]) -> None:
    if not removed:
        return
    for g in graphs:
        if any(id(n) in removed for n in g.nodes):
            g.nodes = [n for n in g.nodes if id(n) not in removed]


def _remove_dead(graph: gs.Graph) -> int:
    graphs = all_graphs(graph)
    before = node_count(graphs)
    graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
    return before - node_count(all_graphs(graph))


def _count_constants(graphs: list[gs.Graph]) -> int:
    seen: set[int] = set()
    for g in graphs:
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    seen.add(id(t))
    return len(seen)


def _opset_imports(graph: gs.Graph, ctx: PassContext) -> list[onnx.OperatorSetIdProto]:
    if ctx.model_template is not None and ctx.model_template.opset_import:
        imports = [onnx.helper.make_opsetid(i.domain, i.version) for i in ctx.model_template.opset_import]
    elif graph.import_domains:
        imports = [onnx.helper.make_opsetid(i.domain, i.version) for i in graph.import_domains]
    else:
        imports = []
    # the graph's default-domain opset wins (a pass may have upgraded it)
    imports = [i for i in imports if i.domain not in _DEFAULT_DOMAINS]
    imports.append(onnx.helper.make_opsetid("", int(graph.opset or 13)))
    return imports


def _dropout_training(node: gs.Node, opset: int, any_out: set[int]) -> str | None:
    """Why this Dropout is not an identity at inference (None: it is)."""
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if not mask.is_empty() and (mask.outputs or id(mask) in any_out):
            return "dropout_kept_mask_used"
    if opset < 7 and int(node.attrs.get("is_test", 0)) != 1:
        return "dropout_kept_training_mode"
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant):
            return "dropout_kept_training_mode_not_constant"
        if np.asarray(mode.values).astype(bool).any():
            return "dropout_kept_training_mode"
    return None


def _rewire_producer_check(
    x: gs.Tensor, y: gs.Tensor, g: gs.Graph, owner: dict[int, gs.Graph], any_out: set[int], any_in: set[int]
) -> str | None:
    """Can ``x``'s producer be made to produce the graph output ``y`` directly? None if yes, else why not."""
    if isinstance(x, gs.Constant):
        return "output_of_initializer"
    if id(x) in any_in:
        return "output_of_graph_input"
    if id(x) in any_out:
        return "output_of_output"
    if len(x.inputs) != 1 or owner.get(id(x.inputs[0])) is not g:
        return "output_of_outer_scope"
    return None


# ----------------------------------------------------------------------------------------- folding helpers
def _feeding_if_conditions(cand: list[gs.Node], direct: dict[int, np.ndarray]) -> set[int]:
    """ids of the static Shape/Size candidates whose value reaches an If condition through candidate nodes."""
    cand_ids = {id(n) for n in cand}
    stack = []
    for node in cand:
        for t in node.outputs:
            if any(c.op == "If" and c.inputs and c.inputs[0] is t for c in t.outputs):
                stack.append(node)
    blocked: set[int] = set()
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.outputs and id(node.outputs[0]) in direct:
            blocked.add(id(node))
            continue
        for t in node.inputs:
            if len(t.inputs) == 1 and id(t.inputs[0]) in cand_ids:
                stack.append(t.inputs[0])
    return blocked


def _nbytes(t: gs.Tensor, avail: dict[int, np.ndarray]) -> int:
    if id(t) in avail:
        return int(avail[id(t)].nbytes)
    if isinstance(t, gs.Constant):
        try:
            return int(t._values.nbytes)  # LazyValues knows its size without loading
        except Exception:  # pragma: no cover - exotic dtypes
            return int(np.asarray(t.values).nbytes)
    return 0


def _shape_value(node: gs.Node, dims: tuple[int, ...] | None) -> np.ndarray | None:
    """Value of Shape/Size when the needed dims are static and positive; None otherwise."""
    if dims is None:
        return None
    rank = len(dims)
    if node.op == "Size":
        return (
            np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64) if all(d > 0 for d in dims) else None
        )
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    end = rank if end is None else int(end)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    sel = dims[start:end] if end > start else ()
    if any(d <= 0 for d in sel):
        return None
    return np.array(sel, dtype=np.int64)


def _too_large_by_inference(node: gs.Node, static: dict, limit: int) -> bool:
    """Skip before evaluating when inferred output shapes already prove the result would inflate."""
    out_bytes = 0
    for t in node.outputs:
        if t.is_empty():
            continue
        info = static.get(t.name)
        if info is None or info[1] is None:
            return False
        out_bytes += int(np.prod(info[0], dtype=np.int64)) * info[1].itemsize
    in_bytes = 0
    for t in node.inputs:
        if t.is_empty():
            continue
        if isinstance(t, gs.Constant):
            in_bytes += _nbytes(t, {})
            continue
        info = static.get(t.name)
        if info is None or info[1] is None:
            return False
        in_bytes += int(np.prod(info[0], dtype=np.int64)) * info[1].itemsize
    return out_bytes > in_bytes + limit


def _computed_static_shapes(
    graph: gs.Graph, imports: list
) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """name -> (static shape, dtype) of main-graph values, by shape inference from the graph inputs alone.

    Declared value_info, graph-output shapes and subgraph I/O shapes are stripped before inference: only the
    graph inputs' positive static dims (which onnxruntime enforces on every run) and the constants are trusted.
    """
    try:
        model = gs.export_onnx(graph, do_type_check=False, opset_imports=imports)
        _strip_declared_shapes(model.graph, main=True)
        _weights_to_inputs(model.graph)
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # a model onnx cannot infer: fold no shapes
        log.info(
            "cleanup: shape inference failed (%s); Shape/Size are not folded", str(exc).splitlines()[0][:200]
        )
        return {}
    out: dict[str, tuple[tuple[int, ...], np.dtype | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                break
            dims.append(int(d.dim_value))
        else:
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
            except Exception:
                dtype = None
            out[vi.name] = (tuple(dims), dtype)
    return out


def _weights_to_inputs(g: onnx.GraphProto, min_elements: int = 1024) -> None:
    """Large float initializers become typed graph inputs: shape inference needs only their shapes, and data
    propagation only small integer tensors, so the big bytes need not be serialised again."""
    keep, moved = [], []
    declared = {i.name for i in g.input}
    for t in g.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if n >= min_elements and t.data_type in _FLOAT_TENSOR_TYPES and t.name not in declared:
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    if moved:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.input.extend(moved)


_FLOAT_TENSOR_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


def _strip_declared_shapes(g: onnx.GraphProto, main: bool) -> None:
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    for idx, vi in enumerate(g.input):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        if not main:
            vi.type.tensor_type.ClearField("shape")
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:  # -1 / 0 mean "unknown" in some exporters
                d.dim_param = f"__cleanup_dyn_{idx}_{j}"
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_declared_shapes(attr.g, main=False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _strip_declared_shapes(sub, main=False)


def _evaluate(nodes: list[gs.Node], direct: dict[int, np.ndarray], imports: list) -> dict[str, np.ndarray]:
    """Values of every output of ``nodes`` (constant-only, topologically ordered): one ORT session, falling back
    to one session per node (and the reference evaluator for integer-only nodes) when the batch fails."""
    if not nodes:
        return {}
    try:
        return _run_ort(nodes, direct, {}, imports)
    except Exception as exc:
        log.debug("cleanup: batched constant evaluation failed (%s); evaluating node by node", exc)
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        try:
            values.update(_run_ort([node], direct, values, imports))
            continue
        except Exception as exc:
            log.debug("cleanup: onnxruntime cannot evaluate %s (%s): %s", node.name, node.op, exc)
        try:
            values.update(_run_reference(node, direct, values, imports))
        except Exception as exc:
            log.debug("cleanup: reference evaluator cannot evaluate %s (%s): %s", node.name, node.op, exc)
    return values


def _fold_model(
    nodes: list[gs.Node], direct: dict[int, np.ndarray], known: dict[str, np.ndarray], imports: list
) -> onnx.ModelProto:
    produced = {t.name for n in nodes for t in n.outputs if not t.is_empty()}
    inits: dict[str, onnx.TensorProto] = {}
    for n in nodes:
        for t in n.inputs:
            if t.is_empty() or t.name in produced or t.name in inits:
                continue
            if isinstance(t, gs.Constant):
                inits[t.name] = OnnxExporter.export_tensor_proto(t)
            elif id(t) in direct:
                inits[t.name] = numpy_helper.from_array(direct[id(t)], t.name)
            elif t.name in known:
                inits[t.name] = numpy_helper.from_array(known[t.name], t.name)
            else:
                raise KeyError(f"input {t.name!r} of {n.name!r} is not constant")
    outputs = [onnx.ValueInfoProto(name=name) for name in sorted(produced)]
    g = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes], "cleanup_fold", [], outputs, list(inits.values())
    )
    model = onnx.helper.make_model(g, opset_imports=imports)
    model.ir_version = max(7, onnx.helper.find_min_ir_version_for(list(imports), ignore_unknown=True))
    return model


def _run_ort(nodes, direct, known, imports) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    model = _fold_model(nodes, direct, known, imports)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {}), strict=True))


def _run_reference(node, direct, known, imports) -> dict[str, np.ndarray]:
    """onnx's reference evaluator, only for nodes whose inputs are all integer/bool (shape arithmetic): float
    kernels could round differently from onnxruntime."""
    from onnx.reference import ReferenceEvaluator

    for t in node.inputs:
        if t.is_empty():
            continue
        arr = direct.get(id(t)) if id(t) in direct else known.get(t.name)
        if arr is None and isinstance(t, gs.Constant):
            arr = np.asarray(t.values)
        if arr is None or arr.dtype.kind not in "biu":
            raise TypeError("reference fallback only for integer inputs")
    model = _fold_model([node], direct, known, imports)
    names = [o.name for o in model.graph.output]
    res = ReferenceEvaluator(model).run(None, {})
    out = {n: np.asarray(r) for n, r in zip(names, res, strict=True)}
    if any(r.dtype.kind not in "biu" for r in out.values()):
        raise TypeError("reference fallback only for integer outputs")
    return out


# ---------------------------------------------------------------------------------------------- BN folding
def _fold_one_bn(
    bn: gs.Node, g: gs.Graph, owner: dict[int, gs.Graph], any_out: set[int], io_ids: set[int], taken: set[str]
) -> str | None:
    """Fold one BatchNormalization into its producer; None on success, else the reason it stays."""
    if len(bn.inputs) < 5 or any(t.is_empty() for t in bn.inputs[:5]) or not bn.outputs:
        return "malformed"
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "training_mode"
    if int(bn.attrs.get("spatial", 1)) == 0:
        return "not_spatial"
    for extra in bn.outputs[1:]:
        if not extra.is_empty() and (extra.outputs or id(extra) in any_out):
            return "training_outputs_used"
    x, gamma, beta, mean, var = bn.inputs[:5]
    y = bn.outputs[0]
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    if producer is None or producer.op not in _BN_PRODUCERS or not _is_default_domain(producer):
        return "no_linear_producer"
    if owner.get(id(producer)) is not g:
        return "producer_in_outer_scope"
    if len(x.outputs) != 1 or id(x) in any_out or producer.outputs[0] is not x:
        return "producer_output_shared"
    if not all(isinstance(p, gs.Constant) for p in (gamma, beta, mean, var)):
        return "params_not_constant"
    if len(producer.inputs) < 2 or not isinstance(producer.inputs[1], gs.Constant):
        return "weight_not_constant"
    w_t = producer.inputs[1]
    b_t = producer.inputs[2] if len(producer.inputs) > 2 and not producer.inputs[2].is_empty() else None
    if b_t is not None and not isinstance(b_t, gs.Constant):
        return "bias_not_constant"
    w = np.asarray(w_t.values)
    if w.dtype.kind != "f":
        return "weight_not_float"
    params = [np.asarray(p.values, dtype=np.float64).reshape(-1) for p in (gamma, beta, mean, var)]
    c = params[0].size
    if any(p.size != c for p in params):
        return "shape_mismatch"
    g64, beta64, mean64, var64 = params
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = g64 / np.sqrt(var64 + eps)
    w64 = w.astype(np.float64)
    gemm_beta = None
    if producer.op == "Conv":
        if w.ndim < 3 or w.shape[0] != c:
            return "shape_mismatch"
        w_new = w64 * s.reshape((c,) + (1,) * (w.ndim - 1))
    elif producer.op == "ConvTranspose":
        group = int(producer.attrs.get("group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group or w.shape[1] * group != c:
            return "shape_mismatch"
        cout_g = w.shape[1]
        grouped = w64.reshape((group, w.shape[0] // group, cout_g) + w.shape[2:])
        w_new = (grouped * s.reshape((group, 1, cout_g) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:  # Gemm
        if w.ndim != 2:
            return "shape_mismatch"
        trans_b = int(producer.attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != c:
            return "shape_mismatch"
        w_new = w64 * (s[:, None] if trans_b else s[None, :])
        gemm_beta = float(producer.attrs.get("beta", 1.0))
    if b_t is None:
        b64 = np.zeros(c, dtype=np.float64)
    else:
        b64 = np.asarray(b_t.values, dtype=np.float64)
        if gemm_beta is not None:
            if b64.ndim > 2:
                return "shape_mismatch"
            b64 = gemm_beta * b64
        elif b64.size != c:
            return "shape_mismatch"
        else:
            b64 = b64.reshape(c)
    b_new = (b64 - mean64) * s + beta64  # Gemm: broadcasts C ([], [N], [1,N], [M,1], [M,N]) against [N]
    if gemm_beta is not None and b_new.ndim > 2:
        return "shape_mismatch"

    def fresh(old: gs.Constant | None, suffix: str, values: np.ndarray) -> gs.Constant:
        # keep the weight's own name when nothing else reads it; a new name when it is shared
        if old is not None and len(old.outputs) == 1 and id(old) not in io_ids:
            name = old.name
        else:
            base = old.name if old is not None else (producer.name or y.name)
            name = unique_name(f"{base}_{suffix}", taken)
        return gs.Constant(name, values=np.ascontiguousarray(values.astype(w.dtype)))

    new_w = fresh(w_t, "bnfold", w_new)
    new_b = fresh(b_t, "bnfold" if b_t is not None else "bias", b_new)
    producer.inputs[1] = new_w
    if b_t is not None or len(producer.inputs) > 2:
        producer.inputs[2] = new_b
    else:
        producer.inputs.append(new_b)
    if gemm_beta is not None:
        producer.attrs["beta"] = 1.0
    detach(bn)
    producer.outputs[0] = y
    return None


# ------------------------------------------------------------------------------------------- deduplication
def _dedup_initializers(graph: gs.Graph, stats: Counter) -> bool:
    graphs = all_graphs(graph)
    io_ids = graph_output_ids(graphs) | graph_input_ids(graphs)
    consts: dict[int, gs.Constant] = {}
    for g in graphs:  # main graph first: its constants become the canonical copies
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant) and id(t) not in consts and id(t) not in io_ids:
                    consts[id(t)] = t
    by_meta: dict[tuple, list[gs.Constant]] = defaultdict(list)
    for t in consts.values():
        lazy = t._values
        if isinstance(lazy, gs.ir.tensor.SparseValues):
            continue
        try:
            key = (str(np.dtype(t.dtype)), tuple(int(d) for d in t.shape))
        except Exception:
            continue
        by_meta[key].append(t)
    merged = 0
    for group in by_meta.values():
        if len(group) < 2:
            continue
        buckets: dict[bytes, list[gs.Constant]] = defaultdict(list)
        for t in group:
            arr = np.ascontiguousarray(t.values)
            if arr.dtype.kind not in "biufc":
                continue
            digest = hashlib.blake2b(memoryview(arr).cast("B"), digest_size=16).digest()
            canon = next((c for c in buckets[digest] if _same_bytes(c, arr)), None)
            if canon is None:
                buckets[digest].append(t)
                continue
            if canon.name == t.name:
                # a subgraph's shadow copy of an outer initializer (the exporter writes one per scope that reads
                # it): merging changes nothing once exported, and would make the pass report work forever
                continue
            redirect_consumers(t, canon)
            merged += 1
    if merged:
        stats["initializers_deduplicated"] += merged
    return merged > 0


def _same_bytes(c: gs.Constant, arr: np.ndarray) -> bool:
    other = np.ascontiguousarray(c.values)
    return (
        other.dtype == arr.dtype
        and other.shape == arr.shape
        and memoryview(other).cast("B") == memoryview(arr).cast("B")
    )
