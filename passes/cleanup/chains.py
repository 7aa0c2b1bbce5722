"""``cleanup``: chains of layout ops merged into one node (``merge_chains``).

**Chains** (``merge_chains``), the first node's output read by the second only:
``Reshape(v(x), s)`` where ``v`` is Reshape/Flatten/Squeeze/Unsqueeze is ``Reshape(x, s')``: a reshape depends
only on the element order and the target shape; ``s'`` is ``s`` with each copy-dim 0 replaced by the
intermediate dim (static), or kept when the intermediate dim is provably ``x``'s dim at the same position.
``Unsqueeze(Unsqueeze(x, a1), a2)`` is ``Unsqueeze(x, a)``, ``a`` = ``a2`` plus the final positions of ``a1``.
``Transpose(Transpose(x, p1), p2)`` is ``Transpose(x, p)`` with ``p[i] = p1[p2[i]]`` (identity: both go).
``Slice(Slice(x, ...))`` on disjoint axes, all parameters constant, is one Slice over the union of the axes.
``Concat(.., Concat(a, b), ..)`` on the same axis is ``Concat(.., a, b, ..)``.
``Squeeze(Unsqueeze(x, a), a)`` and ``Unsqueeze(Squeeze(x, a), a)`` are ``x``.
A ``Transpose`` feeding only Reshapes that moves nothing but size-1 axes (every other axis, symbols included,
keeps its relative order) is the Reshape to its output dims (0 = copy where the dim is provably ``x``'s dim at
the same position, -1 for one remaining dim), which the Reshape chain rule then absorbs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import detach

from .reshape_targets import resolve_shape
from .rewrite_env import Env, axes_of, bypass, is_default, new_const, producer_in, rank_of, single_use
from .symbolic_values import const_ints

_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def merge_chains(env: Env, stats: Counter) -> set[int]:
    """Merge every chain the rules above allow; the ids of the nodes removed."""
    removed: set[int] = set()
    for g in env.graphs:
        for node in list(g.nodes):
            if not is_default(node) or id(node) in removed or not node.inputs or not node.outputs:
                continue
            op = node.op
            if op == "Transpose":
                key = _transpose_chain(node, g, env, removed) or _transpose_as_reshape(node, g, env)
            elif op == "Reshape":
                key = _reshape_chain(node, g, env, removed)
            elif op == "Unsqueeze":
                key = _squeeze_pair(node, g, env, removed) or _unsqueeze_chain(node, g, env, removed)
            elif op == "Squeeze":
                key = _squeeze_pair(node, g, env, removed)
            elif op == "Slice":
                key = _slice_chain(node, g, env, removed)
            elif op == "Concat":
                key = _concat_chain(node, g, env, removed)
            else:
                key = None
            if key:
                stats[key] += 1
    return removed


def _drop(node: gs.Node, removed: set[int]) -> None:
    detach(node)
    removed.add(id(node))


def _transpose_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    first = producer_in(node.inputs[0], env, g)
    if first is None or first.op != "Transpose" or not single_use(node.inputs[0], env):
        return None
    p1, p2 = first.attrs.get("perm"), node.attrs.get("perm")
    if p1 is None or p2 is None or len(p1) != len(p2):
        return None
    perm = [int(p1[int(i)]) for i in p2]
    x = first.inputs[0]
    node.inputs[0] = x
    node.attrs["perm"] = perm
    _drop(first, removed)
    if perm == list(range(len(perm))) and bypass(node, x, node.outputs[0], g, env) is None:
        removed.add(id(node))
        return "transpose_pair_removed"
    return "transpose_chain_merged"


def _transpose_as_reshape(node: gs.Node, g: gs.Graph, env: Env) -> str | None:
    y = node.outputs[0]
    if (
        id(y) in env.any_out
        or not y.outputs
        or any(c.op != "Reshape" or not is_default(c) for c in y.outputs)
    ):
        return None
    if any(c.inputs[0] is not y for c in y.outputs):
        return None
    perm = node.attrs.get("perm")
    fx = env.facts.of(node.inputs[0])
    if env.opset < 5 or perm is None or fx is None or fx.dims is None or len(fx.dims) != len(perm):
        return None
    dims = fx.dims
    moved = [int(p) for p in perm if dims[int(p)] != 1]
    if moved != sorted(moved):
        return None
    target = resolve_shape([dims[int(p)] for p in perm], dims, 0)
    if target is None:
        return None
    node.op = "Reshape"
    node.attrs.clear()
    node.inputs.append(new_const(env, f"{y.name}_shape", np.array(target, dtype=np.int64)))
    return "transpose_as_reshape"


def _reshape_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    if len(node.inputs) < 2 or int(node.attrs.get("allowzero", 0)) != 0:
        return None
    mid = node.inputs[0]
    first = producer_in(mid, env, g)
    if first is None or first.op not in _VIEW_OPS or not single_use(mid, env):
        return None
    if first.op == "Reshape" and int(first.attrs.get("allowzero", 0)) != 0:
        return None
    shape = const_ints(node.inputs[1])
    if shape is None:
        return None
    x = first.inputs[0]
    shape = [int(v) for v in shape.reshape(-1)]
    if 0 in shape:
        fm, fx = env.facts.of(mid), env.facts.of(x)
        if fm is None or fm.dims is None:
            return None
        new = []
        for i, v in enumerate(shape):
            if v != 0:
                new.append(v)
            elif i < len(fm.dims) and isinstance(fm.dims[i], int):
                new.append(fm.dims[i])
            elif (
                fx is not None
                and fx.dims is not None
                and i < len(fx.dims)
                and i < len(fm.dims)
                and fx.dims[i] == fm.dims[i]
            ):
                new.append(0)
            else:
                return None
        if new != shape:
            node.inputs[1] = new_const(env, f"{node.inputs[1].name}_merged", np.array(new, dtype=np.int64))
    node.inputs[0] = x
    _drop(first, removed)
    return "reshape_chain_merged"


def _unsqueeze_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    mid = node.inputs[0]
    first = producer_in(mid, env, g)
    if first is None or first.op != "Unsqueeze" or not single_use(mid, env):
        return None
    a1, a2 = axes_of(first), axes_of(node)
    if a1 is None or a2 is None:
        return None
    x = first.inputs[0]
    r0 = rank_of(x, env)
    if r0 is None:
        if any(a < 0 for a in a1 + a2):
            return None
        r0 = 0  # only used to normalise negative axes
    r1 = r0 + len(a1)
    r2 = r1 + len(a2)
    a1n = sorted(a + r1 if a < 0 else a for a in a1)
    a2n = sorted(a + r2 if a < 0 else a for a in a2)
    if len(set(a2n)) != len(a2n) or any(not 0 <= a < r2 for a in a2n):
        return None
    rest = [i for i in range(r2) if i not in set(a2n)]
    if any(not 0 <= a < len(rest) for a in a1n):
        return None
    merged = sorted(a2n + [rest[a] for a in a1n])
    node.inputs[0] = x
    if "axes" in node.attrs:
        node.attrs["axes"] = merged
    else:
        node.inputs[1] = new_const(env, f"{node.outputs[0].name}_axes", np.array(merged, dtype=np.int64))
    _drop(first, removed)
    return "unsqueeze_chain_merged"


def _concat_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    """Concat inputs that are Concats on the same axis (read by this node only) are spliced in."""
    rank = rank_of(node.outputs[0], env)

    def norm(a: int) -> int | None:
        return a if a >= 0 else (a + rank if rank is not None else None)

    axis = norm(int(node.attrs.get("axis", 0)))
    new_inputs: list[gs.Tensor] = []
    inner: list[gs.Node] = []
    for t in node.inputs:
        first = producer_in(t, env, g)
        if (
            first is not None
            and first.op == "Concat"
            and id(first) not in removed
            and len(t.outputs) == 1
            and id(t) not in env.any_out
            and axis is not None
            and norm(int(first.attrs.get("axis", 0))) == axis  # same rank as the outer Concat
        ):
            new_inputs.extend(first.inputs)
            inner.append(first)
        else:
            new_inputs.append(t)
    if not inner:
        return None
    for first in inner:
        _drop(first, removed)
    node.inputs.clear()
    node.inputs.extend(new_inputs)
    return "concat_chain_merged"


def _squeeze_pair(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    """``Squeeze(Unsqueeze(x, a), a)`` and ``Unsqueeze(Squeeze(x, a), a)`` are ``x`` (a Squeeze only removes size-1
    axes, so re-inserting them at the same places restores ``x``); axes compared in the rank of the tensor that has
    them (Unsqueeze's output, Squeeze's input)."""
    mid = node.inputs[0]
    first = producer_in(mid, env, g)
    pair = {node.op, first.op} if first is not None else set()
    if pair != {"Squeeze", "Unsqueeze"} or not single_use(mid, env):
        return None
    a1, a2 = axes_of(first), axes_of(node)
    if not a1 or not a2:
        return None
    x = first.inputs[0]
    r = rank_of(mid if first.op == "Unsqueeze" else x, env)
    if r is None and any(a < 0 for a in a1 + a2):
        return None
    norm1 = sorted(a + r if a < 0 else a for a in a1) if r is not None else sorted(a1)
    norm2 = sorted(a + r if a < 0 else a for a in a2) if r is not None else sorted(a2)
    if norm1 != norm2 or len(set(norm1)) != len(norm1):
        return None
    if bypass(node, x, node.outputs[0], g, env) is not None:
        return None
    removed.add(id(node))
    _drop(first, removed)
    return "squeeze_pair_removed"


def _slice_params(node: gs.Node, rank: int | None) -> list[np.ndarray] | None:
    ins = node.inputs
    if len(ins) < 3:
        return None
    starts, ends = const_ints(ins[1]), const_ints(ins[2])
    if starts is None or ends is None or starts.size != ends.size:
        return None
    n = starts.size
    if len(ins) > 3 and not ins[3].is_empty():
        axes = const_ints(ins[3])
        if axes is None:
            return None
    else:
        axes = np.arange(n)
    if len(ins) > 4 and not ins[4].is_empty():
        steps = const_ints(ins[4])
        if steps is None:
            return None
    else:
        steps = np.ones(n, np.int64)
    axes = axes.reshape(-1).astype(np.int64)
    if (axes < 0).any():
        if rank is None:
            return None
        axes = np.where(axes < 0, axes + rank, axes)
    return [
        starts.reshape(-1).astype(np.int64),
        ends.reshape(-1).astype(np.int64),
        axes,
        steps.reshape(-1).astype(np.int64),
    ]


def _slice_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    mid = node.inputs[0]
    first = producer_in(mid, env, g)
    if first is None or first.op != "Slice" or not single_use(mid, env):
        return None
    x = first.inputs[0]
    rank = rank_of(x, env)
    p1, p2 = _slice_params(first, rank), _slice_params(node, rank)
    if p1 is None or p2 is None or set(p1[2].tolist()) & set(p2[2].tolist()):
        return None
    merged = [np.concatenate([a, b]) for a, b in zip(p1, p2, strict=True)]
    base = node.outputs[0].name
    params = [
        new_const(env, f"{base}_{what}", arr)
        for what, arr in zip(("starts", "ends", "axes", "steps"), merged, strict=True)
    ]
    node.inputs.clear()
    node.inputs.extend([x] + params)
    _drop(first, removed)
    return "slice_chain_merged"
