"""Fidelity tools of the ``quantize`` pass: output scoring, per-layer sensitivity, mixed precision, bias
correction and cross-layer equalization.

**Scores** of a candidate against the float reference on the same feeds, per graph output ``o``:
cosine ``⟨r, c⟩ / (‖r‖‖c‖)`` averaged over feeds; for outputs with a class axis (last dim >= 2) the top-1
agreement ``mean(argmax r == argmax c)`` over every position of every feed (a classifier's top-1; for a sequence
model the per-step agreement — also reported: the fraction of feeds agreeing at every step); SQNR ``10 log10(Σr² / Σ(r − c)²)``. The model's score
is the worst output.

**Sensitivity** of a layer (anchor node), one model per layer: *leave-one-out* (default) keeps that layer float in
the otherwise quantized model and scores the outputs — the marginal gain at the operating point; *one-at-a-time*
quantizes that layer alone. On deep, noise-amplifying nets (PP-OCR's recognizer) any single quantized layer already
saturates the output metrics, so one-at-a-time cannot rank layers, while leave-one-out finds the one depthwise
Conv whose wide-range output costs most. **Mixed precision**: order layers from most to least sensitive and keep
the first ``k`` in float, with ``k`` the smallest count that meets the target (``min_cosine``,
``max_agreement_drop``), found by doubling then bisection (assumes more float layers never hurt, which holds up to
noise).

**Bias correction** (Nagel et al. 2019, empirical form). Quantization shifts the mean of a layer's output:
``E[ŷ] − E[y] = E[(Ŵ x̂) − (W x)]`` per output channel. Measured on the calibration feeds (per-channel means of the
anchor's output in the float and the quantized graph, streamed), the shift is subtracted from the float bias before
quantizing again: ``b' = b − (E[ŷ] − E[y])``. Data-free form for weights only: ``(Ŵ − W)·E[x]`` with ``E[x]`` the
input's per-channel mean.

**Cross-layer equalization** (Nagel et al. 2019). For Conv1 -> f -> Conv2 with ``f`` positively homogeneous
(identity, Relu, LeakyRelu, PRelu with shared slope: ``f(x/s) = f(x)/s`` for ``s > 0``), per channel ``i`` with
``r1_i = max|W1[i]|`` (output channel of Conv1) and ``r2_i = max|W2[:, i]|`` (input channel of Conv2)::

    s_i = sqrt(r1_i / r2_i);   W1[i] /= s_i;   b1[i] /= s_i;   W2[:, i] *= s_i

after which both ranges equal ``sqrt(r1_i · r2_i)`` — per-tensor-friendly weights, exactly the same function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.data import Feed
from onnxcompress.runtime import Session

from ._quant_ops import const_value, is_depthwise

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- scoring
@dataclass
class Reference:
    feeds: list[Feed]
    outputs: list[list[np.ndarray]]
    names: list[str]
    #: anchors whose activation input is scored too (the features the model's last layers read)
    feature_nodes: list[str] = field(default_factory=list)
    features: list[list[np.ndarray]] = field(default_factory=list)

    def head(self, n: int) -> Reference:
        """The reference on its first ``n`` feeds."""
        return Reference(self.feeds[:n], self.outputs[:n], self.names, self.feature_nodes, self.features[:n])


def feature_nodes(graph: gs.Graph, max_walk: int = 64) -> list[str]:
    """For each graph output, the nearest anchor (Conv/MatMul/Gemm) upstream of it: the model's last layers.

    Their inputs are continuous features; unlike softmax/argmax outputs they do not saturate under small
    perturbations, so they rank layers by how much noise they add."""
    found: list[str] = []
    for out in graph.outputs:
        stack, seen, walked = [out], set(), 0
        while stack and walked < max_walk:
            t = stack.pop()
            if id(t) in seen or not t.inputs:
                continue
            seen.add(id(t))
            walked += 1
            node = t.inputs[0]
            if node.op in ("Conv", "MatMul", "Gemm") and node.name:
                if node.name not in found:
                    found.append(node.name)
                continue
            stack.extend(x for x in node.inputs if not isinstance(x, gs.Constant))
    return found


def feature_tensor_names(model: onnx.ModelProto, nodes: list[str]) -> list[str]:
    by_name = {n.name: n for n in model.graph.node}
    return [by_name[n].input[0] for n in nodes if n in by_name]


def run_model(
    model: onnx.ModelProto, feeds: list[Feed], features: list[str] = ()
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Outputs (and the inputs of the ``features`` nodes) of ``model`` on ``feeds``, optimized CPU session."""
    from onnxcompress.analyses.activations import expose_outputs

    extra = feature_tensor_names(model, list(features))
    m = expose_outputs(model, extra) if extra else model
    n_out = len(model.graph.output)
    with Session(m, threads=1, optimize=True, what="quantized candidate") as s:
        names = [o.name for o in model.graph.output] + extra
        runs = [list(s.run(f, names)) for f in feeds]
    return [r[:n_out] for r in runs], [r[n_out:] for r in runs]


def run_features(model: onnx.ModelProto, feeds: list[Feed], features: list[str]) -> list[list[np.ndarray]]:
    """Only the inputs of the ``features`` nodes on ``feeds`` (no graph output is fetched or scored): what the
    automatic float-layer search ranks candidates by."""
    from onnxcompress.analyses.activations import expose_outputs

    extra = feature_tensor_names(model, list(features))
    if not extra:
        return [[] for _ in feeds]
    with Session(expose_outputs(model, extra), threads=1, optimize=True, what="quantized candidate") as s:
        return [list(s.run(f, extra)) for f in feeds]


def feature_sqnr_db(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float | None:
    """Worst SQNR over the feature tensors (``None`` when there are none or they do not line up)."""
    if not ref or not ref[0] or not cand or len(cand[0]) != len(ref[0]):
        return None
    return min(_sqnr([f[i] for f in ref], [f[i] for f in cand]) for i in range(len(ref[0])))


def reference(model: onnx.ModelProto, feeds: list[Feed], features: list[str] = ()) -> Reference:
    outs, feats = run_model(model, feeds, features)
    return Reference(feeds, outs, [o.name for o in model.graph.output], list(features), feats)


def _sqnr(refs: list[np.ndarray], cands: list[np.ndarray]) -> float:
    sig = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in refs)
    err = sum(
        float(np.sum((np.asarray(r, np.float64) - np.asarray(c, np.float64)) ** 2))
        for r, c in zip(refs, cands, strict=True)
    )
    if err == 0:
        return float("inf")
    return float(10 * np.log10(sig / err)) if sig > 0 else float("-inf")


def score(ref: Reference, cand: tuple[list[list[np.ndarray]], list[list[np.ndarray]]]) -> dict[str, float]:
    """Worst-output cosine (mean over feeds), top-1 agreement (class-like outputs) and SQNR; worst feature SQNR."""
    cand, cand_features = cand
    cos_by_out: list[float] = []
    agree_by_out: list[float] = []
    sqnr_by_out: list[float] = []
    exact_by_out: list[float] = []
    n_out = len(ref.names)
    for k in range(n_out):
        cos, agree_hits, agree_total, sig, err = [], 0, 0, 0.0, 0.0
        feeds_exact, feeds_seen = 0, 0
        for r_outs, c_outs in zip(ref.outputs, cand, strict=True):
            r = np.asarray(r_outs[k])
            c = np.asarray(c_outs[k])
            if not np.issubdtype(r.dtype, np.floating) or r.shape != c.shape:
                continue
            # plain float64 reductions, no BLAS call: a multi-threaded BLAS spins on a shared machine
            r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
            rr, cc = float(np.sum(r64 * r64)), float(np.sum(c64 * c64))
            nr, nc = np.sqrt(rr), np.sqrt(cc)
            if nr == 0 and nc == 0:
                cos.append(1.0)
            elif nr == 0 or nc == 0:
                cos.append(0.0)
            else:
                cos.append(float(np.sum(r64 * c64)) / (nr * nc))
            sig += rr
            err += float(np.sum((r64 - c64) ** 2))
            if r.ndim >= 1 and r.shape[-1] >= 2:
                a = np.argmax(r.reshape(-1, r.shape[-1]), axis=1)
                b = np.argmax(c.reshape(-1, c.shape[-1]), axis=1)
                agree_hits += int(np.sum(a == b))
                agree_total += a.size
                feeds_exact += int(np.all(a == b))
                feeds_seen += 1
        if cos:
            cos_by_out.append(float(np.mean(cos)))
            sqnr_by_out.append(
                float("inf") if err == 0 else (10 * np.log10(sig / err) if sig > 0 else -np.inf)
            )
        if agree_total:
            agree_by_out.append(agree_hits / agree_total)
            exact_by_out.append(feeds_exact / feeds_seen)
    out = {
        "cosine": min(cos_by_out) if cos_by_out else 1.0,
        "sqnr_db": min(sqnr_by_out) if sqnr_by_out else float("inf"),
    }
    if ref.features and ref.features[0] and cand_features and len(cand_features[0]) == len(ref.features[0]):
        sq = [
            _sqnr([f[i] for f in ref.features], [f[i] for f in cand_features])
            for i in range(len(ref.features[0]))
        ]
        out["feature_sqnr_db"] = min(sq)
    if agree_by_out:
        out["agreement"] = min(agree_by_out)
        out["feeds_all_positions_agree"] = min(exact_by_out)
    return out


def meets(s: dict[str, float], min_cosine: float | None, max_agreement_drop: float | None) -> bool:
    if min_cosine is not None and s["cosine"] < min_cosine:
        return False
    if max_agreement_drop is not None and "agreement" in s and 1.0 - s["agreement"] > max_agreement_drop:
        return False
    return True


def rank_key(s: dict[str, float]) -> tuple[float, float, float]:
    """Sort key of a score, best first: the noise of the last layers' input features (continuous, does not
    saturate), then agreement lost, then output SQNR."""
    return (-s.get("feature_sqnr_db", 0.0), 1.0 - s.get("agreement", 1.0), -s["sqnr_db"])


# ------------------------------------------------------------------------------------------- mixed precision
@dataclass
class MixedPrecisionResult:
    float_layers: list[str]
    reasons: dict[str, str]
    score: dict[str, float]
    met: bool
    evaluations: int


def sensitivity(
    layers: list[str], evaluate_only: Callable[[str], dict[str, float]], progress: Callable | None = None
) -> dict[str, dict[str, float]]:
    """Score of the model with only ``layer`` quantized, for each layer."""
    it = progress(layers, total=len(layers), desc="sensitivity") if progress else layers
    return {name: evaluate_only(name) for name in it}


def search_float_set(
    order: list[str],
    evaluate_with_float: Callable[[list[str]], dict[str, float]],
    min_cosine: float | None,
    max_agreement_drop: float | None,
    first: dict[str, float],
) -> tuple[int, dict[str, float], int]:
    """Smallest k such that keeping ``order[:k]`` float meets the target; (k, score, evaluations)."""
    if meets(first, min_cosine, max_agreement_drop):
        return 0, first, 0
    evals = 0
    scores: dict[int, dict[str, float]] = {0: first}
    lo, hi = 0, None  # lo fails, hi meets
    k = 1
    n = len(order)
    while k <= n:
        s = evaluate_with_float(order[:k])
        log.debug("mixed precision: %d float -> %s", k, s)
        evals += 1
        scores[k] = s
        if meets(s, min_cosine, max_agreement_drop):
            hi = k
            break
        lo = k
        if k == n:
            break
        k = min(2 * k, n)
    if hi is None:
        return n, scores[max(scores)], evals
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = evaluate_with_float(order[:mid])
        log.debug("mixed precision: %d float -> %s", mid, s)
        evals += 1
        scores[mid] = s
        if meets(s, min_cosine, max_agreement_drop):
            hi = mid
        else:
            lo = mid
    return hi, scores[hi], evals


# --------------------------------------------------------------------------------------- bias correction
def channel_means(
    model: onnx.ModelProto, names: list[str], feeds, axes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Per-channel means of the named tensors over the feeds (streamed); channel axis 1 unless ``axes`` says
    otherwise (-1: the last axis, for MatMul/Gemm inputs)."""
    from onnxcompress.analyses.activations import stream_activations

    axes = axes or {}
    if not names:
        return {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    bad: set[str] = set()
    for _feed, acts in stream_activations(model, names, feeds, desc="channel means"):
        for n, a in acts.items():
            a = np.asarray(a)
            if n in bad or a.ndim < 2 or not np.issubdtype(a.dtype, np.floating):
                bad.add(n)
                continue
            ax = axes.get(n, 1) % a.ndim
            s = a.astype(np.float64).sum(axis=tuple(i for i in range(a.ndim) if i != ax))
            if n in sums and sums[n].shape != s.shape:
                bad.add(n)
                continue
            sums[n] = sums.get(n, 0) + s
            counts[n] = counts.get(n, 0) + a.size // a.shape[ax]
    return {n: sums[n] / counts[n] for n in sums if n not in bad and counts.get(n)}


def weight_error_shift(node: gs.Node, mean_x: np.ndarray, per_channel: bool) -> np.ndarray | None:
    """``(Ŵ − W)·E[x]`` per output channel for Conv (grouped too), Gemm and 2-D MatMul weights."""
    from . import _quant_math as qm
    from ._quant_ops import weight_axis

    w = const_value(node.inputs[1])
    if w is None or w.dtype != np.float32:
        return None
    axis = weight_axis(node, w) if per_channel else None
    err = qm.quantize_weight(w, qm.INT8, axis).dequantized().astype(np.float64) - w.astype(np.float64)
    if node.op == "Conv":
        cout, cin_g = w.shape[0], w.shape[1]
        groups = int(node.attrs.get("group", 1))
        if mean_x.shape != (cin_g * groups,):
            return None
        e = err.reshape(cout, cin_g, -1).sum(axis=2)  # (Cout, Cin/g)
        g_of_o = np.arange(cout) // (cout // groups)
        mx = mean_x.reshape(groups, cin_g)[g_of_o]  # (Cout, Cin/g)
        return np.sum(e * mx, axis=1)
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        e = err.T if node.attrs.get("transB", 0) else err  # (K, N)
        if mean_x.shape != (e.shape[0],):
            return None
        return float(node.attrs.get("alpha", 1.0)) * (mean_x @ e)
    if node.op == "MatMul" and w.ndim == 2 and mean_x.shape == (w.shape[0],):
        return mean_x @ err
    return None


def add_to_bias(node: gs.Node, delta: np.ndarray, names: set[str]) -> bool:
    """Add ``delta`` to a Conv/Gemm bias (creating one for Conv if absent). MatMul: no bias slot -> False."""
    from ._quant_prepare import _unique

    delta = np.asarray(delta, dtype=np.float64)
    if node.op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = const_value(node.inputs[2])
            if b is None:
                return False
            node.inputs[2] = gs.Constant(
                _unique(f"{node.inputs[2].name}_bc", names), (b + delta).astype(np.float32)
            )
        else:
            node.inputs.append(gs.Constant(_unique(f"{node.name}_bias_bc", names), delta.astype(np.float32)))
        return True
    if node.op == "Gemm" and len(node.inputs) > 2 and float(node.attrs.get("beta", 1.0)) == 1.0:
        c = const_value(node.inputs[2])
        if c is None or c.ndim != 1 or c.shape != delta.shape:
            return False
        node.inputs[2] = gs.Constant(
            _unique(f"{node.inputs[2].name}_bc", names), (c + delta).astype(np.float32)
        )
        return True
    return False


# ---------------------------------------------------------------------------------- cross-layer equalization
_HOMOGENEOUS = {"Relu", "LeakyRelu", "Identity"}


def equalize(graph: gs.Graph, names: set[str], iterations: int = 2) -> int:
    """Cross-layer equalization of Conv -> (Relu|LeakyRelu|none) -> Conv pairs; returns pairs equalized."""
    from ._quant_prepare import _unique

    pairs = 0
    outputs = {id(t) for t in graph.outputs}
    for _ in range(iterations):
        for c1 in list(graph.nodes):
            if c1.op != "Conv" or len(c1.inputs) < 2 or len(c1.outputs) != 1:
                continue
            w1 = const_value(c1.inputs[1])
            if (
                w1 is None
                or w1.dtype != np.float32
                or int(c1.attrs.get("group", 1)) != 1
                and not is_depthwise(c1)
            ):
                continue
            y = c1.outputs[0]
            if id(y) in outputs or len(y.outputs) != 1:
                continue
            nxt = y.outputs[0]
            if nxt.op in _HOMOGENEOUS:
                z = nxt.outputs[0]
                if id(z) in outputs or len(z.outputs) != 1:
                    continue
                nxt = z.outputs[0]
            if nxt.op != "Conv" or len(nxt.inputs) < 2:
                continue
            w2 = const_value(nxt.inputs[1])
            if w2 is None or w2.dtype != np.float32:
                continue
            g2 = int(nxt.attrs.get("group", 1))
            cout = w1.shape[0]
            if g2 == 1:
                if w2.shape[1] != cout:
                    continue
                r2 = np.abs(w2).max(axis=tuple(i for i in range(w2.ndim) if i != 1)).astype(np.float64)
            elif is_depthwise(nxt) and w2.shape[0] == cout:
                r2 = np.abs(w2).reshape(cout, -1).max(axis=1).astype(np.float64)
            else:
                continue
            r1 = np.abs(w1).reshape(cout, -1).max(axis=1).astype(np.float64)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(cout)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if np.allclose(s, 1.0, rtol=1e-3):
                continue
            has_b1 = len(c1.inputs) > 2 and c1.inputs[2].name
            b1 = const_value(c1.inputs[2]) if has_b1 else np.zeros(cout, np.float32)
            if b1 is None:
                continue
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            w1n = (w1 / s.reshape(shape1)).astype(np.float32)
            b1n = (b1 / s).astype(np.float32)
            if g2 == 1:
                shape2 = (1, -1) + (1,) * (w2.ndim - 2)
            else:
                shape2 = (-1,) + (1,) * (w2.ndim - 1)
            w2n = (w2 * s.reshape(shape2)).astype(np.float32)
            c1.inputs[1] = gs.Constant(_unique(f"{c1.inputs[1].name}_cle", names), w1n)
            if has_b1:
                c1.inputs[2] = gs.Constant(_unique(f"{c1.inputs[2].name}_cle", names), b1n)
            else:
                c1.inputs.append(gs.Constant(_unique(f"{c1.name}_bias_cle", names), b1n))
            nxt.inputs[1] = gs.Constant(_unique(f"{nxt.inputs[1].name}_cle", names), w2n)
            pairs += 1
    return pairs
