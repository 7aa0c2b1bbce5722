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
  re-quantized on it. Scales bit-equal at the start on the two sides of one float node (DQ -> MaxPool/Pad/Reshape
  ... -> Q: ``quantize`` shared them so that ORT runs the op on integers, which it does only while they are equal)
  train as one; a scale whose Q reads a Clip's output stays small enough that the integer range fits inside the
  Clip (ORT folds the Clip into the integer kernel only then: measured, EfficientNet-Lite2's ReLU6 Convs fell back
  to float, latency 0.47x -> 0.71x, when LSQ let those scales grow). Scales are kept >= 1e-3 of their start.

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
    #: no learned sparsity mask (``torch_interpreter.Weight.rule``: the trainer asks every trainable value)
    rule: Any = None

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
    rule: Any = None  # as ``QuantWeight.rule``

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

    bases = activation_scales(tg, uses, const_np, stats) if learn_scales else {}

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


class _Groups:
    """Union-find over scale names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _clip_limit(q: Any, z: float, lo_q: int, hi_q: int, const: Callable[[Any], np.ndarray | None]) -> float:
    """The largest scale of ``q`` whose integer range stays inside the Clip that produces its input (ORT drops
    that Clip into the integer kernel only then); inf when the input is not clipped."""
    src = q.inputs[0]
    node = src.inputs[0] if len(src.inputs) == 1 else None
    if node is None or node.op != "Clip":
        return float("inf")
    lo = const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("min")
    hi = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else node.attrs.get("max")
    limit = float("inf")
    if hi is not None and hi_q > z:
        limit = min(limit, float(np.asarray(hi).reshape(())) * (1 - 1e-6) / (hi_q - z))
    if lo is not None and lo_q < z and float(np.asarray(lo).reshape(())) < 0:
        limit = min(limit, float(np.asarray(lo).reshape(())) * (1 - 1e-6) / (lo_q - z))
    return limit


def activation_scales(tg: Any, uses: dict, const_np: Callable[[str], np.ndarray], stats: dict) -> dict[str, Any]:
    """Learned activation scales (module docstring): name -> ``ScaleValue`` for every scale constant that trains or
    follows one that does. One parameter per group of DQ scales that must stay equal: the DQ of a Q -> DQ pair, and
    scales bit-equal at the start (with equal zero points) on the two sides of one float node (DQ -> op -> Q: the
    quantize pass shared them so that ORT runs the op on integers, which it does only while they are equal). A
    group's scale is kept within the Clip that feeds one of its Q nodes (ORT folds that Clip only then)."""
    torch = tg.torch
    pairs = []  # (Q node, DQ node, Q scale, DQ scale, zero point value, (q_min, q_max))
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
        z_name = _const_name(dq.inputs[2]) if len(dq.inputs) > 2 else None
        z = const_np(z_name) if z_name and z_name in tg.consts else np.zeros((), np.uint8)
        if z.size != 1 or z.dtype not in RANGES:
            continue
        pairs.append((q, dq, s_q, s_dq, float(z.reshape(())), RANGES[z.dtype]))
    bases = {p[3] for p in pairs}
    tied: dict[str, tuple[str, float]] = {}
    bad: set[str] = set()
    for _, _, s_q, s_dq, _, _ in pairs:
        if s_q != s_dq:
            ratio = float(const_np(s_q).reshape(())) / float(const_np(s_dq).reshape(()))
            if s_q in tied and tied[s_q][0] != s_dq:
                bad.update({s_q, s_dq, tied[s_q][0]})
            tied[s_q] = (s_dq, ratio)
    # a scale read by anything but an activation Q/DQ (or tied to two bases, or both base and tied) stays fixed
    for name in bases | set(tied):
        if any(n.op not in ("QuantizeLinear", "DequantizeLinear") or i != 1 for n, i in uses[name]):
            bad.add(name)
    bad |= bases & set(tied)
    # groups: bit-equal scales (and zero points) across one float node, DQ -> op -> Q
    groups = _Groups()
    by_dq = {id(dq): (s_dq, z) for _, dq, _, s_dq, z, _ in pairs}
    by_q = {id(q): (s_dq, z) for q, _, _, s_dq, z, _ in pairs}
    for node in tg.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = [by_dq[id(t.inputs[0])] for t in node.inputs if len(t.inputs) == 1 and id(t.inputs[0]) in by_dq]
        outs = [by_q[id(c)] for t in node.outputs for c in t.outputs if id(c) in by_q]
        for a, za in ins:
            for b, zb in outs:
                if za == zb and np.array_equal(const_np(a), const_np(b)):
                    groups.union(a, b)
    members: dict[str, list[str]] = defaultdict(list)
    for b in sorted(bases):
        members[groups.find(b)].append(b)
    for names in members.values():
        if any(n in bad for n in names):
            bad.update(names)
    bad |= {q for q, (b, _) in tied.items() if b in bad}
    limit: dict[str, float] = defaultdict(lambda: float("inf"))
    for q, _, s_q, s_dq, z, (lo_q, hi_q) in pairs:
        cap = _clip_limit(q, z, lo_q, hi_q, lambda t: const_np(t.name) if t.name in tg.consts else None)
        root = groups.find(s_dq)
        limit[root] = min(limit[root], cap / (tied[s_q][1] if s_q in tied else 1.0))
    out: dict[str, ScaleValue] = {}
    for root, names in members.items():
        if root in bad:
            continue
        v0 = const_np(root).astype(np.float32)
        start = float(v0.reshape(()))
        floor, cap = start * SCALE_FLOOR, max(limit[root], start)
        p = torch.nn.Parameter(torch.from_numpy(v0.reshape(()).copy()))
        fn = (lambda p=p, lo=floor: torch.clamp(p, min=lo)) if not np.isfinite(cap) else \
            (lambda p=p, lo=floor, hi=cap: torch.clamp(p, min=lo, max=hi))
        out[root] = base = ScaleValue(root, v0.shape, fn, p)
        for other in names:
            if other != root:
                out[other] = ScaleValue(other, const_np(other).shape, base.value)
                stats["scales_tied"] += 1
    for name, (b, ratio) in tied.items():
        if name in bad or b not in out:
            continue
        r = torch.tensor(ratio, dtype=torch.float32)
        out[name] = ScaleValue(name, const_np(name).shape, (lambda b=out[b], r=r: b.value() * r))
        stats["scales_tied"] += 1
    stats["scales_learned"] = sum(v.param is not None for v in out.values())
    stats["scales_capped_by_clip"] = sum(1 for r in members if r in out and np.isfinite(limit[r]))
    return out


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
        if sx in bases and sw and sw in tg.consts and s_name not in bases and s_name not in new:
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
