"""How a clustered tensor is stored: a codebook and packed indices decoded in the graph, or the values snapped.

**Codebook.** The k (per channel: C·k) float centroids, and the index of every weight packed into a little-endian
bit stream of b = ceil(log2 k) bits per index: index i holds bits [i·b, (i+1)·b) of the stream, byte j holding bits
8j..8j+7 (LSB first). b <= 8, so an index lies within two consecutive bytes:

    o = i·b,  word = byte[o // 8] + 256 · byte[o // 8 + 1],  idx_i = (word // 2^(o mod 8)) mod 2^b

(one padding byte keeps ``o // 8 + 1`` in range; for b in {1, 2, 4, 8} no index crosses a byte and the second byte
is not read). The graph evaluates exactly this with integer ops (Range, Mul, Div, Mod, Gather, Cast — opset 11):
``Gather(codebook, idx) -> Reshape`` feeds the original consumer(s). All inputs are constants, so ORT folds the
decode at session start: the file holds b bits per weight, the session the float tensor (measured in the benchmark).

**Sparse codebook** (a pruned tensor whose zero is a codebook entry): a 1-bit mask m (weight != 0) and the indices
of the non-zero weights only, 1 + (1 - sparsity)·b bits per weight. Decoded as

    p = CumSum(m) - 1,  idx = Where(m, nz_idx[p], zero_index)

(``Gather`` with p = -1 reads the last entry; the mask discards it).

**Per channel** (axis a, C channels, stride s = prod(shape[a+1:])): element i belongs to channel (i // s) mod C and
reads ``codebook[channel · k + idx_i]``.

**Channel scales**: ``Mul`` by s [C] broadcast along the channel axis after the Reshape.

**Snapped**: the tensor keeps its layout and dtype with every value replaced by its centroid; the raw size is
unchanged, only zip (and the int8 of a later ``quantize``) gains.

``plan_bytes`` gives the bytes a storage adds to the file (data + a measured per-decode overhead for the nodes and
their small constants, ``decode_overhead``), so ``storage=auto`` picks the smaller one per tensor.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

#: serialized bytes of a decode subgraph besides its data tensors (nodes, short names, small constants), measured
#: with onnx 1.x protobuf on MatMul weights (tests check the predicted file size against the written one): unpacking
#: a stream whose indices never cross a byte (b in 1, 2, 4), one that does (two Gathers), plain bytes (b = 8); the
#: per-channel offset; the sparse form's mask, CumSum and Where
OVERHEAD_UNPACK = {"aligned": 1320, "crossing": 1720, "bytes": 640}
OVERHEAD_PER_CHANNEL = 470
OVERHEAD_SPARSE = 1900
OVERHEAD_SCALE = 160


def decode_overhead(bits: int, per_channel: bool, sparse: bool) -> int:
    kind = "bytes" if bits == 8 else ("aligned" if 8 % bits == 0 else "crossing")
    return OVERHEAD_UNPACK[kind] + OVERHEAD_PER_CHANNEL * per_channel + OVERHEAD_SPARSE * sparse


def index_bits(k: int) -> int:
    """Bits per index for a codebook of k entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 2))))


def pack_bits(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (each < 2^bits) -> uint8 little-endian bit stream, plus one padding byte."""
    idx = np.asarray(idx).reshape(-1).astype(np.uint16)
    if bits == 8:
        return np.concatenate([idx.astype(np.uint8), np.zeros(1, np.uint8)])
    planes = ((idx[:, None] >> np.arange(bits, dtype=np.uint16)[None, :]) & 1).astype(np.uint8)
    return np.concatenate([np.packbits(planes.reshape(-1), bitorder="little"), np.zeros(1, np.uint8)])


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The NumPy reference of the graph's decode: n indices of ``bits`` bits from the stream ``data``."""
    d = np.asarray(data).astype(np.int32)
    o = np.arange(n, dtype=np.int64) * bits
    word = d[o // 8] + 256 * d[o // 8 + 1]
    return (word >> (o % 8)) & ((1 << bits) - 1)


def plan_bytes(n: int, codebook_rows: int, k: int, nonzero: int | None = None, itemsize: int = 4) -> int:
    """Bytes on disk of the codebook form of an n-element tensor with a [rows, k] codebook (``nonzero``: the
    sparse form with that many non-zero weights)."""
    bits = index_bits(k)
    book = itemsize * codebook_rows * k
    over = decode_overhead(bits, codebook_rows > 1, nonzero is not None)
    if nonzero is None:
        return math.ceil(n * bits / 8) + 1 + book + over
    return (math.ceil(n / 8) + 1) + (math.ceil(nonzero * bits / 8) + 1) + book + over


class DecodeBuilder:
    """Writes decode subgraphs into ``graph``; ``namer(base)`` gives unique tensor/node names."""

    def __init__(self, graph: gs.Graph, namer):
        self.graph = graph
        self.namer = namer

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.namer(base), np.asarray(value))

    def _op(self, op: str, inputs: list, base: str, dtype=None, attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(self.namer(base), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, name=self.namer(f"{base}_{op}"), inputs=inputs, outputs=[out],
                                        attrs=attrs or {}))
        return out

    def _unpack(self, base: str, data: np.ndarray, bits: int, n: int) -> gs.Variable:
        """int32 [n] indices decoded from a packed stream constant."""
        d32 = self._op("Cast", [self._const(f"{base}_packed", data)], f"{base}_bytes", np.int32, {"to": 6})
        pos = self._op("Range", [self._const(f"{base}_zero", np.int32(0)), self._const(f"{base}_n", np.int32(n)),
                                 self._const(f"{base}_one", np.int32(1))], f"{base}_pos", np.int32)
        if bits == 8:
            return self._op("Gather", [d32, pos], f"{base}_idx", np.int32, {"axis": 0})
        o = self._op("Mul", [pos, self._const(f"{base}_bits", np.int32(bits))], f"{base}_bitpos", np.int32)
        byte = self._op("Div", [o, self._const(f"{base}_eight", np.int32(8))], f"{base}_byte", np.int32)
        shift = self._op("Mod", [o, self._const(f"{base}_eight2", np.int32(8))], f"{base}_shift", np.int32)
        word = self._op("Gather", [d32, byte], f"{base}_lo", np.int32, {"axis": 0})
        if 8 % bits:
            nxt = self._op("Add", [byte, self._const(f"{base}_one2", np.int32(1))], f"{base}_byte1", np.int32)
            hi = self._op("Gather", [d32, nxt], f"{base}_hi", np.int32, {"axis": 0})
            hi = self._op("Mul", [hi, self._const(f"{base}_256", np.int32(256))], f"{base}_hi256", np.int32)
            word = self._op("Add", [word, hi], f"{base}_word", np.int32)
        div = self._op("Gather", [self._const(f"{base}_pow2", (1 << np.arange(8)).astype(np.int32)), shift],
                       f"{base}_div", np.int32, {"axis": 0})
        q = self._op("Div", [word, div], f"{base}_shifted", np.int32)
        return self._op("Mod", [q, self._const(f"{base}_mask", np.int32(1 << bits))], f"{base}_idx", np.int32)

    def build(self, base: str, shape: tuple[int, ...], codebook: np.ndarray, labels: np.ndarray, *,
              axis: int | None, sparse_zero: int | None = None, out_name: str | None = None,
              scale: np.ndarray | None = None, scale_axis: int | None = None) -> tuple[gs.Variable, dict]:
        """Decode subgraph for a tensor of ``shape``: ``codebook`` [C, k] (C = 1 unless per channel along
        ``axis``), ``labels`` in the tensor's own layout. ``sparse_zero``: the label of the zero entry (per channel:
        the same label in every row), for the sparse form. ``base`` prefixes the internal names (keep it short:
        every name is stored in the file); ``out_name`` names the decoded tensor. Returns it and what was stored."""
        n = int(np.prod(shape))
        rows, k = codebook.shape
        bits = index_bits(k)
        flat = labels.reshape(-1)
        info = {"bits": bits, "codebook_entries": rows * k}
        if sparse_zero is None:
            data = pack_bits(flat, bits)
            idx = self._unpack(f"{base}_cl", data, bits, n)
            info.update(form="codebook", data_bytes=int(data.nbytes))
        else:
            mask = flat != sparse_zero
            mbytes, nz = pack_bits(mask.astype(np.uint8), 1), pack_bits(flat[mask], bits)
            m = self._unpack(f"{base}_clmask", mbytes, 1, n)
            nz_idx = self._unpack(f"{base}_clnz", nz, bits, int(mask.sum())) if mask.any() else \
                self._const(f"{base}_clnz_empty", np.zeros(1, np.int32))
            p = self._op("CumSum", [m, self._const(f"{base}_axis0", np.int32(0))], f"{base}_clcount", np.int32)
            p = self._op("Sub", [p, self._const(f"{base}_one3", np.int32(1))], f"{base}_clpos", np.int32)
            picked = self._op("Gather", [nz_idx, p], f"{base}_clpicked", np.int32, {"axis": 0})
            keep = self._op("Cast", [m], f"{base}_clkeep", np.bool_, {"to": 9})
            idx = self._op("Where", [keep, picked, self._const(f"{base}_clzero", np.int32(sparse_zero))],
                           f"{base}_clidx", np.int32)
            info.update(form="sparse-codebook", data_bytes=int(mbytes.nbytes + nz.nbytes))
        if rows > 1:
            stride = int(np.prod(shape[axis + 1:]))
            pos = self._op("Range", [self._const(f"{base}_z", np.int32(0)), self._const(f"{base}_N", np.int32(n)),
                                     self._const(f"{base}_1", np.int32(1))], f"{base}_elem", np.int32)
            ch = self._op("Div", [pos, self._const(f"{base}_stride", np.int32(stride))], f"{base}_ch", np.int32)
            if axis > 0:
                ch = self._op("Mod", [ch, self._const(f"{base}_C", np.int32(rows))], f"{base}_chm", np.int32)
            off = self._op("Mul", [ch, self._const(f"{base}_k", np.int32(k))], f"{base}_choff", np.int32)
            idx = self._op("Add", [idx, off], f"{base}_cbidx", np.int32)
        values = self._op("Gather", [self._const(f"{base}_codebook", codebook.reshape(-1)), idx],
                          f"{base}_values", codebook.dtype, {"axis": 0})
        last = scale is None
        out = self._op("Reshape", [values, self._const(f"{base}_shape", np.asarray(shape, np.int64))],
                       (out_name or f"{base}_decoded") if last else f"{base}_shared", codebook.dtype)
        if not last:  # per-output-channel scales: w = s_c * codebook[idx]
            bshape = [1] * len(shape)
            bshape[scale_axis] = -1
            out = self._op("Mul", [out, self._const(f"{base}_scale", scale.reshape(bshape))],
                           out_name or f"{base}_decoded", codebook.dtype)
        out.shape = list(shape)
        info["stored_bytes"] = int(info["data_bytes"] + codebook.nbytes + (0 if scale is None else scale.nbytes))
        return out, info
