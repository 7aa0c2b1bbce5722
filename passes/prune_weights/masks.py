"""Masks from scores: which entries of a weight matrix V [rows, cols] become zero.

Scores S [rows, cols] (larger = more important):

- ``magnitude``: S = |V|;
- ``wanda``: S_ij = |V_ij| · ||x_j||, ||x_j||² = (X^T X)_jj the calibration energy of input column j (Sun et al.
  2023, "A simple and effective pruning approach for LLMs");
- ``obs``: the OBS saliency S_ij = V_ij² / [H^-1]_jj, H = X^T X + damping (the output error of removing V_ij and
  re-fitting the rest of its row optimally; used to set per-layer budgets, ``obs`` itself then chooses its mask
  block by block while it updates the weights, see ``obs``).

Counts are exact: a target of k zeros in a tensor zeroes exactly k entries (ties broken by position), so the reached
sparsity equals round(sparsity · size) — within one element of the target. Scopes:

- ``row``: every output row gets its share; the k zeros are spread as evenly as the rows allow
  (``row_counts``: floor(k / rows), one more for the first k mod rows rows);
- ``layer``: the k smallest scores of the whole matrix;
- N:M: in every group of M consecutive columns (along the reduction axis) the M - N smallest scores go, so each
  group holds at most N non-zeros; the sparsity is 1 - N/M whatever ``sparsity`` says.

Comparable scores for one ``global`` threshold (``comparable``): the squared score over its layer mean,
c_ij = S_ij² / mean(S²): for ``magnitude`` w² over the layer's mean w², for ``wanda`` the weight's share of the
layer's output energy, for ``obs`` the error of removing it relative to the layer's mean. One threshold over all
layers' c then gives each layer its count (``global_counts``).
"""

from __future__ import annotations

import numpy as np


def ranks(scores: np.ndarray, axis: int | None) -> np.ndarray:
    """Rank of every entry among its row (axis=1) or the whole array (axis=None); 0 = smallest; stable. int32 when
    the ranks fit (half the memory of int64 on large layers)."""
    n = scores.size if axis is None else scores.shape[axis]
    dtype = np.int32 if n < 2**31 else np.int64
    if axis is None:
        flat = scores.reshape(-1)
        r = np.empty(flat.size, dtype=dtype)
        r[np.argsort(flat, kind="stable")] = np.arange(flat.size, dtype=dtype)
        return r.reshape(scores.shape)
    order = np.argsort(scores, axis=axis, kind="stable")
    r = np.empty(order.shape, dtype=dtype)
    np.put_along_axis(r, order, np.broadcast_to(np.arange(scores.shape[axis], dtype=dtype)[None, :], order.shape),
                      axis=axis)
    return r


def row_counts(k: int, rows: int, cols: int) -> np.ndarray:
    """Zeros per row summing to exactly ``k``: floor(k / rows), plus one for the first k mod rows rows."""
    base, extra = divmod(int(k), rows)
    c = np.full(rows, base, dtype=np.int64)
    c[:extra] += 1
    return np.minimum(c, cols)


def unstructured_mask(scores: np.ndarray, k: int, scope: str) -> np.ndarray:
    """True where an entry is zeroed: exactly ``k`` entries, the smallest scores per ``scope`` (row / layer)."""
    return mask_from_ranks(ranks(scores, axis=1 if scope == "row" else None), k, scope)


def mask_from_ranks(ranked: np.ndarray, k: int, scope: str) -> np.ndarray:
    """``unstructured_mask`` from ranks computed once (``ranks`` with axis=1 for ``row``, None for ``layer``):
    several sparsity levels of one layer cost one sort."""
    if scope == "row":
        return ranked < row_counts(k, *ranked.shape)[:, None]
    return ranked < k


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """True where an entry is zeroed: the M - N smallest of every M consecutive columns (cols % M == 0)."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    order = np.argsort(g, axis=2, kind="stable")
    r = np.empty_like(order)
    np.put_along_axis(r, order, np.broadcast_to(np.arange(m), g.shape).copy(), axis=2)
    return (r < m - n).reshape(rows, cols)


def comparable(scores: np.ndarray) -> np.ndarray:
    """Scores of one layer made comparable with other layers' (see the module docstring)."""
    s2 = np.square(scores.astype(np.float64))
    mean = float(s2.mean())
    return s2 / mean if mean > 0 else s2


def global_counts(comparables: list[np.ndarray], sparsity: float) -> tuple[list[int], float]:
    """One threshold over every layer's comparable scores: the k = round(sparsity · total) smallest go; returns
    each layer's zero count and the threshold (the largest comparable score that goes)."""
    sizes = [c.size for c in comparables]
    total = int(sum(sizes))
    k = int(round(sparsity * total))
    if k == 0:
        return [0] * len(sizes), 0.0
    flat = np.concatenate([c.reshape(-1) for c in comparables])
    order = np.argsort(flat, kind="stable")[:k]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    counts = np.bincount(owner[order], minlength=len(sizes))
    return [int(x) for x in counts], float(flat[order[-1]])


def wanda_scores(v: np.ndarray, col_sq_norms: np.ndarray) -> np.ndarray:
    """|V_ij| · ||x_j||."""
    return np.abs(v) * np.sqrt(np.maximum(col_sq_norms, 0.0))[None, :]
