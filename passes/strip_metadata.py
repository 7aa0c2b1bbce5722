"""``strip-metadata``: remove documentation and metadata that do not take part in inference (exact).

What goes, and where it lives:

- ``doc_strings``: the doc_string of the main graph and of every subgraph (If/Loop/Scan bodies), held by the
  graphsurgeon graph, and the model's own doc_string. Node and value (input/output/value_info) doc_strings never
  reach a pass: graphsurgeon's IR has no field for them, so every model onnxcompress writes is without them anyway.
- ``metadata_props`` (author, license, exporter notes ...) unless ``keep_metadata``; with ``producer`` also the
  producer name and version. These are fields of the ModelProto, not of the graph: ``io.to_model`` copies them from
  ``ctx.model_template`` (the manager's working copy of the model) onto every export, so they are cleared there.

Nothing that a runtime reads changes: outputs are bit-identical, and so are the channels (``channel_groups``) and the
activations (``activation_statistics``) of every tensor. Counters: ``doc_strings_removed``,
``metadata_props_removed``, ``producer_fields_cleared``; nothing to remove -> ``modified`` False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from onnxcompress.context import PassContext
from onnxcompress.graph_utils import all_graphs
from onnxcompress.pass_base import Pass, PassResult, option, register


@register
@dataclass(frozen=True)
class StripMetadata(Pass):
    """Remove doc strings, metadata_props and (optionally) the producer name/version; the graph is untouched."""

    name: ClassVar[str] = "strip-metadata"
    description: ClassVar[str] = "remove doc strings, metadata_props and optionally the producer fields (exact)"
    exact: ClassVar[bool] = True
    #: what the pass needs besides the graph: nothing (no calibration data)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: analyses still valid after the pass: metadata changes no value, no shape and no channel
    preserves: ClassVar[frozenset[str]] = frozenset({"channel_groups", "activation_statistics"})

    doc_strings: bool = option(True, "remove the doc strings of the model and of its graphs")
    keep_metadata: bool = option(False, "keep the model's metadata_props (key/value pairs)")
    producer: bool = option(False, "also clear the model's producer_name and producer_version")

    def __post_init__(self) -> None:
        for flag in ("doc_strings", "keep_metadata", "producer"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"strip-metadata: {flag} must be true or false, got {getattr(self, flag)!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        model = ctx.model_template  # None when a pass runs outside a PassManager: no model-level fields then
        stats = {"doc_strings_removed": 0, "metadata_props_removed": 0, "producer_fields_cleared": 0}
        if self.doc_strings:
            for g in all_graphs(graph):
                if g.doc_string:
                    g.doc_string = ""
                    stats["doc_strings_removed"] += 1
            if model is not None and model.doc_string:
                model.doc_string = ""
                stats["doc_strings_removed"] += 1
        if model is not None and not self.keep_metadata and len(model.metadata_props):
            stats["metadata_props_removed"] = len(model.metadata_props)
            del model.metadata_props[:]
        if model is not None and self.producer:
            for field in ("producer_name", "producer_version"):
                if getattr(model, field):
                    setattr(model, field, "")
                    stats["producer_fields_cleared"] += 1
        return PassResult(modified=any(stats.values()), stats=stats)
