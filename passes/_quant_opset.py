"""Opset requirements of quantized formats, and upgrading a graph to meet them.

=====================================  ======
format                                 opset
=====================================  ======
QuantizeLinear/DequantizeLinear         10
per-channel (``axis``) Q/DQ             13
blocked Q/DQ (``block_size``), int4     21
=====================================  ======

Several ops changed their signature on the way (Split/Squeeze/Unsqueeze/ReduceSum take axes as an input from 13,
the other Reduce* from 18, Resize and Pad gained inputs, BatchNormalization dropped outputs ...). Rather than
re-implementing every adapter, the model is converted with ``onnx.version_converter`` (which knows them all), checked,
and re-imported; graphs in other domains (com.microsoft ...) keep their versions.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxcompress import io

log = logging.getLogger(__name__)

PER_TENSOR_OPSET = 10
PER_CHANNEL_OPSET = 13
BLOCKED_OPSET = 21


def graph_opset(graph: gs.Graph) -> int:
    return int(graph.opset or 0)


def upgrade(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` converted to default-domain opset ``target`` (raises on failure)."""
    converted = version_converter.convert_version(model, target)
    onnx.checker.check_model(converted)
    return converted


def transplant(dst: gs.Graph, src: gs.Graph) -> None:
    """Make ``dst`` (the graph object the PassManager holds) carry ``src``'s contents."""
    dst.nodes = src.nodes
    dst.inputs = src.inputs
    dst.outputs = src.outputs
    dst.opset = src.opset
    if getattr(src, "import_domains", None) is not None:
        dst.import_domains = src.import_domains


def upgrade_graph(graph: gs.Graph, model: onnx.ModelProto, target: int) -> None:
    """Upgrade the graph in place by converting ``model`` (the graph's export) and re-importing it."""
    converted = upgrade(model, target)
    new = io.to_graph(converted)
    new.opset = target
    transplant(graph, new)
