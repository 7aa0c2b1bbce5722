"""The weight tensors ``cluster`` may share values in, and why the others are left alone.

A float constant in a weight slot (``layouts.WEIGHT_SLOTS``: Conv / ConvTranspose / Gemm / MatMul weights, Gather
tables, recurrent W and R) is a candidate unless it is small (``min_size``), excluded by name, a graph output, not a
matrix, or a depthwise kernel under ``skip_depthwise``; each refusal is counted under its reason. One constant read
by several nodes (tied weights) is one candidate with several uses.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .layouts import WEIGHT_SLOTS, Use


@dataclass
class Candidate:
    tensor: gs.Constant
    uses: list[Use]


def _refusal(node: gs.Node, t: gs.Constant, outputs: set[int], opts: Any) -> str | None:
    v = t.values
    if not np.issubdtype(np.dtype(v.dtype), np.floating):
        return "not a float tensor"
    if v.size < opts.min_size:
        return f"fewer than {opts.min_size} elements"
    if any(fnmatch.fnmatchcase(t.name, p) or fnmatch.fnmatchcase(node.name or "", p) for p in opts.exclude):
        return "excluded by name"
    if id(t) in outputs:
        return "a graph output"
    if v.ndim < 1 or (node.op == "Gather" and v.ndim != 2):
        return "not a weight matrix"
    if opts.skip_depthwise and node.op == "Conv" and v.ndim >= 3 and v.shape[1] == 1 and \
            int(node.attrs.get("group", 1)) > 1:
        return "depthwise Conv (skip_depthwise)"
    return None


def find_candidates(graph: gs.Graph, opts: Any, skipped: Counter) -> list[Candidate]:
    """The candidates of ``graph`` under the pass options ``opts`` (min_size, exclude, embeddings,
    skip_depthwise); refusals counted in ``skipped``."""
    found: dict[int, Candidate | None] = {}
    outputs = {id(t) for t in graph.outputs}
    for node, slot in ((n, s) for n in graph.nodes for s in WEIGHT_SLOTS.get(n.op, ())):
        if len(node.inputs) <= slot or not isinstance(node.inputs[slot], gs.Constant):
            continue
        if node.op == "Gather" and not opts.embeddings:
            continue
        t = node.inputs[slot]
        if id(t) in found:
            if found[id(t)] is not None:
                found[id(t)].uses.append(Use(node, slot))
            continue
        reason = _refusal(node, t, outputs, opts)
        if reason:
            skipped[reason] += 1
            found[id(t)] = None
            continue
        found[id(t)] = Candidate(t, [Use(node, slot)])
    return [c for c in found.values() if c is not None]


__all__ = ["Candidate", "find_candidates"]
