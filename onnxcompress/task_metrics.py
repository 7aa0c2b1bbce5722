"""Task metrics of a candidate's outputs against the original's (FP32 vs itself = 1.0), streamed feed by feed.

Each accumulator takes one feed's reference output ``r`` and candidate output ``c`` (same shape) and keeps only
counts, so validation never holds all outputs at once.

**ctc** (sequence recognisers, scores ``[N, T, C]``: N samples, T frames, C symbols, blank = 0): greedy (best
path) decoding of a sample x: k_t = argmax_c x[t, c]; keep frame t iff k_t != k_{t-1} (t > 0) and k_t != blank;
the kept k_t in order are the decoded symbol string s(x) (compared as symbol indices: no charset needed).

- ``string_agreement`` = (1/S) sum_samples [ s(c) == s(r) ]   (the task metric)
- ``char_error_rate``  = sum_samples lev(s(r), s(c)) / max(1, sum_samples |s(r)|), lev = Levenshtein distance

**detect** (YOLO-style box outputs ``[N, 4+K, A]`` or ``[N, A, 4+K]``: A anchors, per anchor a centre box
(cx, cy, w, h) and K class scores in [0, 1]): per sample, class k* = argmax scores, score = max scores; anchors
with score >= ``score_threshold`` (0.25) are kept, their boxes turned into corners (cx -+ w/2, cy -+ h/2), and
greedy non-maximum suppression keeps a box iff no kept box of higher score (ties: lower anchor index) has
IoU > ``nms_iou`` (0.45) with it; ``class_agnostic=False`` suppresses only within a class (boxes are shifted by
k* x (2 max |coordinate| + 1), so boxes of two classes never overlap). NMS is vectorised: with S[j, i] = "j ranks
before i and IoU(j, i) > thr", the kept set K is the fixed point of K_i = not any_j (K_j and S[j, i]), reached
by iterating from K = all (it equals the greedy recursion, so the fixed point is unique).
Matching: candidate boxes in score order, each takes the unmatched reference box of the same class with the
highest IoU if that IoU >= 0.5 (one-to-one): TP = matches over all samples,

- ``box_f1`` = 2 TP / (boxes_ref + boxes)   (1.0 when neither model finds a box; the task metric)

**classify**: top-1 agreement (in ``onnxcompress.validate``).

**embed** (embeddings, and any other float output): per sample (index of the first axis, flattened)
cos = <r, c> / (|r| |c|) (1 when both are zero, 0 when one is); ``cosine_mean`` (the task metric) and
``sample_cosine_min`` over all samples.
"""

from __future__ import annotations

import numpy as np

BLANK = 0
SCORE_THRESHOLD = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
#: at most this many highest-scoring anchors per sample go into NMS (a bound on its n^2 IoU matrix)
MAX_NMS_CANDIDATES = 4096

#: the metric each task reports as its task metric, and how it is named in reports
TASK_METRIC = {"ctc": "string_agreement", "detect": "box_f1", "classify": "top1_agreement", "embed": "cosine_mean"}
METRIC_TITLE = {"string_agreement": "CTC string agreement", "box_f1": "box F1 @ IoU 0.5",
                "top1_agreement": "top-1 agreement", "cosine_mean": "mean per-sample cosine"}


# ---------------------------------------------------------------------------------------------------------- CTC
def ctc_decode(scores: np.ndarray, blank: int = BLANK) -> list[np.ndarray]:
    """Greedy CTC decoding of ``[N, T, C]`` (or ``[T, C]``) scores -> one int64 array of symbol indices per sample."""
    s = np.asarray(scores)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3:
        raise ValueError(f"CTC scores must be [N, T, C], got shape {list(s.shape)}")
    idx = s.argmax(axis=-1)
    keep = idx != blank
    keep[:, 1:] &= idx[:, 1:] != idx[:, :-1]
    return [row[k].astype(np.int64) for row, k in zip(idx, keep, strict=True)]


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance of two symbol sequences; one vectorised DP row per symbol of ``a``.

    Row i from row i-1: sub/del candidates d[j] = min(prev[j] + 1, prev[j-1] + [a_i != b_j]); then insertions
    row[j] = min_{k <= j} (d[k] + j - k), a running minimum of d[k] - k (``np.minimum.accumulate``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0 or b.size == 0:
        return int(max(a.size, b.size))
    cols = np.arange(b.size + 1)
    prev = cols.copy()
    for i, sym in enumerate(a, start=1):
        d = np.empty_like(prev)
        d[0] = i
        d[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (b != sym))
        prev = np.minimum.accumulate(d - cols) + cols
    return int(prev[-1])


class CtcAgreement:
    """Streaming string agreement and character error rate of CTC outputs (module docstring)."""

    def __init__(self, blank: int = BLANK):
        self.blank = blank
        self.samples = self.same = self.edits = self.ref_symbols = 0

    def update(self, r: np.ndarray, c: np.ndarray) -> None:
        for sr, sc in zip(ctc_decode(r, self.blank), ctc_decode(c, self.blank), strict=True):
            self.samples += 1
            equal = sr.size == sc.size and bool(np.array_equal(sr, sc))
            self.same += equal
            self.edits += 0 if equal else edit_distance(sr, sc)
            self.ref_symbols += sr.size

    def summary(self) -> dict[str, float]:
        return {"string_agreement": self.same / self.samples if self.samples else 1.0,
                "char_error_rate": self.edits / max(1, self.ref_symbols), "strings": self.samples}


# ---------------------------------------------------------------------------------------------------- detection
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corner boxes ``[n, 4]`` x ``[m, 4]`` (x1, y1, x2, y2) -> ``[n, m]``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Indices kept by greedy NMS, best score first (fixed-point form, module docstring)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if order.size <= 1:
        return order.astype(np.int64)
    b = np.asarray(boxes, np.float64)[order]
    suppress = np.triu(box_iou(b, b) > iou, k=1)  # [j, i]: j ranks before i and overlaps it
    keep = np.ones(order.size, bool)
    while True:
        new = ~(suppress & keep[:, None]).any(axis=0)
        if np.array_equal(new, keep):
            return order[keep].astype(np.int64)
        keep = new


def yolo_boxes(out: np.ndarray, channels_first: bool, score_threshold: float = SCORE_THRESHOLD,
               nms_iou: float = NMS_IOU, class_agnostic: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample of a ``[N, 4+K, A]`` (``channels_first``) or ``[N, A, 4+K]`` output: (corner boxes ``[n, 4]``,
    classes ``[n]``) after the score threshold and NMS, in score order."""
    o = np.asarray(out, np.float64)
    if o.ndim != 3 or o.shape[1 if channels_first else 2] < 5:
        raise ValueError(f"detection output must be [N, 4+K, A] or [N, A, 4+K] with K >= 1, got {list(o.shape)}")
    if channels_first:
        o = o.transpose(0, 2, 1)
    result = []
    for sample in o:
        cls = sample[:, 4:].argmax(axis=1)
        score = np.take_along_axis(sample[:, 4:], cls[:, None], axis=1)[:, 0]
        sel = np.flatnonzero(score >= score_threshold)
        if sel.size > MAX_NMS_CANDIDATES:
            sel = sel[np.argsort(-score[sel], kind="stable")[:MAX_NMS_CANDIDATES]]
            sel.sort()
        xy, wh = sample[sel, :2], sample[sel, 2:4]
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
        if class_agnostic or boxes.size == 0:
            shifted = boxes
        else:
            shifted = boxes + (cls[sel] * (2.0 * np.abs(boxes).max() + 1.0))[:, None]
        k = nms(shifted, score[sel], nms_iou)
        result.append((boxes[k], cls[sel][k]))
    return result


def match_boxes(ref_boxes: np.ndarray, ref_cls: np.ndarray, boxes: np.ndarray, cls: np.ndarray,
                iou: float = MATCH_IOU) -> int:
    """One-to-one matches of candidate boxes (in their order) to same-class reference boxes at IoU >= ``iou``."""
    if len(ref_boxes) == 0 or len(boxes) == 0:
        return 0
    m = box_iou(boxes, ref_boxes)
    m[np.asarray(cls)[:, None] != np.asarray(ref_cls)[None, :]] = 0.0
    free = np.ones(len(ref_boxes), bool)
    hits = 0
    for row in m:  # one step per detected box (tens per image), each step vectorised over the reference boxes
        j = int(np.argmax(np.where(free, row, -1.0)))
        if free[j] and row[j] >= iou:
            free[j] = False
            hits += 1
    return hits


class BoxF1:
    """Streaming box F1 of a YOLO-style output against the reference's boxes (module docstring)."""

    def __init__(self, channels_first: bool, class_agnostic: bool = False,
                 score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU):
        self.channels_first, self.class_agnostic = channels_first, class_agnostic
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.tp = self.n_ref = self.n_cand = 0

    def update(self, r: np.ndarray, c: np.ndarray) -> None:
        opts = dict(channels_first=self.channels_first, score_threshold=self.score_threshold,
                    nms_iou=self.nms_iou, class_agnostic=self.class_agnostic)
        for (rb, rc), (cb, cc) in zip(yolo_boxes(r, **opts), yolo_boxes(c, **opts), strict=True):
            self.tp += match_boxes(rb, rc, cb, cc)
            self.n_ref += len(rb)
            self.n_cand += len(cb)

    def summary(self) -> dict[str, float]:
        total = self.n_ref + self.n_cand
        return {"box_f1": 1.0 if total == 0 else 2.0 * self.tp / total, "boxes_ref": self.n_ref,
                "boxes": self.n_cand}


def detection_layout(shape: tuple[int, ...]) -> bool | None:
    """For a forced ``detect`` task: ``True`` for ``[N, 4+K, A]`` (the smaller of the last two axes holds the box
    and scores, as anchors outnumber classes), ``False`` for ``[N, A, 4+K]``, ``None`` when not a box output."""
    if len(shape) != 3 or min(shape[1], shape[2]) < 5 or shape[1] == shape[2]:
        return None
    return bool(shape[1] < shape[2])


# ---------------------------------------------------------------------------------------------------- embedding
class SampleCosine:
    """Streaming per-sample cosine (module docstring)."""

    def __init__(self):
        self.total = 0.0
        self.samples = 0
        self.worst = 1.0

    def update(self, r: np.ndarray, c: np.ndarray) -> None:
        if np.size(r) == 0:
            return
        rows = r.shape[0] if np.ndim(r) >= 2 else 1
        r2 = np.asarray(r, np.float64).reshape(rows, -1)
        c2 = np.asarray(c, np.float64).reshape(rows, -1)
        dot = np.einsum("ij,ij->i", r2, c2)
        nr, nc = np.linalg.norm(r2, axis=1), np.linalg.norm(c2, axis=1)
        both_zero = (nr == 0) & (nc == 0)
        cos = np.where(both_zero, 1.0, dot / np.where((nr == 0) | (nc == 0), np.inf, nr * nc))
        self.total += float(cos.sum())
        self.samples += cos.size
        if cos.size:
            self.worst = min(self.worst, float(cos.min()))

    def summary(self) -> dict[str, float]:
        return {"cosine_mean": self.total / self.samples if self.samples else 1.0, "sample_cosine_min": self.worst}
