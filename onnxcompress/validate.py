"""The ORT oracle: run the original and the candidate on the same feeds and compare, plus the structural gate.

Per output, accumulated over all feeds in one streaming pass (no output is kept after its feed):

- max-abs  = max |r - c|;  mean-abs = sum |r - c| / count
- cosine   = <r, c> / (||r|| ||c||) over all elements of all feeds; ``cosine_min`` is the worst single feed
- SQNR dB  = 10 log10( sum r^2 / sum (r - c)^2 )   (inf when identical)
- rel_max_abs = max-abs / max |r|  (the scale-free form of max-abs)
- top-1 / top-5 agreement, for outputs that ARE class scores: produced (through shape-only ops: Reshape, Flatten,
  Squeeze, Transpose, Identity, Cast) by Softmax / LogSoftmax, by Gemm, or by a MatMul(+constant Add) head, with a
  last axis 2..100000 wide (or every output when the user says ``task="classify"``): the fraction of rows (all
  leading positions) where argmax(c) == argmax(r), resp. argmax(r) is in top5(c). A detection map or an embedding
  is not class scores, whatever its width: its report says ``metric_kind: values``.

Structural gate (before anything is written): ``onnx.checker`` full check (which includes strict shape inference) and
an ORT session. A check the ORIGINAL model already fails (old exporters, custom domains) is not held against the
result; the ORT session must always build.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress import io
from onnxcompress.data import FeedSet
from onnxcompress.errors import ValidationError
from onnxcompress.runtime import Session

log = logging.getLogger(__name__)


@dataclass
class OutputFidelity:
    """Streaming accumulator of one output's metrics over all feeds (module docstring for the formulas)."""
    name: str
    count: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    ref_max_abs: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    err_sq: float = 0.0
    cosine_min: float = 1.0
    top1_hits: int = 0
    top5_hits: int = 0
    rows: int = 0
    classifier: bool = False
    class_scores: bool = False  # whether this output gets top-k agreement
    exact_mismatch: int = 0  # for non-float outputs: elements that differ

    def update(self, r: np.ndarray, c: np.ndarray) -> None:
        """Add one feed's reference ``r`` and candidate ``c`` outputs (same shape) to the sums."""
        if r.shape != c.shape:
            raise ValidationError(f"output {self.name!r}: shape {list(c.shape)} differs from the original {list(r.shape)}")
        if not np.issubdtype(r.dtype, np.floating):
            self.exact_mismatch += int(np.count_nonzero(r != c))
            self.count += r.size
            return
        r64 = r.astype(np.float64).ravel()
        c64 = c.astype(np.float64).ravel()
        diff = np.abs(r64 - c64)
        self.count += r64.size
        if r64.size:
            # NaN-ignoring max with no warning on all-NaN (the NaN itself shows in cosine/SQNR: nonfinite_metrics)
            self.max_abs = max(self.max_abs, float(np.fmax.reduce(diff, initial=0.0)))
            self.ref_max_abs = max(self.ref_max_abs, float(np.fmax.reduce(np.abs(r64), initial=0.0)))
        self.sum_abs += float(np.nansum(diff))
        dot, rr, cc = float(r64 @ c64), float(r64 @ r64), float(c64 @ c64)
        self.dot += dot
        self.ref_sq += rr
        self.cand_sq += cc
        self.err_sq += float(diff @ diff)
        self.cosine_min = min(self.cosine_min, _cos(dot, rr, cc))
        if self.class_scores and r.ndim >= 2 and 2 <= r.shape[-1] <= 100_000:
            self.classifier = True
            rr2 = r.reshape(-1, r.shape[-1])
            cc2 = c.reshape(-1, c.shape[-1])
            top_r = rr2.argmax(axis=1)
            self.top1_hits += int(np.count_nonzero(cc2.argmax(axis=1) == top_r))
            k = min(5, r.shape[-1])
            top5 = np.argpartition(-cc2, k - 1, axis=1)[:, :k]
            self.top5_hits += int(np.count_nonzero((top5 == top_r[:, None]).any(axis=1)))
            self.rows += rr2.shape[0]

    def summary(self) -> dict[str, float]:
        """The metrics so far: max/mean-abs, rel max-abs, cosine (+ worst feed), SQNR, top-k for class scores;
        ``nonfinite_metrics`` lists the ones that are NaN/inf."""
        if self.ref_sq == 0 and self.cand_sq == 0 and self.count and self.exact_mismatch == 0 and self.max_abs == 0:
            sqnr = math.inf
        else:
            sqnr = 10 * math.log10(self.ref_sq / self.err_sq) if self.err_sq > 0 else math.inf
        out = {
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / self.count if self.count else 0.0,
            "rel_max_abs": self.max_abs / self.ref_max_abs if self.ref_max_abs > 0 else self.max_abs,
            "cosine": _cos(self.dot, self.ref_sq, self.cand_sq),
            "cosine_min": self.cosine_min,
            "sqnr_db": sqnr,
        }
        if self.exact_mismatch:
            out["mismatched_elements"] = self.exact_mismatch
        nonfinite = [k for k in ("max_abs", "mean_abs", "cosine", "cosine_min") if not math.isfinite(out[k])]
        if nonfinite or math.isnan(out["sqnr_db"]):
            out["nonfinite_metrics"] = nonfinite or ["sqnr_db"]
        if self.classifier and self.rows:
            out["top1_agreement"] = self.top1_hits / self.rows
            out["top5_agreement"] = self.top5_hits / self.rows
        return out


def _cos(dot: float, rr: float, cc: float) -> float:
    if rr == 0 and cc == 0:
        return 1.0
    if rr == 0 or cc == 0:
        return 0.0
    return dot / math.sqrt(rr * cc)


@dataclass
class FidelityReport:
    """Per-output metrics of a comparison, with how many feeds and where they came from."""
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    feeds: int = 0
    source: str = ""
    synthetic: bool = False

    def worst(self) -> dict[str, float]:
        """The worst value of each metric over all outputs (max for errors, min for similarities)."""
        worst: dict[str, float] = {}
        for metrics in self.outputs.values():
            for k, v in metrics.items():
                if not isinstance(v, (int, float)):
                    continue
                higher_is_worse = k in ("max_abs", "mean_abs", "rel_max_abs", "mismatched_elements")
                if k not in worst:
                    worst[k] = v
                else:
                    worst[k] = max(worst[k], v) if higher_is_worse else min(worst[k], v)
        return worst

    def to_dict(self) -> dict:
        """JSON-ready form, with the worst value of each metric over the outputs."""
        return {"feeds": self.feeds, "source": self.source, "synthetic": self.synthetic, "outputs": self.outputs,
                "worst": self.worst()}


_SHAPE_ONLY = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"}


def class_score_outputs(model: onnx.ModelProto) -> set[str]:
    """Graph outputs that are class scores (see the module docstring): the ones top-k agreement is reported for."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node
                                                            if n.op_type == "Constant"}
    out = set()
    for o in model.graph.output:
        node = producer.get(o.name)
        while node is not None and node.op_type in _SHAPE_ONLY:
            node = producer.get(node.input[0])
        if node is None:
            continue
        if node.op_type in ("Softmax", "LogSoftmax", "Gemm"):
            out.add(o.name)
        elif node.op_type == "Add" and any(i in consts for i in node.input):
            other = next((producer.get(i) for i in node.input if i not in consts), None)
            if other is not None and other.op_type == "MatMul" and any(i in consts for i in other.input):
                out.add(o.name)
        elif node.op_type == "MatMul" and any(i in consts for i in node.input[1:]):
            out.add(o.name)
    return out


def _as_proto(model: onnx.ModelProto | bytes | str) -> onnx.ModelProto | None:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)
    try:
        return onnx.load_model(str(model), load_external_data=False)
    except Exception:  # unreadable here: the session below says why
        return None


def compare_models(original: onnx.ModelProto | bytes | str, candidate: onnx.ModelProto | bytes | str,
                   feeds: FeedSet, threads: int = 1, progress=None, *, task: str = "auto",
                   optimize_original: bool = True) -> FidelityReport:
    """Run both models on every feed and accumulate the per-output metrics above.

    ``task``: "auto" (top-k agreement for outputs detected as class scores), "classify" (for every float output
    with a class axis) or "none". ``optimize_original=False`` runs the original without ORT's graph optimizations
    (the exactness check compares that with the optimized original to measure ORT's own rounding)."""
    if task not in ("auto", "classify", "none"):
        raise ValueError(f"task must be auto, classify or none, got {task!r}")
    proto = _as_proto(original) if task == "auto" else None
    scores = class_score_outputs(proto) if proto is not None else set()
    with Session(original, threads, optimize=optimize_original, what="original model") as ref_s, \
            Session(candidate, threads, what="compressed model") as cand_s:
        names = ref_s.output_names
        missing = [n for n in names if n not in cand_s.output_names]
        if missing:
            raise ValidationError(f"the compressed model lost output {missing[0]!r}")
        acc = {n: OutputFidelity(n, class_scores=task == "classify" or n in scores) for n in names}
        n_feeds = 0
        iterator = progress(feeds, total=len(feeds), desc="validate") if progress else feeds
        for feed in iterator:
            ref = ref_s.run(feed, names)
            cand = cand_s.run(feed, names)
            for name, r, c in zip(names, ref, cand, strict=True):
                acc[name].update(np.asarray(r), np.asarray(c))
            n_feeds += 1
    summaries = {}
    for n, a in acc.items():
        summaries[n] = {**a.summary(), "metric_kind": "class scores" if a.class_scores else "values"}
    return FidelityReport(summaries, n_feeds, feeds.source, feeds.synthetic)


# -------------------------------------------------------------------------------------------- structural gate
def structural_problems(model: onnx.ModelProto) -> list[str]:
    """Checker (full, strict shape inference) problems of a model; [] when clean."""
    problems = []
    try:
        if io.needs_external_data(model):
            onnx.checker.check_model(model, full_check=False)
        else:
            onnx.checker.check_model(model.SerializeToString(), full_check=True)
    except Exception as exc:
        problems.append(f"onnx.checker: {io.first_line(exc)}")
    return problems


def structural_gate(candidate: onnx.ModelProto, original_problems: list[str] | None = None) -> list[str]:
    """Raise ValidationError if the candidate fails a check the original passed, or ORT cannot load it.

    Returns the (tolerated) problems the original already had.
    """
    problems = structural_problems(candidate)
    if problems and not original_problems:
        raise ValidationError(f"the compressed model is invalid: {problems[0]}")
    with Session(candidate, what="compressed model"):
        pass
    return problems
