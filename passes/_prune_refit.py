"""Layer refitting for ``distill``: design rows, streamed normal equations, ridge solves, weight write-back.

A layer computes y = W x + b on rows: Conv on im2col patches (one row per output position, columns Cin*k, C order
of W[:, c, i, j]), Gemm/MatMul on the rows of its input. With X the student's input rows (an extra column of ones
when the layer has a bias) and Y the teacher's output rows (restricted to the kept output channels):

    [W; b] = argmin ||X [W; b] - Y||^2 + lambda ||W - W0||^2 = (X^T X + lambda I')^{-1} (X^T Y + lambda I' W0),
    lambda = ridge * mean(diag(X^T X)), W0 the current weights (the bias is not penalised): directions the
    calibration data does not excite keep their weights instead of collapsing to 0.

Only X^T X and X^T Y are accumulated, feed by feed (``Normal``); a random subset of rows per feed (output positions
for Conv) bounds the cost. Variants:

- depthwise Conv: one small system per channel (k x k, batched);
- sparse weights (after ``prune-weights``): each output column is solved on its own support, zeros stay zero;
- quantized weights (a DequantizeLinear of constant integers): the float solution is re-quantized on the existing
  scale/zero-point grid, then the bias is re-solved for the quantized weights:
  b = (sum Y - (sum X) W_q) / n from the same statistics;
- a refit is kept only if it lowers the objective on the accumulated statistics;
- ridge selection (``select_ridge``): every 4th feed is held out; lambda is chosen among ridge x {1, 10, 100, 1000}
  by the held-out objective ||X_h W - Y_h||^2 = tr(W^T A_h W) - 2 tr(W^T B_h) + const, and the current weights win
  when no refit beats them there; the chosen lambda is then solved on all feeds. With few rows per unknown (MiniLM:
  ~1.3k tokens for a 1014-input FFN projection) a weak ridge interpolates the calibration tokens and the refit
  generalises worse than the pruned weights it replaces.

Layers that cannot be refit this way (ConvTranspose, grouped Conv, very wide inputs) get bias correction:
b += mean(Y_teacher - Y_student) per output channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ weights
@dataclass
class WeightRef:
    """A float weight read by ``node`` at input ``index``: a constant, or DequantizeLinear(integer constant)."""

    node: gs.Node
    index: int
    dq: gs.Node | None = None

    @staticmethod
    def resolve(node: gs.Node, index: int) -> WeightRef | None:
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        t = node.inputs[index]
        if isinstance(t, gs.Constant):
            return WeightRef(node, index)
        if t.inputs and t.inputs[0].op == "DequantizeLinear":
            dq = t.inputs[0]
            if all(isinstance(x, gs.Constant) for x in dq.inputs if x.name) and "block_size" not in dq.attrs:
                return WeightRef(node, index, dq)
        return None

    @property
    def quantized(self) -> bool:
        return self.dq is not None

    def _qparams(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        q = np.asarray(self.dq.inputs[0].values)
        scale = np.asarray(self.dq.inputs[1].values).astype(np.float64)
        zp = (
            np.asarray(self.dq.inputs[2].values)
            if len(self.dq.inputs) > 2 and self.dq.inputs[2].name
            else np.zeros((), dtype=q.dtype)
        )
        axis = int(self.dq.attrs.get("axis", 1)) % max(q.ndim, 1)
        return q, scale, zp, axis

    def _bshape(self, q: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
        if v.size <= 1:
            return v.reshape(())
        shape = [1] * q.ndim
        shape[axis] = v.size
        return v.reshape(shape)

    def get(self) -> np.ndarray:
        if self.dq is None:
            return np.asarray(self.node.inputs[self.index].values).astype(np.float64)
        q, scale, zp, axis = self._qparams()
        return (q.astype(np.float64) - self._bshape(q, zp.astype(np.float64), axis)) * self._bshape(
            q, scale, axis
        )

    def set(self, value: np.ndarray) -> np.ndarray:
        """Write ``value`` (float64); returns what the graph now computes with (re-quantized when quantized)."""
        if self.dq is None:
            t = self.node.inputs[self.index]
            new = value.astype(np.asarray(t.values).dtype)
            if len({id(c) for c in t.outputs}) > 1:
                self.node.inputs[self.index] = gs.Constant(
                    f"{t.name}_distilled_{id(self.node) % 100000}", new
                )
            else:
                t.values = new
            return new.astype(np.float64)
        q, scale, zp, axis = self._qparams()
        info = np.iinfo(q.dtype)
        s = self._bshape(q, scale, axis)
        z = self._bshape(q, zp.astype(np.float64), axis)
        new_q = np.clip(np.round(value / s) + z, info.min, info.max).astype(q.dtype)
        qt = self.dq.inputs[0]
        if len({id(c) for c in qt.outputs}) > 1:
            self.dq.inputs[0] = gs.Constant(f"{qt.name}_distilled_{id(self.dq) % 100000}", new_q)
        else:
            qt.values = new_q
        return (new_q.astype(np.float64) - z) * s


# ------------------------------------------------------------------------------------------------ layers
@dataclass
class Layer:
    node: gs.Node
    kind: str  # conv, dwconv, gemm, matmul, bias (bias correction only)
    x: str  # student input activation
    y: str  # output tensor matched against the teacher
    out_axis: int
    w: WeightRef | None
    b: WeightRef | None = None
    b_layout: str = "vector"  # how b maps to output channels: "vector" (1-D / [1,N]) or "conv"
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: bool = False
    trans_b: bool = False
    kept_out: np.ndarray | None = None  # teacher channel per student output channel
    res_out: str | None = (
        None  # residual Add this layer feeds (target: teacher(res_out) - student(res_other))
    )
    res_other: str | None = None
    ln_axis: int | None = None  # res_out is normalised over this axis (LayerNormalization): rows weigh 1/std
    stage: int = 0
    reason: str = ""
    stats: Normal | None = None
    hold: Normal | None = None  # statistics of the held-out feeds (ridge selection)
    bias_sum: np.ndarray | None = None
    bias_count: int = 0


@dataclass
class Normal:
    """Streaming normal equations: X^T X, X^T Y (dense), or one small system per channel (depthwise)."""

    xtx: np.ndarray | None = None
    xty: np.ndarray | None = None
    yty: float = 0.0
    rows: int = 0
    per_channel: bool = False
    extra: dict = field(default_factory=dict)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.per_channel:  # x [C, R, k], y [C, R]
            xtx = np.einsum("crk,crl->ckl", x, x)
            xty = np.einsum("crk,cr->ck", x, y)
            self.rows += x.shape[1]
        else:
            xtx = x.T @ x
            xty = x.T @ y
            self.rows += x.shape[0]
        self.yty += float(np.sum(y * y))
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty

    def merged(self, other: Normal | None) -> Normal:
        """The statistics of both row sets (X^T X and X^T Y add)."""
        if other is None or other.rows == 0:
            return self
        return Normal(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty, self.rows + other.rows,
                      self.per_channel)


def _conv_geometry(node: gs.Node, w_shape: tuple[int, ...], in_spatial: list[int], out_spatial: list[int]):
    nd = len(w_shape) - 2
    k = list(w_shape[2:])
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin = []
        for i in range(nd):
            total = max(0, (out_spatial[i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - in_spatial[i])
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
    elif auto == "VALID":
        begin = [0] * nd
    else:
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        begin = pads[:nd]
    return k, strides, dil, begin


def conv_rows(
    x: np.ndarray,
    node: gs.Node,
    w_shape: tuple[int, ...],
    out_spatial: list[int],
    rows: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Patches [R, C, k...] at ``rows`` random output positions, and those positions (n, o_1, .., o_d)."""
    n = x.shape[0]
    in_spatial = list(x.shape[2:])
    k, strides, dil, begin = _conv_geometry(node, w_shape, in_spatial, out_spatial)
    total = n * int(np.prod(out_spatial))
    r = min(rows, total)
    flat = rng.choice(total, r, replace=False) if r < total else np.arange(total)
    pos = np.unravel_index(flat, [n] + list(out_spatial))
    # pad generously on both sides, then index
    pad_lo = [max(0, b) for b in begin]
    pad_hi = [
        max(0, (out_spatial[i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - in_spatial[i] - begin[i])
        for i in range(len(k))
    ]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(lo, hi) for lo, hi in zip(pad_lo, pad_hi, strict=True)])
    xt = np.moveaxis(xp, 1, -1)  # [N, S..., C]
    nd = len(k)
    idx: list[np.ndarray] = [pos[0].reshape((-1,) + (1,) * nd)]
    for d in range(nd):
        start = pos[d + 1] * strides[d] - begin[d] + pad_lo[d]
        offs = np.arange(k[d]) * dil[d]
        shape = [1] * nd
        shape[d] = k[d]
        idx.append(start.reshape((-1,) + (1,) * nd) + offs.reshape([1] + shape))
    patches = xt[tuple(idx)]  # [R, k..., C]
    return np.moveaxis(patches, -1, 1), pos


def solve(
    stats: Normal,
    ridge: float,
    has_bias: bool,
    mask: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """Ridge solution of the accumulated system, shrunk towards ``prior`` (the current weights) rather than 0:
    (X^T X + lambda I') W = X^T Y + lambda I' W_prior. A weight whose input never fires on the calibration data keeps
    its value. ``mask`` [K(+1), N] restricts each column's support (zeros stay zeros)."""
    a = stats.xtx
    b = stats.xty
    k = a.shape[-1] - (1 if has_bias else 0)
    if stats.per_channel:
        diag = np.einsum("ckk->ck", a)[:, :k]
        lam = ridge * np.maximum(diag.mean(axis=1), 1e-12)
        reg = np.zeros(a.shape[:2])
        reg[:, :k] = lam[:, None]
        rhs = b + (reg * prior if prior is not None else 0.0)
        a_reg = a + reg[:, :, None] * np.eye(a.shape[-1])[None] + 1e-12 * np.eye(a.shape[-1])
        return np.linalg.solve(a_reg, rhs[..., None])[..., 0]
    lam = ridge * max(float(np.mean(np.diag(a)[:k])), 1e-12)
    reg = np.zeros(a.shape[0])
    reg[:k] = lam
    a_reg = a + np.diag(reg + 1e-12)
    rhs = b + (reg[:, None] * prior if prior is not None else 0.0)
    if mask is None:
        return _sym_solve(a_reg, rhs)
    out = np.zeros_like(rhs)
    for j in range(rhs.shape[1]):
        s = np.flatnonzero(mask[:, j])
        if s.size:
            out[s, j] = _sym_solve(a_reg[np.ix_(s, s)], rhs[s, j])
    return out


RIDGE_GRID = (1.0, 10.0, 100.0, 1000.0)


def select_ridge(fit: Normal, hold: Normal | None, ridge: float, has_bias: bool, prior: np.ndarray,
                 mask: np.ndarray | None = None) -> float | None:
    """The ridge (from ``ridge`` x ``RIDGE_GRID``) whose solution on ``fit`` has the lowest objective on ``hold``;
    None when the current weights ``prior`` do at least as well there (no refit generalises). Without held-out rows:
    ``ridge``."""
    if hold is None or hold.rows == 0 or fit.rows == 0:
        return ridge
    best, best_obj = None, objective(hold, prior)
    for r in (ridge * g for g in RIDGE_GRID):
        obj = objective(hold, solve(fit, r, has_bias, mask, prior=prior))
        if obj < best_obj:
            best, best_obj = r, obj
    return best


def _sym_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        c = np.linalg.cholesky(a)
        z = np.linalg.solve(c, b)
        return np.linalg.solve(c.T, z)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def objective(stats: Normal, wb: np.ndarray) -> float:
    """||X wb - Y||^2 from the statistics (dense only), up to the constant ||Y||^2."""
    a, b = stats.xtx, stats.xty
    if stats.per_channel:
        return float(np.einsum("ck,ckl,cl->", wb, a, wb) - 2 * np.einsum("ck,ck->", wb, b))
    return float(np.sum(wb * (a @ wb)) - 2 * np.sum(wb * b))
