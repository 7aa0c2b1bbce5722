"""Computed facts about values: a value's dims (ints, dim symbols or symbolic expressions) and dtype.

``Facts`` maps a value name to its ``Fact``; ``Facts.of(tensor)`` also answers for constants (their dims and dtype
are known exactly). Shared by shape inference (``shape_facts``), the inference models it builds
(``inference_models``) and symbolic values (``symbolic_values``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

#: one element of a symbolic value or a dim: an int, a dim symbol (str), or an expression (op, a, b) of them
Elem = int | str | tuple


@dataclass(frozen=True)
class Fact:
    """Computed facts about one value: dims (None: rank unknown) and dtype (None: unknown)."""

    dims: tuple[Elem, ...] | None
    dtype: np.dtype | None

    @property
    def static(self) -> tuple[int, ...] | None:
        if self.dims is None or not all(isinstance(d, int) for d in self.dims):
            return None
        return self.dims  # type: ignore[return-value]


class Facts(dict):
    """name -> Fact; ``of(tensor)`` also answers for constants."""

    def of(self, t: gs.Tensor) -> Fact | None:
        if isinstance(t, gs.Constant):
            try:
                return Fact(tuple(int(d) for d in t.shape), np.dtype(t.dtype))
            except Exception:
                return None
        return self.get(t.name)
