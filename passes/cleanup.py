"""``cleanup``: exact graph simplification.

Every rewrite leaves the model's outputs equal (up to float rounding of the BN / Conv-affine folds) and keeps the
names, dtypes and order of the graph outputs; graph inputs are never removed. Shapes are only ever taken from
*computed* shape inference (``_cleanup_shapes``: declared value_info and output shapes are stripped first, they can
be wrong). Rewrites, repeated until none applies:

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
  sequence/optional ops, non-default domains, values that are graph outputs.
* **Shape folding** (``fold_shapes``). A small integer value computed from ``Shape``/``Size`` is a constant when
  every element is known from computed shapes, however dynamic the rest of the tensor is: ``Gather(Shape(s), 0)``
  with ``s: [2, batch, 128]`` is 2. A Reshape target computed from shapes becomes a constant with 0 (copy) for
  dims provably equal to the data's dim at the same position and -1 for one remaining dim.
* **Constant If** (``inline_if``). An If whose condition is constant is replaced by the branch it takes
  (``_cleanup_if``); constants inside branches fold like any others.
* **BatchNormalization into Conv / ConvTranspose / Gemm.** With ``s = γ / sqrt(σ² + ε)`` per output channel::

      W' = W · s   (Conv: axis 0 of [Cout, Cin/g, k..]; ConvTranspose: axis 1 of [Cin, Cout/g, k..] per group;
                    Gemm: the N axis of B, i.e. rows if transB else columns)
      b' = (b − μ) · s + β           (Gemm: b = beta·C, then beta := 1)

  computed in float64 and cast back to the weight dtype; only when the producer's output feeds the BN alone and
  every weight is an initializer (a weight that is a graph input is a skip reason in stats). The same arithmetic
  folds a per-channel constant ``+ c`` / ``- c`` / ``· c`` after a Conv/ConvTranspose (``fold_conv_affine``).
* **No-op nodes, chains, common subexpressions** (``remove_noops``, ``merge_chains``, ``cse``): see
  ``_cleanup_rewrites`` for the exact rule of each (Cast to the same dtype, identity Transpose/Reshape/Slice/Pad,
  ``x·1``, ``x+0``; Reshape/Unsqueeze/Transpose/Slice chains; same op + attributes + inputs -> one node).
* **Duplicate initializers.** Constants with the same dtype, shape and bytes (blake2b over the raw bytes, then a
  byte comparison) are merged into the first one met (main graph first); subgraphs then read the outer copy.

Not done on purpose (they make ORT CPU slower, see design.md §4): folding Pad into Conv, MatMul+Add into Gemm.
A Reshape target is never taken from a declared output shape (onnxslim does, and changes ddddocr's output).
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
from onnxcompress.graph_utils import (
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
from onnxcompress.pass_base import Pass, PassResult, register

from . import _cleanup_rewrites as rw
from ._cleanup_if import inline_constant_ifs
from ._cleanup_shapes import Facts, SymVal, infer_facts, sym_values

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

_BOOL_OPTIONS = (
    "remove_dead", "remove_identity", "remove_dropout", "fold_constants", "fold_shapes", "inline_if",
    "fold_batchnorm", "fold_conv_affine", "remove_noops", "merge_chains", "cse", "dedup_initializers",
)  # fmt: skip


def _is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


class _Analysis:
    """Computed facts and symbolic values of one round (valid by name: rewrites replace values by equal ones)."""

    def __init__(self, graph: gs.Graph, imports: list) -> None:
        self.facts: Facts = infer_facts(graph, imports)
        self.sym: dict[str, SymVal] = sym_values(graph, self.facts)


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    """Exact simplification: dead code, Identity/Dropout, constant/shape folding, constant If, BN and Conv-affine
    folding, no-op nodes, chains, common subexpressions, duplicate initializers."""

    name: ClassVar[str] = "cleanup"
    description: ClassVar[str] = (
        "dead nodes/initializers, Identity/Dropout, constant and shape folding, constant If inlined, BN and "
        "per-channel Add/Mul folded into Conv, no-op nodes, merged chains, common subexpressions, duplicate "
        "initializers (exact)"
    )
    exact: ClassVar[bool] = True
    option_help_legacy: ClassVar[dict[str, str]] = {
        "remove_dead": "drop nodes that reach no graph output",
        "remove_identity": "bypass Identity nodes",
        "remove_dropout": "bypass inference-mode Dropout nodes",
        "fold_constants": "evaluate constant-only nodes with onnxruntime",
        "fold_shapes": "fold shape values known from computed shapes; constant Reshape targets (0 / -1)",
        "inline_if": "replace an If with a constant condition by the branch it takes",
        "fold_batchnorm": "fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm",
        "fold_conv_affine": "fold a per-channel constant Add/Sub/Mul into the preceding Conv/ConvTranspose",
        "remove_noops": "bypass nodes that provably return their input (Cast to same type, x*1, full Slice...)",
        "merge_chains": "merge Reshape/Unsqueeze/Transpose/Slice chains",
        "cse": "merge nodes with the same op, attributes and inputs",
        "dedup_initializers": "merge initializers with equal dtype, shape and bytes",
        "fold_size_limit": "bytes a folded result may exceed its inputs by (else not folded)",
        "max_rounds": "upper bound on rewrite rounds before giving up on a fixed point",
    }

    remove_dead: bool = True
    remove_identity: bool = True
    remove_dropout: bool = True
    fold_constants: bool = True
    fold_shapes: bool = True
    inline_if: bool = True
    fold_batchnorm: bool = True
    fold_conv_affine: bool = True
    remove_noops: bool = True
    merge_chains: bool = True
    cse: bool = True
    dedup_initializers: bool = True
    fold_size_limit: int = 65536
    max_rounds: int = 8

    def __post_init__(self) -> None:
        for f in _BOOL_OPTIONS:
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

    @property
    def _needs_facts(self) -> bool:
        return self.fold_shapes or self.remove_noops or self.merge_chains

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
        an: _Analysis | None = None
        for rnd in range(self.max_rounds):
            changed, an = self._round(graph, ctx, stats, kept)
            log.debug("cleanup round %d: changed=%s", rnd, changed)
            if not changed:
                break
            modified = True
        else:
            log.warning("cleanup: still changing after %d rounds; stopping", self.max_rounds)
            an = _Analysis(graph, _opset_imports(graph, ctx)) if self._needs_facts else None
        if modified and an is not None:
            # a rewrite can let shape inference see through to a declared shape that was always wrong (ddddocr's
            # output); declared shapes that contradict the computed ones are corrected so the model stays valid
            n = _reconcile_declared_shapes(graph, an.facts)
            if n:
                stats["declared_shapes_corrected"] = n

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

    def _env(self, graph: gs.Graph, an: _Analysis | None) -> rw.Env:
        graphs = all_graphs(graph)
        return rw.Env(
            graph=graph,
            graphs=graphs,
            facts=an.facts if an is not None else Facts(),
            sym=an.sym if an is not None else {},
            opset=int(graph.opset or 1),
            any_out=graph_output_ids(graphs),
            any_in=graph_input_ids(graphs),
            owner=node_owner(graphs),
            taken=all_tensor_names(graphs),
        )

    def _round(
        self, graph: gs.Graph, ctx: PassContext, stats: Counter, kept: dict[int, str]
    ) -> tuple[bool, _Analysis | None]:
        """One pass of every enabled rewrite; (anything changed, the analysis the round started from)."""
        changed = False
        if self.remove_dead:
            n = _remove_dead(graph)
            if n:
                stats["dead_nodes_removed"] += n
                changed = True
        if self.remove_identity or self.remove_dropout:
            changed |= self._bypass_identities(graph, stats, kept)
        imports = _opset_imports(graph, ctx)
        an = _Analysis(graph, imports) if self._needs_facts else None
        if self.fold_constants:
            changed |= self._fold_constants(graph, imports, an, stats, kept)
        if self.inline_if:
            graphs = all_graphs(graph)
            changed |= inline_constant_ifs(graphs, all_tensor_names(graphs), stats) > 0
        if self.fold_batchnorm:
            changed |= self._fold_batchnorms(graph, stats, kept)
        if self.fold_conv_affine:
            env = self._env(graph, an)
            changed |= self._apply(env, rw.fold_conv_affine(env, stats, kept, self._affine_fn(env)))
        if self.fold_shapes and an is not None:
            changed |= rw.simplify_reshape_shapes(self._env(graph, an), stats) > 0
        if self.remove_noops and an is not None:
            env = self._env(graph, an)
            changed |= self._apply(env, rw.remove_noops(env, stats, kept))
        if self.merge_chains and an is not None:
            env = self._env(graph, an)
            changed |= self._apply(env, rw.merge_chains(env, stats))
        if self.dedup_initializers:
            changed |= _dedup_initializers(graph, stats)
        if self.cse:
            env = self._env(graph, an)
            changed |= self._apply(env, rw.eliminate_common(env, stats))
        return changed, an

    @staticmethod
    def _apply(env: rw.Env, removed: set[int]) -> bool:
        _purge(env.graphs, removed)
        return bool(removed)

    # ---------------------------------------------------------------------------------- Identity / Dropout
    def _bypass_identities(self, graph: gs.Graph, stats: Counter, kept: dict[int, str]) -> bool:
        env = self._env(graph, None)
        opset = graph.opset or 1
        removed: set[int] = set()
        for g in env.graphs:
            for node in list(g.nodes):
                if not _is_default_domain(node) or not node.inputs or not node.outputs:
                    continue
                if node.op == "Identity" and self.remove_identity:
                    key = "identity_removed"
                elif node.op == "Dropout" and self.remove_dropout:
                    why = _dropout_training(node, opset, env.any_out)
                    if why:
                        kept[id(node)] = why
                        continue
                    key = "dropout_removed"
                else:
                    continue
                x, y = node.inputs[0], node.outputs[0]
                if x.is_empty() or y.is_empty():
                    continue
                reason = rw.bypass(node, x, y, g, env)
                if reason:
                    kept[id(node)] = f"{key.split('_')[0]}_kept_{reason}"
                    continue
                removed.add(id(node))
                stats[key] += 1
        _purge(env.graphs, removed)
        return bool(removed)

    # ------------------------------------------------------------------------------------ constant folding
    def _fold_constants(
        self, graph: gs.Graph, imports: list, an: _Analysis | None, stats: Counter, kept: dict[int, str]
    ) -> bool:
        graphs = all_graphs(graph)
        any_out = graph_output_ids(graphs)
        eval_imports = [i for i in imports if i.domain in _DEFAULT_DOMAINS]  # only default-domain nodes fold
        folded_total = 0
        for g in graphs:
            folded_total += self._fold_graph(
                g, an if self.fold_shapes else None, any_out, eval_imports, stats, kept
            )
        if folded_total:
            stats["constants_folded"] += folded_total
        return folded_total > 0

    def _fold_candidates(
        self,
        g: gs.Graph,
        an: _Analysis | None,
        any_out: set[int],
        kept: dict[int, str],
        excluded: frozenset[int],
    ) -> tuple[list[gs.Node], dict[int, np.ndarray]]:
        """Nodes (topological order) whose inputs are constant or become constant, and the values known from
        computed shapes without evaluation (tensor id -> value)."""
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
                if an is not None and _too_large_by_inference(node, an.facts, self.fold_size_limit):
                    kept[id(node)] = "fold_skipped_too_large"
                    continue
                cand.append(node)
                will_be_const.update(id(t) for t in outs)
            elif an is not None and len(outs) == 1 and id(node) not in excluded:
                sv = an.sym.get(outs[0].name)
                if sv is not None and sv.known:
                    direct[id(outs[0])] = sv.array()
                    cand.append(node)
                    will_be_const.add(id(outs[0]))
        return cand, direct

    def _fold_graph(
        self,
        g: gs.Graph,
        an: _Analysis | None,
        any_out: set[int],
        imports: list[onnx.OperatorSetIdProto],
        stats: Counter,
        kept: dict[int, str],
    ) -> int:
        cand, direct = self._fold_candidates(g, an, any_out, kept, frozenset())
        if direct and not self.inline_if:
            # Shape folds are the only values that become constant here but not in onnxruntime's own folding.
            # One that decides an If condition lets ORT inline a branch at load and re-run shape inference on it,
            # which rejects some graphs that ran fine (1-element tensors where the spec wants scalars): without
            # our own If inlining, keep those.
            blocked = _feeding_if_conditions(cand, direct)
            if blocked:
                for nid in blocked:
                    kept[nid] = "fold_skipped_if_condition"
                cand, direct = self._fold_candidates(g, an, any_out, kept, frozenset(blocked))
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
        env = self._env(graph, None)
        removed: set[int] = set()
        for g in env.graphs:
            for bn in g.nodes:
                if bn.op != "BatchNormalization" or not _is_default_domain(bn):
                    continue
                reason = _fold_one_bn(bn, g, env)
                if reason is None:
                    removed.add(id(bn))
                    stats["bn_folded"] += 1
                    kept.pop(id(bn), None)
                else:
                    kept[id(bn)] = f"bn_kept_{reason}"
        _purge(env.graphs, removed)
        return bool(removed)

    @staticmethod
    def _affine_fn(env: rw.Env):
        io_ids = env.any_out | env.any_in

        def apply(producer: gs.Node, s: np.ndarray, t: np.ndarray, y: gs.Tensor) -> str | None:
            return _apply_affine(producer, s, t, io_ids, env.taken, y.name)

        return apply


# ====================================================================================================== helpers
def _purge(graphs: list[gs.Graph], removed: set[int]) -> None:
    if not removed:
        return
    for g in graphs:
        if any(id(n) in removed for n in g.nodes):
            g.nodes = [n for n in g.nodes if id(n) not in removed]


def _reconcile_declared_shapes(graph: gs.Graph, facts: Facts) -> int:
    """Declared (non-input) shapes that contradict computed facts -- other rank, or another static dim -- are
    replaced by the computed dims (symbols become unnamed dims). Returns how many were corrected."""
    graphs = all_graphs(graph)
    inputs = graph_input_ids(graphs)
    fixed = 0
    seen: set[int] = set()
    for g in graphs:
        for t in list(g.outputs) + [o for n in g.nodes for o in n.outputs]:
            if id(t) in seen or id(t) in inputs or not isinstance(t, gs.Variable) or t.shape is None:
                continue
            seen.add(id(t))
            f = facts.get(t.name)
            if f is None or f.dims is None:
                continue
            decl = list(t.shape)
            wrong = len(decl) != len(f.dims) or any(
                isinstance(d, (int, np.integer)) and d > 0 and isinstance(c, int) and int(d) != c
                for d, c in zip(decl, f.dims, strict=True)
            )
            if wrong:
                t.shape = [c if isinstance(c, int) else None for c in f.dims]
                fixed += 1
    return fixed


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


def _too_large_by_inference(node: gs.Node, facts: Facts, limit: int) -> bool:
    """Skip before evaluating when computed output shapes already prove the result would inflate."""
    out_bytes = 0
    for t in node.outputs:
        if t.is_empty():
            continue
        f = facts.get(t.name)
        if f is None or f.static is None or f.dtype is None:
            return False
        out_bytes += int(np.prod(f.static, dtype=np.int64)) * f.dtype.itemsize
    in_bytes = 0
    for t in node.inputs:
        if t.is_empty():
            continue
        if isinstance(t, gs.Constant):
            in_bytes += _nbytes(t, {})
            continue
        f = facts.get(t.name)
        if f is None or f.static is None or f.dtype is None:
            return False
        in_bytes += int(np.prod(f.static, dtype=np.int64)) * f.dtype.itemsize
    return out_bytes > in_bytes + limit


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
def _fold_one_bn(bn: gs.Node, g: gs.Graph, env: rw.Env) -> str | None:
    """Fold one BatchNormalization into its producer; None on success, else the reason it stays."""
    if len(bn.inputs) < 5 or any(t.is_empty() for t in bn.inputs[:5]) or not bn.outputs:
        return "malformed"
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "training_mode"
    if int(bn.attrs.get("spatial", 1)) == 0:
        return "not_spatial"
    for extra in bn.outputs[1:]:
        if not extra.is_empty() and (extra.outputs or id(extra) in env.any_out):
            return "training_outputs_used"
    x, gamma, beta, mean, var = bn.inputs[:5]
    y = bn.outputs[0]
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    if producer is None or producer.op not in _BN_PRODUCERS or not _is_default_domain(producer):
        return "no_linear_producer"
    if env.owner.get(id(producer)) is not g:
        return "producer_in_outer_scope"
    if len(x.outputs) != 1 or id(x) in env.any_out or producer.outputs[0] is not x:
        return "producer_output_shared"
    if not all(isinstance(p, gs.Constant) for p in (gamma, beta, mean, var)):
        return "params_not_constant"
    params = [np.asarray(p.values, dtype=np.float64).reshape(-1) for p in (gamma, beta, mean, var)]
    c = params[0].size
    if any(p.size != c for p in params):
        return "shape_mismatch"
    g64, beta64, mean64, var64 = params
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = g64 / np.sqrt(var64 + eps)
    reason = _apply_affine(producer, s, beta64 - mean64 * s, env.any_out | env.any_in, env.taken, y.name)
    if reason:
        return reason
    detach(bn)
    producer.outputs[0] = y
    return None


def _apply_affine(
    producer: gs.Node, s: np.ndarray, t: np.ndarray, io_ids: set[int], taken: set[str], base: str
) -> str | None:
    """Make a Conv/ConvTranspose/Gemm compute ``out · s + t`` per output channel: W' = W·s, b' = b·s + t
    (float64, cast back). None on success, else the reason nothing was changed."""
    if len(producer.inputs) < 2 or not isinstance(producer.inputs[1], gs.Constant):
        return "weight_not_constant"
    w_t = producer.inputs[1]
    b_t = producer.inputs[2] if len(producer.inputs) > 2 and not producer.inputs[2].is_empty() else None
    if b_t is not None and not isinstance(b_t, gs.Constant):
        return "bias_not_constant"
    w = np.asarray(w_t.values)
    if w.dtype.kind != "f":
        return "weight_not_float"
    c = s.size
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
    elif producer.op == "Gemm":
        if w.ndim != 2:
            return "shape_mismatch"
        trans_b = int(producer.attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != c:
            return "shape_mismatch"
        w_new = w64 * (s[:, None] if trans_b else s[None, :])
        gemm_beta = float(producer.attrs.get("beta", 1.0))
    else:
        return "no_linear_producer"
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
    b_new = b64 * s + t  # Gemm: broadcasts C ([], [N], [1,N], [M,1], [M,N]) against [N]
    if gemm_beta is not None and b_new.ndim > 2:
        return "shape_mismatch"

    def fresh(old: gs.Constant | None, suffix: str, values: np.ndarray) -> gs.Constant:
        # keep the weight's own name when nothing else reads it; a new name when it is shared
        if old is not None and len(old.outputs) == 1 and id(old) not in io_ids:
            name = old.name
        else:
            name = unique_name(f"{old.name if old is not None else (producer.name or base)}_{suffix}", taken)
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
