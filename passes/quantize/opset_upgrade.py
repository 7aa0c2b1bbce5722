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
and re-imported; graphs in other domains (com.microsoft ...) keep their versions. ``ensure_opset`` is what the modes
call: upgrade only when the graph's opset is below what the format needs, and record the upgrade (or why it failed)
in the pass stats.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxcompress import io, mmap_weights

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

log = logging.getLogger(__name__)

PER_TENSOR_OPSET = 10
#: DynamicQuantizeLinear is opset 11 (MatMulInteger / ConvInteger are 10)
DYNAMIC_OPSET = 11
PER_CHANNEL_OPSET = 13
BLOCKED_OPSET = 21


def graph_opset(graph: gs.Graph) -> int:
    return int(graph.opset or 0)


def upgrade(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` converted to default-domain opset ``target`` (raises on failure)."""
    converted = version_converter.convert_version(model, target)
    # memory-mapped weights (models over 2 GB) are checked on a weightless stand-in: their external references
    # would otherwise resolve against the working directory
    onnx.checker.check_model(mmap_weights.checkable(converted) if mmap_weights.has_mapped(converted) else converted)
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


def ensure_opset(graph: gs.Graph, ctx: PassContext, needed: int, stats: dict) -> bool:
    """Upgrade the default-domain opset to ``needed`` if lower; True on success (stats record it)."""
    have = graph_opset(graph) or ctx.opset()
    if have >= needed:
        return True
    try:
        upgrade_graph(graph, ctx.export(graph), needed)
    except Exception as exc:  # version_converter covers most but not all ops
        log.warning("opset upgrade %d -> %d failed: %s", have, needed, exc)
        stats["opset_upgrade_failed"] = f"{have} -> {needed}: {str(exc).splitlines()[0][:200]}"
        return False
    stats["opset_upgrade"] = f"{have} -> {needed}"
    return True
