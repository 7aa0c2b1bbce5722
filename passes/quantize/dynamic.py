"""``quantize{mode=dynamic}`` and ``quantize{mode=weight_only}``: quantization without calibration data.

**Dynamic** (MatMul/Gemm with a constant weight ``W [K, N]``; ``Gemm`` with ``transB`` is transposed offline, alpha
folds into the weight scale, ``beta·C`` is added after). The activation's range is measured at run time::

    x_q, s_x, z_x = DynamicQuantizeLinear(x)              # uint8, asymmetric over [min(x, 0), max(x, 0)]
    acc = MatMulInteger(x_q, W_q, z_x, 0)                 # int32; W_q int8 symmetric per column n: s_w[n]
    y = Cast(acc, float) · (s_x · s_w)  (+ beta·C)

ORT fuses the chain into ``DynamicQuantizeMatMul``. Conv is not quantized dynamically by default (ORT's
ConvInteger path is several times slower than float Conv on CPU).

**Weight-only**: the weight is stored as integers and dequantized in the graph; activations stay float.

* 8-bit: ``DequantizeLinear(W_q int8, s_w[n], axis)`` per output channel (opset 13).
* 4-bit, ``weight_format=qdq``: blocked ``DequantizeLinear`` (opset 21) with ``block_size`` consecutive values along
  the reduction axis K sharing one scale: ``W[k, n] ≈ s[k // B, n] · q[k, n]``, ``q`` int4 in [−8, 7] (symmetric,
  scale = max|block| / 7, clipping ratio per block chosen by least squares). ORT rewrites DQ(int4) -> MatMul into
  ``MatMulNBits`` at load time.
* 4-bit, ``weight_format=matmulnbits``: ``com.microsoft.MatMulNBits`` directly: ``B`` packed ``[N, K/B, B/2]`` uint8
  (two values per byte, first in the low nibble), unsigned 4-bit with the implicit zero point 8, scales ``[N·K/B]``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress import io
from onnxcompress.errors import PassError
from onnxcompress.naming import Namer, graph_names
from onnxcompress.pass_base import PassResult

from . import opset_upgrade as qo
from . import qparams_math as qm
from .opset_upgrade import ensure_opset
from .ort_int8_kernels import const_value, weight_axis
from .prepare import name_unnamed_nodes

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

    from .quantize_pass import Quantize

log = logging.getLogger(__name__)


def _weight_bytes(graph: gs.Graph, ctx: PassContext) -> int:
    return io.weight_bytes(ctx.export(graph))


def _matmul_weight(n: gs.Node) -> tuple[np.ndarray, float, bool] | None:
    """(W as [K, N] float32, alpha, transposed_from_transB) for MatMul/Gemm with a constant 2-D weight."""
    if len(n.inputs) < 2:
        return None
    w = const_value(n.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return None
    if n.op == "MatMul":
        return w, 1.0, False
    if n.op == "Gemm":
        if int(n.attrs.get("transA", 0)):
            return None
        trans = bool(int(n.attrs.get("transB", 0)))
        return (np.ascontiguousarray(w.T) if trans else w), float(n.attrs.get("alpha", 1.0)), trans
    return None


def _candidates(p: Quantize, graph: gs.Graph, ops: tuple[str, ...]) -> tuple[list[gs.Node], dict[str, str]]:
    name_unnamed_nodes(graph, graph_names(graph))
    chosen, skipped = [], {}
    for n in graph.nodes:
        if n.op not in ops:
            continue
        if (n.name and n.name in p.exclude) or n.op in p.exclude:
            skipped[n.name] = "excluded by the user"
            continue
        chosen.append(n)
    return chosen, skipped


def _finish(
    p: Quantize, graph: gs.Graph, ctx: PassContext, new_nodes: list[gs.Node], done: Counter, skipped: dict, stats: dict
) -> None:
    """Add the new nodes, drop the replaced ones, quantize embedding tables, and fill the common stats."""
    graph.nodes.extend(new_nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if "Gather" in p.dynamic_ops:
        k = quantize_gathers(graph, tuple(p.exclude))
        if k:
            done["Gather"] += k
    stats["nodes_quantized"] = dict(done)
    stats["layers_kept_float"] = skipped
    stats["weight_bytes_after"] = _weight_bytes(graph, ctx)


# ------------------------------------------------------------------------------------------------- dynamic
def run_dynamic(p: Quantize, graph: gs.Graph, ctx: PassContext) -> PassResult:
    stats: dict = {"mode": "dynamic", "weight_bytes_before": _weight_bytes(graph, ctx)}
    per_channel = p.per_channel
    if not ensure_opset(graph, ctx, qo.PER_TENSOR_OPSET, stats):
        raise PassError("dynamic quantization needs opset >= 10 and the upgrade failed")
    namer = Namer(graph)
    nodes, skipped = _candidates(p, graph, tuple(op for op in p.dynamic_ops if op in ("MatMul", "Gemm")))
    done: Counter = Counter()
    new_nodes: list[gs.Node] = []
    for n in nodes:
        got = _matmul_weight(n)
        if got is None:
            skipped[n.name] = "no constant 2-D float weight"
            continue
        w, alpha, _ = got
        x = n.inputs[0]
        qw = qm.quantize_weight(w, qm.INT8, 1 if per_channel else None)
        s_w = (np.asarray(qw.scale, np.float64) * alpha).astype(np.float32)
        base = n.name or x.name
        xq = gs.Variable(namer(f"{base}_input_quantized"), dtype=np.uint8)
        xs = gs.Variable(namer(f"{base}_input_scale"), dtype=np.float32)
        xz = gs.Variable(namer(f"{base}_input_zero_point"), dtype=np.uint8)
        acc = gs.Variable(namer(f"{base}_acc"), dtype=np.int32)
        accf = gs.Variable(namer(f"{base}_acc_float"), dtype=np.float32)
        scale = gs.Variable(namer(f"{base}_scale"), dtype=np.float32)
        y = n.outputs[0]
        has_c = n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name
        y_mm = gs.Variable(namer(f"{base}_matmul"), dtype=np.float32) if has_c else y
        chain = [
            gs.Node(
                "DynamicQuantizeLinear",
                namer(f"{base}_DynamicQuantizeLinear"),
                inputs=[x],
                outputs=[xq, xs, xz],
            ),
            gs.Node(
                "MatMulInteger",
                namer(f"{base}_MatMulInteger"),
                inputs=[
                    xq,
                    gs.Constant(namer(f"{base}_weight_quantized"), qw.q),
                    xz,
                    gs.Constant(namer(f"{base}_weight_zero_point"), np.asarray(qw.zero_point)),
                ],
                outputs=[acc],
            ),
            gs.Node(
                "Cast",
                namer(f"{base}_Cast"),
                attrs={"to": onnx.TensorProto.FLOAT},
                inputs=[acc],
                outputs=[accf],
            ),
            gs.Node(
                "Mul",
                namer(f"{base}_scale_Mul"),
                inputs=[xs, gs.Constant(namer(f"{base}_weight_scale"), np.asarray(s_w))],
                outputs=[scale],
            ),
            gs.Node("Mul", namer(f"{base}_Mul"), inputs=[accf, scale], outputs=[y_mm]),
        ]
        if has_c:
            c = n.inputs[2]
            beta = float(n.attrs.get("beta", 1.0))
            cv = const_value(c)
            if cv is not None and beta != 1.0:
                c = gs.Constant(namer(f"{base}_bias"), (cv.astype(np.float64) * beta).astype(np.float32))
            elif beta != 1.0:
                skipped[n.name] = "Gemm with beta != 1 and a non-constant C"
                continue
            chain.append(gs.Node("Add", namer(f"{base}_bias_Add"), inputs=[y_mm, c], outputs=[y]))
        n.inputs.clear()
        n.outputs.clear()
        new_nodes.extend(chain)
        done[n.op] += 1
    _finish(p, graph, ctx, new_nodes, done, skipped, stats)
    return PassResult(bool(done), stats)


# --------------------------------------------------------------------------------------------- weight-only
def _int8_weight_dq(namer: Namer, name: str, w: np.ndarray, axis: int | None) -> tuple[gs.Node, gs.Variable]:
    """Symmetric int8 ``w`` (per channel on ``axis``, per tensor when None) behind a DequantizeLinear."""
    qw = qm.quantize_weight(w, qm.INT8, axis)
    attrs = {"axis": int(axis)} if axis is not None else {}
    return _dq_node(namer, name, qw.q, qw.scale, qw.zero_point, attrs, int4=False)


def _dq_node(
    namer: Namer, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, attrs: dict, int4: bool
) -> tuple[gs.Node, gs.Variable]:
    out = gs.Variable(namer(f"{base}_dequantized"), dtype=np.float32)
    if int4:
        tq = numpy_helper.from_array(q, namer(f"{base}_quantized"))
        q_c = gs.Constant(tq.name, LazyValues(tq))
    else:
        q_c = gs.Constant(namer(f"{base}_quantized"), q)
    inputs = [q_c, gs.Constant(namer(f"{base}_scale"), np.asarray(scale, np.float32))]
    if zp is not None:
        if int4:
            tz = numpy_helper.from_array(zp, namer(f"{base}_zero_point"))
            inputs.append(gs.Constant(tz.name, LazyValues(tz)))
        else:
            inputs.append(gs.Constant(namer(f"{base}_zero_point"), np.asarray(zp)))
    node = gs.Node(
        "DequantizeLinear", namer(f"{base}_DequantizeLinear"), attrs=attrs, inputs=inputs, outputs=[out]
    )
    return node, out


def run_weight_only(p: Quantize, graph: gs.Graph, ctx: PassContext) -> PassResult:
    stats: dict = {
        "mode": "weight_only",
        "weight_bits": p.weight_bits,
        "weight_bytes_before": _weight_bytes(graph, ctx),
    }
    int4 = p.weight_bits == 4
    per_channel = p.per_channel
    if int4 and p.weight_format == "qdq":
        if not ensure_opset(graph, ctx, qo.BLOCKED_OPSET, stats):
            raise PassError(
                "4-bit blocked DequantizeLinear needs opset 21 and the upgrade failed; "
                "use weight_format=matmulnbits"
            )
    elif not int4:
        if per_channel and not ensure_opset(graph, ctx, qo.PER_CHANNEL_OPSET, stats):
            per_channel = False
            stats["per_channel"] = "off: the opset upgrade to 13 failed"
        if not per_channel and not ensure_opset(graph, ctx, qo.PER_TENSOR_OPSET, stats):
            raise PassError("weight-only int8 needs opset >= 10 and the upgrade failed")
    namer = Namer(graph)
    nodes, skipped = _candidates(p, graph, tuple(p.dynamic_ops))
    done: Counter = Counter()
    new_nodes: list[gs.Node] = []
    for n in nodes:
        if n.op == "Gather":
            continue  # embedding tables: quantize_gathers below
        if n.op in ("MatMul", "Gemm"):
            got = _matmul_weight(n)
            if got is None:
                skipped[n.name] = "no constant 2-D float weight"
                continue
        elif n.op in ("Conv", "ConvTranspose"):
            w = const_value(n.inputs[1]) if len(n.inputs) > 1 else None
            if w is None or w.dtype != np.float32:
                skipped[n.name] = "no constant float weight"
                continue
            if int4:
                skipped[n.name] = "4-bit weights only for MatMul/Gemm"
                continue
        else:
            continue
        w_t = n.inputs[1]
        w = np.asarray(w_t.values, np.float32)
        if int4 and p.weight_format == "matmulnbits":
            if n.op != "MatMul":
                skipped[n.name] = "MatMulNBits replaces MatMul only"
                continue
            new_nodes.append(_matmulnbits(n, w, p.block_size, namer))
            n.inputs.clear()
            n.outputs.clear()
            done[n.op] += 1
            continue
        if int4:
            # blocks run along the reduction axis K: MatMul/Gemm(transB=0) W [K, N] axis 0; Gemm transB W [N, K] axis 1
            axis = 1 if (n.op == "Gemm" and int(n.attrs.get("transB", 0))) else 0
            qw = qm.quantize_weight_blocked(w, qm.INT4, axis, p.block_size, symmetric=True, clip_search=True)
            node, out = _dq_node(
                namer,
                w_t.name,
                qw.q,
                qw.scale,
                None,
                {"axis": axis, "block_size": int(p.block_size)},
                int4=True,
            )
        else:
            node, out = _int8_weight_dq(namer, w_t.name, w, weight_axis(n, w) if per_channel else None)
        n.inputs[1] = out
        new_nodes.append(node)
        done[n.op] += 1
    _finish(p, graph, ctx, new_nodes, done, skipped, stats)
    return PassResult(bool(done) or "opset_upgrade" in stats, stats)


def _matmulnbits(n: gs.Node, w: np.ndarray, block: int, namer: Namer) -> gs.Node:
    """com.microsoft.MatMulNBits (4 bits, implicit zero point 8) replacing ``MatMul(x, W)``, ``W [K, N]``."""
    k, nn = w.shape
    n_blocks = -(-k // block)
    # per column n, blocks along K: quantize W^T [N, K] blocked along axis 1, unsigned with zero point 8
    qw = qm.quantize_weight_blocked(
        np.ascontiguousarray(w.T), qm.INT4, 1, block, symmetric=True, clip_search=True
    )
    q = qw.q.astype(np.int16) + 8  # int4 [-8, 7] -> uint4 [0, 15] around the implicit zero point 8
    pad = n_blocks * block - k
    if pad:
        q = np.concatenate([q, np.full((nn, pad), 8, np.int16)], axis=1)
    packed = qm.pack_uint4_rows(q.astype(np.uint8).reshape(nn, n_blocks, block))  # [N, n_blocks, block/2]
    scales = np.asarray(qw.scale, np.float32).reshape(nn * n_blocks)
    base = n.name or n.inputs[1].name
    return gs.Node(
        "MatMulNBits",
        namer(f"{base}_MatMulNBits"),
        domain="com.microsoft",
        attrs={"K": int(k), "N": int(nn), "bits": 4, "block_size": int(block)},
        inputs=[
            n.inputs[0],
            gs.Constant(namer(f"{base}_B"), packed),
            gs.Constant(namer(f"{base}_scales"), scales),
        ],
        outputs=list(n.outputs),
    )


# ------------------------------------------------------------------------------------------ embedding tables
#: a Gather's constant data is treated as an embedding table from this many elements on
EMBEDDING_MIN_ELEMENTS = 65536


def quantize_gathers(graph: gs.Graph, exclude: tuple[str, ...] = ()) -> int:
    """Embedding tables ``Gather(E [V, D], ids)`` stored as int8 with one symmetric scale per row ``s[v]``::

        Gather(E_q, ids) -> Cast(float) -> Mul(Gather(s [V, 1], ids))

    Only the gathered rows are converted at run time (a DequantizeLinear in front of the Gather would convert the
    whole table on every run). Returns the number of tables quantized.
    """
    namer = Namer(graph)
    done = 0
    new_nodes: list[gs.Node] = []
    for n in list(graph.nodes):
        if n.op != "Gather" or len(n.inputs) != 2 or int(n.attrs.get("axis", 0)) != 0:
            continue
        if (n.name and n.name in exclude) or "Gather" in exclude:
            continue
        e = const_value(n.inputs[0])
        if e is None or e.dtype != np.float32 or e.ndim != 2 or e.size < EMBEDDING_MIN_ELEMENTS:
            continue
        if isinstance(n.inputs[1], gs.Constant):
            continue
        qw = qm.quantize_weight(e, qm.INT8, 0)
        base = n.inputs[0].name
        ids = n.inputs[1]
        gq = gs.Variable(namer(f"{base}_gathered_quantized"), dtype=np.int8)
        gf = gs.Variable(namer(f"{base}_gathered_float"), dtype=np.float32)
        gsc = gs.Variable(namer(f"{base}_gathered_scale"), dtype=np.float32)
        out = n.outputs[0]
        new_nodes += [
            gs.Node(
                "Gather",
                namer(f"{base}_Gather_quantized"),
                attrs={"axis": 0},
                inputs=[gs.Constant(namer(f"{base}_quantized"), qw.q), ids],
                outputs=[gq],
            ),
            gs.Node(
                "Gather",
                namer(f"{base}_Gather_scale"),
                attrs={"axis": 0},
                inputs=[
                    gs.Constant(namer(f"{base}_row_scale"), np.asarray(qw.scale, np.float32).reshape(-1, 1)),
                    ids,
                ],
                outputs=[gsc],
            ),
            gs.Node(
                "Cast", namer(f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[gq], outputs=[gf]
            ),
            gs.Node("Mul", namer(f"{base}_dequantize_Mul"), inputs=[gf, gsc], outputs=[out]),
        ]
        n.inputs.clear()
        n.outputs.clear()
        done += 1
    if done:
        graph.nodes.extend(new_nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done


def quantize_float_op_weights(
    graph: gs.Graph, ops: tuple[str, ...], per_channel: bool, exclude: tuple[str, ...] = ()
) -> int:
    """Weight-only int8 for ops that have no integer kernel (ConvTranspose): ``DQ(W_q, s_w, axis)`` feeding the
    float op, so the file shrinks even where the compute stays float. Returns the number of weights quantized."""
    namer = Namer(graph)
    new_nodes: list[gs.Node] = []
    for n in graph.nodes:
        if n.op not in ops or (n.name and n.name in exclude) or n.op in exclude or len(n.inputs) < 2:
            continue
        w = const_value(n.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim < 3:
            continue
        if n.op == "ConvTranspose" and int(n.attrs.get("group", 1)) != 1:
            continue  # axis 1 of a grouped ConvTranspose weight is not the output channel
        node, out = _int8_weight_dq(namer, n.inputs[1].name, w, weight_axis(n, w) if per_channel else None)
        n.inputs[1] = out
        new_nodes.append(node)
    if new_nodes:
        graph.nodes.extend(new_nodes)
        graph.toposort()
    return len(new_nodes)
