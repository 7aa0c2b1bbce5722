"""Blocks of the student for block-wise training (BRECQ-style) and the tensors feature matching compares.

A *boundary* b sits between node b-1 and node b of the topological order. The tensors live across it are those
produced before it (or graph inputs) and consumed after it. A boundary is a valid cut when every live tensor whose
value depends on a trainable weight also exists in the teacher under the same name (so the teacher says what it
should be): the residual stream between blocks, a stage's output. Live tensors that depend on no weight (attention
masks, shapes) are inputs only. ``partition`` walks the boundaries once (O(nodes + edges)) and cuts at valid ones so
that blocks hold about equal numbers of trainable weight elements.

Block-wise training (``train_blockwise``): block k (nodes [start, end)) gets its inputs from the *current* student
(run in onnxruntime with the block's inputs exposed, after the blocks before it were trained and written back), and
its targets from the teacher at the block's output tensors (the kept channels of a pruned tensor; the graph outputs
with their own losses for the last block). Only the block's weights train. A block holding an op the interpreter
cannot run is left untrained and named in the stats (mode=refit+train gives it the closed-form refit first).
Memory: one block's activations, not the whole graph's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcompress.runtime import Session

from .torch_interpreter import TorchGraph, Unsupported
from .torch_ops import MULTI_OUTPUT, OPS
from .train_losses import teacher_view

log = logging.getLogger(__name__)


@dataclass
class Block:
    start: int
    end: int
    inputs: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    weights: set[str] = field(default_factory=set)
    size: int = 0


def weight_dependent(tg: TorchGraph, nodes: list) -> set[str]:
    """Names of the tensors ``nodes`` (in topological order) produce whose values depend on a trainable weight."""
    depends: set[str] = set()
    for node in nodes:
        if any(t.name in tg.weights or t.name in depends for t in node.inputs):
            depends.update(t.name for t in node.outputs if t.name)
    return depends


def partition(tg: TorchGraph, teacher_names: set[str], n_blocks: int) -> list[Block]:
    """Cut the student's nodes into about ``n_blocks`` blocks at valid boundaries (see the module docstring)."""
    nodes = tg.nodes
    n = len(nodes)
    last: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for t in node.inputs:
            if t.name and t.name not in tg.consts and t.name not in tg.weights:
                last[t.name] = k
    for name in tg.outputs:
        last[name] = n
    depends = weight_dependent(tg, nodes)
    sizes = [sum(int(np.prod(tg.weights[x].shape)) for x in {t.name for t in node.inputs if t.name in tg.weights})
             for node in nodes]
    total = max(1, sum(sizes))
    target = total / max(1, n_blocks)
    live = {name for name in tg.inputs if name in last}
    blocks: list[Block] = []
    start, acc = 0, 0
    for k, node in enumerate(nodes):
        acc += sizes[k]
        live.update(t.name for t in node.outputs if t.name and t.name in last)
        live.difference_update({name for name in list(live) if last.get(name, -1) <= k})
        if k == n - 1 or acc < target:
            continue
        dep = sorted(x for x in live if x in depends)
        if dep and all(x in teacher_names for x in dep):
            blocks.append(Block(start, k + 1, targets=dep, size=acc))
            start, acc = k + 1, 0
    blocks.append(Block(start, n, targets=list(tg.outputs), size=acc))
    # inputs of each block: the tensors it reads that are produced before it (or graph inputs)
    produced = {t.name: k for k, node in enumerate(nodes) for t in node.outputs if t.name}
    for b in blocks:
        reads = {t.name for node in nodes[b.start:b.end] for t in node.inputs if t.name}
        b.inputs = sorted(x for x in reads if x not in tg.consts and x not in tg.weights
                          and produced.get(x, -1) < b.start)
        b.weights = {x for x in reads if x in tg.weights}
    return blocks


def last_boundary(tg: TorchGraph, teacher_names: set[str]) -> list[str]:
    """The weight-dependent tensors live just after the student's last weighted node, when they all exist in the
    teacher and are not graph outputs (MiniLM: the last LayerNorm's per-token hidden states, before the pooling);
    else []. One pass over the nodes."""
    nodes = tg.nodes
    weighted = [k for k, node in enumerate(nodes) if any(t.name in tg.weights for t in node.inputs)]
    if not weighted:
        return []
    k = weighted[-1]
    later = {t.name for node in nodes[k + 1:] for t in node.inputs if t.name}
    made = {t.name for node in nodes[: k + 1] for t in node.outputs if t.name}
    live = sorted(x for x in made & later if x not in tg.outputs)
    depends = weight_dependent(tg, nodes[: k + 1])
    dep = [x for x in live if x in depends]
    return dep if dep and all(x in teacher_names for x in dep) else []


def block_unsupported(tg: TorchGraph, b: Block) -> list[str]:
    return sorted({node.op for node in tg.nodes[b.start:b.end]
                   if (node.op not in OPS and node.op not in MULTI_OUTPUT)
                   or (node.domain or "") not in ("", "ai.onnx")})


def train_blockwise(trainer: Any, graph: Any, feeds: list[dict]) -> dict:
    """Train the student block by block (see the module docstring); returns the stats."""
    ctx, opts, torch = trainer.ctx, trainer.opts, trainer.torch
    tg: TorchGraph = trainer.tg
    teacher_names = {v for node in trainer.teacher.graph.node for v in node.output}
    teacher_names |= {i.name for i in trainer.teacher.graph.input}
    blocks = partition(tg, teacher_names, opts.blocks or 8)
    train, held = trainer.split(feeds)
    targets_all = sorted({t for b in blocks for t in b.targets})
    total = max(1, sum(b.size for b in blocks))
    budget = opts.max_minutes * 60.0
    rows, untrained = [], []
    with Session(teacher_view(trainer.teacher, targets_all), what="teacher") as t_sess:
        trainer.batchable = trainer.stackable(t_sess, feeds[0])
        for k, b in enumerate(blocks):
            bad = block_unsupported(tg, b)
            if bad or not b.weights:
                if bad:
                    untrained.append({"block": k, "ops": bad})
                continue
            last = b.end == len(tg.nodes)
            student = ctx.export(graph)
            feats = [] if last else list(b.targets)
            with Session(teacher_view(student, b.inputs), what="student") as s_sess:
                names = b.inputs
                want_t = list(trainer.kinds) if last else b.targets

                def inputs(feed: dict, s_sess: Any = s_sess, names: list[str] = names) -> dict:
                    env = dict(zip(names, s_sess.run(feed, names), strict=True))
                    return {n: torch.from_numpy(np.asarray(v)) for n, v in env.items()}

                def forward(feed: dict, b: Block = b, inputs: Any = inputs, want: list[str] = want_t) -> dict:
                    env = inputs(feed)
                    tg.run_nodes(tg.nodes[b.start:b.end], env, set(want))
                    return env

                def targets(feed: dict, want: list[str] = want_t) -> dict:
                    return dict(zip(want, t_sess.run(feed, want), strict=True))

                saved_kinds, saved_weight = trainer.kinds, trainer.feature_weight
                if not last:
                    trainer.kinds, trainer.feature_weight = {}, 1.0
                try:
                    params = tg.parameters(b.weights)
                    steps = max(10, int(round(opts.steps * b.size / total)))
                    stats = trainer.fit(params, steps, budget * b.size / total, train, held, forward, targets,
                                        feats, f"distill block {k + 1}/{len(blocks)}")
                except Unsupported as exc:
                    untrained.append({"block": k, "ops": [exc.op]})
                    continue
                finally:
                    trainer.kinds, trainer.feature_weight = saved_kinds, saved_weight
            if stats["improved"]:
                tg.write_back(b.weights)
            rows.append({"block": k, "nodes": b.end - b.start, "weights": len(b.weights), **{
                key: stats[key] for key in ("steps", "stopped_by", "seconds", "heldout_loss_start",
                                            "heldout_loss_best", "improved")}})
    return {"mode": "train", "blockwise": True, "blocks": len(blocks), "blocks_trained": len(rows),
            "blocks_untrained": untrained, "block_stats": rows, "seconds": round(sum(r["seconds"] for r in rows), 1),
            "weights_trained": len(tg.weights), "losses": {k: v[0] for k, v in trainer.kinds.items()},
            "train_feeds": len(train), "heldout_feeds": len(held)}
