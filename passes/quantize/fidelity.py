"""How close a quantized candidate is to the float model: the scores every stage of ``quantize`` decides by.

**Reference**: the float model's outputs, and the inputs of its last layers (``feature_nodes``: for each graph
output the nearest Conv/MatMul/Gemm upstream), on the evaluation feeds, kept once (``calibrate.calibrate_with_reference``
records them during the first calibration pass).

**Scores** of a candidate against the reference on the same feeds, per graph output ``o``:
cosine ``⟨r, c⟩ / (‖r‖‖c‖)`` averaged over feeds; for outputs that are class scores (a Softmax / Gemm / MatMul
head, ``onnxcompress.validate.class_score_outputs``) with a class axis (last dim >= 2) the top-1
agreement ``mean(argmax r == argmax c)`` over every position of every feed (a classifier's top-1; for a sequence
model the per-step agreement — also reported: the fraction of feeds agreeing at every step); SQNR
``10 log10(Σr² / Σ(r − c)²)``. The model's score is the worst output; ``feature_sqnr_db`` is the worst SQNR of the
last layers' input features, which (unlike softmax/argmax outputs) do not saturate under small perturbations.

**Across feeds** (``Reference.feed_score``, ``FEED_SCORES``): ``pooled`` sums signal and error over all feeds first
(``Σ_f Σr² / Σ_f Σ(r − c)²``), which weighs each feed by its signal energy: a rounding that ruins the low-energy
feeds (PP-OCRv4 rec's low-contrast lines) hardly moves it. ``worst_feed`` is the lowest per-feed SQNR
``min_f 10 log10(Σr_f² / Σ(r_f − c_f)²)``, ``mean_feed_db`` their mean in dB (each per-feed value clipped to
±``FEED_DB_CLIP`` dB, so an exact feed does not decide alone; a feed's signal energy is floored at
``FEED_ENERGY_FLOOR`` of the mean feed's, so a near-empty one does not either), and ``mean_feed_nsr``
``−10 log10(mean_f Σ(r_f − c_f)² / Σr_f²)``: the per-feed noise-to-signal ratios averaged (linear, so the noisiest
feeds weigh most, but every one counts): every feed counts whatever its energy. ``least_sure_half`` pools only the
half of the feeds on which the float model is least sure (``feed_weights``: the smallest lower-quartile top-1 - top-2
margin of its class outputs over their positions; every feed when there are no class outputs): the inputs where a
little noise flips a decision, found without labels.

**Ranking** (``rank_key``, best first): feature SQNR, then agreement lost, then output SQNR. **Targets**
(``meets``): ``cosine >= min_cosine``, ``1 − agreement <= max_agreement_drop`` and ``SQNR >= min_sqnr_db`` (worst
output).

Bias correction, cross-layer equalization and the mixed-precision search that use these scores live in
``bias_correction``, ``equalization`` and ``mixed_precision``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.data import Feed
from onnxcompress.runtime import Session

log = logging.getLogger(__name__)

#: how SQNRs combine the feeds (module doc)
FEED_SCORES = ("pooled", "worst_feed", "mean_feed_db", "mean_feed_nsr", "least_sure_half")
#: a per-feed SQNR is clipped to +-this many dB before the feeds are combined
FEED_DB_CLIP = 100.0
#: ``least_sure_half`` ranks a feed by this percentile of its positions' top-1 - top-2 margins: a classifier has one
#: position; a CTC recognizer's positions are mostly sure blanks (PP-OCRv4 rec: the mean margin picked 3 of its 4 hard
#: lines among 8 mixed calibration feeds, the lower quartile all 8 of 16)
MARGIN_QUANTILE = 25.0
#: ... and measured against at least this share of the mean feed's signal energy: a near-empty output (PP-OCRv4
#: det's probability map of a line-free crop) has an SQNR of -100 dB for an error nobody sees
FEED_ENERGY_FLOOR = 0.01


@dataclass
class Reference:
    feeds: list[Feed]
    outputs: list[list[np.ndarray]]
    names: list[str]
    #: anchors whose activation input is scored too (the features the model's last layers read)
    feature_nodes: list[str] = field(default_factory=list)
    features: list[list[np.ndarray]] = field(default_factory=list)
    #: outputs that are class scores (``onnxcompress.validate.class_score_outputs``): the only ones top-1
    #: agreement is computed for; None: every output with a last axis >= 2
    class_outputs: frozenset[str] | None = None
    #: how the SQNRs of ``score`` combine the feeds (``FEED_SCORES``)
    feed_score: str = "pooled"

    def head(self, n: int) -> Reference:
        """The reference on its first ``n`` feeds."""
        return Reference(self.feeds[:n], self.outputs[:n], self.names, self.feature_nodes, self.features[:n],
                         self.class_outputs, self.feed_score)

    def scored_by(self, feed_score: str) -> Reference:
        """The same reference, its SQNRs combining the feeds by ``feed_score``."""
        if feed_score not in FEED_SCORES:
            raise ValueError(f"feed_score must be one of {FEED_SCORES}, got {feed_score!r}")
        return replace(self, feed_score=feed_score)


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


def feature_sqnr_db(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]], feed_score: str = "pooled",
                    weights: np.ndarray | None = None) -> float | None:
    """Worst SQNR over the feature tensors, the feeds combined by ``feed_score`` (``weights``: ``feed_weights``)
    (``None`` when there are none or they do not line up)."""
    if not ref or not ref[0] or not cand or len(cand[0]) != len(ref[0]):
        return None
    return min(_sqnr([f[i] for f in ref], [f[i] for f in cand], feed_score, weights) for i in range(len(ref[0])))


def model_feature_sqnr(ref: Reference, model: onnx.ModelProto, feeds: list[Feed]) -> float | None:
    """``feature_sqnr_db`` of ``model`` against the reference on its first ``len(feeds)`` feeds (``feeds`` are those),
    the feeds combined by ``ref.feed_score``."""
    n = len(feeds)
    return feature_sqnr_db(ref.features[:n], run_features(model, feeds, ref.feature_nodes), ref.feed_score,
                           feed_weights(ref, n))


def feed_weights(ref: Reference, n: int | None = None) -> np.ndarray | None:
    """For ``feed_score=least_sure_half``: 1 for the half of the first ``n`` feeds (at least one) whose float
    outputs have the smallest top-1 - top-2 margin (the ``MARGIN_QUANTILE`` percentile over their positions, the
    smallest over the class outputs), 0 for the others; None (every feed) for any other score or without class
    outputs."""
    if ref.feed_score != "least_sure_half":
        return None
    outputs = ref.outputs[: len(ref.outputs) if n is None else n]
    margins = []
    for outs in outputs:
        m = []
        for k, name in enumerate(ref.names):
            r = np.asarray(outs[k])
            if ref.class_outputs is not None and name not in ref.class_outputs:
                continue
            if not np.issubdtype(r.dtype, np.floating) or r.ndim < 1 or r.shape[-1] < 2:
                continue
            top2 = np.partition(r.reshape(-1, r.shape[-1]).astype(np.float64), -2, axis=1)[:, -2:]
            m.append(float(np.percentile(top2[:, 1] - top2[:, 0], MARGIN_QUANTILE)))
        margins.append(min(m) if m else np.nan)
    mg = np.asarray(margins, np.float64)
    if not mg.size or not np.all(np.isfinite(mg)):
        return None
    w = np.zeros(mg.size)
    w[np.argsort(mg, kind="stable")[: max(1, mg.size // 2)]] = 1.0
    return w


def reference(model: onnx.ModelProto, feeds: list[Feed], features: list[str] = ()) -> Reference:
    """The float ``model``'s outputs and ``features`` inputs on ``feeds``."""
    from onnxcompress.validate import class_score_outputs

    outs, feats = run_model(model, feeds, features)
    return Reference(feeds, outs, [o.name for o in model.graph.output], list(features), feats,
                     frozenset(class_score_outputs(model)))


def score_model(ref: Reference, model: onnx.ModelProto) -> dict[str, float]:
    """``score`` of ``model`` run on the reference's own feeds (and feature nodes)."""
    return score(ref, run_model(model, ref.feeds, ref.feature_nodes))


#: the scores an outputs-only decision reads and its stats report
OUTPUT_KEYS = ("sqnr_db", "cosine", "agreement")


def outputs_summary(ref: Reference, model: onnx.ModelProto) -> dict[str, float]:
    """``score_model`` on the graph outputs: the worst output's SQNR, cosine and agreement, rounded to 4 places."""
    return {k: round(v, 4) for k, v in score_model(ref, model).items() if k in OUTPUT_KEYS}


class GraphScorer:
    """``scorer(g)``: ``outputs_summary`` of the graph ``g`` against the float graph given at construction, on
    ``feeds``. The float outputs are computed on first use and kept, so the decisions of one run share them and a
    run that decides nothing never computes them."""

    def __init__(self, graph: gs.Graph, export, feeds, feed_score: str):
        self.float_graph, self.export, self.feed_score = graph.copy(), export, feed_score
        self.feeds = feeds
        self._ref: Reference | None = None

    def __call__(self, g: gs.Graph) -> dict[str, float]:
        if self._ref is None:
            self._ref = reference(self.export(self.float_graph), list(self.feeds)).scored_by(self.feed_score)
        return outputs_summary(self._ref, self.export(g))


def _sqnr(refs: list[np.ndarray], cands: list[np.ndarray], feed_score: str = "pooled",
          weights: np.ndarray | None = None) -> float:
    sig = [float(np.sum(np.asarray(r, np.float64) ** 2)) for r in refs]
    err = [
        float(np.sum((np.asarray(r, np.float64) - np.asarray(c, np.float64)) ** 2))
        for r, c in zip(refs, cands, strict=True)
    ]
    return combine_feeds(sig, err, feed_score, weights)


def combine_feeds(sig: list[float], err: list[float], feed_score: str = "pooled",
                  weights: np.ndarray | None = None) -> float:
    """SQNR (dB) from per-feed signal and error energies, the feeds combined by ``feed_score`` (module doc;
    ``least_sure_half`` pools the feeds ``weights`` selects, ``feed_weights``)."""
    if feed_score == "least_sure_half" and weights is not None and len(weights) == len(sig):
        sig = [x for x, w in zip(sig, weights, strict=True) if w > 0]
        err = [x for x, w in zip(err, weights, strict=True) if w > 0]
        feed_score = "pooled"
    if feed_score in ("pooled", "least_sure_half") or not sig:
        s, e = float(sum(sig)), float(sum(err))
        if e == 0:
            return float("inf")
        return float(10 * np.log10(s / e)) if s > 0 else float("-inf")
    s_, e_ = np.asarray(sig, np.float64), np.asarray(err, np.float64)
    s_ = np.maximum(s_, FEED_ENERGY_FLOOR * float(np.mean(s_)))
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10 * np.log10(s_ / e_)
    db = np.where(e_ == 0, FEED_DB_CLIP, np.where(s_ == 0, -FEED_DB_CLIP, db))
    db = np.clip(db, -FEED_DB_CLIP, FEED_DB_CLIP)
    if feed_score == "worst_feed":
        return float(np.min(db))
    if feed_score == "mean_feed_db":
        return float(np.mean(db))
    if feed_score == "mean_feed_nsr":
        return float(-10 * np.log10(np.mean(10.0 ** (-db / 10))))
    raise ValueError(f"feed_score must be one of {FEED_SCORES}, got {feed_score!r}")


def score(ref: Reference, cand: tuple[list[list[np.ndarray]], list[list[np.ndarray]]]) -> dict[str, float]:
    """Worst-output cosine (mean over feeds), top-1 agreement (class-like outputs) and SQNR; worst feature SQNR
    (SQNRs: the feeds combined by ``ref.feed_score``)."""
    cand, cand_features = cand
    weights = feed_weights(ref, len(cand))
    cos_by_out: list[float] = []
    agree_by_out: list[float] = []
    sqnr_by_out: list[float] = []
    exact_by_out: list[float] = []
    n_out = len(ref.names)
    for k in range(n_out):
        cos, agree_hits, agree_total, sig, err = [], 0, 0, [], []
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
            sig.append(rr)
            err.append(float(np.sum((r64 - c64) ** 2)))
            is_class = ref.class_outputs is None or ref.names[k] in ref.class_outputs
            if is_class and r.ndim >= 1 and r.shape[-1] >= 2:
                a = np.argmax(r.reshape(-1, r.shape[-1]), axis=1)
                b = np.argmax(c.reshape(-1, c.shape[-1]), axis=1)
                agree_hits += int(np.sum(a == b))
                agree_total += a.size
                feeds_exact += int(np.all(a == b))
                feeds_seen += 1
        if cos:
            cos_by_out.append(float(np.mean(cos)))
            sqnr_by_out.append(combine_feeds(sig, err, ref.feed_score, weights))
        if agree_total:
            agree_by_out.append(agree_hits / agree_total)
            exact_by_out.append(feeds_exact / feeds_seen)
    out = {
        "cosine": min(cos_by_out) if cos_by_out else 1.0,
        "sqnr_db": min(sqnr_by_out) if sqnr_by_out else float("inf"),
    }
    if ref.features and ref.features[0] and cand_features and len(cand_features[0]) == len(ref.features[0]):
        sq = [
            _sqnr([f[i] for f in ref.features], [f[i] for f in cand_features], ref.feed_score, weights)
            for i in range(len(ref.features[0]))
        ]
        out["feature_sqnr_db"] = min(sq)
    if agree_by_out:
        out["agreement"] = min(agree_by_out)
        out["feeds_all_positions_agree"] = min(exact_by_out)
    return out


def meets(s: dict[str, float], min_cosine: float | None, max_agreement_drop: float | None,
          min_sqnr_db: float | None = None) -> bool:
    if min_cosine is not None and s["cosine"] < min_cosine:
        return False
    if min_sqnr_db is not None and s["sqnr_db"] < min_sqnr_db:
        return False
    if max_agreement_drop is not None and "agreement" in s and 1.0 - s["agreement"] > max_agreement_drop:
        return False
    return True


def rank_key(s: dict[str, float]) -> tuple[float, float, float]:
    """Sort key of a score, best first: the noise of the last layers' input features (continuous, does not
    saturate), then agreement lost, then output SQNR."""
    return (-s.get("feature_sqnr_db", 0.0), 1.0 - s.get("agreement", 1.0), -s["sqnr_db"])
