"""ONNX operators as PyTorch functions: the op table of ``torch_interpreter`` (imported only in ``mode=train``).

Each entry maps ``(torch, inputs, attrs) -> list of outputs`` with ONNX semantics (opset 11-21 forms: attributes or
inputs for axes/splits/pads). ``inputs`` holds torch tensors, ``None`` for an empty optional input. Values that are
shapes, indices or axes stay int64 tensors and are read with ``.tolist()`` where an op needs Python ints.

Not every attribute combination is implemented: an unsupported one raises ``NotImplementedError`` naming the op and
the attribute, which the interpreter turns into a clear error (end-to-end) or a block left untrained (block-wise).
QuantizeLinear / DequantizeLinear are fake quantization with a straight-through estimator (``fake_quant``).

A 2-D Conv's input is made channels-last (NHWC strides; the values are the same and every later op reads them
through their strides). Measured (``benchmarks.train_speed layout``: a forward + backward step of 8 inputs, 1 thread,
NCHW and channels-last interleaved, medians of 4 rounds) on an idle machine: ddddocr_det 1.11x faster, PP-OCRv4 rec
1.08x, PP-OCRv4 det, nudenet 320n and EfficientNet-Lite2 1.00-1.01x (under load 4: 1.16x, 1.09x, 1.05x, 1.01x,
0.98x): never slower beyond the noise. Weights made channels-last too bought nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .fake_quant import dequantize_linear, quantize_linear

#: 2-D Conv inputs made channels-last (module doc; ``benchmarks.train_speed layout`` times both layouts)
CHANNELS_LAST = True

# ONNX TensorProto data types -> numpy dtypes (torch dtypes are derived from these)
_ONNX_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
            10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def torch_dtype(torch: Any, onnx_type: int) -> Any:
    np_type = _ONNX_NP.get(int(onnx_type))
    if np_type is None:
        raise NotImplementedError(f"Cast to ONNX type {onnx_type}")
    return {np.float32: torch.float32, np.uint8: torch.uint8, np.int8: torch.int8, np.int16: torch.int16,
            np.int32: torch.int32, np.int64: torch.int64, np.bool_: torch.bool, np.float16: torch.float16,
            np.float64: torch.float64, np.uint32: torch.int64, np.uint64: torch.int64}[np_type]


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if hasattr(t, "tolist") else t)]


def _axes(inputs: list, attrs: dict, index: int, key: str = "axes") -> list[int] | None:
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return list(attrs[key]) if key in attrs and attrs[key] is not None else None


def _pads_2d(torch: Any, x: Any, attrs: dict, kernel: list[int], strides: list[int], dil: list[int],
             value: float = 0.0) -> tuple:
    """ONNX pads (or auto_pad) -> (x, symmetric torch padding) with an explicit F.pad when asymmetric."""
    nd = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pads_b = pads_e = [0] * nd
    else:
        pads = list(attrs.get("pads", [0] * (2 * nd)))
        pads_b, pads_e = pads[:nd], pads[nd:]
    if pads_b == pads_e:
        return x, pads_b
    flat = []
    for b, e in zip(reversed(pads_b), reversed(pads_e), strict=True):
        flat += [b, e]
    return torch.nn.functional.pad(x, flat, value=value), [0] * nd


def conv(torch: Any, inputs: list, attrs: dict) -> list:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    x, pad = _pads_2d(torch, x, attrs, kernel, strides, dil)
    if nd == 2 and CHANNELS_LAST:  # channels-last activations (module doc): oneDNN's NHWC kernels, both ways
        x = x.contiguous(memory_format=torch.channels_last)
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    return [fn(x, w, b, strides, pad, dil, int(attrs.get("group", 1)))]


def conv_transpose(torch: Any, inputs: list, attrs: dict) -> list:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = w.dim() - 2
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise NotImplementedError("ConvTranspose with output_shape / auto_pad")
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:]:
        raise NotImplementedError("ConvTranspose with asymmetric pads")
    fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
          3: torch.nn.functional.conv_transpose3d}[nd]
    return [fn(x, w, b, list(attrs.get("strides", [1] * nd)), pads[:nd],
               list(attrs.get("output_padding", [0] * nd)), int(attrs.get("group", 1)),
               list(attrs.get("dilations", [1] * nd)))]


def gemm(torch: Any, inputs: list, attrs: dict) -> list:
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + float(attrs.get("beta", 1.0)) * inputs[2]
    return [y]


def batch_norm(torch: Any, inputs: list, attrs: dict) -> list:
    x, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return [(x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)]


def layer_norm(torch: Any, inputs: list, attrs: dict) -> list:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = int(attrs.get("axis", -1)) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(attrs.get("epsilon", 1e-5))) * scale
    return [y + bias if bias is not None else y]


def _pool(torch: Any, inputs: list, attrs: dict, kind: str) -> list:
    x = inputs[0]
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    ceil = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        x, pad = _pads_2d(torch, x, attrs, kernel, strides, dil, float("-inf"))
        fn = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d}[nd]
        return [fn(x, kernel, strides, pad, dil, ceil)]
    if dil != [1] * nd:
        raise NotImplementedError("AveragePool with dilations")
    x, pad = _pads_2d(torch, x, attrs, kernel, strides, dil)
    fn = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d}[nd]
    return [fn(x, kernel, strides, pad, ceil, bool(attrs.get("count_include_pad", 0)))]


def reshape(torch: Any, inputs: list, attrs: dict) -> list:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def split(torch: Any, inputs: list, attrs: dict, n_out: int) -> list:
    x = inputs[0]
    axis = int(attrs.get("axis", 0)) % x.dim()
    sizes = _axes(inputs, attrs, 1, "split")
    if sizes is None:
        size = x.shape[axis]
        chunk = -(-size // n_out)
        sizes = [chunk] * (n_out - 1) + [size - chunk * (n_out - 1)]
    return list(torch.split(x, sizes, dim=axis))


def slice_(torch: Any, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    starts, ends = _axes(inputs, attrs, 1, "starts"), _axes(inputs, attrs, 2, "ends")
    axes = _axes(inputs, attrs, 3) or list(range(len(starts)))
    steps = _axes(inputs, attrs, 4, "steps") or [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a %= x.dim()
        n = x.shape[a]
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            s, e = max(0, min(n, s)), max(0, min(n, e))
            index: list[Any] = [slice(None)] * x.dim()
            index[a] = slice(s, max(s, e), st)
            x = x[tuple(index)]
        else:  # negative step: clamp start to [0, n-1], end to [-1, n-1]
            s, e = max(0, min(n - 1, s)), max(-1, min(n - 1, e))
            x = torch.index_select(x, a, torch.arange(s, e, st, dtype=torch.int64))
    return [x]


def gather(torch: Any, inputs: list, attrs: dict) -> list:
    x, idx = inputs[0], inputs[1].long()
    axis = int(attrs.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    shape = list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:])
    return [out.reshape(shape)]


def gather_nd(torch: Any, inputs: list, attrs: dict) -> list:
    """out[b..., i...] = data[b..., idx[b..., i..., :]] with ``batch_dims`` leading batch axes (negatives wrap)."""
    x, idx = inputs[0], inputs[1].long()
    b = int(attrs.get("batch_dims", 0))
    k = idx.shape[-1]
    sizes = torch.tensor(list(x.shape[b:b + k]), dtype=torch.long)
    idx = torch.where(idx < 0, idx + sizes, idx)
    lead = [torch.arange(n).reshape([-1 if j == a else 1 for j in range(idx.dim() - 1)])
            for a, n in enumerate(x.shape[:b])]
    return [x[tuple(lead + [idx[..., j] for j in range(k)])]]


def scatter_nd(torch: Any, inputs: list, attrs: dict) -> list:
    """out = data with out[idx[..., :]] = updates (reduction none; negatives wrap); differentiable in both."""
    if attrs.get("reduction", "none") not in ("none", b"none"):
        raise NotImplementedError("ScatterND with a reduction")
    x, idx, upd = inputs[0], inputs[1].long(), inputs[2]
    k = idx.shape[-1]
    sizes = torch.tensor(list(x.shape[:k]), dtype=torch.long)
    idx = torch.where(idx < 0, idx + sizes, idx)
    return [x.index_put(tuple(idx[..., j] for j in range(k)), upd)]


def squeeze(torch: Any, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axes = _axes(inputs, attrs, 1)
    if axes is None:
        return [x.squeeze()]
    keep = [s for i, s in enumerate(x.shape) if i not in {a % x.dim() for a in axes}]
    return [x.reshape(keep)]


def unsqueeze(torch: Any, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axes = sorted(a % (x.dim() + len(_axes(inputs, attrs, 1))) for a in _axes(inputs, attrs, 1))
    for a in axes:
        x = x.unsqueeze(a)
    return [x]


def resize(torch: Any, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    mode = attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else None
    sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and inputs[3].numel() else None
    if sizes is not None:
        size = _ints(sizes)[2:]
    elif scales is not None:
        sc = [float(v) for v in scales.reshape(-1).tolist()]
        if sc[:2] != [1.0, 1.0]:
            raise NotImplementedError("Resize of batch/channel axes")
        size = [int(math.floor(x.shape[2 + i] * s)) for i, s in enumerate(sc[2:])]
    else:
        raise NotImplementedError("Resize without scales or sizes")
    if mode == "nearest":
        nm = attrs.get("nearest_mode", "round_prefer_floor")
        nm = nm.decode() if isinstance(nm, bytes) else nm
        integer = all(size[i] % x.shape[2 + i] == 0 for i in range(len(size)))
        if ctm == "asymmetric" and (nm == "floor" or integer):
            return [torch.nn.functional.interpolate(x, size=size, mode="nearest")]
        if ctm in ("half_pixel", "pytorch_half_pixel") and integer and nm in ("round_prefer_floor",
                                                                                "round_prefer_ceil"):
            return [torch.nn.functional.interpolate(x, size=size, mode="nearest")]
        raise NotImplementedError(f"Resize nearest with {ctm}/{nm}")
    if mode == "linear":
        if ctm == "align_corners":
            return [torch.nn.functional.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "linear",
                                                    align_corners=True)]
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return [torch.nn.functional.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "linear",
                                                    align_corners=False)]
    raise NotImplementedError(f"Resize mode {mode} with {ctm}")


def pad(torch: Any, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    pads = _axes(inputs, attrs, 1, "pads")
    value = float(inputs[2].reshape(-1)[0]) if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() \
        else float(attrs.get("value", 0.0))
    axes = _axes(inputs, attrs, 3) or list(range(x.dim()))
    n = len(axes)
    full_b, full_e = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        full_b[a % x.dim()], full_e[a % x.dim()] = pads[i], pads[n + i]
    flat = []
    for d in reversed(range(x.dim())):
        flat += [full_b[d], full_e[d]]
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        return [torch.nn.functional.pad(x, flat, value=value)]
    return [torch.nn.functional.pad(x, flat, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


def _reduce(name: str) -> Callable:
    def fn(torch: Any, inputs: list, attrs: dict) -> list:
        x = inputs[0]
        axes = _axes(inputs, attrs, 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        dims = tuple(a % x.dim() for a in axes)
        if name == "mean":
            return [x.mean(dim=dims, keepdim=keep)]
        if name == "sum":
            return [x.sum(dim=dims, keepdim=keep)]
        if name == "l2":
            return [torch.sqrt((x * x).sum(dim=dims, keepdim=keep))]
        y = x
        for d in sorted(dims, reverse=True):
            y = (y.amax if name == "max" else y.amin)(dim=d, keepdim=keep)
        return [y]

    return fn


def _softmax(log: bool) -> Callable:
    def fn(torch: Any, inputs: list, attrs: dict) -> list:
        x = inputs[0]
        axis = int(attrs.get("axis", -1))
        return [torch.log_softmax(x, axis) if log else torch.softmax(x, axis)]

    return fn


def clip(torch: Any, inputs: list, attrs: dict) -> list:
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return [torch.clamp(inputs[0], lo, hi)]


def cast(torch: Any, inputs: list, attrs: dict) -> list:
    return [inputs[0].to(torch_dtype(torch, attrs["to"]))]


def shape(torch: Any, inputs: list, attrs: dict) -> list:
    dims = list(inputs[0].shape)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return [torch.tensor(dims, dtype=torch.int64)]


def constant_of_shape(torch: Any, inputs: list, attrs: dict) -> list:
    value = attrs.get("value")
    fill = torch.zeros((), dtype=torch.float32) if value is None else torch.from_numpy(np.asarray(value.values))
    return [fill.reshape(()).expand(_ints(inputs[0])).clone()]


def _binary(name: str) -> Callable:
    def fn(torch: Any, inputs: list, attrs: dict) -> list:
        a, b = inputs
        if name == "Div" and not a.is_floating_point():
            return [torch.div(a, b, rounding_mode="trunc")]
        op = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
              "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
              "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or}[name]
        out = op(a, b)
        if name == "Pow" and out.dtype != a.dtype:
            out = out.to(a.dtype)
        return [out]

    return fn


def _variadic(name: str) -> Callable:
    def fn(torch: Any, inputs: list, attrs: dict) -> list:
        out = inputs[0]
        for x in inputs[1:]:
            out = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}[name](out, x)
        return [out]

    return fn


def _unary(f: Callable) -> Callable:
    return lambda torch, inputs, attrs: [f(torch, inputs[0], attrs)]


def _hard_sigmoid(torch: Any, x: Any, attrs: dict) -> Any:
    return torch.clamp(float(attrs.get("alpha", 0.2)) * x + float(attrs.get("beta", 0.5)), 0.0, 1.0)


def _range(torch: Any, inputs: list, attrs: dict) -> list:
    start, limit, delta = (v.reshape(()) for v in inputs)
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _where(torch: Any, inputs: list, attrs: dict) -> list:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


def _expand(torch: Any, inputs: list, attrs: dict) -> list:
    x, target = inputs[0], _ints(inputs[1])
    nd = max(x.dim(), len(target))
    xs = [1] * (nd - x.dim()) + list(x.shape)
    ts = [1] * (nd - len(target)) + target
    return [x.reshape(xs).expand([max(a, b) for a, b in zip(xs, ts, strict=True)])]


def _flatten(torch: Any, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axis = int(attrs.get("axis", 1)) % (x.dim() + 1)
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]


OPS: dict[str, Callable] = {
    "Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm,
    "MatMul": lambda torch, i, a: [torch.matmul(i[0], i[1])],
    "BatchNormalization": batch_norm, "LayerNormalization": layer_norm,
    "MaxPool": lambda torch, i, a: _pool(torch, i, a, "max"),
    "AveragePool": lambda torch, i, a: _pool(torch, i, a, "avg"),
    "GlobalAveragePool": lambda torch, i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda torch, i, a: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Relu": _unary(lambda torch, x, a: torch.relu(x)),
    "Sigmoid": _unary(lambda torch, x, a: torch.sigmoid(x)),
    "Tanh": _unary(lambda torch, x, a: torch.tanh(x)),
    "Erf": _unary(lambda torch, x, a: torch.erf(x)),
    "Sqrt": _unary(lambda torch, x, a: torch.sqrt(x)),
    "Exp": _unary(lambda torch, x, a: torch.exp(x)),
    "Log": _unary(lambda torch, x, a: torch.log(x)),
    "Abs": _unary(lambda torch, x, a: torch.abs(x)),
    "Neg": _unary(lambda torch, x, a: torch.neg(x)),
    "Reciprocal": _unary(lambda torch, x, a: torch.reciprocal(x)),
    "Floor": _unary(lambda torch, x, a: torch.floor(x)),
    "Ceil": _unary(lambda torch, x, a: torch.ceil(x)),
    "Not": _unary(lambda torch, x, a: torch.logical_not(x)),
    "IsNaN": _unary(lambda torch, x, a: torch.isnan(x)), "GatherND": gather_nd, "ScatterND": scatter_nd,
    "Identity": _unary(lambda torch, x, a: x),
    "Dropout": lambda torch, i, a: [i[0]],
    "HardSigmoid": _unary(_hard_sigmoid),
    "HardSwish": _unary(lambda torch, x, a: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)),
    "LeakyRelu": _unary(lambda torch, x, a: torch.nn.functional.leaky_relu(x, float(a.get("alpha", 0.01)))),
    "Elu": _unary(lambda torch, x, a: torch.nn.functional.elu(x, float(a.get("alpha", 1.0)))),
    "Softplus": _unary(lambda torch, x, a: torch.nn.functional.softplus(x)),
    "Mish": _unary(lambda torch, x, a: x * torch.tanh(torch.nn.functional.softplus(x))),
    "Gelu": _unary(lambda torch, x, a: torch.nn.functional.gelu(
        x, approximate="tanh" if a.get("approximate", "none") in ("tanh", b"tanh") else "none")),
    "PRelu": lambda torch, i, a: [torch.where(i[0] >= 0, i[0], i[0] * i[1])],
    "Clip": clip, "Cast": cast, "Shape": shape, "ConstantOfShape": constant_of_shape,
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "Reshape": reshape, "Flatten": _flatten,
    "Transpose": lambda torch, i, a: [i[0].permute(*(a.get("perm") or list(reversed(range(i[0].dim())))))],
    "Concat": lambda torch, i, a: [torch.cat([x for x in i if x is not None], dim=int(a["axis"]))],
    "Slice": slice_, "Gather": gather, "Squeeze": squeeze, "Unsqueeze": unsqueeze,
    "Resize": resize, "Pad": pad, "Expand": _expand, "Range": _range, "Where": _where,
    "Tile": lambda torch, i, a: [i[0].repeat(*_ints(i[1]))],
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceL2": _reduce("l2"),
    "QuantizeLinear": quantize_linear, "DequantizeLinear": dequantize_linear,
    "Max": _variadic("Max"), "Min": _variadic("Min"), "Sum": _variadic("Sum"),
    **{k: _binary(k) for k in ("Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
                               "GreaterOrEqual", "And", "Or")},
}
#: ops whose output count is the node's (Split)
MULTI_OUTPUT = {"Split": split}
