"""Quantization arithmetic shared by the ``quantize`` pass: scales, zero points, integer tensors.

Affine (linear) quantization of a real tensor ``x`` to integers in ``[qmin, qmax]`` with scale ``s > 0`` and zero
point ``z`` (an integer in ``[qmin, qmax]``)::

    q = clamp(round_half_even(x / s) + z, qmin, qmax)        (QuantizeLinear)
    x~ = s · (q − z)                                          (DequantizeLinear)

**Asymmetric** over a calibrated range ``[a, b]``: the range is first widened to hold 0 (so that 0 — padding, ReLU
floor — is exact), then ``s = (b − a) / (qmax − qmin)`` and ``z = clamp(round(qmin − a / s), qmin, qmax)``.

**Symmetric**: ``m = max(|a|, |b|)``, ``s = m / q_half`` with ``q_half = 127`` (int8 weights use the restricted
range [−127, 127] so that −q is representable and the integer kernels never see −128 · −128), ``z = 0`` for int8 and
``z = 128`` for uint8.

**Per channel** (weights): one ``(s, z)`` per slice along ``axis`` (the output channel: Conv axis 0 of
``[Cout, Cin/g, k..]``, ConvTranspose axis 1 of ``[Cin, Cout/g, k..]``, MatMul axis 1 of ``[K, N]``, Gemm axis 1 of
``B`` or axis 0 when ``transB=1``). **Blocked** (weight-only, opset 21): one ``(s, z)`` per ``block_size`` consecutive
elements along ``axis`` for every other index.

**Bias** of Conv/Gemm is stored as int32 with ``s_b[c] = s_x · s_w[c]`` and ``z_b = 0``, so the integer kernel adds it
to the int32 accumulator ``Σ (q_x − z_x) · q_w`` directly. A channel whose bias would overflow int32 gets its weight
scale raised until it fits (``s_w ≥ |b| / (s_x · (2³¹ − 1))``).

An all-zero channel gets the smallest scale that keeps its bias in int32 (never 0: a zero scale is invalid ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MAX = np.float64(2**31 - 1)
#: smallest scale we ever emit; float32 can represent it and 1/s stays finite
MIN_SCALE = np.float64(1e-12)


@dataclass(frozen=True)
class QType:
    """An integer type for quantized values."""

    name: str  # "uint8" | "int8" | "uint4" | "int4" | "int32"
    qmin: int
    qmax: int
    bits: int
    signed: bool

    @property
    def numpy(self) -> np.dtype:
        if self.bits == 4:
            import ml_dtypes

            return np.dtype(ml_dtypes.int4 if self.signed else ml_dtypes.uint4)
        return np.dtype(self.name)

    @property
    def sym_zero(self) -> int:
        """Zero point of the symmetric form: 0 for signed types, the mid point for unsigned ones."""
        return 0 if self.signed else (self.qmax + 1) // 2

    @property
    def sym_half(self) -> int:
        """Steps on each side of zero in the symmetric form (127 for 8 bits, 7 for 4 bits)."""
        return (2 ** (self.bits - 1)) - 1


UINT8 = QType("uint8", 0, 255, 8, False)
INT8 = QType("int8", -128, 127, 8, True)
UINT4 = QType("uint4", 0, 15, 4, False)
INT4 = QType("int4", -8, 7, 4, True)
INT32 = QType("int32", -(2**31), 2**31 - 1, 32, True)
QTYPES = {q.name: q for q in (UINT8, INT8, UINT4, INT4, INT32)}


def qtype(name: str) -> QType:
    try:
        return QTYPES[name]
    except KeyError:
        raise ValueError(f"unknown quantized type {name!r}; known: {sorted(QTYPES)}") from None


# ------------------------------------------------------------------------------------------ scale / zero point
def scale_zero_point(lo, hi, qt: QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for ranges ``[lo, hi]`` (scalars or arrays of the same shape). Returns float32, qt."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        m = np.maximum(np.abs(lo), np.abs(hi))
        scale = m / qt.sym_half
    else:
        scale = (hi - lo) / (qt.qmax - qt.qmin)
    # a degenerate (all-zero) range: any positive scale represents 0 exactly; use 1
    scale = np.where(np.isfinite(scale) & (scale > MIN_SCALE), scale, 1.0)
    if symmetric:
        zp = np.full(np.shape(scale), qt.sym_zero, dtype=np.float64)
    else:
        zp = np.clip(np.round(qt.qmin - lo / scale), qt.qmin, qt.qmax)
    return scale.astype(np.float32), zp.astype(qt.numpy)


def quantize(x: np.ndarray, scale, zp, qt: QType, axis: int | None = None, block_size: int = 0) -> np.ndarray:
    """QuantizeLinear in NumPy (round half to even, saturate), per tensor, per ``axis`` or blocked along ``axis``."""
    x64 = np.asarray(x, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zp).astype(np.float64)
    if axis is not None and s.ndim:
        s, z = _broadcast_params(x64, s, z, axis, block_size)
    q = np.clip(np.rint(x64 / s) + z, qt.qmin, qt.qmax)
    return q.astype(np.int64).astype(qt.numpy)


def dequantize(q: np.ndarray, scale, zp, axis: int | None = None, block_size: int = 0) -> np.ndarray:
    """DequantizeLinear in NumPy (float32 result)."""
    q64 = np.asarray(q).astype(np.float64)
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zp).astype(np.float64)
    if axis is not None and s.ndim:
        s, z = _broadcast_params(q64, s, z, axis, block_size)
    return ((q64 - z) * s).astype(np.float32)


def _broadcast_params(x: np.ndarray, s: np.ndarray, z: np.ndarray, axis: int, block_size: int):
    axis = axis % x.ndim
    if block_size:
        # scale has x's shape with dim ``axis`` replaced by ceil(n / block_size)
        s = np.repeat(s, block_size, axis=axis)
        z = np.repeat(z, block_size, axis=axis) if z.ndim else z
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(0, x.shape[axis])
        return s[tuple(idx)], (z[tuple(idx)] if z.ndim else z)
    shape = [1] * x.ndim
    shape[axis] = -1
    return s.reshape(shape), (z.reshape(shape) if z.ndim else z)


# --------------------------------------------------------------------------------------------------- weights
@dataclass
class QuantizedWeight:
    q: np.ndarray  # integers (qt.numpy)
    scale: np.ndarray  # float32, scalar or per-channel / per-block
    zero_point: np.ndarray  # qt.numpy, same shape as scale
    axis: int | None  # None: per tensor
    block_size: int = 0

    def dequantized(self) -> np.ndarray:
        return dequantize(self.q, self.scale, self.zero_point, self.axis, self.block_size)


def channel_ranges(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice min and max of ``w`` along ``axis``."""
    moved = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0).reshape(w.shape[axis], -1)
    return moved.min(axis=1), moved.max(axis=1)


def quantize_weight(
    w: np.ndarray, qt: QType, axis: int | None, symmetric: bool = True, clip_search: bool = False
) -> QuantizedWeight:
    """Per-tensor (``axis=None``) or per-channel weight quantization; optional MSE-optimal clipping per slice."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        lo, hi = np.float64(w.min()) if w.size else 0.0, np.float64(w.max()) if w.size else 0.0
        if clip_search:
            lo, hi = _mse_clip(w.reshape(1, -1), np.array([lo]), np.array([hi]), qt, symmetric)
            lo, hi = lo[0], hi[0]
        s, z = scale_zero_point(lo, hi, qt, symmetric)
        return QuantizedWeight(quantize(w, s, z, qt), s, z, None)
    axis = axis % w.ndim
    lo, hi = channel_ranges(w, axis)
    if clip_search:
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        lo, hi = _mse_clip(rows, lo, hi, qt, symmetric)
    s, z = scale_zero_point(lo, hi, qt, symmetric)
    return QuantizedWeight(quantize(w, s, z, qt, axis=axis), s, z, axis)


def quantize_weight_blocked(
    w: np.ndarray, qt: QType, axis: int, block_size: int, symmetric: bool = True, clip_search: bool = True
) -> QuantizedWeight:
    """Blocked quantization along ``axis`` (DequantizeLinear-21 ``block_size``): one scale per block of elements.

    The scale tensor has ``w``'s shape with ``shape[axis]`` replaced by ``ceil(shape[axis] / block_size)``.
    ``clip_search`` picks, per block, the clipping ratio in a small grid that minimises the block's squared error.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    n = w.shape[axis]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    moved = np.moveaxis(w, axis, -1)
    if pad:
        # pad with zeros: they do not change a block's min/max once 0 is forced into the range
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), np.float32)], axis=-1)
    blocks = moved.reshape(-1, block_size)  # (... * nb, block_size)
    lo, hi = blocks.min(axis=1).astype(np.float64), blocks.max(axis=1).astype(np.float64)
    if clip_search:
        lo, hi = _mse_clip(blocks, lo, hi, qt, symmetric)
    s, z = scale_zero_point(lo, hi, qt, symmetric)
    scale_shape = moved.shape[:-1] + (nb,)
    s = np.moveaxis(s.reshape(scale_shape), -1, axis).astype(np.float32)
    z = np.moveaxis(z.reshape(scale_shape), -1, axis)
    q = quantize(w, s, z, qt, axis=axis, block_size=block_size)
    return QuantizedWeight(q, np.ascontiguousarray(s), np.ascontiguousarray(z), axis, block_size)


def _mse_clip(
    rows: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    qt: QType,
    symmetric: bool,
    grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
):
    """Per row, the range ``[α·lo, α·hi]`` (α in ``grid``) with the least squared quantization error of the row."""
    rows = rows.astype(np.float64)
    best_err = np.full(rows.shape[0], np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    for alpha in grid:
        a, b = lo * alpha, hi * alpha
        s, z = scale_zero_point(a, b, qt, symmetric)
        s64, z64 = s.astype(np.float64)[:, None], z.astype(np.float64)[:, None]
        q = np.clip(np.rint(rows / s64) + z64, qt.qmin, qt.qmax)
        err = np.sum(((q - z64) * s64 - rows) ** 2, axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, a, best_lo)
        best_hi = np.where(better, b, best_hi)
    return best_lo, best_hi


def quantize_bias(b: np.ndarray, s_x: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale ``s_x · s_w``; returns (q int32, scale float32). Callers ensure the scale fits first."""
    sb = (np.float64(s_x) * np.asarray(w_scale, dtype=np.float64)).astype(np.float32)
    q = np.clip(np.rint(np.asarray(b, dtype=np.float64) / sb.astype(np.float64)), -INT32_MAX, INT32_MAX)
    return q.astype(np.int32), sb


def fit_bias_scale(w_scale: np.ndarray, b: np.ndarray, s_x: float, headroom: float = 2.0**-1) -> np.ndarray:
    """Raise weight scales (per channel) so that ``b / (s_x · s_w)`` fits int32 with ``headroom``."""
    need = np.abs(np.asarray(b, dtype=np.float64)) / (np.float64(s_x) * INT32_MAX * headroom)
    return np.maximum(np.asarray(w_scale, dtype=np.float64), need).astype(np.float32)


def requantize_with_scale(w: np.ndarray, scale: np.ndarray, qt: QType, axis: int | None) -> QuantizedWeight:
    """Symmetric weight quantization with given (possibly raised) scales."""
    z = (
        np.zeros(np.shape(scale), dtype=qt.numpy)
        if qt.signed
        else np.full(np.shape(scale), qt.sym_zero, qt.numpy)
    )
    return QuantizedWeight(quantize(w, scale, z, qt, axis=axis), np.asarray(scale, np.float32), z, axis)


# ------------------------------------------------------------------------------------------- 4-bit packing
def pack_uint4_rows(q: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit values (last axis, even length) two per byte, the first value in the low nibble."""
    q = np.asarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    lo, hi = q[..., 0::2], q[..., 1::2]
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


# ----------------------------------------------------------------------------------------------- measures
def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(Σ ref² / Σ (ref − approx)²)`` in dB (inf when exact)."""
    ref = np.asarray(ref, dtype=np.float64).ravel()
    err = np.sum((ref - np.asarray(approx, dtype=np.float64).ravel()) ** 2)
    sig = np.sum(ref**2)
    if err == 0:
        return float("inf")
    if sig == 0:
        return float("-inf")
    return float(10.0 * np.log10(sig / err))
