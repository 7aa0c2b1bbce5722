"""``cleanup``: a per-channel constant after a Conv/ConvTranspose folded into it (``fold_conv_affine``).

**Conv affine** (``fold_conv_affine``): ``Conv(x, W, b) + c``, ``- c`` or ``* c`` with a constant ``c`` that is
one value per output channel (dims 1 except the channel axis; rank <= the Conv output's) folds into the Conv::

    + c:  b' = b + c          * c:  W' = W · c (per output channel),  b' = b · c

(ConvTranspose: the output channel is axis 1 of each weight group), computed in float64. ``* c`` only in the
forms onnxruntime fuses itself at load (``c`` a 0-d scalar, ``[C,1..]`` or ``[1,C,1..]``), so its kernels see the
same weights as they would for the original: scaling the weights changes the rounding of every accumulation,
and folding the ``[1]``-shaped scales of PP-OCRv4 det moved its output by 1.1e-4 of its scale.

The weights are rewritten by ``batchnorm_folding.apply_affine`` (the same arithmetic as BN folding).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import detach

from .batchnorm_folding import apply_affine
from .rewrite_env import Env, is_default, producer_in, single_use


def fold_conv_affine(env: Env, stats: Counter, kept: dict[int, str]) -> set[int]:
    """Constant per-channel Add/Sub/Mul after Conv/ConvTranspose -> the Conv's bias/weights; the ids of the nodes
    removed (a node that stays gets its reason in ``kept``)."""
    io_ids = env.any_out | env.any_in
    removed: set[int] = set()
    for g in env.graphs:
        for node in list(g.nodes):
            if node.op not in ("Add", "Sub", "Mul") or not is_default(node) or len(node.inputs) != 2:
                continue
            order = [(0, 1)] if node.op == "Sub" else [(0, 1), (1, 0)]
            for pi, ci in order:
                conv_out, c = node.inputs[pi], node.inputs[ci]
                producer = producer_in(conv_out, env, g)
                if producer is None or producer.op not in ("Conv", "ConvTranspose"):
                    continue
                if not isinstance(c, gs.Constant) or not single_use(conv_out, env):
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
                reason = apply_affine(producer, s, t, io_ids, env.taken, y.name)
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
