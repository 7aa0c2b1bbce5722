"""Streaming normal equations of a least-squares fit Y ≈ X W: only X^T X, X^T Y and ||Y||^2 are kept.

Rows arrive feed by feed (``update``); the sums add, so memory is one feed's rows plus the K x K and K x N sums,
whatever the number of feeds. Depthwise layers keep one small system per channel (``per_channel``: X [C, R, k],
Y [C, R]; X^T X [C, k, k]). ``merged`` adds two row sets' statistics (the fit and the held-out feeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
