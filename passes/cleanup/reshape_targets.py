"""``cleanup``: Reshape targets computed from shapes become constants (``fold_shapes``).

**Reshape shapes** (``fold_shapes``): a Reshape whose target shape is computed from ``Shape`` ops gets a constant
target when every element is known: an int stays; a dim provably equal to the data's dim at the same position
becomes 0 (copy; only with ``allowzero`` 0); a single remaining element becomes -1 when every other element is a
positive int (so -1 is unambiguous even for empty tensors).

The same ``resolve_shape`` gives the target of a Transpose rewritten as a Reshape (``chains``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .rewrite_env import Env, is_default, new_const
from .symbolic_values import sym_of


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
            node.inputs[1] = new_const(env, f"{shape_t.name}_const", np.array(new, dtype=np.int64))
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
