"""Cheap "this layer float" variants of a quantized model, for ranking candidates of the float-layer search.

Rebuilding the whole QDQ graph for every leave-one-out candidate (copy, placement, Q/DQ insertion, export) costs
~0.3-0.5 s per layer on a 50-layer CNN, more than running it. Ranking only needs an approximation, so a candidate
is made by rewiring the already exported all-int8 ``ModelProto`` in place, then undoing it:

* the layer reads its original float input (``x`` instead of ``DQ(Q(x))``) when the QDQ model still computes it;
* its weight and bias inputs point at the original float values (added as initializers; the bias without
  bias correction, like a float layer of a real build);
* consumers of its output's ``DQ(Q(y))`` that are not integer layers (activations, pooling, Add, ...) read ``y``:
  with the layer float, nothing forces its output through int8 (what makes a wide-range depthwise output costly).

Everything else is left as it is: an integer region grown through Add/Concat around the layer keeps its Q/DQ, and
Q/DQ nodes left without consumers still run (a per-channel weight DQ: negligible). So the patched gain is a slight underestimate of the real one; the search
re-scores its best few candidates with real builds before it decides (``float_layer_search``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

#: consumers that keep reading the dequantized output of a float layer (their integer kernel needs it)
INTEGER_LAYERS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})


class FloatPatcher:
    """Patches ``model`` (an exported QDQ model; modified only inside ``float_layer``) using the float weights of
    ``base`` (the float graph the QDQ model was built from; its anchors have the same node names)."""

    def __init__(self, model: onnx.ModelProto, base: gs.Graph):
        self.model = model
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.base_nodes = {n.name: n for n in base.nodes if n.name}
        self.graph_inputs = {i.name for i in model.graph.input}

    def _float_input(self, original: str, current: str) -> str | None:
        """The layer's float input: its original tensor when the QDQ model still computes it, else ``x`` when the
        current input is ``DQ(Q(x))`` with the DQ standing for ``x`` itself (not for an op the placement absorbed
        into the scale, e.g. the ``/6`` of a HardSwish: ``x`` would then be off by that factor)."""
        if original in self.producer or original in self.graph_inputs:
            return original
        dq = self.producer.get(current)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or current != f"{q.input[0]}_dequantized":
            return None
        return q.input[0]

    def can_patch(self, layer: str) -> bool:
        return layer in self.nodes and layer in self.base_nodes

    @contextmanager
    def float_layer(self, layer: str) -> Iterator[onnx.ModelProto]:
        """The model with ``layer`` computed in float (yielded; restored on exit)."""
        node, bnode = self.nodes[layer], self.base_nodes[layer]
        saved = list(node.input)
        rewired: list[tuple[onnx.NodeProto, list[str]]] = []
        added = 0
        try:
            for y in node.output:  # ops behind the layer that are not integer layers read its float output
                for q in self.consumers.get(y, []):
                    if q.op_type != "QuantizeLinear":
                        continue
                    for dq in self.consumers.get(q.output[0], []):
                        if dq.op_type != "DequantizeLinear":
                            continue
                        for c in self.consumers.get(dq.output[0], []):
                            if c.op_type in INTEGER_LAYERS:
                                continue
                            rewired.append((c, list(c.input)))
                            for i, name in enumerate(c.input):
                                if name == dq.output[0]:
                                    c.input[i] = y
            x = self._float_input(bnode.inputs[0].name, node.input[0]) if node.input else None
            if x is not None:
                node.input[0] = x
            for slot in range(1, min(len(node.input), len(bnode.inputs))):
                t = bnode.inputs[slot]
                if not isinstance(t, gs.Constant) or not self.producer.get(node.input[slot]):
                    continue  # already a float initializer (or an activation)
                if self.producer[node.input[slot]].op_type != "DequantizeLinear":
                    continue
                init = numpy_helper.from_array(np.asarray(t.values), f"{layer}__float_input_{slot}")
                self.model.graph.initializer.append(init)
                added += 1
                node.input[slot] = init.name
            yield self.model
        finally:
            for c, inputs in reversed(rewired):
                del c.input[:]
                c.input.extend(inputs)
            del node.input[:]
            node.input.extend(saved)
            for _ in range(added):
                self.model.graph.initializer.pop()


__all__ = ["FloatPatcher"]
