"""Codebooks and channel scales stored as float16, cast to float32 in the graph (``cluster{half_codebooks=true}``).

A clustered tensor's side tables (the codebook values, the channel scales) are few values each used by many weights:
on MiniLM-L6 at 12x they are 5.7% of the file (the word table's 64 codebooks of 256 six-vectors alone 393 KB).
Stored as float16 they take half; ``Cast(to float)`` restores float32 values (folded at session start like the
rest of the decode), so the session holds the same float32 weights.

Rounding a value v to float16 moves it by at most 2^-11·|v| (relative, in the normal range 2^-14 .. 65504). The
tensor's decoded weights move by Δ_h = decode(half) - decode(full); the form is kept in float16 only when that
costs at most ``MAX_SHARE`` of the clustering's own error,

    ||Δ_h||^2 <= MAX_SHARE · ||W - decode(full)||^2,

measured on the tensor (an 8-bit codebook of a layer whose error is already tiny keeps float32; a 2-4 bit codebook,
whose error is ~2^-2b of the weights' energy, always passes). Values below float16's normal range (2^-14) round to
its subnormals, an absolute step of 2^-24: harmless among normal values (MiniLM-L6's 12x word-table codebook holds 99
such values among 98,304; refusing them kept 393 KB float32 where 197 KB would do), ruinous when the whole table is that
small; the same measured share decides. Values above 65504 (no float16), and tables whose saving would not pay for
their Cast nodes (a 16-value codebook), keep float32.

``halve`` rounds the tables of a ``Clustered`` result (scalar, product-quantized table, vector codes), recomputes its
snapped values exactly as the graph's float math will, and charges the bytes (-2 per value, + a Cast node each).
The values do not depend on the storage: ``storage=snap`` writes the same rounded values in place (no bytes saved).
With ``pack_only`` (``packing.pack_existing``) the codebooks and scales of unpacked decodes trained by ``distill`` are
rounded when they are packed (the training moved them off the float16 grid: the same rounding, once).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .cluster_tensor import Clustered, decode_scalar, to_rows
from .hot_rows import apply_stages
from .vector_codebook import decode as decode_table

MAX_SHARE = 0.01
#: serialized bytes of one Cast node and its output name
OVERHEAD_CAST = 96
_FP16_MAX = 65504.0


def rounded(a: np.ndarray | None) -> np.ndarray | None:
    """``a`` on the float16 grid (same dtype; subnormals included), or None when a value exceeds float16's range."""
    if a is None:
        return None
    if np.abs(np.asarray(a, np.float64)).max(initial=0.0) > _FP16_MAX:
        return None
    return np.asarray(a).astype(np.float16).astype(a.dtype)


def decode(res: Clustered, shape: tuple[int, ...], use=None) -> np.ndarray:
    """The weights a ``Clustered`` result decodes to, in the graph's float math (its codebook's dtype)."""
    book = res.codebook
    if res.matrix:
        values = book[res.labels.astype(np.int64)].reshape(res.labels.shape[0], -1)
        if res.inputs_order is not None:
            values = values[:, res.inputs_order]
        return use.from_matrix(values * res.scale[:, None], shape)
    if res.vector is not None:
        base = decode_table(book.reshape(res.labels.shape[1], -1, book.shape[1]), res.labels.astype(np.int64))
        return apply_stages(res.hot, base)
    return decode_scalar(book, to_rows(res.labels, res.axis), shape, res.axis, res.scale, res.scale_axis)


def halve(res: Clustered, w: np.ndarray, use=None) -> Clustered:
    """``res`` with its codebook and scales on the float16 grid when that costs <= ``MAX_SHARE`` of its error."""
    if w.dtype != np.float32:
        return res
    saved = (res.codebook.nbytes + (0 if res.scale is None else res.scale.nbytes)) // 2
    casts = 1 + (res.scale is not None)
    book, scale = rounded(res.codebook), rounded(res.scale)
    if book is None or (res.scale is not None and scale is None) or saved <= casts * OVERHEAD_CAST:
        return res
    half = dataclasses.replace(res, codebook=book, scale=scale)
    snapped = decode(half, w.shape, use).astype(w.dtype)
    moved = float(np.sum((snapped.astype(np.float64) - res.snapped) ** 2))
    err = float(np.sum((w.astype(np.float64) - res.snapped) ** 2))
    if moved > MAX_SHARE * err:
        return res
    half.snapped = snapped
    half.half = True
    half.bytes_planned = {k: (v if k == "snap" else v - saved + casts * OVERHEAD_CAST)
                          for k, v in res.bytes_planned.items()}
    return half


__all__ = ["MAX_SHARE", "OVERHEAD_CAST", "decode", "halve", "rounded"]
