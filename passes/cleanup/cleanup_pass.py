"""The ``cleanup`` pass: its options and the driver that applies the rewrites (rules: the package docstring).

One round applies every enabled rewrite once, in this order: dead code, Identity/Dropout, constant (and shape)
folding, constant If, BN folding, Conv-affine folding, Reshape targets, no-op nodes, chains, duplicate
initializers, GELU operand order, common subexpressions. Shapes are computed once per round, after the Identity/Dropout bypass
(``RoundFacts``; valid by name for the rest of the round, since rewrites replace values by equal ones). Rounds repeat
until one changes nothing, at most ``max_rounds`` (a warning says when that bound stopped it). Then declared shapes
that contradict the computed ones are corrected (a rewrite can let inference see through to a declared shape that
was always wrong), the per-node reasons for what stayed are counted into the stats, and the graph's inputs and
outputs (names, dtypes, order) are checked to be unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.context import PassContext
from onnxcompress.errors import PassError
from onnxcompress.graph_utils import all_graphs, all_tensor_names, graph_input_ids, node_count
from onnxcompress.pass_base import Pass, PassResult, option, register

from .batchnorm_folding import fold_batchnorms
from .chains import merge_chains
from .constant_folding import fold_constants
from .conv_affine_folding import fold_conv_affine
from .cse import eliminate_common
from .dedup_initializers import dedup_initializers
from .gelu_order import order_gelus
from .if_inlining import inline_constant_ifs
from .noops import bypass_identities, remove_noops
from .reshape_targets import simplify_reshape_shapes
from .rewrite_env import DEFAULT_DOMAINS, Env, purge
from .shape_facts import Facts, RoundFacts

log = logging.getLogger(__name__)


_BOOL_OPTIONS = (
    "remove_dead", "remove_identity", "remove_dropout", "fold_constants", "fold_shapes", "inline_if",
    "fold_batchnorm", "fold_conv_affine", "remove_noops", "merge_chains", "cse", "dedup_initializers", "order_gelu",
)  # fmt: skip


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
    #: BN folding and Conv-affine folding change the producers' weights: channel groups must be recomputed
    preserves: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()

    remove_dead: bool = option(True, "drop nodes that reach no graph output")
    remove_identity: bool = option(True, "bypass Identity nodes")
    remove_dropout: bool = option(True, "bypass inference-mode Dropout nodes")
    fold_constants: bool = option(True, "evaluate constant-only nodes with onnxruntime")
    fold_shapes: bool = option(
        True, "fold shape values known from computed shapes; constant Reshape targets (0 / -1)"
    )
    inline_if: bool = option(True, "replace an If with a constant condition by the branch it takes")
    fold_batchnorm: bool = option(True, "fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm")
    fold_conv_affine: bool = option(
        True, "fold a per-channel constant Add/Sub/Mul into the preceding Conv/ConvTranspose"
    )
    remove_noops: bool = option(
        True, "bypass nodes that provably return their input (Cast to same type, x*1, full Slice...)"
    )
    merge_chains: bool = option(True, "merge Reshape/Unsqueeze/Transpose/Slice chains")
    cse: bool = option(True, "merge nodes with the same op, attributes and inputs")
    dedup_initializers: bool = option(True, "merge initializers with equal dtype, shape and bytes")
    order_gelu: bool = option(
        True, "write x*(0.5*(1+erf(x/sqrt2))) as (x*(1+erf))*0.5, the operand order onnxruntime fuses into Gelu"
    )
    fold_size_limit: int = option(65536, "bytes a folded result may exceed its inputs by (else not folded)")
    max_rounds: int = option(8, "upper bound on rewrite rounds before giving up on a fixed point")

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
        an: RoundFacts | None = None
        for rnd in range(self.max_rounds):
            changed, an = self._round(graph, ctx, stats, kept)
            log.debug("cleanup round %d: changed=%s", rnd, changed)
            if not changed:
                break
            modified = True
        else:
            log.warning("cleanup: still changing after %d rounds; stopping", self.max_rounds)
            an = RoundFacts(graph, _opset_imports(graph, ctx)) if self._needs_facts else None
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

    def _round(
        self, graph: gs.Graph, ctx: PassContext, stats: Counter, kept: dict[int, str]
    ) -> tuple[bool, RoundFacts | None]:
        """One pass of every enabled rewrite; (anything changed, the facts the round started from)."""
        changed = False
        if self.remove_dead:
            n = _remove_dead(graph)
            if n:
                stats["dead_nodes_removed"] += n
                changed = True
        if self.remove_identity or self.remove_dropout:
            changed |= bypass_identities(graph, self.remove_identity, self.remove_dropout, stats, kept)
        imports = _opset_imports(graph, ctx)
        an = RoundFacts(graph, imports) if self._needs_facts else None
        if self.fold_constants:
            changed |= fold_constants(
                graph,
                imports,
                an if self.fold_shapes else None,
                self.fold_size_limit,
                self.inline_if,
                stats,
                kept,
            )
        if self.inline_if:
            graphs = all_graphs(graph)
            changed |= inline_constant_ifs(graphs, all_tensor_names(graphs), stats) > 0
        if self.fold_batchnorm:
            changed |= fold_batchnorms(graph, stats, kept)
        if self.fold_conv_affine:
            env = Env.build(graph, an)
            changed |= self._apply(env, fold_conv_affine(env, stats, kept))
        if self.fold_shapes and an is not None:
            changed |= simplify_reshape_shapes(Env.build(graph, an), stats) > 0
        if self.remove_noops and an is not None:
            env = Env.build(graph, an)
            changed |= self._apply(env, remove_noops(env, stats, kept))
        if self.merge_chains and an is not None:
            env = Env.build(graph, an)
            changed |= self._apply(env, merge_chains(env, stats))
        if self.dedup_initializers:
            changed |= dedup_initializers(graph, stats)
        if self.order_gelu:
            changed |= order_gelus(graph, stats)
        if self.cse:
            env = Env.build(graph, an)
            changed |= self._apply(env, eliminate_common(env, stats))
        return changed, an

    @staticmethod
    def _apply(env: Env, removed: set[int]) -> bool:
        purge(env.graphs, removed)
        return bool(removed)


# ====================================================================================================== helpers
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
    imports = [i for i in imports if i.domain not in DEFAULT_DOMAINS]
    imports.append(onnx.helper.make_opsetid("", int(graph.opset or 13)))
    return imports
