"""Structural rewrites of ``cleanup``; each leaves every value the graph still has unchanged.

Shapes come from ``_cleanup_shapes`` (computed, never declared). Rules:

* **No-op nodes** (``remove_noops``): ``y = op(x, ...)`` with ``y == x`` is bypassed (consumers read ``x``):
  ``Cast``/``CastLike`` to ``x``'s own dtype; ``Transpose`` with the identity perm; ``Reshape``/``Flatten``/
  ``Squeeze``/``Unsqueeze``/``Expand``/``Tile`` whose computed output dims equal the input dims (equal symbols
  count: a reshape to the same dims is the identity), and a Reshape of a vector into a vector; ``Slice`` whose
  every axis has start 0, step 1 and an end at or past the (static) dim or >= 2**31 - 1; ``Pad`` whose pads are
  all 0; ``Concat``/``Sum``/``Max``/``Min``/``Mean`` of one input; ``Split`` into one output with the input's dims;
  ``x * 1``, ``1 * x``, ``x / 1``, ``x + 0``, ``0 + x``, ``x - 0`` where the constant is all ones (zeros), has x's
  dtype and cannot broadcast x to a larger shape (its rank <= x's rank, each of its dims 1 or equal to x's static
  dim). ``x + 0`` turns ``-0.0`` into ``+0.0``: equal as numbers, the sign of a zero may change.
* **Chains** (``merge_chains``), the first node's output read by the second only:
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
* **Reshape shapes** (``fold_shapes``): a Reshape whose target shape is computed from ``Shape`` ops gets a constant
  target when every element is known: an int stays; a dim provably equal to the data's dim at the same position
  becomes 0 (copy; only with ``allowzero`` 0); a single remaining element becomes -1 when every other element is a
  positive int (so -1 is unambiguous even for empty tensors).
* **Common subexpressions** (``cse``): two nodes with the same op, domain, attributes and inputs (by identity;
  constants by name, after duplicate initializers are merged) compute the same values; the later one's consumers
  read the earlier one's outputs. Scope-aware: a node inside an If/Loop branch may reuse a node of an enclosing
  graph that precedes the branch's node; never across sibling branches. Never merged: non-deterministic ops
  (Random*, Multinomial, Bernoulli, Dropout), nodes with subgraphs, non-default domains, and a node whose output
  is an output of its graph.
* **Conv affine** (``fold_conv_affine``): ``Conv(x, W, b) + c``, ``- c`` or ``* c`` with a constant ``c`` that is
  one value per output channel (dims 1 except the channel axis; rank <= the Conv output's) folds into the Conv::

      + c:  b' = b + c          * c:  W' = W · c (per output channel),  b' = b · c

  (ConvTranspose: the output channel is axis 1 of each weight group), computed in float64. ``* c`` only in the
  forms onnxruntime fuses itself at load (``c`` a 0-d scalar, ``[C,1..]`` or ``[1,C,1..]``), so its kernels see the
  same weights as they would for the original: scaling the weights changes the rounding of every accumulation,
  and folding the ``[1]``-shaped scales of PP-OCRv4 det moved its output by 1.1e-4 of its scale.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import detach, redirect_consumers, unique_name

from ._cleanup_shapes import Facts, SymVal, const_ints, sym_of

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_SAME_DIMS_NOOP = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile"})
_SLICE_END_ALL = 2**31 - 1


@dataclass
class Env:
    """What every rewrite needs to know about the graph; rebuilt once per rewrite step."""

    graph: gs.Graph
    graphs: list[gs.Graph]
    facts: Facts
    sym: dict[str, SymVal]
    opset: int
    any_out: set[int] = field(default_factory=set)
    any_in: set[int] = field(default_factory=set)
    owner: dict[int, gs.Graph] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    _g_outs: dict[int, set[int]] = field(default_factory=dict)

    def outputs_of(self, g: gs.Graph) -> set[int]:
        """ids of ``g``'s own outputs (cached; the outputs of a graph never change during a step)."""
        ids = self._g_outs.get(id(g))
        if ids is None:
            ids = self._g_outs[id(g)] = {id(t) for t in g.outputs}
        return ids


def is_default(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


def _single_use(t: gs.Tensor, env: Env) -> bool:
    """``t`` is read by exactly one node (in any scope) and is no graph output."""
    return len(t.outputs) == 1 and id(t) not in env.any_out


def _producer(t: gs.Tensor, env: Env, g: gs.Graph) -> gs.Node | None:
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    p = t.inputs[0]
    return p if env.owner.get(id(p)) is g and is_default(p) else None


def _new_const(env: Env, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(unique_name(base, env.taken), values=np.ascontiguousarray(values))


def _axes_of(node: gs.Node, idx: int = 1) -> list[int] | None:
    """Constant axes of Squeeze/Unsqueeze (attribute before opset 13, input after); None when not constant."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > idx and not node.inputs[idx].is_empty():
        arr = const_ints(node.inputs[idx])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def _rank(t: gs.Tensor, env: Env) -> int | None:
    f = env.facts.of(t)
    return None if f is None or f.dims is None else len(f.dims)


# ------------------------------------------------------------------------------------------------- bypassing
def bypass(node: gs.Node, x: gs.Tensor, y: gs.Tensor, g: gs.Graph, env: Env) -> str | None:
    """Make ``y``'s consumers read ``x`` and drop ``node``. None on success, else why the node stays.

    When ``y`` is an output of its graph, ``x``'s producer is made to produce ``y`` instead (the output name
    survives); that needs ``x`` to come from a node of the same graph and to be no graph input/output.
    """
    if id(y) in env.outputs_of(g):
        if isinstance(x, gs.Constant):
            return "output_of_initializer"
        if id(x) in env.any_in:
            return "output_of_graph_input"
        if id(x) in env.any_out:
            return "output_of_output"
        if len(x.inputs) != 1 or env.owner.get(id(x.inputs[0])) is not g:
            return "output_of_outer_scope"
        producer = x.inputs[0]
        detach(node)
        redirect_consumers(x, y)
        idx = next(i for i, t in enumerate(producer.outputs) if t is x)
        producer.outputs[idx] = y
        return None
    if id(y) in env.any_out:
        return "subgraph_output"
    detach(node)
    redirect_consumers(y, x)
    return None


# ------------------------------------------------------------------------------------------------- no-op nodes
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
            r = _rank(ins[0], env)
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


def remove_noops(env: Env, stats: Counter, kept: dict[int, str]) -> set[int]:
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


# ------------------------------------------------------------------------------------------------ Reshape shapes
def simplify_reshape_shapes(env: Env, stats: Counter) -> int:
    """Computed Reshape targets -> constants (see the module docstring)."""
    changed = 0
    for g in env.graphs:
        for node in g.nodes:
            if node.op != "Reshape" or not is_default(node) or len(node.inputs) < 2:
                continue
            shape_t = node.inputs[1]
            if isinstance(shape_t, gs.Constant) or shape_t.is_empty():
                continue
            sv = sym_of(shape_t, env.sym)
            if sv is None or sv.scalar:
                continue
            allowzero = int(node.attrs.get("allowzero", 0))
            fx = env.facts.of(node.inputs[0])
            new = resolve_shape(list(sv.elems), fx.dims if fx is not None else None, allowzero)
            if new is None:
                continue
            node.inputs[1] = _new_const(env, f"{shape_t.name}_const", np.array(new, dtype=np.int64))
            changed += 1
    if changed:
        stats["reshape_shapes_folded"] += changed
    return changed


def resolve_shape(elems: list, xdims: tuple | None, allowzero: int) -> list[int] | None:
    """A constant Reshape target equal to ``elems`` for data of dims ``xdims``; None when not provable."""
    out: list[int | None] = []
    for i, e in enumerate(elems):
        if isinstance(e, int):
            if e == 0 and allowzero == 0 and (xdims is None or i >= len(xdims)):
                return None  # a copy-dim past the data's rank: leave it to the runtime to reject
            out.append(e)
        elif allowzero == 0 and xdims is not None and i < len(xdims) and xdims[i] == e:
            out.append(0)
        else:
            out.append(None)
    unknown = [i for i, e in enumerate(out) if e is None]
    if not unknown:
        return out  # type: ignore[return-value]
    if len(unknown) == 1 and all(e is None or e > 0 for e in out):
        out[unknown[0]] = -1
        return out  # type: ignore[return-value]
    return None


# ------------------------------------------------------------------------------------------------------- chains
def merge_chains(env: Env, stats: Counter) -> set[int]:
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
    first = _producer(node.inputs[0], env, g)
    if first is None or first.op != "Transpose" or not _single_use(node.inputs[0], env):
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
    node.inputs.append(_new_const(env, f"{y.name}_shape", np.array(target, dtype=np.int64)))
    return "transpose_as_reshape"


def _reshape_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    if len(node.inputs) < 2 or int(node.attrs.get("allowzero", 0)) != 0:
        return None
    mid = node.inputs[0]
    first = _producer(mid, env, g)
    if first is None or first.op not in _VIEW_OPS or not _single_use(mid, env):
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
            node.inputs[1] = _new_const(env, f"{node.inputs[1].name}_merged", np.array(new, dtype=np.int64))
    node.inputs[0] = x
    _drop(first, removed)
    return "reshape_chain_merged"


def _unsqueeze_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    mid = node.inputs[0]
    first = _producer(mid, env, g)
    if first is None or first.op != "Unsqueeze" or not _single_use(mid, env):
        return None
    a1, a2 = _axes_of(first), _axes_of(node)
    if a1 is None or a2 is None:
        return None
    x = first.inputs[0]
    r0 = _rank(x, env)
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
        node.inputs[1] = _new_const(env, f"{node.outputs[0].name}_axes", np.array(merged, dtype=np.int64))
    _drop(first, removed)
    return "unsqueeze_chain_merged"


def _concat_chain(node: gs.Node, g: gs.Graph, env: Env, removed: set[int]) -> str | None:
    """Concat inputs that are Concats on the same axis (read by this node only) are spliced in."""
    rank = _rank(node.outputs[0], env)

    def norm(a: int) -> int | None:
        return a if a >= 0 else (a + rank if rank is not None else None)

    axis = norm(int(node.attrs.get("axis", 0)))
    new_inputs: list[gs.Tensor] = []
    inner: list[gs.Node] = []
    for t in node.inputs:
        first = _producer(t, env, g)
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
    first = _producer(mid, env, g)
    pair = {node.op, first.op} if first is not None else set()
    if pair != {"Squeeze", "Unsqueeze"} or not _single_use(mid, env):
        return None
    a1, a2 = _axes_of(first), _axes_of(node)
    if not a1 or not a2:
        return None
    x = first.inputs[0]
    r = _rank(mid if first.op == "Unsqueeze" else x, env)
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
    first = _producer(mid, env, g)
    if first is None or first.op != "Slice" or not _single_use(mid, env):
        return None
    x = first.inputs[0]
    rank = _rank(x, env)
    p1, p2 = _slice_params(first, rank), _slice_params(node, rank)
    if p1 is None or p2 is None or set(p1[2].tolist()) & set(p2[2].tolist()):
        return None
    merged = [np.concatenate([a, b]) for a, b in zip(p1, p2, strict=True)]
    base = node.outputs[0].name
    params = [
        _new_const(env, f"{base}_{what}", arr)
        for what, arr in zip(("starts", "ends", "axes", "steps"), merged, strict=True)
    ]
    node.inputs.clear()
    node.inputs.extend([x] + params)
    _drop(first, removed)
    return "slice_chain_merged"


# ------------------------------------------------------------------------------------------------------- CSE
def _attr_key(v):
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(e) for e in v)
    if isinstance(v, np.ndarray):
        return ("nd", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, gs.Constant):
        return ("c", v.name)
    if isinstance(v, gs.Tensor):
        return ("t", id(v))
    if isinstance(v, float) and v != v:
        return ("nan",)
    return (type(v).__name__, v)


def _node_key(node: gs.Node):
    ins = []
    for t in node.inputs:
        if t.is_empty():
            ins.append("")
        elif isinstance(t, gs.Constant):
            ins.append(("c", t.name))
        else:
            ins.append(("v", id(t)))
    attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
    return (node.op, node.domain or "", tuple(ins), attrs, len(node.outputs))


def eliminate_common(env: Env, stats: Counter) -> set[int]:
    removed: set[int] = set()
    _cse_graph(env.graph, [], env, removed, stats)
    return removed


def _cse_graph(g: gs.Graph, outer: list[dict], env: Env, removed: set[int], stats: Counter) -> None:
    seen: dict = {}
    scopes = outer + [seen]
    for node in list(g.nodes):
        subs = list(node.subgraphs())
        if subs:
            for sub in subs:
                _cse_graph(sub, scopes, env, removed, stats)
            continue
        if not is_default(node) or node.op in _NONDETERMINISTIC or not node.outputs:
            continue
        key = _node_key(node)
        canon = next((s[key] for s in reversed(scopes) if key in s), None)
        if canon is None:
            seen[key] = node
            continue
        pairs = list(zip(node.outputs, canon.outputs, strict=True))
        if any(not d.is_empty() and (id(d) in env.any_out or c.is_empty()) for d, c in pairs):
            continue
        for d, c in pairs:
            if not d.is_empty():
                redirect_consumers(d, c)
        detach(node)
        removed.add(id(node))
        stats["cse_nodes_merged"] += 1


# --------------------------------------------------------------------------------------------- Conv affine fold
def fold_conv_affine(env: Env, stats: Counter, kept: dict[int, str], apply_affine) -> set[int]:
    """Constant per-channel Add/Sub/Mul after Conv/ConvTranspose -> the Conv's bias/weights."""
    removed: set[int] = set()
    for g in env.graphs:
        for node in list(g.nodes):
            if node.op not in ("Add", "Sub", "Mul") or not is_default(node) or len(node.inputs) != 2:
                continue
            order = [(0, 1)] if node.op == "Sub" else [(0, 1), (1, 0)]
            for pi, ci in order:
                conv_out, c = node.inputs[pi], node.inputs[ci]
                producer = _producer(conv_out, env, g)
                if producer is None or producer.op not in ("Conv", "ConvTranspose"):
                    continue
                if not isinstance(c, gs.Constant) or not _single_use(conv_out, env):
                    continue
                if producer.outputs[0] is not conv_out or not node.outputs:
                    continue
                vec = _per_channel(producer, c)
                if vec is None or (
                    node.op == "Mul"
                    and len(c.shape)
                    not in (0, len(producer.inputs[1].shape) - 1, len(producer.inputs[1].shape))
                ):
                    continue
                cvec, cout = vec
                if node.op == "Mul":
                    s, t = cvec, np.zeros(cout)
                else:
                    s, t = np.ones(cout), (cvec if node.op == "Add" else -cvec)
                y = node.outputs[0]
                reason = apply_affine(producer, s, t, y)
                if reason:
                    kept[id(node)] = f"conv_affine_kept_{reason}"
                    continue
                detach(node)
                producer.outputs[0] = y
                removed.add(id(node))
                stats[f"conv_{node.op.lower()}_folded"] += 1
                break
    return removed


def _per_channel(conv: gs.Node, c: gs.Constant) -> tuple[np.ndarray, int] | None:
    """(float64 vector of length Cout, Cout) when ``c`` broadcasts as one value per output channel."""
    if len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant):
        return None
    w = conv.inputs[1]
    try:
        wshape = tuple(int(d) for d in w.shape)
        cshape = tuple(int(d) for d in c.shape)
        if np.dtype(c.dtype) != np.dtype(w.dtype) or np.dtype(c.dtype).kind != "f":
            return None
    except Exception:
        return None
    r = len(wshape)
    if r < 3 or len(cshape) > r:
        return None
    if conv.op == "Conv":
        cout = wshape[0]
    else:
        group = int(conv.attrs.get("group", 1))
        cout = wshape[1] * group
    padded = (1,) * (r - len(cshape)) + cshape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, cout):
        return None
    vals = np.asarray(c.values, dtype=np.float64).reshape(-1)
    return (np.full(cout, vals[0]) if vals.size == 1 else vals), cout
