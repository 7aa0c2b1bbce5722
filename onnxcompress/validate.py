"""The ORT oracle: run the original and the candidate on the same feeds and compare, plus the structural gate.

Per output, accumulated over all feeds in one streaming pass (no output is kept after its feed):

- max-abs  = max |r - c|;  mean-abs = sum |r - c| / count
- cosine   = <r, c> / (||r|| ||c||) over all elements of all feeds; ``cosine_min`` is the worst single feed
- SQNR dB  = 10 log10( sum r^2 / sum (r - c)^2 )   (inf when identical)
- rel_max_abs = max-abs / max |r|  (the scale-free form of max-abs)
- integer / bool outputs (labels, masks, ids): ``exact_agreement`` = the fraction of elements equal (and
  ``mismatched_elements``); the numeric metrics above are computed on their values too, so none claims identity
  where labels changed
- top-1 / top-5 agreement, for outputs that ARE class scores: produced (through shape-only ops: Reshape, Flatten,
  Squeeze, Transpose, Identity, Cast) by Softmax / LogSoftmax, by Gemm, or by a MatMul(+constant Add) head, with a
  last axis 2..100000 wide (or every output when the user says ``task="classify"``): the fraction of rows (all
  leading positions) where argmax(c) == argmax(r), resp. argmax(r) is in top5(c). A detection map or an embedding
  is not class scores, whatever its width: its report says ``metric_kind: values``.

Task metrics (``onnxcompress.task_metrics`` has the maths), one per output, named by ``task``:

- ``ctc``: a rank-3 output made by Softmax / LogSoftmax over its last axis ([N, T, C] sequence scores): CTC string
  agreement and character error rate (these outputs get no per-frame top-k);
- ``detect``: a rank-3 output made by a Concat over axis 1 or 2 of two tensors, one a Sigmoid (YOLOv8's box +
  class-score head, [N, 4+K, A] or [N, A, 4+K]): box F1 at IoU 0.5 after threshold + class-wise NMS;
- ``classify``: the class-score outputs above: top-1 agreement;
- ``embed``: every other float output: mean per-sample cosine.

``task="auto"`` detects the kinds from the graph as above (and falls back to ``embed`` when an output's real shape
does not fit); ``task="ctc"`` / ``"detect"`` / ``"classify"`` / ``"embed"`` apply that kind to every float output
whose shape fits it (others get ``embed``). ``FidelityReport.task_metric()`` is the model's task metric: the worst
(lowest) over the ctc / detect / classify outputs, or over the embed outputs when there are none of those.

Structural gate (before anything is written): ``onnx.checker`` full check (which includes strict shape inference) and
an ORT session. A check the ORIGINAL model already fails (old exporters, custom domains) is not held against the
result; the ORT session must always build.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcompress import io, task_metrics
from onnxcompress.data import FeedSet, count_nonfinite
from onnxcompress.errors import BadInputError, ValidationError
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
    exact_mismatch: int = 0  # for non-float outputs: elements that differ, of ``exact_count``
    exact_count: int = 0
    #: NaN/inf elements the original (reference) and the candidate produced
    ref_nonfinite: int = 0
    cand_nonfinite: int = 0
    #: "ctc", "detect", "classify", "embed" or "" (none); the detection layout: [N, 4+K, A] is channels first
    task: str = ""
    channels_first: bool | None = None
    task_acc: Any = None

    def update(self, r: np.ndarray, c: np.ndarray) -> None:
        """Add one feed's reference ``r`` and candidate ``c`` outputs (same shape) to the sums."""
        if r.shape != c.shape:
            raise ValidationError(f"output {self.name!r}: shape {list(c.shape)} differs from the original {list(r.shape)}")
        exact = not np.issubdtype(r.dtype, np.floating)
        if exact:  # labels, masks, ids: how many elements differ, and the numeric metrics of their values (an
            # argmax output whose labels changed claimed cosine 1.0 and SQNR inf while the logits' agreement fell)
            self.exact_mismatch += int(np.count_nonzero(r != c))
            self.exact_count += r.size
        else:
            self._update_task(r, c)
        r64 = r.astype(np.float64).ravel()
        c64 = c.astype(np.float64).ravel()
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, counted below and named by the caller
            diff = np.abs(r64 - c64)
        self.count += r64.size
        self.ref_nonfinite += count_nonfinite(r64)
        self.cand_nonfinite += count_nonfinite(c64)
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
        if self.class_scores and not exact and r.ndim >= 2 and 2 <= r.shape[-1] <= 100_000:
            self.classifier = True
            rr2 = r.reshape(-1, r.shape[-1])
            cc2 = c.reshape(-1, c.shape[-1])
            top_r = rr2.argmax(axis=1)
            self.top1_hits += int(np.count_nonzero(cc2.argmax(axis=1) == top_r))
            k = min(5, r.shape[-1])
            top5 = np.argpartition(-cc2, k - 1, axis=1)[:, :k]
            self.top5_hits += int(np.count_nonzero((top5 == top_r[:, None]).any(axis=1)))
            self.rows += rr2.shape[0]

    def _update_task(self, r: np.ndarray, c: np.ndarray) -> None:
        """On the first feed, check that the real shape fits the task (else ``embed``) and start its accumulator;
        add every feed (top-1 agreement of ``classify`` is counted in ``update``)."""
        if not self.task:
            return
        if self.task_acc is None:
            if self.task == "ctc" and not (r.ndim == 3 and r.shape[2] >= 2):
                log.info("output %r: shape %s is not [N, T, C] scores; no CTC metric", self.name, list(r.shape))
                self.task = "embed"
            elif self.task == "detect":
                layout = self.channels_first
                if layout is None or r.ndim != 3 or r.shape[1 if layout else 2] < 5:
                    layout = task_metrics.detection_layout(r.shape)
                if layout is None:
                    log.info("output %r: shape %s is not a YOLO box output; no box F1", self.name, list(r.shape))
                    self.task = "embed"
                self.channels_first = layout
            elif self.task == "classify" and not (r.ndim >= 2 and 2 <= r.shape[-1] <= 100_000):
                self.task, self.class_scores = "embed", False
            self.task_acc = {"ctc": task_metrics.CtcAgreement, "embed": task_metrics.SampleCosine,
                             "detect": lambda: task_metrics.BoxF1(bool(self.channels_first)),
                             "classify": lambda: "top-1"}[self.task]()
        if self.task != "classify":
            self.task_acc.update(r, c)

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
        if self.exact_count:
            out["exact_agreement"] = 1.0 - self.exact_mismatch / self.exact_count
        nonfinite = [k for k in ("max_abs", "mean_abs", "cosine", "cosine_min") if not math.isfinite(out[k])]
        if nonfinite or math.isnan(out["sqnr_db"]):
            out["nonfinite_metrics"] = nonfinite or ["sqnr_db"]
        if self.ref_nonfinite or self.cand_nonfinite:
            out["nonfinite_values"] = {"original": self.ref_nonfinite, "compressed": self.cand_nonfinite}
        if self.classifier and self.rows:
            out["top1_agreement"] = self.top1_hits / self.rows
            out["top5_agreement"] = self.top5_hits / self.rows
        if self.task_acc is not None and self.task != "classify":
            out.update(self.task_acc.summary())
        metric = task_metrics.TASK_METRIC.get(self.task)
        if metric in out:
            out["task_metric"] = out[metric]
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
    #: the original model against itself on noisy inputs (``onnxcompress.input_noise``), when measured
    input_noise_reference: dict | None = None
    #: outputs the original computed identically on every feed (2+ feeds): agreeing with them says nothing
    constant_outputs: list[str] = field(default_factory=list)

    def worst(self) -> dict[str, float]:
        """The worst value of each metric over all outputs (max for errors, min for similarities)."""
        worst: dict[str, float] = {}
        for metrics in self.outputs.values():
            for k, v in metrics.items():
                if not isinstance(v, (int, float)) or k in _COUNTS:
                    continue
                higher_is_worse = k in ("max_abs", "mean_abs", "rel_max_abs", "mismatched_elements", "char_error_rate")
                if k not in worst:
                    worst[k] = v
                else:
                    worst[k] = max(worst[k], v) if higher_is_worse else min(worst[k], v)
        return worst

    def task_metric(self) -> dict[str, Any] | None:
        """The model's task metric (module docstring): ``{"value", "metric", "title", "task", "output"}`` of the
        worst task output, or None when no output has one."""
        found = [(m["task_metric"], name, m["task"]) for name, m in self.outputs.items() if "task_metric" in m]
        primary = [f for f in found if f[2] != "embed"] or found
        if not primary:
            return None
        value, name, task = min(primary, key=lambda f: (f[0], f[1]))
        metric = task_metrics.TASK_METRIC[task]
        return {"value": float(value), "metric": metric, "title": task_metrics.METRIC_TITLE[metric], "task": task,
                "output": name}

    def to_dict(self) -> dict:
        """JSON-ready form, with the worst value of each metric over the outputs and the task metric."""
        out = {"feeds": self.feeds, "source": self.source, "synthetic": self.synthetic, "outputs": self.outputs,
               "worst": self.worst(), "task_metric": self.task_metric()}
        if self.input_noise_reference is not None:
            out["input_noise_reference"] = self.input_noise_reference
        if self.constant_outputs:
            out["constant_outputs"] = list(self.constant_outputs)
        return out


_COUNTS = frozenset({"strings", "boxes_ref", "boxes"})  # sizes, not fidelity: no "worst" of them


TASKS = ("auto", "classify", "ctc", "detect", "embed", "none")
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


def _through_shape_ops(name: str, producer: dict, ops: set[str]):
    node = producer.get(name)
    while node is not None and node.op_type in ops:
        node = producer.get(node.input[0])
    return node


def _attr(node, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _rank(value_info) -> int | None:
    t = value_info.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def task_outputs(model: onnx.ModelProto) -> dict[str, tuple[str, bool | None]]:
    """Graph outputs whose task the graph shows (module docstring): name -> ("ctc", None), ("detect",
    channels_first) or ("classify", None). Outputs not listed are ``embed``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 13)
    scores = class_score_outputs(model)
    out: dict[str, tuple[str, bool | None]] = {}
    for o in model.graph.output:
        rank = _rank(o)
        node = _through_shape_ops(o.name, producer, _SHAPE_ONLY)
        if node is not None and node.op_type in ("Softmax", "LogSoftmax") and rank in (3, None):
            axis = _attr(node, "axis", -1 if opset >= 13 else 1)
            if axis in (-1, 2):
                out[o.name] = ("ctc", None)
                continue
        node = _through_shape_ops(o.name, producer, {"Identity", "Cast"})
        if node is not None and node.op_type == "Concat" and len(node.input) == 2 and rank in (3, None):
            axis = _attr(node, "axis")
            parts = [_through_shape_ops(i, producer, _SHAPE_ONLY) for i in node.input]
            if axis in (1, 2, -1, -2) and any(p is not None and p.op_type == "Sigmoid" for p in parts):
                out[o.name] = ("detect", axis in (1, -2))
                continue
        if o.name in scores:
            out[o.name] = ("classify", None)
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
                   optimize_original: bool = True, input_noise: Callable[[dict], dict] | None = None
                   ) -> FidelityReport:
    """Run both models on every feed and accumulate the per-output metrics above.

    ``task``: one of ``TASKS`` (module docstring): "auto" (the kinds the graph shows), a kind for every float
    output that fits it, or "none" (no task metric). ``optimize_original=False`` runs the original without ORT's graph optimizations
    (the exactness check compares that with the optimized original to measure ORT's own rounding). ``input_noise``
    (``input_noise_for``): the original also runs on each feed with that noise added, scored against its clean
    outputs of the same pass like the candidate (``FidelityReport.input_noise_reference``). A feed the original
    itself cannot run on (onnxruntime refuses it) is bad data: ``BadInputError`` naming the feed."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    proto = _as_proto(original) if task == "auto" else None
    found = task_outputs(proto) if proto is not None else {}
    with Session(original, threads, optimize=optimize_original, what="original model") as ref_s, \
            Session(candidate, threads, what="compressed model") as cand_s:
        names = ref_s.output_names
        missing = [n for n in names if n not in cand_s.output_names]
        if missing:
            raise ValidationError(f"the compressed model lost output {missing[0]!r}")
        kinds = {n: found.get(n, ("embed", None)) if task == "auto" else (task if task != "none" else "", None)
                 for n in names}

        def accumulators() -> dict[str, OutputFidelity]:
            return {n: OutputFidelity(n, class_scores=k == "classify", task=k, channels_first=layout)
                    for n, (k, layout) in kinds.items()}

        acc = accumulators()
        noisy = accumulators() if input_noise is not None else None
        n_feeds = 0
        first: dict[str, np.ndarray] = {}  # the original's outputs on the first feed
        varies: set[str] = set()  # outputs that differed from them on some later feed
        iterator = progress(feeds, total=len(feeds), desc="validate") if progress else feeds
        for feed in iterator:
            try:
                ref = ref_s.run(feed, names)
            except Exception as exc:  # onnxruntime's Fail / InvalidArgument: the reference cannot run on this feed
                raise BadInputError(f"{feeds.source} sample {n_feeds}: the original model cannot run on it: "
                                    f"{io.first_line(exc)}") from exc
            for name, r in zip(names, ref, strict=True):
                if not n_feeds:
                    first[name] = np.array(r, copy=True)
                elif name not in varies and not np.array_equal(first[name], r):
                    varies.add(name)
            runs = [(acc, cand_s.run(feed, names))]
            if noisy is not None:
                runs.append((noisy, ref_s.run(input_noise(feed), names)))
            for target, cand in runs:
                for name, r, c in zip(names, ref, cand, strict=True):
                    target[name].update(np.asarray(r), np.asarray(c))
            n_feeds += 1
    report = FidelityReport(_summaries(acc), n_feeds, feeds.source, feeds.synthetic)
    if n_feeds >= 2:
        report.constant_outputs = [n for n in names if n not in varies]
    if noisy is not None:
        own = FidelityReport(_summaries(noisy), n_feeds, feeds.source, feeds.synthetic)
        worst = own.worst()
        report.input_noise_reference = {
            "sigma_levels": input_noise.sigma_levels, "feeds": n_feeds,  # type: ignore[union-attr]
            "pixel_level": {k: float(v) for k, v in input_noise.levels.items()},  # type: ignore[union-attr]
            "worst": {k: worst[k] for k in ("sqnr_db", "cosine", "cosine_min", "top1_agreement") if k in worst},
            "task_metric": own.task_metric()}
    return report


def constant_outputs_note(fid: dict) -> str | None:
    """A warning line when the original computed some outputs identically on every feed (``to_dict`` form)."""
    const = fid.get("constant_outputs")
    if not const:
        return None
    return (f"the original model's output{'s' if len(const) > 1 else ''} {', '.join(const)} "
            f"{'are' if len(const) > 1 else 'is'} the same on all {fid['feeds']} feeds: agreement with "
            f"{'them' if len(const) > 1 else 'it'} says nothing about the inputs (a constant or untrained model?)")


def _summaries(acc: dict[str, OutputFidelity]) -> dict[str, dict]:
    summaries = {}
    for n, a in acc.items():
        started = a.task_acc is not None
        kind = {"classify": "class scores", "ctc": "ctc", "detect": "detection"}.get(a.task, "values")
        summaries[n] = {**a.summary(), "metric_kind": kind if started else "values"}
        if started:
            summaries[n]["task"] = a.task
    return summaries


def input_noise_for(feeds: FeedSet) -> Callable[[dict], dict] | None:
    """The noise of the input-noise reference (``onnxcompress.input_noise``: ``SIGMA_LEVELS`` pixel levels on the
    8-bit image inputs) for ``compare_models(input_noise=...)``, or None when no input is an 8-bit image or the
    feeds are synthetic."""
    from onnxcompress import input_noise

    return None if feeds.synthetic else input_noise.perturbation(feeds.first(), input_noise.SIGMA_LEVELS)


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
