"""Float weights of a layer as distill reads and writes them: a constant, DequantizeLinear(integer constant), or a
clustered weight decoded from shared values (``cluster``'s scalar decode: ``analyses.shared_values``).

``WeightRef.get`` gives the float weight (quantized: (q - z) * s on the per-tensor or per-axis grid). ``set`` writes a
float64 solution back: a constant takes the weight's own float type; a quantized weight is re-quantized on its
existing grid, q = clip(round(w / s) + z, int range), so the graph keeps its integer kernels; the returned value is
what the graph now computes with. A constant shared with other nodes is copied (``<name>_distilled_<n>``) rather
than changed under them, unless all its readers are refit together (``tied``: tied weights stay tied). Never writes into a Constant's array in place (graphsurgeon copies share them). A
clustered weight (``decode``) is not set as raw values: ``layer_solve`` refits its shared values and scales and
writes them with ``decode.set``, so the indices, the sharing, stay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.shared_values import Decode, SnappedValues, snapped_values, weight_output_axis


@dataclass
class WeightRef:
    """A float weight read by ``node`` at input ``index``: a constant, or DequantizeLinear(integer constant)."""

    node: gs.Node
    index: int
    dq: gs.Node | None = None
    decode: Decode | SnappedValues | None = None

    @staticmethod
    def resolve(node: gs.Node, index: int,
                decodes: Callable[[gs.Tensor], Decode | None] | None = None) -> WeightRef | None:
        """The weight at ``node.inputs[index]``; ``decodes`` reads a clustered weight's decode (None: not one)."""
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        t = node.inputs[index]
        if isinstance(t, gs.Constant):
            snapped = snapped_values(node, index, weight_output_axis(node)) if decodes is not None and index == 1 \
                else None  # storage=snap clustering: its values refit, the sharing kept
            return WeightRef(node, index, decode=snapped)
        if t.inputs and t.inputs[0].op == "DequantizeLinear":
            dq = t.inputs[0]
            if all(isinstance(x, gs.Constant) for x in dq.inputs if x.name) and "block_size" not in dq.attrs:
                return WeightRef(node, index, dq)
        dec = decodes(t) if decodes is not None and len(t.outputs) == 1 else None  # tied weights stay as they are
        return WeightRef(node, index, decode=dec) if dec is not None else None

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
        if self.decode is not None:
            return self.decode.weight()
        if self.dq is None:
            return np.asarray(self.node.inputs[self.index].values).astype(np.float64)
        q, scale, zp, axis = self._qparams()
        return (q.astype(np.float64) - self._bshape(q, zp.astype(np.float64), axis)) * self._bshape(
            q, scale, axis
        )

    def set(self, value: np.ndarray, tied: bool = False) -> np.ndarray:
        """Write ``value`` (float64); returns what the graph now computes with (re-quantized when quantized).
        ``tied``: every reader of the constant is refit together (``tied_solve``): it is written in place (a new
        array), so they all keep reading the one tensor."""
        if self.decode is not None and not isinstance(self.decode, SnappedValues):
            raise TypeError("a clustered weight is refit through its shared values (decode.set)")
        if self.dq is None:
            t = self.node.inputs[self.index]
            new = value.astype(np.asarray(t.values).dtype)
            if not tied and len({id(c) for c in t.outputs}) > 1:
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
        if not tied and len({id(c) for c in qt.outputs}) > 1:
            self.dq.inputs[0] = gs.Constant(f"{qt.name}_distilled_{id(self.dq) % 100000}", new_q)
        else:
            qt.values = new_q
        return (new_q.astype(np.float64) - z) * s
