"""A smoothing strength per smoothed input, chosen by the predicted joint rounding error at its layers' outputs
(``smooth=auto``'s ``per-input`` trial; ``smoothing`` with ``run.smooth_alpha`` None).

One strength α for the whole model moves every input's outliers by the same share into the weights, yet what
breaks differs by input: where the weight rows are what breaks (their per-output-channel scale set by a few rows
the factors enlarged), less migration is better; where the activation's range is, more. For an input ``X`` [.., K]
read by ``Y_m = X W_m`` and factors ``s = s(α)`` (``smoothing.factors``; α = None: ``s = 1``, not smoothed), the
rounding model is the one the quantizer builds: the activation ``X/s`` per tensor, ``uint8`` over
``[min(0, min_j lo_j/s_j), max(0, max_j hi_j/s_j)]`` (``lo``/``hi``: the channels' calibrated extremes), step
``Δ = range / 255``, noise uniform and independent (variance ``Δ²/12`` per element); the weights ``diag(s) W_m``
symmetric int8 per output channel, rounded to nearest (error ``E_m`` computed exactly). Per row, the expected
error energy at the outputs is

    e(α) = Σ_m  Δ²/12 · ||Q(diag(s) W_m)||_F²  +  tr(E_mᵀ diag(1/s) Σ diag(1/s) E_m),

``Σ = E[x xᵀ]`` the input's second-moment matrix (the Gram matrix of its rows over their count, from the same run
of the shared statistics collector that measures the channel RMS). Each input takes the α of ``ALPHA_GRID`` (or no
smoothing) with the smallest ``e``, relative to the signal ``Σ_m tr(W_mᵀ Σ W_m)``. The choice is local (each
layer's own output, both roundings at once); whether the model gains is measured by ``smoothing_choice``'s screen
like every other strength.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: strengths tried per input (None: not smoothed)
ALPHA_GRID: tuple[float | None, ...] = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


def joint_error(w_list: list[np.ndarray], sigma: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                s: np.ndarray) -> float:
    """``e`` of the module docstring for factors ``s`` (weights [K, N_m], ``sigma`` [K, K], channel extremes)."""
    inv = 1.0 / s
    a_lo, a_hi = min(0.0, float(np.min(lo * inv))), max(0.0, float(np.max(hi * inv)))
    step = (a_hi - a_lo) / 255.0
    sig_s = (sigma * inv[:, None] * inv[None, :]).astype(np.float32)
    total = 0.0
    for w in w_list:
        ws = w.astype(np.float64) * s[:, None]
        m = np.abs(ws).max(axis=0)
        scale = np.where(m > 0, m / 127.0, 1.0)
        q = np.clip(np.rint(ws / scale), -127, 127) * scale
        e = (q - ws).astype(np.float32)
        total += step * step / 12.0 * float(np.sum(q * q)) + float(np.sum((sig_s @ e) * e))
    return total


def choose_strengths(w_list_by: dict[str, list[np.ndarray]], stats: dict[str, dict],
                     factors: Callable[[np.ndarray, np.ndarray, float], np.ndarray], grid=ALPHA_GRID
                     ) -> dict[str, tuple[float | None, np.ndarray, dict[str, float]]]:
    """Per input name: (chosen α or None, its factors, predicted output NSR in dB per α tried). ``stats[name]``:
    ``rms``, ``sigma`` (E[x xᵀ]), ``lo``, ``hi``; ``w_list_by[name]``: the weights ``W_m`` [K, N_m] it feeds;
    ``factors``: ``smoothing.factors`` (rms, max |W_j|, α) -> s."""
    out = {}
    for name, ws in w_list_by.items():
        st = stats.get(name)
        if st is None or "sigma" not in st:
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in ws], axis=0).astype(np.float64)
        sigma = st["sigma"]
        signal = sum(float(np.sum((sigma @ w.astype(np.float64)) * w)) for w in ws)
        best = None
        tried: dict[str, float] = {}
        for a in grid:
            s = np.ones_like(st["rms"], dtype=np.float64) if a is None else factors(st["rms"], w_max, a)
            e = joint_error(ws, sigma, st["lo"], st["hi"], s)
            tried["none" if a is None else f"{a:g}"] = round(10 * np.log10(max(e, 1e-30) / max(signal, 1e-30)), 2)
            if best is None or e < best[0]:
                best = (e, a, s)
        out[name] = (best[1], best[2], tried)
    return out


__all__ = ["ALPHA_GRID", "choose_strengths", "joint_error"]
