"""``cleanup``: BatchNormalization folded into the Conv / ConvTranspose / Gemm before it (``fold_batchnorm``).

**BatchNormalization into Conv / ConvTranspose / Gemm.** With ``s = γ / sqrt(σ² + ε)`` per output channel::

    W' = W · s   (Conv: axis 0 of [Cout, Cin/g, k..]; ConvTranspose: axis 1 of [Cin, Cout/g, k..] per group;
                  Gemm: the N axis of B, i.e. rows if transB else columns)
    b' = (b − μ) · s + β           (Gemm: b = beta·C, then beta := 1)

computed in float64 and cast back to the weight dtype; only when the producer's output feeds the BN alone and
every weight is an initializer (a weight that is a graph input is a skip reason in stats). The same arithmetic
folds a per-channel constant ``+ c`` / ``- c`` / ``· c`` after a Conv/ConvTranspose (``conv_affine_folding``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import detach
from onnxcompress.naming import unique_name

from .rewrite_env import Env, is_default, purge

_BN_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorms(graph: gs.Graph, stats: Counter, kept: dict[int, str]) -> bool:
    """Fold every BatchNormalization that can be (rule above); a BN that stays gets its reason in ``kept``.
    Whether anything changed."""
    env = Env.build(graph, None)
    removed: set[int] = set()
    for g in env.graphs:
        for bn in g.nodes:
            if bn.op != "BatchNormalization" or not is_default(bn):
                continue
            reason = _fold_one_bn(bn, g, env)
            if reason is None:
                removed.add(id(bn))
                stats["bn_folded"] += 1
                kept.pop(id(bn), None)
            else:
                kept[id(bn)] = f"bn_kept_{reason}"
    purge(env.graphs, removed)
    return bool(removed)


def _fold_one_bn(bn: gs.Node, g: gs.Graph, env: Env) -> str | None:
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
    if producer is None or producer.op not in _BN_PRODUCERS or not is_default(producer):
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
    reason = apply_affine(producer, s, beta64 - mean64 * s, env.any_out | env.any_in, env.taken, y.name)
    if reason:
        return reason
    detach(bn)
    producer.outputs[0] = y
    return None


def apply_affine(
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
