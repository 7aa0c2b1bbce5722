"""Learned sparsity masks for ``distill{mode=train learn_masks=true}``: which weights are zero is trained too.

With fixed masks (the default) a pruned weight trains as W = P * M, M = (W0 != 0): the pruning's choice of zeros is
final. With learned masks P is a dense shadow (starting from W0, so its pruned entries start at 0) and

    forward:  W = P * M(P)          backward:  dL/dP = dL/dW     (straight-through, all entries)

so a pruned entry whose gradient keeps pushing it one way grows in P and, once it outweighs a kept entry of its
group, swaps in (SR-STE's estimator, Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural networks
from scratch", without its decay term). M(P) keeps the pruning's pattern and count:

- N:M (every group of M consecutive entries along the weight's reduction axis holds <= N non-zeros, read off W0:
  ``nm_pattern``): the N largest |P| of each group;
- unstructured: the k largest |P| of the tensor, k = W0's non-zero count (the tensor's sparsity is kept; the
  per-row balance a ``row`` scope gave may shift).

Since P starts at W0, M(P) = M(W0) at step 0: the OBS / Wanda choice is where training starts, not undone by a
magnitude criterion. M is recomputed from P every ``mask_every`` steps and before each held-out evaluation (a mask
is a function of P, so restoring the best P restores its mask), and written back as P * M(P): the written graph has
exactly the pattern and count it came with.

Only weights of MatMul / Gemm / Conv / ConvTranspose slots with at least ``MIN_SPARSITY`` zeros learn their mask;
other exact zeros (a bias or scale that happens to hold a 0) stay fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: a weight learns its mask only when at least this share of it is zero (a pruned tensor, not a stray 0)
MIN_SPARSITY = 0.2
#: group sizes tried for an N:M pattern, smallest first (a 2:4 tensor is also 4:8, and 2:4 is the finer claim)
GROUP_SIZES = (2, 4, 8, 16)
#: an N:M claim needs the tensor's density within this factor of N/M (a sparse tensor with few non-zeros per group
#: by chance is unstructured, not N:M)
NM_DENSITY_SLACK = 0.95


@dataclass(frozen=True)
class MaskRule:
    """How M(P) is chosen: ``n`` of every ``m`` along ``axis`` (N:M), or the ``keep`` largest of the tensor."""

    keep: int
    n: int = 0
    m: int = 0
    axis: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def describe(self) -> str:
        """The pattern kept: ``N:M`` or ``unstructured``."""
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def reduction_axis(op: str, index: int, attrs: dict, ndim: int) -> int | None:
    """The axis of a weight that its node sums over (the axis N:M groups run along), or None."""
    if op == "MatMul":
        return ndim - 2 if index == 1 and ndim >= 2 else (ndim - 1 if index == 0 else None)
    if op == "Gemm" and index == 1 and ndim == 2:
        return 1 if attrs.get("transB", 0) else 0
    if op == "Conv" and index == 1 and ndim >= 3:
        return 1
    if op == "ConvTranspose" and index == 1 and ndim >= 3:
        return 0
    return None


def nm_pattern(nonzero: np.ndarray, axis: int) -> tuple[int, int] | None:
    """(N, M) when every group of M consecutive entries along ``axis`` holds <= N non-zeros and the tensor's
    density is about N/M (``NM_DENSITY_SLACK``); the smallest such M. None: no N:M pattern."""
    moved = np.moveaxis(nonzero, axis, -1)
    length, density = moved.shape[-1], float(nonzero.mean())
    for m in GROUP_SIZES:
        if length % m:
            continue
        per_group = moved.reshape(*moved.shape[:-1], length // m, m).sum(axis=-1)
        n = int(per_group.max())
        if n < m and density >= NM_DENSITY_SLACK * n / m:
            return n, m
    return None


def rule_for(value: np.ndarray, axis: int | None) -> MaskRule | None:
    """The mask rule of a weight W0, or None when it should keep a fixed mask (too few zeros)."""
    nonzero = value != 0
    if nonzero.size == 0 or 1.0 - float(nonzero.mean()) < MIN_SPARSITY:
        return None
    keep = int(nonzero.sum())
    if axis is not None:
        pattern = nm_pattern(nonzero, axis)
        if pattern is not None:
            return MaskRule(keep=keep, n=pattern[0], m=pattern[1], axis=axis)
    return MaskRule(keep=keep)


def choose_mask(torch: Any, param: Any, rule: MaskRule) -> Any:
    """M(P) as a float tensor of P's shape (1 = kept)."""
    with torch.no_grad():
        mag = param.detach().abs()
        if rule.structured:
            moved = mag.movedim(rule.axis, -1)
            groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // rule.m, rule.m)
            top = groups.topk(rule.n, dim=-1).indices
            mask = torch.zeros_like(groups).scatter_(-1, top, 1.0)
            return mask.reshape(moved.shape).movedim(-1, rule.axis).contiguous()
        flat = mag.reshape(-1)
        if rule.keep >= flat.numel():
            return torch.ones_like(mag)
        mask = torch.zeros_like(flat)
        mask[flat.topk(rule.keep).indices] = 1.0
        return mask.reshape(mag.shape)


def straight_through(param: Any, mask: Any) -> Any:
    """P * M in the forward, identity in the backward (every entry of P gets dL/dW)."""
    return param - (param * (1.0 - mask)).detach()
