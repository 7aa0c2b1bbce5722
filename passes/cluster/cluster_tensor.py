"""One weight tensor clustered: rows (the tensor, or one row per output channel), element weights, k-means,
codebook order, optional refit, and the storage that is smallest on disk.

Element weights (``activation_aware``): the cost of moving weight M_oi by d on the layer's output is d^2 E[x_i^2]
summed over calibration rows, so each element is weighted by ||x_i||^2 / rows of the input column it multiplies
(the diagonal of the layer's Gram matrix: per input channel, or per im2col column of a Conv when the refit's Gram is
there), floored at 1e-3 of the mean so that dead inputs still pull their weights to some centroid.

Channel scales (``channel_scales``, per-tensor codebooks only): w_oi = s_o u_oi with s_o the RMS of output channel o;
the u of the whole tensor share one codebook of k values (element weights x s_o^2: an error in u costs s_o^2 in w),
so every channel has <= k values and channels of very different magnitude (a BatchNorm folded into a Conv) each get
their own resolution for C extra floats instead of C codebooks. Decoded as Gather -> Reshape -> Mul(s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .kmeans1d import kmeans_1d
from .layouts import Use
from .refine import refine
from .storage import OVERHEAD_SCALE, plan_bytes


@dataclass
class Clustered:
    """The outcome for one tensor, in the tensor's own layout."""

    codebook: np.ndarray  # [R, k] in the tensor's dtype
    labels: np.ndarray  # the tensor's shape, uint8
    axis: int | None  # channel axis (per channel) or None
    zero_label: int | None  # label of the fixed zero (0 in every row) or None
    snapped: np.ndarray
    storage: str = "snap"  # snap | codebook | sparse-codebook
    bytes_raw: int = 0
    bytes_planned: dict[str, int] = field(default_factory=dict)
    weighted: bool = False
    refit: tuple[float, float] | None = None
    scale: np.ndarray | None = None  # per output channel (channel_scales), along scale_axis
    scale_axis: int | None = None
    vector: int | None = None  # product-quantized table (``vector_codebook``): the sub-vector length d
    hot: tuple | None = None  # a product-quantized table's residual stages (``hot_rows.HotRows``, in order)
    matrix: bool = False  # vector codes of a weight matrix (``matrix_vector``): codebook [k, d], labels [out, in/d]
    inputs_order: np.ndarray | None = None  # matrix_vector's act-order: column j of the matrix is coded column [j]
    half: bool = False  # codebook and scales on the float16 grid, stored as float16 (``half_books``)


def to_rows(a: np.ndarray, axis: int | None) -> np.ndarray:
    return a.reshape(1, -1) if axis is None else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def from_rows(r: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return r.reshape(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.moveaxis(r.reshape(moved), 0, axis)


def decode_scalar(codebook: np.ndarray, row_labels: np.ndarray, shape: tuple[int, ...], axis: int | None,
                  scale: np.ndarray | None, scale_axis: int | None) -> np.ndarray:
    """W = c[labels] laid back in ``shape``, times the output channel's scale when there is one: the graph's decode,
    in the codebook's (the tensor's) dtype, as its Gather and Mul compute it. ``row_labels``: per ``to_rows`` row."""
    out = from_rows(np.take_along_axis(codebook, row_labels.astype(np.int64), axis=1), shape, axis)
    if scale is not None:
        bshape = [1] * len(shape)
        bshape[scale_axis] = -1
        out = out * scale.reshape(bshape)
    return out


def element_weights(use: Use, shape: tuple[int, ...], norms: np.ndarray, per_column: bool) -> np.ndarray:
    """Tensor-layout weights from norms per column of the matrix view (``per_column``) or per input channel."""
    m_shape = use.to_matrix(np.empty(shape, np.uint8)).shape
    wm = np.broadcast_to(norms[None, :], m_shape) if per_column else norms[use.input_channel_of(shape)]
    wm = np.maximum(wm, 1e-3 * max(float(np.mean(wm)), 1e-30))
    return use.from_matrix(np.ascontiguousarray(wm), shape)


def _zero_first(cents: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder every codebook row so its exact zero is entry 0 (the sparse form's implicit value)."""
    perm = np.argsort(cents != 0.0, axis=1, kind="stable")  # zero (False) first, the rest in order
    inv = np.argsort(perm, axis=1)
    return np.take_along_axis(cents, perm, 1), np.take_along_axis(inv, labels.astype(np.int64), 1)


def cluster_tensor(
    w: np.ndarray,
    k: int,
    *,
    use: Use,
    per_channel: bool,
    channel_scales: bool,
    init: str,
    zero_fraction: float,
    col_norms: np.ndarray | None,
    per_column: bool,
    refit_gram: np.ndarray | None,
    storage: str,
    obs: bool = True,
    refit_rounds: int = 1,
    fit_scales: bool = False,
    rng: np.random.Generator,
) -> Clustered:
    shape, dtype = w.shape, w.dtype
    ch_axis = use.channel_axis(w.ndim)
    axis = ch_axis if per_channel else None  # the codebook rows
    weights = None
    if col_norms is not None:
        weights = element_weights(use, shape, col_norms, per_column)
    scale = None
    values = w
    if channel_scales and not per_channel:
        # one codebook for the tensor's values divided by their output channel's RMS s_c: the error of u in channel
        # c costs s_c^2 times as much in w
        rms = np.sqrt(np.mean(to_rows(w.astype(np.float64), ch_axis) ** 2, axis=1))
        scale = np.where(rms > 0, rms, 1.0).astype(dtype)
        bshape = [1] * w.ndim
        bshape[ch_axis] = -1
        values = w.astype(np.float64) / scale.reshape(bshape).astype(np.float64)
        sw = np.broadcast_to(scale.reshape(bshape).astype(np.float64) ** 2, shape)
        weights = sw if weights is None else weights * sw
    rows_v = to_rows(values, axis)
    rows_w = None if weights is None else to_rows(np.asarray(weights), axis)
    fixed_zero = zero_fraction < 1.0 and float(np.mean(w == 0)) >= zero_fraction
    cents, labels = kmeans_1d(rows_v, k, rows_w, init=init, fixed_zero=fixed_zero, rng=rng)
    refit = None
    if refit_gram is not None:
        m = use.to_matrix(w.astype(np.float64))
        zero_mask = use.to_matrix(w == 0) if fixed_zero else None
        lab_m = None
        if not obs:
            lab_m = use.to_matrix(from_rows(labels, shape, axis))
        cents, lab_m, sc, refit = refine(m, cents, refit_gram, lab_m, row_scale=None if scale is None else
                                         scale.astype(np.float64), zero_mask=zero_mask, rounds=refit_rounds,
                                         fit_scales=fit_scales)
        labels = to_rows(use.from_matrix(lab_m, shape), axis)
        if scale is not None:
            scale = sc.astype(dtype)
    if axis is None:  # drop unused entries: fewer entries may need fewer index bits
        used = np.unique(labels)
        remap = np.zeros(cents.shape[1], np.int64)
        remap[used] = np.arange(used.size)
        cents, labels = cents[:, used], remap[labels]
    if fixed_zero:
        cents, labels = _zero_first(cents, labels)
    codebook = cents.astype(dtype)
    labels = labels.astype(np.uint8)
    shared = decode_scalar(codebook, labels, shape, axis, scale, ch_axis)
    out = Clustered(codebook=codebook, labels=from_rows(labels, shape, axis), axis=axis,
                    zero_label=0 if fixed_zero else None, snapped=shared.astype(dtype),
                    bytes_raw=int(w.nbytes), weighted=col_norms is not None, refit=refit,
                    scale=scale, scale_axis=ch_axis if scale is not None else None)
    rows, kk, n, item = codebook.shape[0], codebook.shape[1], w.size, dtype.itemsize
    extra = 0 if scale is None else scale.nbytes + OVERHEAD_SCALE
    plans = {"snap": int(w.nbytes), "codebook": plan_bytes(n, rows, kk, itemsize=item) + extra}
    if fixed_zero and rows == 1:
        plans["sparse-codebook"] = plan_bytes(n, rows, kk, nonzero=int(np.count_nonzero(labels)),
                                              itemsize=item) + extra
    out.bytes_planned = plans
    allowed = {"snap": ["snap"], "codebook": [p for p in plans if p != "snap"], "auto": list(plans),
               "unpacked": ["codebook"]}[storage]
    out.storage = min(allowed, key=lambda p: plans[p])
    return out
