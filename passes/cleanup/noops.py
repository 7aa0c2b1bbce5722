"""``cleanup``: nodes that provably return their input are bypassed (consumers read the input).

**Identity / inference Dropout.** ``y = Identity(x)`` and ``y = Dropout(x)`` (mask unused, ``training_mode``
absent or constant false; opset < 7 only with ``is_test=1``) are bypassed: consumers of ``y`` read ``x``. When ``y``
is an output of its graph the producer of ``x`` is made to produce ``y`` instead, so the output name survives; if
``x`` is a graph input, an initializer, another output, or comes from an enclosing scope, the node stays.

**No-op nodes** (``remove_noops``): ``y = op(x, ...)`` with ``y == x`` is bypassed (consumers read ``x``):
``Cast``/``CastLike`` to ``x``'s own dtype; ``Transpose`` with the identity perm; ``Reshape``/``Flatten``/
``Squeeze``/``Unsqueeze``/``Expand``/``Tile`` whose computed output dims equal the input dims (equal symbols
count: a reshape to the same dims is the identity), and a Reshape of a vector into a vector; ``Slice`` whose
every axis has start 0, step 1 and an end at or past the (static) dim or >= 2**31 - 1; ``Pad`` whose pads are
all 0; ``Concat``/``Sum``/``Max``/``Min``/``Mean`` of one input; ``Split`` into one output with the input's dims;
``x * 1``, ``1 * x``, ``x / 1``, ``x + 0``, ``0 + x``, ``x - 0`` where the constant is all ones (zeros), has x's
dtype and cannot broadcast x to a larger shape (its rank <= x's rank, each of its dims 1 or equal to x's static
dim). ``x + 0`` turns ``-0.0`` into ``+0.0``: equal as numbers, the sign of a zero may change.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .rewrite_env import Env, bypass, is_default, purge, rank_of
from .symbolic_values import const_ints

_SAME_DIMS_NOOP = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile"})
_SLICE_END_ALL = 2**31 - 1


def bypass_identities(
    graph: gs.Graph, remove_identity: bool, remove_dropout: bool, stats: Counter, kept: dict[int, str]
) -> bool:
    """Bypass Identity nodes (``remove_identity``) and inference-mode Dropout nodes (``remove_dropout``); a node
    that stays gets its reason in ``kept``. Whether anything changed."""
    env = Env.build(graph, None)
    opset = graph.opset or 1
    removed: set[int] = set()
    for g in env.graphs:
        for node in list(g.nodes):
            if not is_default(node) or not node.inputs or not node.outputs:
                continue
            if node.op == "Identity" and remove_identity:
                key = "identity_removed"
            elif node.op == "Dropout" and remove_dropout:
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
            reason = bypass(node, x, y, g, env)
            if reason:
                kept[id(node)] = f"{key.split('_')[0]}_kept_{reason}"
                continue
            removed.add(id(node))
            stats[key] += 1
    purge(env.graphs, removed)
    return bool(removed)


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


def remove_noops(env: Env, stats: Counter, kept: dict[int, str]) -> set[int]:
    """Bypass every no-op node (rules above); the ids of the nodes removed."""
    removed: set[int] = set()
    for g in env.graphs:
        for node in list(g.nodes):
            if not is_default(node) or node.op in ("Identity", "Dropout"):
                continue
            idx = noop_input(node, env)
            if idx is None:
                continue
            x, y = node.inputs[idx], node.outputs[0]
            if x.is_empty():
                continue
            reason = bypass(node, x, y, g, env)
            if reason:
                kept[id(node)] = f"noop_kept_{reason}"
                continue
            removed.add(id(node))
            stats[f"noop_{node.op.lower()}_removed"] += 1
    return removed


def noop_input(node: gs.Node, env: Env) -> int | None:
    """Index of the input that ``node``'s (only) output provably equals, else None."""
    op, ins = node.op, node.inputs
    if not ins or ins[0].is_empty() or len(node.outputs) != 1 or node.outputs[0].is_empty():
        return None
    y = node.outputs[0]
    fx, fy = env.facts.of(ins[0]), env.facts.of(y)
    if op == "Cast":
        to = node.attrs.get("to")
        try:
            want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
        except Exception:
            return None
        return 0 if fx is not None and fx.dtype is not None and fx.dtype == want else None
    if op == "CastLike" and len(ins) > 1:
        ft = env.facts.of(ins[1])
        ok = fx is not None and ft is not None and fx.dtype is not None and fx.dtype == ft.dtype
        return 0 if ok else None
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            r = rank_of(ins[0], env)
            return 0 if r is not None and r <= 1 else None
        return 0 if list(perm) == list(range(len(perm))) else None
    if op == "Reshape" and fx is not None and fy is not None and fx.dims is not None and fy.dims is not None:
        if len(fx.dims) == 1 and len(fy.dims) == 1:
            return 0  # a valid reshape of a vector into a vector keeps its one dim
    if op in _SAME_DIMS_NOOP:
        if fx is None or fy is None or fx.dims is None or fy.dims is None or fx.dims != fy.dims:
            return None
        return 0 if fx.dtype is None or fy.dtype is None or fx.dtype == fy.dtype else None
    if op == "Slice":
        return 0 if _slice_is_full(node, fx, env) else None
    if op == "Pad":
        return 0 if _pads_all_zero(node) else None
    if op in ("Concat", "Sum", "Max", "Min", "Mean") and len(ins) == 1:
        return 0
    if op == "Split" and len(node.outputs) == 1:
        ok = fx is not None and fy is not None and fx.dims is not None and fx.dims == fy.dims
        return 0 if ok else None
    if op in ("Mul", "Div", "Add", "Sub") and len(ins) == 2:
        cands = [(0, 1)] if op in ("Div", "Sub") else [(0, 1), (1, 0)]
        neutral = 1 if op in ("Mul", "Div") else 0
        for xi, ci in cands:
            if _is_neutral(ins[ci], ins[xi], neutral, env):
                return xi
    return None


def _is_neutral(c: gs.Tensor, x: gs.Tensor, neutral: int, env: Env) -> bool:
    if not isinstance(c, gs.Constant) or isinstance(x, gs.Constant):
        return False
    fx = env.facts.of(x)
    try:
        cdtype = np.dtype(c.dtype)
        cshape = tuple(int(d) for d in c.shape)
    except Exception:
        return False
    if fx is None or fx.dtype is None or fx.dtype != cdtype or cdtype.kind not in "biufc":
        return False
    if int(np.prod(cshape, dtype=np.int64)) > 4096:
        return False
    if cshape:
        if fx.dims is None or len(cshape) > len(fx.dims):
            return False
        for cd, xd in zip(reversed(cshape), reversed(fx.dims), strict=False):
            if cd != 1 and not (isinstance(xd, int) and xd == cd):
                return False
    vals = np.asarray(c.values)
    return bool(vals.size) and bool(np.all(vals == neutral))


def _slice_is_full(node: gs.Node, fx, env: Env) -> bool:
    ins = node.inputs
    if len(ins) < 3 or fx is None or fx.dims is None:
        return False
    starts, ends = const_ints(ins[1]), const_ints(ins[2])
    axes = const_ints(ins[3]) if len(ins) > 3 and not ins[3].is_empty() else None
    steps = const_ints(ins[4]) if len(ins) > 4 and not ins[4].is_empty() else None
    if starts is None or ends is None or (len(ins) > 3 and not ins[3].is_empty() and axes is None):
        return False
    if len(ins) > 4 and not ins[4].is_empty() and steps is None:
        return False
    n = starts.size
    axes = np.arange(n) if axes is None else axes.reshape(-1)
    steps = np.ones(n, np.int64) if steps is None else steps.reshape(-1)
    rank = len(fx.dims)
    for s, e, a, st in zip(starts.reshape(-1), ends.reshape(-1), axes, steps, strict=True):
        a = int(a) + rank if a < 0 else int(a)
        if not 0 <= a < rank or int(st) != 1:
            return False
        d = fx.dims[a]
        if int(s) != 0 and not (isinstance(d, int) and int(s) <= -d):
            return False
        if not (int(e) >= _SLICE_END_ALL or (isinstance(d, int) and int(e) >= d)):
            return False
    return True


def _pads_all_zero(node: gs.Node) -> bool:
    if "pads" in node.attrs:
        return all(int(p) == 0 for p in node.attrs["pads"])
    if len(node.inputs) > 1:
        pads = const_ints(node.inputs[1])
        return pads is not None and bool(np.all(pads == 0))
    return False
