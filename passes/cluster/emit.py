"""Writes one clustered tensor into the graph: its values snapped in place, or its decode subgraph (``storage``)
feeding every reader of the original constant (tied weights read the one decoded tensor)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph_utils import redirect_consumers

from .cluster_tensor import Clustered
from .storage import DecodeBuilder


def write_clustered(builder: DecodeBuilder, tensor: gs.Constant, use, res: Clustered, storage: str,
                    base: str) -> None:
    """``res`` (the outcome for ``tensor``, read through ``use``) into the graph; ``storage=unpacked`` keeps the
    trainable form (int32 indices); ``base`` prefixes the decode's names."""
    w = np.asarray(tensor.values)
    if res.storage == "snap":
        tensor.values = np.ascontiguousarray(res.snapped.astype(w.dtype))
        return
    unpacked = storage == "unpacked"
    out_name, half = f"{tensor.name}_clustered", res.half and not unpacked  # trainable: float32 (on the grid)
    if res.matrix:
        out = builder.build_matrix_vector(base, tuple(w.shape), use.matrix_is_transposed, res.codebook, res.labels,
                                          res.scale, inputs_order=res.inputs_order, out_name=out_name,
                                          unpacked=unpacked, half=half)
    elif res.vector is not None:
        out = builder.build_vector(base, tuple(w.shape), res.codebook, res.labels, out_name=out_name,
                                   unpacked=unpacked, hot=res.hot, half=half)
    elif unpacked:
        out = builder.build_unpacked(base, tuple(w.shape), res.codebook, res.labels, out_name=out_name,
                                     scale=res.scale, scale_axis=res.scale_axis, half=half)
    else:
        out, _ = builder.build(base, tuple(w.shape), res.codebook, res.labels, axis=res.axis, out_name=out_name,
                               scale=res.scale, scale_axis=res.scale_axis, half=half,
                               sparse_zero=res.zero_label if res.storage == "sparse-codebook" else None)
    redirect_consumers(tensor, out)


__all__ = ["write_clustered"]
