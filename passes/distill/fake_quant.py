"""Fake quantization for ``distill{mode=train}`` on a QDQ graph (the output of ``quantize``): quantization-aware
distillation with a straight-through estimator, the graph's nodes unchanged.

Ops (``quantize_linear`` / ``dequantize_linear``, in the interpreter's op table), ONNX semantics on float tensors:

    Q(x; s, z)  = clip(round_ste(x / s) + z, q_min, q_max)        (an integer-valued float tensor)
    DQ(q; s, z) = (q - z) * s

with ``round_ste(u) = u + stopgrad(round(u) - u)``: the forward rounds (half to even, as ONNX), the backward passes
the gradient straight through; ``clip`` passes none for values outside the integer range. ``s`` and ``z`` are
per tensor or per channel on ``axis``; the range comes from the zero point's type (uint8, int8, int16, uint16,
int32), uint8 without one. Through DQ(Q(x)) the gradient of the step ``s`` is LSQ's (Esser et al. 2020):
round(x/s) - x/s inside the range, q_max - z (or q_min - z) outside.

Trainable values (``attach``), keyed by the name of the ONNX constant they are written back to:

- a quantized weight ``DQ(W_q, s_w, z_w)`` read by a weighted slot (the interpreter's ``WEIGHT_SLOTS``): a float
  shadow W initialised to (W_q - z_w) * s_w; the graph reads W_q = clip(round_ste(W / s_w) + z_w), so at the start
  the forward is the quantized model's, bit for bit. Written back as the re-rounded integers, same s_w and z_w;
- an int32 bias ``DQ(b_q, s_b, 0)``: a float shadow b, b_q = round_ste(b / s_b); written back as b_q;
- with ``learn_scales``, each scalar activation scale ``s`` of a Q -> DQ pair (LSQ): one parameter per DQ scale
  constant; a Q whose scale is a different constant (a tensor derived through absorbed scalars, ``s_q = s / c``)
  keeps its ratio to it: s_q = s * (s_q0 / s0), so Q and DQ stay consistent. The bias scale of a layer whose input
  scale is learned follows it, s_b = s_x * s_w (what ORT's integer kernels assume), and the int32 bias is
  re-quantized on it. Scales are kept >= 1e-3 of their start.

The written graph is a plain QDQ graph with the same nodes and types (same latency); only integer initializers and,
with ``learn_scales``, scale initializers change. Zero points stay fixed; weight scales stay fixed. Exact zeros of
a quantized weight are not held at zero (a rounded-to-zero weight and a pruned one look alike). A quantized
constant shared by several DQ nodes, blocked (``block_size``) or 4-bit weights stay constants.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: integer ranges of the quantized types (int32: symmetric, as biases are stored)
RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
          np.dtype(np.int16): (-32768, 32767), np.dtype(np.int32): (-(2**31 - 1), 2**31 - 1)}
#: ONNX element types of QuantizeLinear's ``output_dtype`` attribute -> numpy
ONNX_INT = {2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32}
#: a learned scale never falls below this fraction of its start
SCALE_FLOOR = 1e-3


def round_ste(torch: Any, x: Any) -> Any:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _broadcast(v: Any, ndim: int, axis: int) -> Any:
    """A per-channel scale / zero point shaped to broadcast along ``axis`` of an ``ndim``-D tensor."""
    if v.dim() == 0 or v.numel() == 1 or ndim == 0:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = v.numel()
    return v.reshape(shape)


def torch_range(torch: Any, zero: Any, attrs: dict) -> tuple[int, int]:
    """(q_min, q_max) of a Q/DQ from its zero point's dtype (or ``output_dtype``; uint8 without either)."""
    if zero is not None:
        np_type = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32}.get(
            zero.dtype)
        if np_type is None and str(zero.dtype) == "torch.uint16":
            np_type = np.uint16
        if np_type is None:
            raise NotImplementedError(f"QuantizeLinear to {zero.dtype}")
        return RANGES[np.dtype(np_type)]
    out = int(attrs.get("output_dtype", 0) or 0)
    if out and out not in ONNX_INT:
        raise NotImplementedError(f"QuantizeLinear output_dtype {out}")
    return RANGES[np.dtype(ONNX_INT.get(out, np.uint8))]


def quantize_linear(torch: Any, inputs: list, attrs: dict) -> list:
    if attrs.get("block_size"):
        raise NotImplementedError("blocked QuantizeLinear")
    x, s = inputs[0], inputs[1].float()
    z = inputs[2] if len(inputs) > 2 else None
    lo, hi = torch_range(torch, z, attrs)
    axis = int(attrs.get("axis", 1))
    s = _broadcast(s, x.dim(), axis)
    zf = _broadcast(z.float(), x.dim(), axis) if z is not None else 0.0
    return [torch.clamp(round_ste(torch, x / s) + zf, lo, hi)]


def dequantize_linear(torch: Any, inputs: list, attrs: dict) -> list:
    if attrs.get("block_size"):
        raise NotImplementedError("blocked DequantizeLinear")
    q, s = inputs[0], inputs[1].float()
    z = inputs[2] if len(inputs) > 2 else None
    axis = int(attrs.get("axis", 1))
    qf = q.float()
    if z is not None:
        qf = qf - _broadcast(z.float(), q.dim(), axis)
    return [qf * _broadcast(s, q.dim(), axis)]


# ------------------------------------------------------------------------------------------------ trainable values
@dataclass
class QuantWeight:
    """A quantized weight or int32 bias: a float shadow ``param``; ``value`` = clip(round_ste(param / s) + z), the
    integers the DQ node reads (as float); ``numpy`` = those integers in the constant's type."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    param: Any
    scale: Callable[[], Any]
    zero: Any
    lo: int
    hi: int
    torch: Any = None
    mask: Any = None
    index: Any = None

    def value(self) -> Any:
        return self.torch.clamp(round_ste(self.torch, self.param / self.scale()) + self.zero, self.lo, self.hi)

    def numpy(self) -> np.ndarray:
        with self.torch.no_grad():
            v = self.value().detach().cpu().numpy().astype(np.float64)
        return np.clip(np.rint(v), self.lo, self.hi).astype(self.dtype).reshape(self.shape)


@dataclass
class ScaleValue:
    """A learned scale (``param``) or one tied to others (``fn``); ``numpy`` gives the float32 constant."""

    name: str
    shape: tuple[int, ...]
    fn: Callable[[], Any]
    param: Any = None
    dtype: np.dtype = np.dtype(np.float32)
    mask: Any = None
    index: Any = None

    def value(self) -> Any:
        return self.fn()

    def numpy(self) -> np.ndarray:
        return self.fn().detach().cpu().numpy().astype(np.float32).reshape(self.shape)


def _const_name(t: Any) -> str | None:
    import onnx_graphsurgeon as gs

    return t.name if isinstance(t, gs.Constant) and t.name else None


def _dq_of(t: Any) -> Any:
    return t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear" else None


def _scale_axis(node: Any, ndim: int) -> int:
    return int(node.attrs.get("axis", 1)) % max(ndim, 1)


def attach(tg: Any, is_slot: Callable[[Any, int], bool], learn_scales: bool) -> dict:
    """Make ``tg``'s quantized weights, int32 biases and (``learn_scales``) activation scales trainable; they join
    ``tg.weights`` (and leave ``tg.consts``). Returns counts for the stats."""
    torch = tg.torch
    uses: dict[str, list] = defaultdict(list)  # constant name -> [(node, input index)]
    for node in tg.nodes:
        for i, t in enumerate(node.inputs):
            if _const_name(t):
                uses[t.name].append((node, i))
    stats = {"weights": 0, "biases": 0, "scales_learned": 0, "scales_tied": 0, "skipped": {}}
    skipped: dict[str, int] = defaultdict(int)

    def const_np(name: str) -> np.ndarray:
        return np.asarray(tg.consts[name].numpy())

    # --- learned activation scales: one parameter per DQ scale of a Q -> DQ pair
    bases: dict[str, ScaleValue] = {}
    if learn_scales:
        tied: dict[str, tuple[str, float]] = {}
        bad: set[str] = set()
        for dq in (n for n in tg.nodes if n.op == "DequantizeLinear"):
            src = dq.inputs[0]
            q = src.inputs[0] if len(src.inputs) == 1 else None
            if q is None or q.op != "QuantizeLinear" or len(dq.inputs) < 2 or len(q.inputs) < 2:
                continue
            s_dq, s_q = _const_name(dq.inputs[1]), _const_name(q.inputs[1])
            if not s_dq or not s_q or s_dq not in tg.consts or s_q not in tg.consts:
                continue
            v_dq, v_q = const_np(s_dq), const_np(s_q)
            if v_dq.size != 1 or v_q.size != 1 or not np.issubdtype(v_dq.dtype, np.floating):
                continue
            bases.setdefault(s_dq, None)
            if s_q != s_dq:
                ratio = float(v_q.reshape(())) / float(v_dq.reshape(()))
                if s_q in tied and tied[s_q][0] != s_dq:
                    bad.update({s_q, s_dq, tied[s_q][0]})
                tied[s_q] = (s_dq, ratio)
        # a scale read by anything but an activation Q/DQ (or tied to two bases, or both base and tied) stays fixed
        for name in list(bases) + list(tied):
            if any(n.op not in ("QuantizeLinear", "DequantizeLinear") or i != 1 for n, i in uses[name]):
                bad.add(name)
        bad |= set(bases) & set(tied)
        bad |= {q for q, (b, _) in tied.items() if b in bad}
        for name in [b for b in bases if b not in bad]:
            v0 = const_np(name).astype(np.float32)
            p = torch.nn.Parameter(torch.from_numpy(v0.reshape(()).copy()))
            floor = float(v0.reshape(())) * SCALE_FLOOR
            bases[name] = ScaleValue(name, v0.shape, (lambda p=p, floor=floor: torch.clamp(p, min=floor)), p)
        bases = {k: v for k, v in bases.items() if v is not None}
        for name, (base, ratio) in tied.items():
            if name in bad or base not in bases:
                continue
            r = torch.tensor(ratio, dtype=torch.float32)
            bases[name] = ScaleValue(name, const_np(name).shape, (lambda b=bases[base], r=r: b.value() * r))
            stats["scales_tied"] += 1
        stats["scales_learned"] = sum(v.param is not None for v in bases.values())

    # --- quantized weights and int32 biases behind a DQ read by weighted slots
    new: dict[str, Any] = {}
    for dq in (n for n in tg.nodes if n.op == "DequantizeLinear"):
        wq = _const_name(dq.inputs[0])
        if not wq or wq not in tg.consts or not dq.outputs:
            continue
        q = const_np(wq)
        if q.dtype not in RANGES or q.size <= 1:
            skipped[f"{q.dtype} constant" if q.dtype not in RANGES else "scalar"] += 1
            continue
        if len(uses[wq]) != 1 or "block_size" in dq.attrs:
            skipped["shared or blocked"] += 1
            continue
        readers = [(c, i) for c in dq.outputs[0].outputs for i, t in enumerate(c.inputs) if t is dq.outputs[0]]
        if not readers or not all(is_slot(c, i) for c, i in readers) or dq.outputs[0].name in tg.outputs:
            continue
        s_name = _const_name(dq.inputs[1])
        z_name = _const_name(dq.inputs[2]) if len(dq.inputs) > 2 else None
        if not s_name or s_name not in tg.consts and s_name not in bases:
            continue
        axis = _scale_axis(dq, q.ndim)
        z0 = const_np(z_name) if z_name else np.zeros((), q.dtype)
        if z0.dtype != q.dtype:
            continue
        s0 = const_np(s_name).astype(np.float32)
        if q.dtype == np.int32:
            scale_fn = _bias_scale(tg, dq, readers, s_name, s0, bases, new, stats)
            stats["biases"] += 1
        else:
            s_t = _broadcast(torch.from_numpy(s0.copy()), q.ndim, axis)
            scale_fn = lambda s_t=s_t: s_t  # noqa: E731
            stats["weights"] += 1
        zf = _broadcast(torch.from_numpy(z0.astype(np.float32)), q.ndim, axis)
        lo, hi = RANGES[q.dtype]
        if lo < 0 and not z0.any() and q.min() > lo:
            lo = -hi  # symmetric signed integers (``quantize``'s weights: [-127, 127]) stay symmetric
        with torch.no_grad():
            start = (torch.from_numpy(q.astype(np.float32)) - zf) * scale_fn()
        new[wq] = QuantWeight(wq, q.dtype, q.shape, torch.nn.Parameter(start.detach().clone()), scale_fn, zf, lo, hi,
                              torch)
    for name, v in list(bases.items()) + list(new.items()):
        tg.consts.pop(name, None)
        tg.weights[name] = v
    stats["skipped"] = dict(skipped)
    return stats


def _bias_scale(tg: Any, dq: Any, readers: list, s_name: str, s0: np.ndarray, bases: dict, new: dict,
                stats: dict) -> Callable[[], Any]:
    """The scale an int32 bias is read with: its constant, or s_x * s_w when the layer's input scale s_x is learned
    (the bias scale constant then becomes a tied ``ScaleValue``)."""
    torch = tg.torch
    fixed = torch.from_numpy(s0.copy())
    ndim = len(np.shape(tg.consts[dq.inputs[0].name].numpy()))
    axis = _scale_axis(dq, ndim)
    layer = _bias_layer(readers)
    if layer is not None and bases:
        x_dq, w_dq = _dq_of(layer.inputs[0]), _dq_of(layer.inputs[1])
        sx = _const_name(x_dq.inputs[1]) if x_dq is not None and len(x_dq.inputs) > 1 else None
        sw = _const_name(w_dq.inputs[1]) if w_dq is not None and len(w_dq.inputs) > 1 else None
        if sx in bases and bases[sx].param is not None and sw and sw in tg.consts and s_name not in bases:
            s_w = torch.from_numpy(np.asarray(tg.consts[sw].numpy(), np.float32).copy())
            if s_w.numel() in (1, s0.size):
                s_w = s_w.reshape(()) if s0.size == 1 else s_w.reshape(s0.shape)
                tied = ScaleValue(s_name, s0.shape, (lambda b=bases[sx], s_w=s_w: (b.value() * s_w)))
                new[s_name] = tied
                stats["scales_tied"] += 1
                return lambda tied=tied: _broadcast(tied.value(), ndim, axis)
    return lambda: _broadcast(fixed, ndim, axis)


def _bias_layer(readers: list) -> Any:
    """The layer whose bias a DQ output is: Conv/ConvTranspose/Gemm input 2, or the MatMul/Gemm/Conv that feeds
    the other input of an Add."""
    node, index = readers[0]
    if len(readers) != 1:
        return None
    if node.op in ("Conv", "ConvTranspose", "Gemm") and index == 2:
        return node
    if node.op == "Add" and len(node.inputs) == 2:
        other = node.inputs[1 - index]
        if len(other.inputs) == 1 and other.inputs[0].op in ("MatMul", "Gemm", "Conv"):
            return other.inputs[0]
    return None
