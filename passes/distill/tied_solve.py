"""One refit for a weight read by several layers (tied weights: ALBERT's shared layers, tied projections).

The readers r = 1..R of one weight W (``Layer.tied``, grouped by ``layers._tie``) each bring their normal equations
(``Normal``: A_r = X_r^T X_r, B_r = X_r^T Y_r, the bias column last when the reader has one). W is shared, each
reader's bias b_r is its own unless the readers share the bias tensor too. The joint least squares

    min_{W, b_1..b_m}  sum_r ||X_r W + 1 b_{j(r)} - Y_r||^2

(j(r): which of the m distinct biases reader r adds) has the normal equations of one system over [W; b_1; ...; b_m]:

    A = sum_r P_r^T A_r P_r,   B = sum_r P_r^T B_r,

P_r placing reader r's columns (W's K rows, and its bias row at K + j(r)). This is ``ridge.solve``'s system with m
free (unpenalised) rows: the ridge towards the current weights, its choice on the held-out feeds (summed the same
way) and the rule that a refit is kept only when it lowers the summed objective all apply unchanged. A reader's
objective ||X_r W + 1 b - Y_r||^2 is part of the sum, so the sum of the readers' calibration errors falls.
The weight is written once, in place (``WeightRef.set(tied=True)``): every reader still reads the one tensor;
a quantized weight is re-quantized on its grid and each bias re-solved for it: b_j = (B[K+j] - A[K+j, :K] W_q) /
A[K+j, K+j] (distinct biases never share a row, so their block of A is diagonal).
"""

from __future__ import annotations

import numpy as np

from .layer_solve import (
    bias_vector,
    from_matrix,
    relative_error,
    requantized_bias,
    ridge_refit,
    set_bias,
    to_matrix,
)
from .layers import Layer
from .normal_equations import Normal
from .ridge import objective


def solve_tied(group: list[Layer], *, ridge: float, max_inputs: int,
               choose_ridge: bool = True) -> tuple[str, float, float]:
    """Refit the weight ``group`` reads (and the readers' biases) from their summed statistics; returns (what was
    done, relative residual before, after) over all readers, like ``layer_solve.solve_layer``."""
    holds = [L.hold for L in group]
    for L in group:
        L.hold = None
    why = next((L.reason for L in group if L.reason), None)
    if why:
        return (why, 0.0, 0.0)
    first = group[0]
    w = first.w.get()
    wm = to_matrix(first, w)  # [K, N], y = x @ W for every reader (one kind and layout: ``layers._tie``)
    k = wm.shape[0]
    if k > max_inputs:
        return (f"more than {max_inputs} inputs", 0.0, 0.0)
    keys, biases = _bias_keys(group)
    st = _joint([L.stats for L in group], keys, k, len(biases))
    hold = _joint(holds, keys, k, len(biases))
    if isinstance(st, str) or isinstance(hold, str):
        return (st if isinstance(st, str) else hold, 0.0, 0.0)
    if st is None:
        return ("no rows", 0.0, 0.0)
    nb = len(biases)
    wb_cur = np.concatenate([wm] + [bias_vector(R, wm.shape[1])[None, :] for R, _ in biases], axis=0)
    mask = None
    if np.any(wm == 0):  # pruned weights: the support is kept
        mask = np.concatenate([wm != 0, np.ones((nb, wm.shape[1]), bool)], axis=0)
    fit = ridge_refit(st, hold, wb_cur, ridge, nb, mask, choose_ridge, first.node.name)
    if isinstance(fit, str):
        return (fit, 0.0, 0.0)
    new, st, before = fit
    w_eff_m = to_matrix(first, first.w.set(from_matrix(first, new[:k], w.shape), tied=True))
    rows = [w_eff_m]
    for j, (R, in_place) in enumerate(biases):
        b_new = requantized_bias(st, k + j, w_eff_m) if first.w.quantized else new[k + j]
        set_bias(R, b_new, tied=in_place)
        rows.append(b_new[None, :])
    return ("ls", relative_error(st, before), relative_error(st, objective(st, np.concatenate(rows, axis=0))))


def _bias_keys(group: list[Layer]) -> tuple[list[int | None], list[tuple[Layer, bool]]]:
    """Which bias each reader adds (index into the distinct biases, None: no bias row) and the distinct biases as
    (a reader that writes it, written in place for all). A bias tensor is shared in place only when every node
    reading it is one of the group's bias slots (and, Gemm, with one beta); otherwise each reader's is its own."""
    slots = {(id(L.b.node), L.b.index) for L in group if L.b is not None}
    keys: list[int | None] = []
    biases: list[tuple[Layer, bool]] = []
    shared: dict[int, int] = {}
    for L in group:
        if L.b is None and L.kind != "conv":
            keys.append(None)
            continue
        t = L.b.node.inputs[L.b.index] if L.b is not None else None
        users = [(id(n), i) for n in t.outputs for i, x in enumerate(n.inputs) if x is t] if t is not None else []
        betas = {R.beta for R in group if R.b is not None and R.b.node.inputs[R.b.index] is t}
        if len(users) > 1 and set(users) <= slots and len(betas) == 1 and not (L.b.dq is not None and len(
                {id(n) for n in L.b.dq.inputs[0].outputs}) > 1):
            if id(t) not in shared:
                shared[id(t)] = len(biases)
                biases.append((L, True))
            keys.append(shared[id(t)])
        else:
            keys.append(len(biases))
            biases.append((L, False))
    return keys, biases


def _joint(stats: list[Normal | None], keys: list[int | None], k: int, nb: int) -> Normal | str | None:
    """The readers' statistics as one system over [W; b_1..b_nb] (A = sum P^T A_r P, B = sum P^T B_r); None when
    no reader has rows, a reason when their shapes disagree."""
    parts = [(s, j) for s, j in zip(stats, keys, strict=True) if s is not None and s.rows]
    if not parts:
        return None
    n = parts[0][0].xty.shape[1]
    a, b = np.zeros((k + nb, k + nb)), np.zeros((k + nb, n))
    for s, j in parts:
        idx = np.arange(k) if j is None else np.append(np.arange(k), k + j)
        if s.xtx.shape != (idx.size, idx.size) or s.xty.shape != (idx.size, n):
            return "tied weight: its readers' statistics differ in shape"
        a[np.ix_(idx, idx)] += s.xtx
        b[idx] += s.xty
    return Normal(a, b, sum(s.yty for s, _ in parts), sum(s.rows for s, _ in parts))
