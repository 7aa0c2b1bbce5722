"""``cleanup``: duplicate initializers merged (``dedup_initializers``).

**Duplicate initializers.** Constants with the same dtype, shape and bytes (blake2b over the raw bytes, then a
byte comparison) are merged into the first one met (main graph first); subgraphs then read the outer copy.

A subgraph's shadow copy of an outer initializer (same name: graphsurgeon imports one per scope that reads it)
is left alone: merging it changes nothing once exported.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import all_graphs, graph_input_ids, graph_output_ids, redirect_consumers


def dedup_initializers(graph: gs.Graph, stats: Counter) -> bool:
    """Merge equal constants into the first one met; whether anything changed."""
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
