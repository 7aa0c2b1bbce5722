"""Vector codes for weight matrices with error feedback (GPTQ-VQ): ``cluster{matrix_vector=true}``.

A MatMul / Gemm weight or a Conv kernel (group 1) in its matrix view M [out, in] (``layouts.Use``; ``in`` is the
reduction: a Conv's in·kh·kw im2col columns, its Gram the refit's im2col Gram) is stored as
channel scales s_o (the row's RMS) times d-vectors of one shared codebook C [k, d]: every row is cut along ``in``
into groups of d consecutive inputs and each group names one code,

    M_o,[g·d, (g+1)·d) ≈ s_o · C[i_o,g]          (log2(k) / d bits per weight + k·d floats + out scales)

so at b bits a weight spends its index jointly with d - 1 neighbours (``LEVELS``: 1 bit = blocks of 8 of 256 codes,
2 bits = 4 of 256, 3 bits = 2 of 64, 4 bits = 2 of 256). The codes follow the joint distribution of the groups
(scalar codes are the product of d one-dimensional grids).

**Codebook**: weighted k-means of the scaled groups v = M_o,g / s_o, each weighted by s_o^2 · mean_t H_tt over its
inputs and measured with the metric diag(H) inside the group (``vector_codebook.product_kmeans`` with one block).

**Assignment with error feedback** (GPTQ, Frantar et al. 2022; for vectors: van Baalen et al. 2024, GPTQ-VQ): with
H = X^T X the layer's Gram (damped) and U the upper Cholesky factor of H^-1, the inputs are processed in order. A
group G = [j, j + d) is coded jointly: quantizing it while the later inputs compensate costs
(w - q)^T (U_GG^T U_GG)^-1 (w - q) = ||A (w - q)||^2 with A = U_GG^-T, so the code is the nearest in the A-transformed
space (A·C precomputed per group); then, column by column inside the group, e_j = (w_j - q_j) / U_jj and
w_{j+1:} -= e_j U_{j, j+1:} (within blocks of ``BLOCK`` inputs, one product for the rest), exactly GPTQ's update with
the codes fixed. Measured on MiniLM-L6 layer-1 FFN1 [384, 1536] (64 calibration sentences, output error
tr(ΔW^T H ΔW) / tr(W^T H W)): scalar codes + OBS + refit 2 / 3 bits 0.0313 / 0.0091; vector codes without feedback
0.0434 / 0.0180; with feedback 0.0154 / 0.0057.

**Act-order** (GPTQ's ordering): the inputs are coded in decreasing H_jj (the inputs whose error costs the most
first, while the most later inputs remain to compensate), groups of d consecutive inputs in that order, kept per
tensor when its measured output error beats the natural order's (``cluster_matrix``). Measured on
MiniLM-L6 layer 1 (output error at 2 / 3 bits, natural order -> act-order): FFN1 0.0154 / 0.0051 -> 0.0140 / 0.0042,
FFN2 0.0007 / 0.0002 -> 0.0004 / 0.0001, attention query 0.0341 / 0.0100 -> 0.0327 / 0.0094. The decode puts the
columns back with one Gather along the inputs (the order stored as uint16, 2 bytes per input, cast at load).

Decode: packed log2(k)-bit codes -> Gather(C [k, d]) -> Reshape [out, in] -> Gather(order, axis 1) -> Mul(s [out, 1])
-> the weight's own layout (Transpose for MatMul and Gemm without transB, Reshape for a Conv kernel)
(``storage.DecodeBuilder.build_matrix_vector``); ``unpacked``: int32 codes as one constant, what
``distill{mode=train}`` trains (C and s move, the codes stay).

**Which form**: the scalar codes (``cluster_tensor``) are made too, and the vector codes kept only when they beat them
in the layer's output error after charging their larger codebook (``pick_form``).
"""

from __future__ import annotations

import math

import numpy as np

from .cluster_tensor import Clustered
from .obs_assign import upper_inverse_cholesky
from .storage import STREAMS, decode_overhead, index_bits
from .vector_codebook import product_kmeans

#: bits per weight -> (d inputs per code, k codes)
LEVELS = {1: (8, 256), 2: (4, 256), 3: (2, 64), 4: (2, 256)}
BLOCK = 128
DAMP = 0.01
#: serialized bytes of the decode's Gather + Reshape + Mul + Transpose (nodes, value_info, shapes) besides the codes,
#: codebook and scales (measured by serializing decodes: tests check plans against written files)
OVERHEAD_MATRIX = 340
#: the act-order Gather + Cast besides its uint16 order
OVERHEAD_ORDER = 205
#: a Conv kernel's Reshape back to [out, in, kh, kw] instead of the Transpose
OVERHEAD_RESHAPE = 50
OPS = ("MatMul", "Gemm", "Conv")


def vector_form(bits: int, n_in: int) -> tuple[int, int] | None:
    """(d, k) for ``bits`` per weight when the reduction length ``n_in`` holds whole groups, else None."""
    form = LEVELS.get(bits)
    if form is None or n_in % form[0] or n_in < 2 * form[0] or n_in > 1 << 16:  # the order is stored as uint16
        return None
    return form


def plan_bytes(out: int, n_in: int, d: int, k: int, itemsize: int, ordered: bool = False,
               reshaped: bool = False) -> int:
    bits = index_bits(k)
    data = sum(math.ceil(out * (n_in // d) * w / 8) for w in STREAMS[bits])
    order = (2 * n_in + OVERHEAD_ORDER) if ordered else 0
    return data + k * d * itemsize + out * itemsize + order + decode_overhead(bits, False, False) + \
        OVERHEAD_MATRIX + OVERHEAD_RESHAPE * reshaped


def _codebook(m: np.ndarray, scale: np.ndarray, hdiag: np.ndarray, d: int, k: int,
              rng: np.random.Generator) -> np.ndarray:
    """Shared codebook [k, d] of the scaled groups, weighted k-means under the diag(H) metric."""
    out, n_in = m.shape
    pts = (m / scale[:, None]).reshape(-1, d)
    g = np.maximum(hdiag, 1e-12 * max(float(hdiag.max()), 1e-30)).reshape(-1, d)
    gmean = g.mean(1)
    w = np.tile(gmean, out) * np.repeat(scale ** 2, n_in // d)
    metric = np.sqrt(np.tile(g / gmean[:, None], (out, 1)))
    _, labels = product_kmeans(pts * metric, d, k, w, rng)
    lab = labels[:, 0]
    wsum = np.bincount(lab, weights=w, minlength=k)
    cents = np.stack([np.bincount(lab, weights=pts[:, t] * w, minlength=k) for t in range(d)], axis=1)
    return cents / np.maximum(wsum, 1e-300)[:, None]


def gptq_vq(m: np.ndarray, scale: np.ndarray, book: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Codes [out, in / d] of M [out, in] for codebook [k, d] and channel scales [out], with error feedback."""
    out, n_in = m.shape
    d = book.shape[1]
    w = np.array(m, dtype=np.float64)
    u = upper_inverse_cholesky(np.asarray(gram, np.float64), DAMP)
    codes = np.zeros((out, n_in // d), np.int64)
    block = BLOCK - BLOCK % d
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        err = np.zeros((out, b1 - b0))
        for g0 in range(b0, b1, d):
            a = np.linalg.inv(u[g0:g0 + d, g0:g0 + d]).T
            av = (w[:, g0:g0 + d] / scale[:, None]) @ a.T
            ac = book @ a.T
            lab = np.argmin(np.einsum("kd,kd->k", ac, ac)[None, :] - 2.0 * av @ ac.T, axis=1)
            codes[:, g0 // d] = lab
            q = book[lab] * scale[:, None]
            for j in range(g0, g0 + d):
                e = (w[:, j] - q[:, j - g0]) / u[j, j]
                err[:, j - b0] = e
                w[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
        if b1 < n_in:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def byte_charge(extra_bytes: int, n: int) -> float:
    """The factor by which an n-weight tensor's output error would fall if given ``extra_bytes`` more as
    8·extra / n more bits per weight (high-rate slope 2^(-2R)): a form that costs those bytes must beat the other's
    error times this."""
    return 2.0 ** (-16.0 * extra_bytes / max(n, 1))


def _coded(m: np.ndarray, scale: np.ndarray, gram: np.ndarray, d: int, k: int, order: np.ndarray | None,
           dtype, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Codebook, codes and the decoded matrix (in the graph's float math) of M coded in input ``order`` (None: the
    natural order), and its output error tr(ΔM H ΔM^T)."""
    out, n_in = m.shape
    m_coded, gram_coded = (m, gram) if order is None else (m[:, order], gram[np.ix_(order, order)])
    book = _codebook(m_coded, scale, np.diag(gram_coded).copy(), d, k, rng)
    codes = gptq_vq(m_coded, scale, book, gram_coded)
    book_t = book.astype(dtype)
    values = book_t[codes].reshape(out, n_in)
    if order is not None:
        values = values[:, np.argsort(order)]  # matrix column j = coded column inverse[j]
    decoded = (values * scale.astype(dtype)[:, None]).astype(dtype)
    dm = m - decoded
    return book_t, codes, decoded, float(np.einsum("oi,oi->", dm @ gram, dm))


def cluster_matrix(w: np.ndarray, bits: int, use, gram: np.ndarray, storage: str,
                   rng: np.random.Generator) -> Clustered:
    """The weight ``w`` (read by ``use``) at ``bits`` per weight in vector codes: codebook [k, d], labels [out, in/d],
    scale [out] (``Clustered.vector`` = d, ``matrix``). Coded in the natural input order and in act-order; act-order
    is kept when its output error beats the natural order's after charging its stored order (2 bytes per input, the
    same high-rate rule as ``pick_form``): measured per tensor, since groups of neighbouring inputs that move
    together (heads, filters) fit joint codes in their own order."""
    m = use.to_matrix(w.astype(np.float64))
    out, n_in = m.shape
    d, k = vector_form(bits, n_in)
    scale = np.sqrt(np.mean(m ** 2, axis=1))
    scale = np.where(scale > 0, scale, 1.0)
    gram = np.asarray(gram, np.float64)
    act = np.argsort(-np.diag(gram), kind="stable")
    natural = _coded(m, scale, gram, d, k, None, w.dtype, rng)
    ordered = _coded(m, scale, gram, d, k, act, w.dtype, rng)
    use_order = ordered[3] < natural[3] * byte_charge(2 * n_in + OVERHEAD_ORDER, w.size)
    book_t, codes, decoded, _ = ordered if use_order else natural
    plans = {"snap": int(w.nbytes),
             "matrix-vector": plan_bytes(out, n_in, d, k, w.dtype.itemsize, use_order, w.ndim != 2)}
    res = Clustered(codebook=book_t, labels=codes.astype(np.uint16), axis=None, zero_label=None,
                    snapped=use.from_matrix(decoded, w.shape), bytes_raw=int(w.nbytes), weighted=True,
                    scale=scale.astype(w.dtype), scale_axis=0, vector=d, matrix=True,
                    inputs_order=np.argsort(act) if use_order else None)
    res.bytes_planned = plans
    res.storage = "snap" if storage == "snap" else "matrix-vector"
    return res


def layer_error(w: np.ndarray, snapped: np.ndarray, use, gram: np.ndarray) -> float:
    """tr(ΔM H ΔM^T): the layer's output error on calibration data of the matrix view's change."""
    dm = use.to_matrix(np.asarray(w, np.float64) - np.asarray(snapped, np.float64))
    return float(np.einsum("oi,oi->", dm @ gram, dm))


def pick_form(w: np.ndarray, vector: Clustered, scalar: Clustered, use, gram: np.ndarray) -> Clustered:
    """The vector form when its layer error beats the scalar form's after charging its extra bytes ΔB (the larger
    codebook): the scalar codes given those bytes as 8ΔB / n more bits per weight would lower their error by
    2^(-16 ΔB / n) (high-rate slope), so vector wins iff e_vec < e_scalar · 2^(-16 ΔB / n). A small tensor's 256-code
    codebook rarely pays for itself; the choice is measured on the user's layer."""
    extra = vector.bytes_planned[vector.storage] - scalar.bytes_planned[scalar.storage]
    charge = byte_charge(extra, w.size)
    e_vec, e_scalar = layer_error(w, vector.snapped, use, gram), layer_error(w, scalar.snapped, use, gram)
    return vector if e_vec < e_scalar * charge else scalar


__all__ = ["LEVELS", "OPS", "byte_charge", "cluster_matrix", "gptq_vq", "layer_error", "pick_form", "plan_bytes", "vector_form"]
