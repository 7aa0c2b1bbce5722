"""How far a model's outputs moved: one relative error, shared by every pass that ranks candidates by measuring them.

``relative_output_error(base, cand)``: the mean over float outputs of sum ||y - y0||^2 / sum ||y0||^2 across the
feeds, per feature for outputs of rank >= 3 (see the function); ``base`` and ``cand`` are per feed, per output.
"""

from __future__ import annotations

import numpy as np


def relative_output_error(base: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float:
    """Mean over outputs of the relative squared error sum ||y - y0||^2 / sum ||y0||^2 across the feeds.

    Outputs of rank >= 3 are measured per feature along their smallest non-batch axis of fixed size (a detector's
    [1, 4+C, A]: box coordinates and class scores count alike, whatever their scales; an axis whose size varies
    between feeds is not a feature axis), each feature's energy floored at 1e-6 of
    the mean feature energy (features that are always ~0 do not blow up)."""
    errs = []
    for o in range(len(base[0])):
        b0 = np.asarray(base[0][o])
        if not np.issubdtype(b0.dtype, np.floating) or b0.size == 0:
            continue
        axis = None
        if b0.ndim >= 3 and all(np.ndim(b[o]) == b0.ndim for b in base):
            # feature axis: the smallest non-batch axis whose size is > 1 and the same for every feed (a
            # segmentation map's H or W, which vary with the input, is not a feature axis)
            dims = [(b0.shape[a], a) for a in range(1, b0.ndim)
                    if b0.shape[a] > 1 and all(np.shape(b[o])[a] == b0.shape[a] for b in base)]
            axis = min(dims)[1] if dims else None
        if axis is None:
            num = sum(float(np.sum(np.square(c[o].astype(np.float64) - b[o]))) for b, c in zip(base, cand,
                                                                                               strict=True))
            den = sum(float(np.sum(np.square(b[o].astype(np.float64)))) for b in base)
            if den > 0:
                errs.append(num / den)
            continue
        num = np.zeros(b0.shape[axis])
        den = np.zeros(b0.shape[axis])
        for b, c in zip(base, cand, strict=True):
            bb = np.moveaxis(b[o].astype(np.float64), axis, 0).reshape(b0.shape[axis], -1)
            cc = np.moveaxis(c[o].astype(np.float64), axis, 0).reshape(b0.shape[axis], -1)
            num += np.square(cc - bb).sum(axis=1)
            den += np.square(bb).sum(axis=1)
        den = np.maximum(den, 1e-6 * den.mean())
        if den.mean() > 0:
            errs.append(float(np.mean(num / den)))
    return float(np.mean(errs)) if errs else 0.0
