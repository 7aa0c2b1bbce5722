"""Design rows of a Conv (im2col): the Conv as a matrix product over sampled output positions.

A Conv with weight W [Cout, Cin, k_1, .., k_d] computes, at output position (n, o_1, .., o_d),

    y[n, :, o] = W.reshape(Cout, -1) @ patch(n, o) (+ b),
    patch(n, o)[c, j_1, .., j_d] = x[n, c, o_1 * s_1 - p_1 + j_1 * dil_1, ..]   (0 outside the input),

with strides s, dilations dil and the leading pads p (``auto_pad`` SAME_UPPER / SAME_LOWER put the odd pad at the
end / the start; VALID pads nothing). ``conv_rows`` returns the patches [R, Cin, k...] of R random output positions
(C order of W[:, c, i, j], so ``patches.reshape(R, -1)`` are the rows X of y = X W^T) and the positions themselves:
the rows of least-squares refits (``distill``) and of layer Hessians X^T X (``prune-channels{importance=obs}``).
Pure geometry: no weights are read, only the weight's shape and the node's attributes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def _auto_pad(node: gs.Node) -> str:
    auto = node.attrs.get("auto_pad", "NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto


def _conv_geometry(node: gs.Node, w_shape: tuple[int, ...], in_spatial: list[int], out_spatial: list[int]):
    """(kernel sizes, strides, dilations, leading pads) per spatial axis."""
    nd = len(w_shape) - 2
    k = list(w_shape[2:])
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    auto = _auto_pad(node)
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


def conv_output_spatial(node: gs.Node, w_shape: tuple[int, ...], in_spatial: tuple[int, ...]) -> list[int]:
    """Output sizes of the Conv's spatial axes for an input of spatial sizes ``in_spatial``:
    floor((n + p_begin + p_end - ((k - 1) * dil + 1)) / s) + 1 (SAME: ceil(n / s); VALID: no pads)."""
    k = list(w_shape)
    strides = list(node.attrs.get("strides", [1] * (len(k) - 2)))
    dil = list(node.attrs.get("dilations", [1] * (len(k) - 2)))
    auto = _auto_pad(node)
    pads = list(node.attrs.get("pads", [0] * (2 * (len(k) - 2))))
    out = []
    for i, n_in in enumerate(in_spatial):
        eff = (k[2 + i] - 1) * dil[i] + 1
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-n_in // strides[i]))
        elif auto == "VALID":
            out.append((n_in - eff) // strides[i] + 1)
        else:
            out.append((n_in + pads[i] + pads[i + len(k) - 2] - eff) // strides[i] + 1)
    return out


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
