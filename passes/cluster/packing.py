"""``cluster{pack_only=true}`` (and every cluster run): unpacked decodes packed exactly.

An unpacked decode (``storage=unpacked``, e.g. trained by ``distill{mode=train}``) stores its indices as plain int32
constants. ``Gather(float codebook [k <= 256], constant indices)`` takes index_bits(k)-bit streams instead, and a
product-quantized table ``Gather(codebook [S·k, d], indices [V, S])`` (column s in [s·k, (s+1)·k)) its local indices
i - s·k in log2(k)-bit streams + the offsets, and a weight in vector codes ``Gather(codebook [k <= 256, d], codes)``
its codes in index_bits(k)-bit streams (``storage.DecodeBuilder``): the decoded values are unchanged bit for bit.

With ``half`` (``half_codebooks``) the codebook and the channel scales (the constant of the ``Mul`` after the
decode's Reshape, through an act-order Gather) are stored as float16 and cast back (``half_books.rounded``; values
outside float16's normal range, and tables too small to pay for the Cast, stay float32): a training run moved them
off the float16 grid the cluster pass planned, so they are rounded here once, by at most 2^-11 of each value.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .half_books import OVERHEAD_CAST, rounded
from .storage import STREAMS, DecodeBuilder, index_bits
from .vector_codebook import vector_codes


def _scale_mul(gather: gs.Node) -> tuple[gs.Node, int] | None:
    """The channel-scale Mul of a decode and the slot of its constant (read by that Mul alone):
    Gather -> Reshape (-> Gather axis 1) -> Mul(constant)."""
    nxt = [n for n in gather.outputs[0].outputs if n.op == "Reshape"]
    while len(nxt) == 1:
        node = nxt[0]
        if node.op == "Mul":
            slot = next((i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)), None)
            return None if slot is None or len(node.inputs[slot].outputs) != 1 else (node, slot)
        nxt = [n for n in node.outputs[0].outputs if n.op in ("Mul", "Gather")]
    return None


def _halve_constant(builder: DecodeBuilder, node: gs.Node, slot: int, name: str) -> int:
    """Input ``slot`` of ``node`` (a float32 constant) as float16 + Cast; returns the bytes saved (0: kept)."""
    t = node.inputs[slot]
    values = np.asarray(t.values)
    half = rounded(values) if values.dtype == np.float32 and values.nbytes // 2 > OVERHEAD_CAST else None
    if half is None:  # not float32, outside float16's range, or too small to pay for its Cast
        return 0
    node.inputs[slot] = builder.table(name, half, True)
    return values.nbytes // 2


def pack_existing(graph: gs.Graph, builder: DecodeBuilder, min_size: int, half: bool = False) -> tuple[int, int]:
    """Pack every unpacked decode of ``graph`` with at least ``min_size`` indices (``half``: its codebook and
    scales as float16). Returns (decodes packed, bytes saved)."""
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
            if half:
                saved += _halve_constant(builder, node, 0, f"{name}_codebook")
                scale = _scale_mul(node)
                if scale is not None:
                    saved += _halve_constant(builder, *scale, f"{name}_scale")
        node.inputs[1] = packed[id(idx)]
    return len(packed), saved


__all__ = ["pack_existing"]
