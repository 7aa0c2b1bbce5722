"""``cluster{pack_only=true}`` (and every cluster run): unpacked decodes packed exactly.

An unpacked decode (``storage=unpacked``, e.g. trained by ``distill{mode=train}``) stores its indices as plain int32
constants. ``Gather(float codebook [k <= 256], constant indices)`` takes index_bits(k)-bit streams instead, and a
product-quantized table ``Gather(codebook [S·k, d], indices [V, S])`` (column s in [s·k, (s+1)·k)) its local indices
i - s·k in log2(k)-bit streams + the offsets, and a weight in vector codes ``Gather(codebook [k <= 256, d], codes)``
its codes in index_bits(k)-bit streams (``storage.DecodeBuilder``): the decoded values are unchanged bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .storage import STREAMS, DecodeBuilder, index_bits
from .vector_codebook import vector_codes


def pack_existing(graph: gs.Graph, builder: DecodeBuilder, min_size: int) -> tuple[int, int]:
    """Pack every unpacked decode of ``graph`` with at least ``min_size`` indices. Returns (decodes packed, bytes
    saved)."""
    packed: dict[int, gs.Tensor] = {}
    saved = 0
    for node in list(graph.nodes):
        if node.op != "Gather" or len(node.inputs) < 2 or int(node.attrs.get("axis", 0)) != 0:
            continue
        book, idx = node.inputs[0], node.inputs[1]
        if not (isinstance(book, gs.Constant) and isinstance(idx, gs.Constant)):
            continue
        b, i = np.asarray(book.values), np.asarray(idx.values)
        k = vector_codes(b, i)  # a product-quantized table's codes per block, else 0
        rows = b.shape[0] if b.ndim in (1, 2) else 0  # scalar codebook [k] or shared vector codebook [k, d]
        if not k and (not 2 <= rows <= 256 or not np.issubdtype(b.dtype, np.floating) or
                      not np.issubdtype(i.dtype, np.integer) or i.size < min_size or i.min() < 0 or
                      i.max() >= rows):
            continue
        if id(idx) not in packed:
            bits, name = index_bits(k or rows), f"pk{len(packed) + 1}"
            packed[id(idx)] = builder.pack_vector_indices(name, i, k) if k else \
                builder.packed_indices(name, i.astype(np.uint16), bits)
            saved += int(i.nbytes) - sum(math.ceil(i.size * w / 8) for w in STREAMS[bits])
        node.inputs[1] = packed[id(idx)]
    return len(packed), saved


__all__ = ["pack_existing"]
