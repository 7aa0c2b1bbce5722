"""No-op layers found by value (the ``noop`` units of ``onnxcompress.analyses.blocks``): y provably equals x.

Rules (x: the node's only activation input; every weight read must be a constant; shapes are the static shapes the
analysis works at, and a rule needs out_shape == in_shape where it says so):

- ``identity_conv``: Conv, stride 1, no auto_pad, W zero except at one kernel tap t where W[:, :, t] = I (group 1,
  C_out = C_in) or W[:, 0, t] = 1 (depthwise, group = C), the begin pad of every spatial axis = dilation * t (output
  position i reads input position i), bias absent or 0, out_shape == in_shape. y = x exactly (one product by 1.0
  plus products by 0.0).
- ``identity_gemm``: Gemm with transA 0, alpha * op(B) = I, C absent or beta * C = 0; ``identity_matmul``: MatMul by a
  constant 2-D identity.
- ``transpose_pair``: Transpose(p1) read only by a Transpose(p2) with p1[p2[i]] = i (both go);
  ``identity_transpose``: perm = 0..r-1.
- ``reshape_round_trip``: Reshape/Flatten/Squeeze/Unsqueeze, optionally followed (single consumer) by a second one,
  whose final static shape equals the first input's (fully known dims), in models whose inputs have static shapes
  only (with a dynamic input a reshape that is the identity at one size need not be at another; ``cleanup`` proves
  it on symbols).
- ``zero_pad``: Pad whose pads are all 0 (any mode).
- ``same_cast``: Cast to the element type x already has.
- ``mul_one`` / ``div_one`` / ``add_zero`` / ``sub_zero``: the constant operand is all 1 (0), has x's dtype, and the
  output has x's shape (no broadcast to a larger shape). ``x + 0`` turns -0.0 into +0.0 (equal as numbers).

What the existing ``cleanup`` pass already does exactly (passes/cleanup/noops.py and chains.py): same-type Cast,
identity Transpose, Transpose pairs, Reshape chains and same-dims Reshape, zero Pad, x*1, x/1, x+0, x-0. New here:
identity Conv / Gemm / MatMul (the rules that should move to cleanup).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.blocks_graph import GraphIndex

_VIEW = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def find_noops(ix: GraphIndex, shapes: dict[str, list[int]], dtypes: dict[str, int],
               static: bool = True) -> list[tuple[str, str, str]]:
    """(rule, entry, exit) of every no-op the rules above prove, in topological order. ``static``: the graph's
    inputs have fixed shapes (the view-op rule compares static shapes, so it needs them)."""
    found: list[tuple[str, str, str]] = []
    taken: set[int] = set()
    for i, node in enumerate(ix.nodes):
        if i in taken or not node.outputs or not node.inputs or not isinstance(node.inputs[0], gs.Variable):
            continue
        x, y = node.inputs[0].name, node.outputs[0].name
        same = _known(shapes.get(x)) and shapes.get(x) == shapes.get(y)
        rule = None
        op = node.op
        if op == "Conv" and same and _identity_conv(node):
            rule = "identity_conv"
        elif op == "Gemm" and same and _identity_gemm(node):
            rule = "identity_gemm"
        elif op == "MatMul" and same and _identity_matrix(_const(node, 1)):
            rule = "identity_matmul"
        elif op == "Transpose":
            perm = list(node.attrs.get("perm", []))
            if perm and perm == sorted(perm):
                rule = "identity_transpose"
            else:
                j = _single_consumer(ix, y)
                if perm and j is not None and ix.nodes[j].op == "Transpose":
                    p2 = list(ix.nodes[j].attrs.get("perm", []))
                    if len(p2) == len(perm) and all(perm[p2[k]] == k for k in range(len(perm))):
                        found.append(("transpose_pair", x, ix.nodes[j].outputs[0].name))
                        taken.add(j)
                        continue
        elif op in _VIEW and static and _known(shapes.get(x)):
            if same:
                rule = "reshape_round_trip"
            else:
                j = _single_consumer(ix, y)
                if j is not None and ix.nodes[j].op in _VIEW and ix.nodes[j].inputs[0] is node.outputs[0]:
                    z = ix.nodes[j].outputs[0].name
                    if shapes.get(z) == shapes.get(x):
                        found.append(("reshape_round_trip", x, z))
                        taken.add(j)
                        continue
        elif op == "Pad" and same and _zero_pads(node):
            rule = "zero_pad"
        elif op == "Cast" and x in dtypes and int(node.attrs.get("to", -1)) == dtypes[x]:
            rule = "same_cast"
        elif op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
            rule = _neutral_operand(node, shapes, dtypes)
        if rule is not None:
            found.append((rule, x, y))
    return found


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _const(node: gs.Node, k: int) -> np.ndarray | None:
    if len(node.inputs) <= k or not isinstance(node.inputs[k], gs.Constant):
        return None
    return np.asarray(node.inputs[k].values)


def _zero_or_absent(node: gs.Node, k: int) -> bool:
    if len(node.inputs) <= k or node.inputs[k].name == "":
        return True
    v = _const(node, k)
    return v is not None and not np.any(v)


def _single_consumer(ix: GraphIndex, name: str) -> int | None:
    t = ix.tensors.get(name)
    if t is None or name in ix.graph_outputs or len(t.outputs) != 1:
        return None
    return ix.index.get(id(t.outputs[0]))


def _identity_matrix(w: np.ndarray | None) -> bool:
    return w is not None and w.ndim == 2 and w.shape[0] == w.shape[1] and np.array_equal(w, np.eye(w.shape[0]))


def _identity_conv(node: gs.Node) -> bool:
    w = _const(node, 1)
    if w is None or w.ndim < 3 or not _zero_or_absent(node, 2):
        return False
    a = node.attrs
    spatial = w.ndim - 2
    if any(s != 1 for s in a.get("strides", [1] * spatial)) or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return False
    nz = np.argwhere(w.reshape(w.shape[0], w.shape[1], -1).any(axis=(0, 1)))
    if nz.size != 1:
        return False
    tap = np.unravel_index(int(nz[0, 0]), w.shape[2:])
    dil = list(a.get("dilations", [1] * spatial))
    pads = list(a.get("pads", [0] * (2 * spatial)))
    if any(pads[d] != dil[d] * int(tap[d]) for d in range(spatial)):
        return False
    core = w[(slice(None), slice(None), *tap)]
    group = int(a.get("group", 1))
    if group == 1:
        return _identity_matrix(core)
    return group == w.shape[0] and w.shape[1] == 1 and np.all(core == 1)


def _identity_gemm(node: gs.Node) -> bool:
    b = _const(node, 1)
    a = node.attrs
    if b is None or b.ndim != 2 or int(a.get("transA", 0)):
        return False
    if not _zero_or_absent(node, 2) and float(a.get("beta", 1.0)) != 0.0:
        return False
    m = (b.T if int(a.get("transB", 0)) else b) * float(a.get("alpha", 1.0))
    return _identity_matrix(m)


def _zero_pads(node: gs.Node) -> bool:
    if "pads" in node.attrs:  # opset < 11
        return not any(node.attrs["pads"])
    p = _const(node, 1)
    return p is not None and not np.any(p)


def _neutral_operand(node: gs.Node, shapes: dict[str, list[int]], dtypes: dict[str, int]) -> str | None:
    """mul_one / div_one / add_zero / sub_zero when the constant operand is neutral and nothing broadcasts."""
    a, b = node.inputs
    op = node.op
    for act, k in ((a, 1), (b, 0)):
        if k == 0 and op in ("Div", "Sub"):
            continue  # 1 / x and 0 - x are not x
        c = _const(node, k)
        if c is None or not isinstance(act, gs.Variable) or not _known(shapes.get(act.name)):
            continue
        if shapes.get(act.name) != shapes.get(node.outputs[0].name) or act.name not in dtypes:
            continue
        if c.dtype != onnx.helper.tensor_dtype_to_np_dtype(dtypes[act.name]):
            continue
        neutral = 1 if op in ("Mul", "Div") else 0
        if c.size and np.all(c == neutral):
            return {"Mul": "mul_one", "Div": "div_one", "Add": "add_zero", "Sub": "sub_zero"}[op]
    return None
