"""Measurements of ``prune-layers``: output change of single-unit bypass trials, the block-influence proxy, latency.

Output change of a trial: ``onnxcompress.output_error.relative_output_error`` against the outputs y0 of the model
the pass received, over the calibration feeds (the measure prune-channels' sensitivity uses too). Fidelity
(``min_fidelity``): ``onnxcompress.output_cosine.worst_cosine``, the worst output's cosine <y, y0> / (||y|| ||y0||)
pooled over all feeds, a non-finite output counting as 0 (the measure prune-channels' floor uses).

Shared runs: feeds whose shapes agree are concatenated along the batch axis when every model input has a symbolic
first dim (``batch_feeds``), so a trial is one session and a few runs, not one run per feed.

Block influence (ShortGPT, Men et al. 2024): BI = 1 - E_positions[cos(x_p, y_p)] between a unit's entry and exit
at every position p (the channel vector: axis 1 of a rank-4 tensor, the last axis otherwise), one run of the current
model with every candidate's entry and exit exposed. A unit that barely turns its input (BI ~ 0) is cheap to drop;
the pass measures the ``trials`` lowest first.

Latency (``latency_ratio``): the candidate and the reference timed interleaved (``onnxcompress.latency``, 1 thread),
taken through ``ctx.latency.measure`` under ``prune-layers/latency/<fingerprint of both models and the feed shapes>``
so a recorded profile replays the same decisions.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx

from onnxcompress.analyses.activations import stream_activations
from onnxcompress.data import FeedSet, model_inputs
from onnxcompress.latency_profile import LatencyProfile, fingerprint
from onnxcompress.runtime import Session

log = logging.getLogger(__name__)

Outputs = list[np.ndarray]


def batch_feeds(feeds: list[dict], model: onnx.ModelProto, max_batch: int = 16) -> list[dict]:
    """Feeds with equal shapes concatenated along axis 0 (at most ``max_batch`` per batch) when every model input
    has a symbolic first dim; otherwise the feeds unchanged."""
    specs = model_inputs(model)
    if not feeds or not specs or any(not s.shape or isinstance(s.shape[0], int) for s in specs):
        return feeds
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for f in feeds:
        groups[tuple(sorted((k, v.shape) for k, v in f.items()))].append(f)
    out = []
    for members in groups.values():
        for i in range(0, len(members), max_batch):
            chunk = members[i:i + max_batch]
            out.append({k: np.concatenate([f[k] for f in chunk], axis=0) for k in chunk[0]})
    return out


def run_outputs(model: onnx.ModelProto, feeds: list[dict]) -> list[Outputs]:
    with Session(model, what="prune-layers trial") as s:
        return [s.run(f) for f in feeds]


def block_influence(model: onnx.ModelProto, pairs: list[tuple[str, str]], feeds: list[dict]) -> list[float]:
    """BI of every (entry, exit) pair on ``feeds`` (one run of the model with all the tensors exposed)."""
    names = sorted({n for p in pairs for n in p})
    sums = np.zeros(len(pairs))
    counts = np.zeros(len(pairs))
    fs = FeedSet(lambda: iter(feeds), model_inputs(model), "prune-layers feeds", len(feeds))
    for _, acts in stream_activations(model, names, fs, desc="block influence"):
        for k, (x, y) in enumerate(pairs):
            a, b = acts[x], acts[y]
            if a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
                continue
            axis = 1 if a.ndim == 4 else a.ndim - 1
            a2 = np.moveaxis(a.astype(np.float64), axis, -1).reshape(-1, a.shape[axis])
            b2 = np.moveaxis(b.astype(np.float64), axis, -1).reshape(-1, b.shape[axis])
            na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
            ok = (na > 0) & (nb > 0)
            if ok.any():
                cos = np.sum(a2[ok] * b2[ok], axis=1) / (na[ok] * nb[ok])
                sums[k] += float(np.sum(1.0 - cos))
                counts[k] += int(ok.sum())
    return [float(s / c) if c else 1.0 for s, c in zip(sums, counts, strict=True)]


def latency_ratio(profile: LatencyProfile, reference: onnx.ModelProto, cand: onnx.ModelProto, feed: dict,
                  budget_s: float = 3.0) -> float:
    """Median latency of ``cand`` over ``reference`` on ``feed`` (interleaved, 1 thread), through ``profile``."""
    from onnxcompress.latency import measure_latency

    ref_b, cand_b = reference.SerializeToString(), cand.SerializeToString()
    shapes = str({k: tuple(v.shape) for k, v in feed.items()})
    key = f"prune-layers/latency/{fingerprint(ref_b, cand_b, shapes)}"

    def measure() -> float:
        ms = measure_latency({"reference": ref_b, "candidate": cand_b}, feed, budget_s=budget_s)
        return round(ms["candidate"] / ms["reference"], 4) if ms["reference"] > 0 else 1.0

    return float(profile.measure(key, measure))
