"""Where a clustered weight sits in its consumer: its output-channel axis, its matrix view and its design rows.

A consumer computes y = W x per output position with the weight seen as a matrix M [out, in]:

=================  ==========================  =====================================  ============================
consumer / slot    channel axis (per_channel)  M [out, in]                            design rows x (one per row)
=================  ==========================  =====================================  ============================
Conv W[O,I/g,k..]  0                           W.reshape(O, -1)                       im2col patches (g = 1)
ConvTranspose      1                           none (no refit, no activation weights) -
Gemm B             0 if transB else 1          B if transB else B^T                   A (A^T if transA)
MatMul B [K, N]    last                        B^T                                    A.reshape(-1, K)
Gather data [V,D]  0 (rows)                    none (an embedding table)              -
LSTM/GRU/RNN W, R  1 (gate rows)               W.reshape(-1, in) (no refit)           -
=================  ==========================  =====================================  ============================

``input_channel_of(M)`` maps every column of M to the input channel of the consumer's activation (Conv: column
c·k + j is channel g(o)·I/g + c), so per-input-channel statistics ||x_c||^2 weight every element of M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.analyses.conv_rows import conv_output_spatial, conv_rows

WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (1,), "Gather": (0,),
                "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
RECURRENT = ("LSTM", "GRU", "RNN")


@dataclass
class Use:
    """One consumer slot of a weight tensor."""

    node: gs.Node
    slot: int

    @property
    def op(self) -> str:
        return self.node.op

    def channel_axis(self, ndim: int) -> int:
        if self.op == "ConvTranspose" or self.op in RECURRENT:
            return 1
        if self.op == "Gemm":
            return 0 if self.node.attrs.get("transB", 0) else 1
        if self.op == "MatMul":
            return ndim - 1
        return 0

    @property
    def matrix_is_transposed(self) -> bool:
        """A MatMul / Gemm weight whose matrix view [out, in] is the weight transposed (MatMul; Gemm without
        transB): ``to_matrix`` is ``w.T`` and a decode of the matrix view ends in a Transpose."""
        return self.op == "MatMul" or (self.op == "Gemm" and not self.node.attrs.get("transB", 0))

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        if self.op in RECURRENT:  # [directions, gates x hidden, in] -> one row per gate unit
            return w.reshape(-1, w.shape[-1])
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1)
        if self.op == "Gemm" and not self.matrix_is_transposed:
            return w
        return w.T

    def from_matrix(self, m: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        if self.op == "Conv" or self.op in RECURRENT:
            return m.reshape(w_shape)
        if self.op == "Gemm" and not self.matrix_is_transposed:
            return m
        return m.T

    def input_channel_of(self, w_shape: tuple[int, ...]) -> np.ndarray:
        """[out, in] int array: the input-activation channel every element of the matrix view reads."""
        if self.op == "Conv":
            o, ig = w_shape[0], w_shape[1]
            k = int(np.prod(w_shape[2:]))
            groups = int(self.node.attrs.get("group", 1))
            g_of_o = np.arange(o) // max(o // groups, 1)
            return (g_of_o[:, None] * ig + (np.arange(ig * k) // k)[None, :]).astype(np.int64)
        m_shape = self.to_matrix(np.empty(w_shape, dtype=np.uint8)).shape
        return np.broadcast_to(np.arange(m_shape[1]), m_shape)

    def activation(self) -> gs.Tensor:
        return self.node.inputs[0]

    def channel_rows(self):
        """rows fn: the consumer's input activation -> [rows, channels] (channels-last)."""
        op = self.op
        trans_a = bool(self.node.attrs.get("transA", 0)) if op == "Gemm" else False

        def rows(x: np.ndarray) -> np.ndarray:
            if op == "Conv":
                return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            if trans_a:
                return x.T
            return x.reshape(-1, x.shape[-1])

        return rows

    def design_rows(self, w_shape: tuple[int, ...], per_feed: int, rng: np.random.Generator):
        """rows fn: input activation -> design rows X [R, in] of y = M x (Conv: ``per_feed`` random patches)."""
        if self.op != "Conv":
            base = self.channel_rows()

            def rows(x: np.ndarray) -> np.ndarray:
                r = base(x)
                if r.shape[0] > per_feed:
                    r = r[np.sort(rng.choice(r.shape[0], per_feed, replace=False))]
                return r

            return rows
        node = self.node

        def conv(x: np.ndarray) -> np.ndarray:
            out = conv_output_spatial(node, tuple(w_shape), tuple(x.shape[2:]))
            patches, _ = conv_rows(x, node, tuple(w_shape), out, per_feed, rng)
            return patches.reshape(patches.shape[0], -1)

        return conv

    def refit_reason(self, w_shape: tuple[int, ...]) -> str | None:
        """Why this use cannot take part in a least-squares codebook refit (None: it can)."""
        if self.op in ("ConvTranspose", "Gather") or self.op in RECURRENT:
            return f"{self.op} weight (no design rows)"
        if self.op == "Conv" and int(self.node.attrs.get("group", 1)) != 1:
            return "grouped Conv"
        if self.op == "MatMul" and len(w_shape) != 2:
            return "batched MatMul weight"
        if self.op == "Gemm" and self.node.attrs.get("transA", 0):
            return "Gemm with transA"
        return None
