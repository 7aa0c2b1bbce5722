"""The worst output's cosine of a candidate model against a reference, pooled over feeds.

For every float output o: cos_o = sum_f <y_f, y0_f> / sqrt(sum_f ||y0_f||^2 * sum_f ||y_f||^2), the sums taken over
all feeds f (float64), y0 the reference's outputs and y the candidate's; the measure is min_o cos_o (the cosine of
``onnxcompress.validate``: 1 when both are all-zero, 0 when only one is). A candidate that emits a NaN or an
infinity anywhere in an output gets cos_o = 0 for that output: a non-finite output is the worst, never skipped.

``cosine_terms`` keeps the per-feed sums (outputs, feeds, 3) so a caller can re-weight feeds without re-running the
models (``worst_of(terms, weights)``: one worst cosine per row of feed weights, e.g. bootstrap resamples).
Used by ``prune-channels{min_fidelity}`` and ``prune-layers{min_fidelity}``; ``base`` and ``cand`` are per feed, per
output.
"""

from __future__ import annotations

import numpy as np

Outputs = list[np.ndarray]


def cosine_terms(base: list[Outputs], cand: list[Outputs]) -> np.ndarray:
    """(outputs, feeds, 3): <y, y0>, ||y0||^2, ||y||^2 of every float output on every feed (float64; a sum is NaN
    or inf when the candidate's output is not finite)."""
    if not base:
        return np.zeros((0, 0, 3))
    terms = []
    with np.errstate(over="ignore", invalid="ignore"):
        for o in range(len(base[0])):
            if not np.issubdtype(np.asarray(base[0][o]).dtype, np.floating):
                continue
            rows = []
            for b, c in zip(base, cand, strict=True):
                r64, c64 = np.asarray(b[o], np.float64).ravel(), np.asarray(c[o], np.float64).ravel()
                rows.append((float(r64 @ c64), float(r64 @ r64), float(c64 @ c64)))
            terms.append(rows)
    return np.asarray(terms, dtype=np.float64).reshape(len(terms), len(base), 3)


def worst_of(terms: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """min over outputs of the pooled cosine, for each row of feed ``weights`` (B, feeds); without weights, once
    with every feed counted once. 1 when both sides are 0, 0 when one is, 0 when not finite; 1 with no float
    output."""
    w = np.ones((1, terms.shape[1])) if weights is None else np.asarray(weights, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sums = np.einsum("bn,onk->bok", w, terms)  # (B, outputs, 3)
        dot, rr, cc = sums[..., 0], sums[..., 1], sums[..., 2]
        cos = np.where((rr == 0) & (cc == 0), 1.0,
                       np.where((rr == 0) | (cc == 0), 0.0, dot / np.sqrt(rr * cc)))
    cos = np.where(np.isfinite(cos), cos, 0.0)
    return cos.min(axis=1) if cos.shape[1] else np.ones(len(w))


def worst_cosine(base: list[Outputs], cand: list[Outputs]) -> float:
    """min over float outputs of the cosine between ``cand`` and ``base`` over all feeds (0 when not finite)."""
    return float(worst_of(cosine_terms(base, cand))[0])
