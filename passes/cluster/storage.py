"""How a clustered tensor is stored: a codebook and packed indices decoded in the graph, or the values snapped.

**Codebook.** The k float values (per channel: a [C, k] table) and b = ceil(log2 k) bits per weight index, split
into streams of byte-aligned widths (``STREAMS``: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1; 1, 2, 4, 8 alone).
A stream of width w holds bits [o, o + w) of every index, p = 8 / w of them per byte, entry t of byte j at bits
t·w .. t·w + w - 1:

    part_i = (byte[i // p] << (8 - w - (i mod p)·w)) >> (8 - w)        (uint8 shifts: the high bits fall off)
    idx_i  = sum_streams part_i · 2^o

The graph computes exactly this in uint8 (Reshape [M, 1], BitShift left by the p shifts, BitShift right, Reshape,
Slice; Mul/Add to combine streams, in int32 before opset 14), then Cast to int32 and ``Gather(codebook, idx) -> Reshape`` feeding the original
consumer(s). Every input is a constant, so ORT folds the decode at session start: the file holds b bits per weight,
the session the float tensor; the uint8 intermediates keep the folding's peak memory near 2x the float tensor
(measured in ``benchmarks/results/cluster.md``).

**Sparse codebook** (a pruned tensor, one codebook): a 1-bit stream mask m (weight != 0) and the indices of the
non-zero weights only, 1 + (1 - sparsity)·b bits per weight, decoded as

    v = [0, codebook[nz_idx]],  pos = CumSum(m) · m,  w = v[pos]

**Per channel** (axis a, C channels): the indices are stored channel-major ([C, n / C], the channel axis moved
first) and decoded by ``GatherElements(codebook [C, k], idx [C, n / C], axis=1)``, then Reshape and Transpose back.

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

STREAMS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}

#: serialized bytes of a decode subgraph besides its data tensors (nodes, short names, small constants), measured
#: with onnx 1.x protobuf on MatMul weights (tests check the predicted file size against the written one): per
#: stream (w < 8), the rest of a dense decode, combining streams, the per-channel GatherElements/Transpose, the
#: sparse form's mask and CumSum
OVERHEAD_STREAM = 420
OVERHEAD_DENSE = 330
OVERHEAD_PER_CHANNEL = 250
OVERHEAD_COMBINE = 225
OVERHEAD_SPARSE = 450
OVERHEAD_SCALE = 160


def index_bits(k: int) -> int:
    """Bits per index for a codebook of k entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 2))))


def decode_overhead(bits: int, per_channel: bool, sparse: bool) -> int:
    widths = STREAMS[bits] + ((1,) if sparse else ())
    return OVERHEAD_DENSE + OVERHEAD_STREAM * sum(w < 8 for w in widths) + \
        OVERHEAD_COMBINE * (len(STREAMS[bits]) - 1) + OVERHEAD_PER_CHANNEL * per_channel + OVERHEAD_SPARSE * sparse


def _pack_stream(part: np.ndarray, w: int) -> np.ndarray:
    if w == 8:
        return part.astype(np.uint8)
    per = 8 // w
    p = np.concatenate([part.astype(np.uint16), np.zeros((-part.size) % per, np.uint16)]).reshape(-1, per)
    return (p << (np.arange(per, dtype=np.uint16) * w)[None, :]).sum(axis=1).astype(np.uint8)


def _unpack_stream(data: np.ndarray, w: int, n: int) -> np.ndarray:
    if w == 8:
        return data[:n]
    per = 8 // w
    left = (data[:, None] << (8 - w - np.arange(per, dtype=np.uint8) * w)[None, :]).astype(np.uint8)
    return (left >> np.uint8(8 - w)).reshape(-1)[:n]


def pack_bits(idx: np.ndarray, bits: int) -> list[np.ndarray]:
    """Indices (each < 2^bits) -> one uint8 array per stream of ``STREAMS[bits]``."""
    idx = np.asarray(idx).reshape(-1).astype(np.uint16)
    out, off = [], 0
    for w in STREAMS[bits]:
        out.append(_pack_stream((idx >> off) & ((1 << w) - 1), w))
        off += w
    return out


def unpack_bits(streams: list[np.ndarray], bits: int, n: int) -> np.ndarray:
    """The NumPy reference of the graph's decode: n indices from the streams."""
    acc, off = np.zeros(n, np.uint16), 0
    for data, w in zip(streams, STREAMS[bits], strict=True):
        acc += _unpack_stream(np.asarray(data, np.uint8), w, n).astype(np.uint16) << off
        off += w
    return acc


def plan_bytes(n: int, codebook_rows: int, k: int, nonzero: int | None = None, itemsize: int = 4) -> int:
    """Bytes on disk of the codebook form of an n-element tensor with a [rows, k] codebook (``nonzero``: the
    sparse form with that many non-zero weights)."""
    bits = index_bits(k)
    book = itemsize * codebook_rows * k
    over = decode_overhead(bits, codebook_rows > 1, nonzero is not None)
    data = sum(math.ceil((n if nonzero is None else nonzero) * w / 8) for w in STREAMS[bits])
    return data + book + over + (0 if nonzero is None else math.ceil(n / 8))


class DecodeBuilder:
    """Writes decode subgraphs into ``graph``; ``namer(base)`` gives unique tensor/node names."""

    def __init__(self, graph: gs.Graph, namer, opset: int = 17):
        self.graph = graph
        self.namer = namer
        self.small_ints = opset >= 14  # Mul/Add take uint8 from opset 14 on

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.namer(base), np.asarray(value))

    def table(self, base: str, value: np.ndarray, half: bool) -> gs.Tensor:
        """A codebook or scale constant; ``half``: stored as float16 and cast back (values on the float16 grid,
        ``half_books``), exact."""
        if not half:
            return self._const(base, value)
        return self._op("Cast", [self._const(f"{base}16", np.asarray(value).astype(np.float16))], base,
                        np.asarray(value).dtype, {"to": 1})

    def _op(self, op: str, inputs: list, base: str, dtype=None, attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(self.namer(base), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, name=self.namer(f"{base}_{op}"), inputs=inputs, outputs=[out],
                                        attrs=attrs or {}))
        return out

    def _stream(self, base: str, data: np.ndarray, w: int, n: int) -> gs.Tensor:
        """uint8 [n]: one stream's parts."""
        c = self._const(f"{base}_p{w}", data)
        if w == 8:
            return c
        per = 8 // w
        col = self._op("Reshape", [c, self._const(f"{base}_col", np.array([-1, 1], np.int64))], f"{base}_c{w}",
                       np.uint8)
        left = self._op("BitShift", [col, self._const(f"{base}_l{w}", (8 - w - np.arange(per) * w).astype(np.uint8))],
                        f"{base}_sl{w}", np.uint8, {"direction": "LEFT"})
        right = self._op("BitShift", [left, self._const(f"{base}_r{w}", np.uint8(8 - w))], f"{base}_sr{w}",
                         np.uint8, {"direction": "RIGHT"})
        flat = self._op("Reshape", [right, self._const(f"{base}_flat", np.array([-1], np.int64))], f"{base}_f{w}",
                        np.uint8)
        if data.size * per == n:
            return flat
        return self._op("Slice", [flat, self._const(f"{base}_s0", np.array([0], np.int64)),
                                  self._const(f"{base}_s1", np.array([n], np.int64))], f"{base}_x{w}", np.uint8)

    def _indices(self, base: str, streams: list[np.ndarray], bits: int, n: int) -> gs.Variable:
        """int32 [n] indices from packed streams (combined in uint8, one Cast; before opset 14 in int32)."""
        acc, off = None, 0
        wide = not self.small_ints and len(streams) > 1
        for data, w in zip(streams, STREAMS[bits], strict=True):
            part = self._stream(base, data, w, n)
            if wide:
                part = self._op("Cast", [part], f"{base}_w{off}", np.int32, {"to": 6})
            if acc is None:
                acc = part
            else:
                f = np.int32(1 << off) if wide else np.uint8(1 << off)
                part = self._op("Mul", [part, self._const(f"{base}_m{off}", f)], f"{base}_o{off}", f.dtype)
                acc = self._op("Add", [acc, part], f"{base}_a{off}", f.dtype)
            off += w
        return acc if wide else self._op("Cast", [acc], f"{base}_idx", np.int32, {"to": 6})

    def packed_indices(self, base: str, idx: np.ndarray, bits: int) -> gs.Variable:
        """int32 indices of ``idx``'s shape decoded from ``bits``-bit packed streams (exactly ``idx``)."""
        flat = self._indices(base, pack_bits(idx, bits), bits, int(idx.size))
        return self._op("Reshape", [flat, self._const(f"{base}_ishape", np.asarray(idx.shape, np.int64))],
                        f"{base}_ix", np.int32)

    def build_unpacked(self, base: str, shape: tuple[int, ...], codebook: np.ndarray, labels: np.ndarray, *,
                       out_name: str | None = None, scale: np.ndarray | None = None,
                       scale_axis: int | None = None, half: bool = False) -> gs.Variable:
        """``Gather(codebook [k], int32 indices) -> Reshape (-> Mul(scale))`` with the indices a plain constant: the
        form ``distill{mode=train}`` trains (the codebook and the scales are its parameters, the indices fixed);
        a later ``cluster`` packs the indices (``packed_indices``)."""
        if codebook.shape[0] != 1:
            raise ValueError("the unpacked form takes one codebook")
        idx = self._const(f"{base}_idx", labels.reshape(-1).astype(np.int32))
        values = self._op("Gather", [self.table(f"{base}_codebook", codebook.reshape(-1), half), idx],
                          f"{base}_values", codebook.dtype, {"axis": 0})
        last = scale is None
        name = (out_name or f"{base}_decoded") if last else f"{base}_shared"
        out = self._op("Reshape", [values, self._const(f"{base}_shape", np.asarray(shape, np.int64))], name,
                       codebook.dtype)
        if not last:
            bshape = [1] * len(shape)
            bshape[scale_axis] = -1
            out = self._op("Mul", [out, self.table(f"{base}_scale", scale.reshape(bshape), half)],
                           out_name or f"{base}_decoded", codebook.dtype)
        out.shape = list(shape)
        return out

    def build_vector(self, base: str, shape: tuple[int, int], codebook: np.ndarray, labels: np.ndarray, *,
                     out_name: str | None = None, unpacked: bool = False, hot=None,
                     half: bool = False) -> gs.Variable:
        """A product-quantized table [V, D]: ``codebook`` [S·k, d] (block s's codes at rows s·k ..), ``labels``
        [V, S] local to each block. ``idx + s·k -> Gather -> Reshape [V, D]``; packed to log2(k) bits, or
        ``unpacked``: int32 global indices as one constant (what distill trains; a later cluster packs them).
        ``hot`` (``hot_rows.HotRows`` stages): ``ScatterND(table, rows, GatherND(table, rows) + residual)`` on top,
        one per stage in order."""
        k = codebook.shape[0] // labels.shape[1]
        glob = labels.astype(np.int32) + (np.arange(labels.shape[1]) * k).astype(np.int32)[None, :]
        idx = self._const(f"{base}_idx", glob) if unpacked else self.pack_vector_indices(base, glob, k)
        vecs = self._op("Gather", [self.table(f"{base}_codebook", codebook, half), idx], f"{base}_vecs",
                        codebook.dtype, {"axis": 0})
        name = out_name or f"{base}_decoded"
        stages = tuple(hot or ())
        out = self._op("Reshape", [vecs, self._const(f"{base}_shape", np.asarray(shape, np.int64))],
                       f"{base}_base" if stages else name, codebook.dtype)
        for i, stage in enumerate(stages):
            sb, tag = (f"{base}h", "") if i == 0 else (f"{base}h{i}", str(i))
            rows = self._const(f"{base}_hrows{tag}", stage.rows.reshape(-1, 1).astype(np.int64))
            hshape = (stage.rows.size, shape[1])
            book = stage.codebook.reshape(1, -1)
            if unpacked:
                res = self.build_unpacked(sb, hshape, book, stage.labels)
            else:
                res, _ = self.build(sb, hshape, book, stage.labels, axis=None)
            cur = self._op("GatherND", [out, rows], f"{base}_hcur{tag}", codebook.dtype)
            new = self._op("Add", [cur, res], f"{base}_hnew{tag}", codebook.dtype)
            last = i == len(stages) - 1
            out = self._op("ScatterND", [out, rows, new], name if last else f"{base}_hout{tag}", codebook.dtype)
        out.shape = list(shape)
        return out

    def build_matrix_vector(self, base: str, w_shape: tuple[int, ...], transposed: bool, codebook: np.ndarray,
                            labels: np.ndarray, scale: np.ndarray, *, inputs_order: np.ndarray | None = None,
                            out_name: str | None = None, unpacked: bool = False, half: bool = False) -> gs.Variable:
        """A weight in vector codes (``matrix_vector``): ``codebook`` [k, d] shared by every group, ``labels``
        [out, in / d], ``scale`` [out]: ``Gather -> Reshape [out, in] (-> Gather(axis 1, inputs_order)) ->
        Mul(scale) (-> Transpose, or Reshape of a Conv kernel)`` into the weight's layout ``w_shape``
        (``transposed``: the matrix view is the weight transposed, MatMul). ``inputs_order`` (act-order codes):
        matrix column j is coded column inputs_order[j], stored as uint16 and cast (folded at session start) or
        int32 when ``unpacked``."""
        k = codebook.shape[0]
        idx = self._const(f"{base}_idx", labels.astype(np.int32)) if unpacked else \
            self.packed_indices(base, labels.astype(np.uint16), index_bits(k))
        vecs = self._op("Gather", [self.table(f"{base}_codebook", codebook, half), idx], f"{base}_vecs",
                        codebook.dtype, {"axis": 0})
        out_n, n_in = labels.shape[0], labels.shape[1] * codebook.shape[1]
        rows = self._op("Reshape", [vecs, self._const(f"{base}_mshape", np.array([out_n, n_in], np.int64))],
                        f"{base}_rows", codebook.dtype)
        if inputs_order is not None:
            if unpacked:
                cols = self._const(f"{base}_cols", inputs_order.astype(np.int32))
            else:
                cols = self._op("Cast", [self._const(f"{base}_cols", inputs_order.astype(np.uint16))],
                                f"{base}_colx", np.int32, {"to": 6})
            rows = self._op("Gather", [rows, cols], f"{base}_ordered", codebook.dtype, {"axis": 1})
        name = out_name or f"{base}_decoded"
        reshaped = len(w_shape) != 2  # a Conv kernel [out, in, kh, kw]: the matrix view is [out, in·kh·kw]
        out = self._op("Mul", [rows, self.table(f"{base}_scale", scale.reshape(-1, 1), half)],
                       f"{base}_scaled" if transposed or reshaped else name, codebook.dtype)
        if transposed:
            out = self._op("Transpose", [out], name, codebook.dtype, {"perm": [1, 0]})
        elif reshaped:
            out = self._op("Reshape", [out, self._const(f"{base}_wshape", np.asarray(w_shape, np.int64))], name,
                           codebook.dtype)
        out.shape = list(w_shape)
        return out

    def pack_vector_indices(self, base: str, idx: np.ndarray, k: int) -> gs.Variable:
        """int32 global indices [V, S] (block s in [s·k, (s+1)·k)) from packed local ones + the offsets."""
        offsets = (np.arange(idx.shape[1]) * k).astype(np.int32)
        local = self.packed_indices(base, (idx - offsets[None, :]).astype(np.uint16), index_bits(k))
        return self._op("Add", [local, self._const(f"{base}_off", offsets)], f"{base}_gidx", np.int32)

    def build(self, base: str, shape: tuple[int, ...], codebook: np.ndarray, labels: np.ndarray, *,
              axis: int | None, sparse_zero: int | None = None, out_name: str | None = None,
              scale: np.ndarray | None = None, scale_axis: int | None = None,
              half: bool = False) -> tuple[gs.Variable, dict]:
        """Decode subgraph for a tensor of ``shape``: ``codebook`` [C, k] (C = 1 unless per channel along
        ``axis``), ``labels`` in the tensor's own layout. ``sparse_zero``: the label of the zero entry (one codebook
        only) for the sparse form. ``base`` prefixes the internal names (keep it short: every name is stored in the
        file); ``out_name`` names the decoded tensor. Returns it and what was stored."""
        n = int(np.prod(shape))
        rows, k = codebook.shape
        bits = index_bits(k)
        info = {"bits": bits, "codebook_entries": rows * k}
        dt = codebook.dtype
        if sparse_zero is not None:
            if rows != 1:
                raise ValueError("the sparse form takes one codebook")
            flat = labels.reshape(-1)
            mask = flat != sparse_zero
            mstream = pack_bits(mask.astype(np.uint8), 1)
            nz = pack_bits(flat[mask], bits)
            zero = self._const(f"{base}_zero", np.zeros(1, dt))
            if mask.any():
                nz_idx = self._indices(f"{base}n", nz, bits, int(mask.sum()))
                vals = self._op("Gather", [self.table(f"{base}_codebook", codebook.reshape(-1), half), nz_idx],
                                f"{base}_nzv", dt, {"axis": 0})
                table = self._op("Concat", [zero, vals], f"{base}_tab", dt, {"axis": 0})
            else:
                table = zero
            m = self._op("Cast", [self._stream(f"{base}m", mstream[0], 1, n)], f"{base}_mask", np.int32, {"to": 6})
            pos = self._op("CumSum", [m, self._const(f"{base}_ax", np.int32(0))], f"{base}_cnt", np.int32)
            pos = self._op("Mul", [pos, m], f"{base}_pos", np.int32)
            values = self._op("Gather", [table, pos], f"{base}_values", dt, {"axis": 0})
            info.update(form="sparse-codebook", data_bytes=int(sum(x.nbytes for x in mstream + nz)))
        elif rows == 1:
            streams = pack_bits(labels, bits)
            idx = self._indices(base, streams, bits, n)
            values = self._op("Gather", [self.table(f"{base}_codebook", codebook.reshape(-1), half), idx],
                              f"{base}_values", dt, {"axis": 0})
            info.update(form="codebook", data_bytes=int(sum(x.nbytes for x in streams)))
        else:  # per channel: channel-major indices, GatherElements on the [C, k] table, transposed back
            moved = np.moveaxis(labels, axis, 0)
            streams = pack_bits(moved, bits)
            idx = self._indices(base, streams, bits, n)
            idx = self._op("Reshape", [idx, self._const(f"{base}_ck", np.array([rows, -1], np.int64))],
                           f"{base}_idx2", np.int32)
            g = self._op("GatherElements", [self.table(f"{base}_codebook", codebook, half), idx], f"{base}_g", dt,
                         {"axis": 1})
            values = self._op("Reshape", [g, self._const(f"{base}_mshape", np.asarray(moved.shape, np.int64))],
                              f"{base}_moved", dt)
            if axis:
                perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, len(shape)))
                values = self._op("Transpose", [values], f"{base}_values", dt, {"perm": perm})
            info.update(form="codebook", data_bytes=int(sum(x.nbytes for x in streams)))
        last = scale is None
        name = (out_name or f"{base}_decoded") if last else f"{base}_shared"
        out = self._op("Reshape", [values, self._const(f"{base}_shape", np.asarray(shape, np.int64))], name, dt)
        if not last:  # per-output-channel scales: w = s_c * codebook[idx]
            bshape = [1] * len(shape)
            bshape[scale_axis] = -1
            out = self._op("Mul", [out, self.table(f"{base}_scale", scale.reshape(bshape), half)],
                           out_name or f"{base}_decoded", dt)
        out.shape = list(shape)
        info["stored_bytes"] = int(info["data_bytes"] + (codebook.nbytes + (0 if scale is None else scale.nbytes)) //
                                   (2 if half else 1))
        return out, info
