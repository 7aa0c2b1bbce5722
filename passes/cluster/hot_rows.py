"""Hot rows: a residual correction for the rows of a product-quantized table that the calibration data reads most.

Token frequencies are heavy-tailed (on 256 calibration sentences 1,026 of MiniLM's 30,522 rows carry 91% of the row
weight), yet a product-quantized table (``vector_codebook``) gives every row the same log2(k) / d bits per weight.
Given the table E [V, D], its decode Ê and the row weights w_v (token counts + floor), row v's weighted error is
g_v = w_v ||E_v - Ê_v||^2 and the table's E = sum_v g_v. A residual R_v = E_v - Ê_v stored with b-bit scalar codes
(one shared codebook of 2^b values, weighted 1-D k-means over every stored residual value) costs

    c_b = D·b / 8 + 8 bytes per row (packed codes + the row's int64 index)

and removes a measured part of g_v: gain_v = w_v (||R_v||^2 - ||R_v - R̂_v||^2). The same bytes could instead refine
the whole table (a finer level): at the high-rate limit the error falls as 2^(-2R) with R bits per weight, so one
byte spread over the table buys  s = -dE/dB = 16 ln2 · E / (V·D). Row v takes a residual when gain_v / c_b > s: a
better use of the byte than the table's next level. Rows are pre-selected by the upper bound g_v / c_b > s (a
residual removes at most g_v), the codes fitted on them, the rows re-selected by their measured gains and the codes
refitted on the kept rows. Of b = 1..4 the one with the largest net gain sum_v gain_v - s·B is kept (B: the
residual's planned bytes, its codebook and decode nodes included); no net gain means no residual (uniform weights,
or a table whose error is spread evenly over its rows).

**Stages** (``hot_stages``): one residual gives every hot row the same b bits, while the row weights span decades
(MiniLM-L6 with 4,000 more calibration sentences: the 633 rows read 21+ times carry 82% of new text's tokens and kept
a 1.7% relative error at the 2 bits the other 1,300 hot rows also got). The rule is applied again to the table with
the residual added: its slope s is now that table's (a finer level refines what the residuals left, so its value per
byte falls with E), and the rows that still lose more per byte than s take a second residual on top, then a third,
up to ``STAGES``. Bits per row then grow with log w_v, as reverse water-filling over the rows asks.

In the graph (``storage.DecodeBuilder.build_vector``): ``ScatterND(Ê, rows [H, 1], GatherND(Ê, rows) + R̂)``, R̂
decoded from packed b-bit codes like any scalar-clustered tensor; the sum is computed in the table's dtype, so the
snapped table here equals the graph's output bit for bit; stages chain one ScatterND each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kmeans1d import kmeans_1d
from .storage import plan_bytes

BITS = (1, 2, 3, 4)
#: residual stages on top of each other at most (each must pay for itself at the slope of the table it refines)
STAGES = 3
#: serialized bytes of the GatherND + Add + ScatterND nodes and their names besides the codes and the row index
OVERHEAD_HOT = 160


@dataclass
class HotRows:
    """Rows [H] (ascending) of a table with a residual: codebook [2^bits] (the table's dtype), labels [H, D]."""

    rows: np.ndarray
    codebook: np.ndarray
    labels: np.ndarray
    bits: int

    def apply(self, snapped: np.ndarray) -> np.ndarray:
        """The table with the residuals added to its hot rows, in the table's dtype (what the graph computes)."""
        out = snapped.copy()
        out[self.rows] = snapped[self.rows] + self.codebook[self.labels]
        return out

    def planned_bytes(self) -> int:
        """The residual's codebook form (``storage.plan_bytes``) + the int64 row index + the scatter nodes."""
        codes = plan_bytes(self.labels.size, 1, self.codebook.size, itemsize=self.codebook.itemsize)
        return codes + 8 * self.rows.size + OVERHEAD_HOT


def _fit(residual: np.ndarray, w: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of the residual values [H, D] (row weights w [H]): codebook [2^bits], labels [H, D]."""
    ww = np.broadcast_to(w[:, None], residual.shape).reshape(1, -1)
    cents, labels = kmeans_1d(residual.reshape(1, -1), 1 << bits, np.ascontiguousarray(ww), init="linear", rng=rng)
    return cents[0], labels.reshape(residual.shape)


def _slope(weighted_error: float, size: int) -> float:
    """s = 16 ln2 · E / (V·D): what one byte spread over the whole table's next level removes (high-rate limit)."""
    return 16.0 * math.log(2.0) * weighted_error / size


def table_slope(table: np.ndarray, snapped: np.ndarray, weights: np.ndarray) -> float:
    """The slope s of ``snapped`` (the decoded ``table``) under row weights ``weights``."""
    resid = table.astype(np.float64) - snapped.astype(np.float64)
    return _slope(float(np.sum(weights * np.einsum("vd,vd->v", resid, resid))), resid.size)


def hot_stages(table: np.ndarray, snapped: np.ndarray, weights: np.ndarray,
               rng: np.random.Generator) -> tuple[tuple[HotRows, ...], np.ndarray]:
    """Up to STAGES residuals, each on the table with the earlier ones added, at that table's slope; and the table
    with all of them added (``apply_stages``)."""
    stages: list[HotRows] = []
    while len(stages) < STAGES:
        stage = hot_rows(table, snapped, weights, rng)
        if stage is None:
            break
        stages.append(stage)
        snapped = stage.apply(snapped)
    return tuple(stages), snapped


def apply_stages(stages, snapped: np.ndarray) -> np.ndarray:
    """The table with every stage's residuals added in order (what the graph's chained scatters compute)."""
    for stage in stages or ():
        snapped = stage.apply(snapped)
    return snapped


def describe_stages(stages) -> str:
    """'1923 rows, 2 bits + 770 rows, 2 bits' (the pass's stats)."""
    return " + ".join(f"{h.rows.size} rows, {h.bits} bits" for h in stages)


def hot_rows(table: np.ndarray, snapped: np.ndarray, weights: np.ndarray,
             rng: np.random.Generator) -> HotRows | None:
    """The residual rows of ``snapped`` (the product-quantized ``table`` [V, D]) worth their bytes at the table's
    slope (``table_slope``), or None."""
    v, dim = table.shape
    resid = table.astype(np.float64) - snapped.astype(np.float64)
    err = np.einsum("vd,vd->v", resid, resid)
    g = weights * err
    total = float(g.sum())
    if total <= 0:
        return None
    slope = _slope(total, v * dim)
    best, best_net = None, 0.0
    for bits in BITS:
        cost = dim * bits / 8 + 8
        rows = np.flatnonzero(g / cost > slope)
        if rows.size == 0:
            continue
        for refit in (False, True):  # fit on the candidates, keep the rows that gained enough, refit on those
            book, lab = _fit(resid[rows], weights[rows], bits, rng)
            left = resid[rows] - book[lab]
            gain = weights[rows] * (err[rows] - np.einsum("hd,hd->h", left, left))
            keep = gain / cost > slope
            if refit or keep.all() or not keep.any():
                break
            rows = rows[keep]
        if not keep.any():
            continue
        cand = HotRows(rows[keep].astype(np.int64), book.astype(table.dtype), lab[keep].astype(np.uint8), bits)
        net = float(np.sum(gain[keep])) - slope * cand.planned_bytes()  # the stage's fixed bytes paid too
        if net > best_net:
            best_net, best = net, cand
    return best


__all__ = ["HotRows", "apply_stages", "describe_stages", "hot_rows", "hot_stages", "table_slope"]
