"""Channel layouts and the index maths on them (see ``channel_groups`` for the model).

A *layout* says which axes of a tensor carry channels and, for every position over those axes, which *element*
(a channel id allocated by a weighted producer) sits there: ``el.shape == [dim(a) for a in axes]``. The maths here
is pure index bookkeeping on such arrays:

- ``expand``: a layout broadcast onto a larger set of axes (size-1 along axes it does not carry).
- ``simplify``: axes along which ``el`` is constant carry no information (a channel repeated over them) and go.
- ``reshape_blocks``: two shapes with the same element count split into runs of consecutive axes with equal products
  (``[B,T,384] -> [B,T,12,32]`` gives ``(0)->(0), (1)->(1), (2)->(2,3)``); a channel axis is carried through its
  run in C order.
- ``connected_components``: union-find over element pairs by hook-and-jump, all in NumPy.
- ``AxisSpec.keep``: along one axis of a multi-axis layout, a position is kept when any element over the other axes
  is kept (the kept positions of a head-split layout form a dense box only when units vary along a single axis;
  the analysis blocks the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ------------------------------------------------------------------------------------------------ data types
@dataclass
class Layout:
    """Channel layout of a tensor: ``el[i, j, ..]`` is the element at position (i, j, ..) of ``axes``."""

    axes: tuple[int, ...]
    el: np.ndarray


@dataclass
class AxisSpec:
    """One axis of something to cut: positions along ``axis`` are kept where any element of ``el`` (over the other
    layout axes, ``pos`` being this axis' index in ``el``) is kept."""

    axis: int
    el: np.ndarray
    pos: int = 0

    def keep(self, keep_el: np.ndarray) -> np.ndarray:
        k = keep_el[self.el]
        if k.ndim == 1:
            return k
        others = tuple(i for i in range(k.ndim) if i != self.pos)
        return k.any(axis=others)


# ------------------------------------------------------------------------------------------------ index maths
def axis_elements(spec: AxisSpec) -> np.ndarray:
    """One representative element array per position along the spec's axis (all positions if multi-axis)."""
    if spec.el.ndim == 1:
        return spec.el
    return np.moveaxis(spec.el, spec.pos, 0).reshape(spec.el.shape[spec.pos], -1)


def position_units(spec: AxisSpec, unit_of: np.ndarray) -> np.ndarray:
    """Sorted unique (position, unit) pairs along a spec's axis: equal for two axes iff their kept counts always
    agree."""
    u = unit_of[spec.el]
    if u.ndim == 1:
        pos = np.arange(u.size)
    else:
        u = np.moveaxis(u, spec.pos, 0)
        pos = np.broadcast_to(np.arange(u.shape[0]).reshape((-1,) + (1,) * (u.ndim - 1)), u.shape)
    return np.unique(np.stack([np.asarray(pos).ravel(), u.ravel()]), axis=1)


def part_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each consecutive part of the given sizes."""
    bounds = np.cumsum([0] + list(sizes))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def clamp_index(v: int, d: int) -> int:
    """A Slice start/end (negative counts from the end) clamped into [0, d]."""
    return max(0, min(d, v + d if v < 0 else v))


def varies_along(arr: np.ndarray, i: int) -> bool:
    """True when ``arr`` is not constant along axis ``i``."""
    return arr.shape[i] > 1 and not np.array_equal(np.broadcast_to(arr.take([0], axis=i), arr.shape), arr)


def expand(el: np.ndarray, axes: tuple[int, ...], target: tuple[int, ...], dims) -> np.ndarray:
    """``el`` over ``axes`` broadcast onto ``target`` (a superset), ``dims[a]`` being the extent of axis a."""
    shape = [el.shape[axes.index(a)] if a in axes else 1 for a in target]
    return np.broadcast_to(el.reshape(shape), [dims[a] for a in target])


def simplify(lay: Layout) -> Layout:
    """Drop layout axes along which the element array is constant (the same channel repeated); keep at least one."""
    el = lay.el
    varies = [varies_along(el, i) for i in range(el.ndim)]
    if not any(varies):
        i = next((i for i in range(el.ndim) if el.shape[i] > 1), 0)
        varies[i] = True
    if all(varies):
        return lay
    idx = tuple(slice(None) if v else 0 for v in varies)
    return Layout(tuple(a for a, v in zip(lay.axes, varies, strict=True) if v), np.ascontiguousarray(el[idx]))


def reshape_blocks(si: list[int], so: list[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """Split two shapes with the same element count into runs of consecutive axes with equal products."""
    blocks = []
    i = j = 0
    while i < len(si) or j < len(so):
        i0, j0 = i, j
        pi = pj = 1
        if i < len(si):
            pi *= si[i]
            i += 1
        if j < len(so):
            pj *= so[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(si):
                pi *= si[i]
                i += 1
            elif pj < pi and j < len(so):
                pj *= so[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 axes into this block
        while i < len(si) and si[i] == 1 and (j >= len(so) or so[j] != 1):
            i += 1
        while j < len(so) and so[j] == 1 and (i >= len(si) or si[i] != 1):
            j += 1
        blocks.append((tuple(range(i0, i)), tuple(range(j0, j))))
    return blocks


# ------------------------------------------------------------------------------------------ union-find (NumPy)
def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (0..k-1, ordered by smallest member) of each of n nodes joined by edges (a[i], b[i]).

    Hook-and-jump: every edge hooks the larger of its two roots under the smaller one, then pointers jump to their
    roots; repeat until every edge joins equal roots. Vectorised, no per-edge Python work.
    """
    parent = np.arange(n, dtype=np.int64)
    if a.size:
        while True:
            ra, rb = parent[a], parent[b]
            diff = ra != rb
            if not diff.any():
                break
            ra, rb = ra[diff], rb[diff]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(parent, hi, lo)
            while True:
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt
    _, labels = np.unique(parent, return_inverse=True)
    return labels.astype(np.int64)
