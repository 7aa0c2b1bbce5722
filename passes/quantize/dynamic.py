"""``quantize{mode=dynamic}`` and ``quantize{mode=weight_only}``: quantization without calibration data.

**Dynamic** (MatMul/Gemm with a constant weight ``W [K, N]``; ``Gemm`` with ``transB`` is transposed offline, alpha
folds into the weight scale, ``beta·C`` is added after). The activation's range is measured at run time::

    x_q, s_x, z_x = DynamicQuantizeLinear(x)              # uint8, asymmetric over [min(x, 0), max(x, 0)]
    acc = MatMulInteger(x_q, W_q, z_x, z_w)               # int32; W_q int8 symmetric per column n: s_w[n], z_w 0
                                                          # (uint8 codes, z_w 128, where ORT saturates u8 x s8:
                                                          # ``u8s8_saturation``)
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

from onnxcompress import io
from onnxcompress.errors import PassError
from onnxcompress.naming import Namer
from onnxcompress.pass_base import PassResult

from . import dynamic_rounding, row_ranges, two_pass
from . import opset_upgrade as qo
from . import qparams_math as qm
from . import subgraphs as sg
from . import u8s8_saturation as u8s8
from .bias_correction import bias_add
from .opset_upgrade import ensure_opset
from .ort_int8_kernels import const_value, weight_axis
from .prepare import name_unnamed_nodes

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import PassContext

    from .options import QuantizeOptions

log = logging.getLogger(__name__)


def weight_bytes(graph: gs.Graph, ctx: PassContext) -> int:
    return io.weight_bytes(ctx.export(graph))


def matmul_weight(n: gs.Node) -> tuple[np.ndarray, float, bool] | None:
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


def _no_weight_reason(n: gs.Node) -> str:
    """Why ``matmul_weight`` found no weight: a float16/float64 constant is named as such (export in float32)."""
    w = const_value(n.inputs[1]) if len(n.inputs) > 1 else None
    if w is not None and w.dtype.kind == "f" and w.dtype != np.float32:
        return f"its constant weight is {w.dtype}: int8 is made from float32 weights (export the model in float32)"
    return "no constant 2-D float weight"


def _scoped(p: QuantizeOptions, graph: gs.Graph, ops: tuple[str, ...]):
    """Every scope, a model-wide namer, candidates of ``ops`` in all scopes, skips, weight readers."""
    all_scopes = sg.scopes(graph)
    namer = sg.namer(all_scopes)
    name_unnamed_nodes(graph, namer.taken)
    sg.name_body_nodes(all_scopes, namer.taken)
    nodes, skipped = sg.candidates(all_scopes, ops, tuple(p.exclude))
    return all_scopes, namer, nodes, skipped, sg.readers(all_scopes)


def _allowed_readers(p: QuantizeOptions, all_scopes: list[sg.Scope], nodes: list) -> set[tuple[int, int]]:
    """(node, slot) readers a quantized weight may have: the candidates' weight slots, and embedding lookups
    (``Gather`` data) when tables are quantized too (a tied embedding / output projection: two int8 copies,
    2 bytes per value instead of float's 4)."""
    allowed = {(id(n), 1) for _s, n in nodes}
    if "Gather" in p.dynamic_ops:
        allowed |= {(id(n), 0) for s in all_scopes for n in s.graph.nodes if n.op == "Gather"}
    return allowed


def _keep(scope: sg.Scope, skipped: dict, n: gs.Node, reason: str) -> None:
    skipped[n.name] = reason
    scope.kept_float[f"{n.op} float: {reason}"] += 1


def _note_other_layers(all_scopes: list[sg.Scope], ops: tuple[str, ...], reason: str) -> None:
    """Bodies' layers with a constant float weight that this mode does not touch, counted for the stats."""
    for s in all_scopes[1:]:
        for n in s.graph.nodes:
            if n.op in ("MatMul", "Gemm", "Conv") and n.op not in ops and sg.float_weight(n, 1) is not None:
                s.kept_float[f"{n.op} float: {reason}"] += 1


def _finish(
    p: QuantizeOptions,
    graph: gs.Graph,
    ctx: PassContext,
    all_scopes: list[sg.Scope],
    new_nodes: dict[int, list[gs.Node]],
    done: Counter,
    skipped: dict,
    stats: dict,
) -> None:
    """Add the new nodes to their scopes, drop the replaced ones, quantize embedding tables, fill the stats."""
    for s in all_scopes:
        s.graph.nodes.extend(new_nodes.get(id(s), []))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if "Gather" in p.dynamic_ops:
        k = quantize_gathers(graph, tuple(p.exclude))
        if k:
            done["Gather"] += k
    stats["nodes_quantized"] = dict(done)
    stats["layers_kept_float"] = skipped
    if len(all_scopes) > 1:
        stats["subgraphs"] = sg.body_stats(all_scopes)
    stats["weight_bytes_after"] = weight_bytes(graph, ctx)


# ------------------------------------------------------------------------------------------------- dynamic
def quantize_dynamic(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext, stats: dict,
                     rounded: dict[str, dynamic_rounding.RoundedWeight] | None = None) -> Counter:
    """Quantize ``graph`` dynamically in place (``run_dynamic``'s work, without smoothing); the quantized layers
    by op type. ``stats`` gets the per-scope details; ``rounded``: int8 weights by weight name used instead of
    round-to-nearest, each with the shift its bias Add loses (``dynamic_rounding``: MatMul [K, N], per column)."""
    per_channel = p.per_channel
    if not ensure_opset(graph, ctx, qo.DYNAMIC_OPSET, stats):
        raise PassError(f"dynamic quantization needs opset >= {qo.DYNAMIC_OPSET} (DynamicQuantizeLinear) and the "
                        "upgrade failed")
    ops = tuple(op for op in p.dynamic_ops if op in ("MatMul", "Gemm"))
    unsigned = u8s8.unsigned_weights(p.weight_type, stats)
    all_scopes, namer, nodes, skipped, uses = _scoped(p, graph, ops)
    _note_other_layers(all_scopes, ops, "dynamic mode quantizes MatMul/Gemm only")
    allowed = _allowed_readers(p, all_scopes, nodes)
    shared: dict[tuple, tuple[gs.Constant, gs.Constant, gs.Constant]] = {}
    two_pass_names, two_pass_done = set(p.two_pass), []
    row_names, row_done = set(p.row_ranges), []
    row_inputs: dict[int, row_ranges.RowInputs] = {}  # per scope: each input's row quantization, made once
    done: Counter = Counter()
    new_nodes: dict[int, list[gs.Node]] = {}
    for scope, n in nodes:
        got = matmul_weight(n)
        if got is None:
            _keep(scope, skipped, n, _no_weight_reason(n))
            continue
        has_c = n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name
        beta = float(n.attrs.get("beta", 1.0))
        if has_c and beta != 1.0 and const_value(n.inputs[2]) is None:
            _keep(scope, skipped, n, "Gemm with beta != 1 and a non-constant C")
            continue
        other = sg.foreign_reader(uses.get(n.inputs[1].name, []), allowed)
        if other:
            _keep(scope, skipped, n, f"its weight is also read by {other}: kept float (one copy)")
            continue
        w, alpha, trans = got
        key = (n.inputs[1].name, trans, alpha, per_channel)
        given = (rounded or {}).get(n.inputs[1].name) if (n.op == "MatMul" and per_channel) else None
        if given is not None:
            dynamic_rounding.shift_bias(n, given.shift, namer.taken)
        if key not in shared:
            qw = given.weight if given is not None else qm.quantize_weight(w, qm.INT8, 1 if per_channel else None)
            s_w = (np.asarray(qw.scale, np.float64) * alpha).astype(np.float32)
            wbase = n.inputs[1].name
            codes, zero_point = np.asarray(qw.q), np.asarray(qw.zero_point)
            if unsigned:
                codes, zero_point = u8s8.unsigned_codes(codes, zero_point)
            shared[key] = (
                gs.Constant(namer(f"{wbase}_quantized"), codes),
                gs.Constant(namer(f"{wbase}_zero_point"), zero_point),
                gs.Constant(namer(f"{wbase}_scale"), np.asarray(s_w)),
            )
        two = n.name in two_pass_names
        rows = None if two or not (p.activation_ranges == "row" or n.name in row_names) else \
            row_inputs.setdefault(id(scope), row_ranges.RowInputs(namer, int(graph.opset)))
        new_nodes.setdefault(id(scope), []).extend(_dynamic_chain(n, namer, shared[key], two, rows))
        done[n.op] += 1
        scope.done[f"{n.op} dynamic-int8" + (" two-pass" if two else " row ranges" if rows else "")] += 1
        (two_pass_done if two else row_done if rows else []).append(n.name)
    for scope_id, rows in row_inputs.items():
        new_nodes[scope_id].extend(rows.products())
    for option, names, made in (("two_pass", two_pass_names, two_pass_done), ("row_ranges", row_names, row_done)):
        if missing := sorted(names - set(made) - set(skipped)):  # a layer kept float says why in the stats
            raise PassError(f"quantize{{{option}=...}}: no dynamically quantized MatMul/Gemm named "
                            f"{', '.join(missing)} (names of MatMul/Gemm nodes with a constant weight; `onnxcompress "
                            "inspect` lists them)")
    if two_pass_done:
        stats["two_pass_layers"] = two_pass_done
    if row_done:
        stats["row_range_layers"] = len(row_done)
    _finish(p, graph, ctx, all_scopes, new_nodes, done, skipped, stats)
    return done


def _dynamic_chain(n: gs.Node, namer: Namer, weight: tuple[gs.Constant, gs.Constant, gs.Constant],
                   two: bool = False, rows: row_ranges.RowInputs | None = None) -> list[gs.Node]:
    """``n`` (MatMul/Gemm) as DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (+ beta·C), or with ``two`` as
    a two-pass chain (``two_pass``), or with ``rows`` its input in row ranges (``row_ranges``); ``n`` is emptied."""
    x = n.inputs[0]
    base = n.name or x.name
    y = n.outputs[0]
    has_c = n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name
    y_mm = gs.Variable(namer(f"{base}_matmul"), dtype=np.float32) if has_c else y
    if two:
        chain = two_pass.chain(x, weight, y_mm, base, namer)
    elif rows is not None:
        bias = bias_add(n)  # MatMul -> Add(b): the bias joins the row chain's last sum, the Add goes
        if bias is not None:
            add, slot = bias
            b, y_mm = add.inputs[slot], add.outputs[0]
            if not isinstance(b, gs.Constant):  # a Constant node's output (no cleanup before)
                b = gs.Constant(namer(f"{base}_bias"), const_value(b))
            add.inputs.clear()
            add.outputs.clear()
        rows.add(x, weight, y_mm, b if bias is not None else None, base)  # made with its input's other readers
        chain = []
    else:
        chain = two_pass.product(x, weight, y_mm, base, namer)[0]
    if has_c:
        c = n.inputs[2]
        beta = float(n.attrs.get("beta", 1.0))
        cv = const_value(c)
        if cv is not None and beta != 1.0:
            c = gs.Constant(namer(f"{base}_bias"), (cv.astype(np.float64) * beta).astype(np.float32))
        chain.append(gs.Node("Add", namer(f"{base}_bias_Add"), inputs=[y_mm, c], outputs=[y]))
    n.inputs.clear()
    n.outputs.clear()
    return chain


# --------------------------------------------------------------------------------------------- weight-only
def _weight_only_skip(p: QuantizeOptions, n: gs.Node, int4: bool) -> str | None:
    """Why ``n``'s weight cannot be stored weight-only (None: it can)."""
    if n.op in ("MatMul", "Gemm"):
        return None if matmul_weight(n) is not None else _no_weight_reason(n)
    if n.op in ("Conv", "ConvTranspose"):
        if sg.float_weight(n, 1) is None:
            return "no constant float weight"
        return "4-bit weights only for MatMul/Gemm" if int4 else None
    return "not a MatMul/Gemm/Conv"


def run_weight_only(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Weights of every scope (main graph and bodies) stored as integers; one DequantizeLinear per weight, in the
    innermost scope enclosing all its readers (``subgraphs``)."""
    stats: dict = {
        "mode": "weight_only",
        "weight_bits": p.weight_bits,
        "weight_bytes_before": weight_bytes(graph, ctx),
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
    ops = tuple(op for op in p.dynamic_ops if op != "Gather")
    all_scopes, namer, nodes, skipped, uses = _scoped(p, graph, ops)
    _note_other_layers(all_scopes, ops, "not in dynamic_ops")
    allowed = _allowed_readers(p, all_scopes, nodes)
    dq = sg.SharedDQ(uses)
    done: Counter = Counter()
    new_nodes: dict[int, list[gs.Node]] = {}
    for scope, n in nodes:
        why = _weight_only_skip(p, n, int4)
        if why is None:
            other = sg.foreign_reader(uses.get(n.inputs[1].name, []), allowed)
            why = f"its weight is also read by {other}: kept float (one copy)" if other else None
        if why is not None:
            if n.op in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                _keep(scope, skipped, n, why)
            continue
        w_t = n.inputs[1]
        w = np.asarray(w_t.values, np.float32)
        if int4 and p.weight_format == "matmulnbits":
            if n.op != "MatMul":
                _keep(scope, skipped, n, "MatMulNBits replaces MatMul only")
                continue
            new_nodes.setdefault(id(scope), []).append(_matmulnbits(n, w, p.block_size, namer))
            n.inputs.clear()
            n.outputs.clear()
        elif int4:
            # blocks run along the reduction axis K: MatMul/Gemm(transB=0) W [K, N] axis 0; Gemm transB W [N, K] axis 1
            axis = 1 if (n.op == "Gemm" and int(n.attrs.get("transB", 0))) else 0
            n.inputs[1] = dq.get((w_t.name, "int4", axis, p.block_size), lambda w=w, w_t=w_t, axis=axis: sg.dq_node(
                namer, w_t.name,
                *_blocked(w, axis, p.block_size),
                None, {"axis": axis, "block_size": int(p.block_size)}, int4=True), outermost=True)
        else:
            axis = weight_axis(n, w) if per_channel else None
            n.inputs[1] = dq.get((w_t.name, "int8", axis),
                                 lambda w=w, w_t=w_t, axis=axis: sg.int8_weight_dq(namer, w_t.name, w, axis),
                                 outermost=n.op == "MatMul")
        done[n.op] += 1
        scope.done[f"{n.op} weight-int{p.weight_bits}"] += 1
    dq.insert()
    _finish(p, graph, ctx, all_scopes, new_nodes, done, skipped, stats)
    return PassResult(bool(done) or "opset_upgrade" in stats, stats)


def _blocked(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    qw = qm.quantize_weight_blocked(w, qm.INT4, axis, block, symmetric=True, clip_search=True)
    return qw.q, qw.scale


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
        node, out = sg.int8_weight_dq(namer, n.inputs[1].name, w, weight_axis(n, w) if per_channel else None)
        n.inputs[1] = out
        new_nodes.append(node)
    if new_nodes:
        graph.nodes.extend(new_nodes)
        graph.toposort()
    return len(new_nodes)
