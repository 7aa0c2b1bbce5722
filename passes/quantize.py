"""``quantize``: 8-bit (and 4-bit weight-only) quantization as QDQ graphs that onnxruntime runs on integer kernels.

Modes:

* ``static`` — weights int8 symmetric per output channel (``per_channel=false``: per tensor), activations
  uint8/int8 (asymmetric by default) with ranges from calibration data (``ctx.calibration``, required); biases int32
  with ``s_b = s_x · s_w``. Q/DQ placement follows what ORT's CPU EP fuses (``_quant_placement``): integer regions
  around Conv/MatMul/Gemm grown through Add/Mul/Concat/pooling/data-movement ops, float kept for ops without integer
  kernels and for outputs, Concats that mix ranges stay float. The maths of Q/DQ is in ``_quant_math``.
* ``dynamic`` — MatMul/Gemm weights int8 per channel; activations quantized at run time
  (DynamicQuantizeLinear -> MatMulInteger, fused by ORT into DynamicQuantizeMatMul). No calibration needed.
* ``weight_only`` — weights stored as int8 per channel (opset 13) or int4 in blocks of ``block_size`` along the
  reduction axis (blocked DequantizeLinear, opset 21; ORT turns DQ(int4) -> MatMul into MatMulNBits), or directly as
  ``com.microsoft.MatMulNBits`` (``weight_format=matmulnbits``). Activations stay float.

Static pipeline: refuse already-quantized models -> opset upgrade if the format needs it (``_quant_opset``) ->
exact folds (``_quant_prepare``: per-channel affine into the Conv before it, constant offsets into the unpadded
Conv after it) -> optional cross-layer equalization -> dtypes (type inference, probe run) -> placement ->
streamed calibration in one pass over the feeds (``onnxcompress.analyses.calibration``: ranges, histograms, the
bias-correction means and the FP32 reference outputs together; minmax / percentile / entropy / mse, or auto: the
best of minmax, mse and percentile on the evaluation feeds) -> bias correction of the weight error -> automatic
float layers (leave-one-out: a layer whose float version alone lifts the SQNR of the last layers' input features
by ``auto_float_db`` stays float; ranked on patched copies of the int8 model, ``_quant_float_patch``, the shortlist
re-scored with real builds) -> Q/DQ insertion -> optional mixed precision to a user target (``min_cosine``,
``max_agreement_drop``) -> latency guard (a QDQ model slower than the float one under ORT is not returned: fall back
to keeping float the Convs whose integer kernel alone measured slower than their float Conv,
``_quant_layer_speed``, then to depthwise-float placement, else leave the graph float and say why). Embedding tables (large constant
``Gather`` data) are stored int8 per row in every mode.

Stats: nodes quantized per op type, layers kept float with the reason, calibration method and time, opset upgrade,
weight bytes before/after, the score on the calibration feeds, the measured latency ratio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.calibration import METHODS, choose_range, collect_statistics
from onnxcompress.context import PassContext
from onnxcompress.errors import PassError
from onnxcompress.pass_base import Pass, PassResult, register

from . import _quant_fidelity as fid
from . import _quant_math as qm
from . import _quant_opset as qo
from ._quant_float_patch import FloatPatcher
from ._quant_placement import PlacementOptions, plan_static
from ._quant_prepare import (
    fold_affine_into_conv,
    fold_offset_into_next_conv,
    name_unnamed_nodes,
    tensor_names,
)
from ._quant_qdq import WeightOptions, insert_qdq, resolve_params

log = logging.getLogger(__name__)

#: automatic float layers: leave-one-out is skipped above this many layers, and scored on this many feeds
AUTO_FLOAT_MAX_LAYERS = 256
AUTO_FLOAT_FEEDS = 4
#: ... ranked on patched models (``_quant_float_patch``); this many beyond the float-layer budget are re-scored with
#: real builds before choosing
AUTO_FLOAT_VERIFY = 3
#: feeds the patched ranking runs on (the re-scoring uses AUTO_FLOAT_FEEDS)
AUTO_FLOAT_RANK_FEEDS = 2
#: ... and only when the all-int8 model's last-layer features are noisier than this (SQNR, dB)
AUTO_FLOAT_BELOW_DB = 30.0

#: latency guard: a candidate measured below this ratio in a short run is accepted without the longer run
GUARD_QUICK_ACCEPT = 0.8
#: latency guard fallback: a Conv stays int8 only where its integer kernel alone measured below this ratio
LAYER_KEEP_INT8_BELOW = 0.9

#: range rules tried by calibration=auto, scored on this many evaluation feeds
AUTO_METHODS = ("minmax", "mse", "percentile")
AUTO_METHOD_FEEDS = 16

#: ops that mark a model as already quantized
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QLinearAdd",
        "QLinearMul",
        "QGemm",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "QAttention",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QEmbedLayerNormalization",
    }
)


def _weight_bytes(model: onnx.ModelProto) -> int:
    from onnxcompress import io

    return io.weight_bytes(model)


@register
@dataclass(frozen=True)
class Quantize(Pass):
    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = (
        "int8 QDQ quantization (static with calibration, dynamic, weight-only int8/int4) "
        "placed for ORT's integer kernels; calibration, bias correction, mixed precision"
    )
    exact: ClassVar[bool] = False
    option_help_legacy: ClassVar[dict[str, str]] = {
        "mode": "static (needs --calib) | dynamic (MatMul/Gemm, run-time activation ranges) | weight_only",
        "per_channel": "one weight scale per output channel (opset 13, upgraded automatically)",
        "activation_type": "integer type of activations in static mode",
        "symmetric_activations": "zero point fixed at 0 (int8) / 128 (uint8); Relu/Clip outputs stay one-sided",
        "calibration": "activation range rule: minmax | percentile | entropy (KL) | mse | auto (the best of "
        "minmax, mse, percentile on the evaluation feeds)",
        "percentile": "percentile kept by calibration=percentile",
        "calibration_samples": "calibration feeds used (0: all)",
        "weight_bits": "8, or 4 (weight_only only)",
        "block_size": "4-bit block length along the reduction axis (power of 2, >= 16)",
        "weight_format": "weight_only storage: qdq (DequantizeLinear) | matmulnbits (com.microsoft.MatMulNBits)",
        "exclude": "node names or op types kept float",
        "depthwise": "quantize depthwise Conv too",
        "min_cosine": "mixed precision: keep the most sensitive layers float until output cosine >= this",
        "max_agreement_drop": "mixed precision: ... until top-1 agreement drop <= this",
        "eval_samples": "calibration feeds used to score candidates (mixed precision, sensitivity)",
        "sensitivity": "per-layer sensitivity for mixed precision: leave_one_out (gain of keeping the layer float "
        "in the quantized model) | one_at_a_time (damage of quantizing the layer alone)",
        "bias_correction": "correct per-channel output mean shifts measured on calibration data",
        "equalize": "cross-layer equalization of Conv->Relu->Conv pairs before quantizing",
        "fold_affine": "fold constant per-channel Mul/Add/Sub/Div/BatchNorm into the Conv before them",
        "mixed_range_ratio": "a Concat whose inputs' ranges differ more than this stays float",
        "auto_float_db": "keep float a layer whose float version alone lifts the SQNR of the last layers' inputs by "
        "this many dB (leave-one-out; at most 5% of the layers; 0: off)",
        "latency_guard": "measure the result under ORT; never return a model slower than the float one",
        "already_quantized": "refuse | ignore (quantize only what is still float)",
        "dynamic_ops": "op types quantized by mode=dynamic / weight_only (Gather: embedding tables, all modes)",
    }

    mode: Literal["static", "dynamic", "weight_only"] = "static"
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    symmetric_activations: bool = False
    calibration: Literal["auto", "minmax", "percentile", "entropy", "mse"] = "auto"
    percentile: float = 99.999
    calibration_samples: int = 128
    weight_bits: int = 8
    block_size: int = 32
    weight_format: Literal["qdq", "matmulnbits"] = "qdq"
    exclude: tuple[str, ...] = ()
    depthwise: bool = True
    min_cosine: float | None = None
    max_agreement_drop: float | None = None
    eval_samples: int = 32
    sensitivity: Literal["leave_one_out", "one_at_a_time"] = "leave_one_out"
    bias_correction: bool = True
    equalize: bool = False
    fold_affine: bool = True
    mixed_range_ratio: float = 16.0
    auto_float_db: float = 1.0
    latency_guard: bool = True
    already_quantized: Literal["refuse", "ignore"] = "refuse"
    dynamic_ops: tuple[str, ...] = ("MatMul", "Gemm", "Gather")

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic", "weight_only"):
            raise ValueError(f"mode must be static, dynamic or weight_only, got {self.mode!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type must be uint8 or int8, got {self.activation_type!r}")
        if self.calibration not in ("auto", *METHODS):
            raise ValueError(f"calibration must be auto or one of {METHODS}, got {self.calibration!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 8 or 4, got {self.weight_bits}")
        if self.weight_bits == 4 and self.mode != "weight_only":
            raise ValueError("weight_bits=4 is only supported with mode=weight_only")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.weight_format not in ("qdq", "matmulnbits"):
            raise ValueError(f"weight_format must be qdq or matmulnbits, got {self.weight_format!r}")
        if self.weight_format == "matmulnbits" and self.mode != "weight_only":
            raise ValueError("weight_format=matmulnbits needs mode=weight_only")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.max_agreement_drop is not None and not 0.0 <= self.max_agreement_drop < 1.0:
            raise ValueError(f"max_agreement_drop must be in [0, 1), got {self.max_agreement_drop}")
        if self.calibration_samples < 0 or self.eval_samples < 1:
            raise ValueError("calibration_samples must be >= 0 and eval_samples >= 1")
        if self.auto_float_db < 0:
            raise ValueError(f"auto_float_db must be >= 0, got {self.auto_float_db}")
        if self.mixed_range_ratio <= 1.0:
            raise ValueError(f"mixed_range_ratio must be > 1, got {self.mixed_range_ratio}")
        if self.sensitivity not in ("leave_one_out", "one_at_a_time"):
            raise ValueError(f"sensitivity must be leave_one_out or one_at_a_time, got {self.sensitivity!r}")
        if self.already_quantized not in ("refuse", "ignore"):
            raise ValueError(f"already_quantized must be refuse or ignore, got {self.already_quantized!r}")
        if isinstance(self.exclude, str) or isinstance(self.dynamic_ops, str):
            raise ValueError("exclude and dynamic_ops must be lists of names")

    # ------------------------------------------------------------------------------------------ contract
    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        found = sorted(
            {
                n.op
                for g in [graph, *graph.subgraphs(recursive=True)]
                for n in g.nodes
                if n.op in QUANTIZED_OPS
            }
        )
        if found and self.already_quantized == "refuse":
            raise PassError(
                f"the model is already quantized (it has {', '.join(found)}); quantizing it again would stack "
                "errors. Quantize the float original instead, or pass already_quantized=ignore to quantize only "
                "the parts that are still float"
            )
        if self.mode == "static" and ctx.calibration is None:
            raise PassError(
                "quantize{mode=static} needs calibration data (--calib FILE.npz or a folder of "
                "feeds); use mode=dynamic or mode=weight_only to quantize without data"
            )

    # ----------------------------------------------------------------------------------------------- run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.mode == "static":
            return _StaticRun(self, graph, ctx).run()
        from ._quant_dynamic import run_dynamic, run_weight_only

        if self.mode == "dynamic":
            return run_dynamic(self, graph, ctx)
        return run_weight_only(self, graph, ctx)

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        for n in graph.nodes:
            if n.op in ("QuantizeLinear", "DequantizeLinear") and len(n.inputs) > 1:
                s = n.inputs[1]
                if isinstance(s, gs.Constant) and not np.all(np.asarray(s.values) > 0):
                    raise PassError(f"{n.name}: non-positive quantization scale")


def ensure_opset(graph: gs.Graph, ctx: PassContext, needed: int, stats: dict) -> bool:
    """Upgrade the default-domain opset to ``needed`` if lower; True on success (stats record it)."""
    have = qo.graph_opset(graph) or ctx.opset()
    if have >= needed:
        return True
    try:
        qo.upgrade_graph(graph, ctx.export(graph), needed)
    except Exception as exc:  # version_converter covers most but not all ops
        log.warning("opset upgrade %d -> %d failed: %s", have, needed, exc)
        stats["opset_upgrade_failed"] = f"{have} -> {needed}: {str(exc).splitlines()[0][:200]}"
        return False
    stats["opset_upgrade"] = f"{have} -> {needed}"
    return True


# ------------------------------------------------------------------------------------------------- static
class _StaticRun:
    def __init__(self, p: Quantize, graph: gs.Graph, ctx: PassContext):
        self.p, self.graph, self.ctx = p, graph, ctx
        self.qt = qm.qtype(p.activation_type)
        self.stats: dict = {"mode": "static"}
        self.per_channel = p.per_channel

    # --------------------------------------------------------------------------------------- helpers
    def _feeds(self, n: int):
        feeds = self.ctx.calibration
        return feeds.take(n) if n and n < len(feeds) else feeds

    def _placement_options(self, float_nodes=(), reasons=()) -> PlacementOptions:
        return PlacementOptions(
            exclude=tuple(self.p.exclude),
            depthwise=self.depthwise,
            mixed_range_ratio=self.p.mixed_range_ratio,
            float_nodes=frozenset(float_nodes),
            float_reasons=tuple(reasons),
        )

    def _build(self, float_nodes=(), reasons=()) -> tuple[gs.Graph, object, dict]:
        """A quantized copy of the prepared float graph (layers in ``float_nodes`` and the automatically chosen
        float layers stay float)."""
        if self.auto_float:
            float_nodes = list(dict.fromkeys([*float_nodes, *self.auto_float]))
            reasons = tuple(self.auto_float.items()) + tuple(reasons)
        g = self.base.copy()
        g.toposort()
        plan = plan_static(g, self.dtypes, self._placement_options(float_nodes, reasons), self.minmax)
        for n in plan.anchors:  # bias correction applies to the layers that are quantized
            if id(n) in plan.int8 and n.name in self.bias_shift:
                fid.add_to_bias(n, self.bias_shift[n.name], self.names)
        missing = [n for n in plan.tensors if n not in self.ranges]
        if missing:
            self._calibrate(missing)
        q, dq, rep = resolve_params(plan, self.ranges, self.qt, self.p.symmetric_activations)
        counters = insert_qdq(
            g, plan, q, dq, rep, self.qt, WeightOptions(per_channel=self.per_channel, qtype=qm.INT8)
        )
        return g, plan, counters

    def _export(self, g: gs.Graph) -> onnx.ModelProto:
        return self.ctx.export(g)

    def _calibrate(self, names: list[str], channel_sums: dict[str, int] | None = None, **capture) -> None:
        """Ranges of ``names`` (and the per-channel means of ``channel_sums``) in one pass over the feeds;
        ``capture``: ``fetch`` / ``on_feed`` of ``collect_statistics``."""
        t0 = time.perf_counter()
        need_hist = self.p.calibration != "minmax"  # auto needs them too
        st = collect_statistics(
            self.float_model,
            names,
            self._feeds(self.p.calibration_samples),
            histograms=need_hist,
            channel_sums=channel_sums or {},
            **capture,
        )
        self.tstats.update(st)
        for n, s in st.items():
            self.minmax[n] = (min(s.min, 0.0), max(s.max, 0.0)) if np.isfinite(s.min) else (0.0, 0.0)
            self.ranges[n] = self._range(s, self.method)
        self.calib_seconds += time.perf_counter() - t0

    def _calibrate_with_reference(self, names, channel_sums, eval_feeds) -> fid.Reference:
        """The first calibration pass; it also keeps the float model's outputs and last-layer features on the
        evaluation feeds (the first ``eval_samples`` calibration feeds): the reference every candidate is scored
        against, without running the float model on them again."""
        features = fid.feature_nodes(self.base)
        feature_tensors = fid.feature_tensor_names(self.float_model, features)
        out_names = [o.name for o in self.float_model.graph.output]
        outputs: list[list[np.ndarray]] = []
        feats: list[list[np.ndarray]] = []

        def keep(i: int, acts: dict[str, np.ndarray]) -> None:
            if i < len(eval_feeds):
                outputs.append([np.asarray(acts[n]) for n in out_names])
                feats.append([np.asarray(acts[n]) for n in feature_tensors])

        self._calibrate(names, channel_sums, fetch=[*out_names, *feature_tensors], on_feed=keep)
        if len(outputs) != len(eval_feeds):  # feeds that are not a prefix of the calibration feeds: run them
            return fid.reference(self.float_model, eval_feeds, features)
        return fid.Reference(eval_feeds, outputs, out_names, features, feats)

    def _range(self, s, method: str) -> tuple[float, float]:
        if not np.isfinite(s.min):
            return 0.0, 0.0
        levels = self.qt.qmax - self.qt.qmin + 1
        return choose_range(
            s, method, levels=levels, symmetric=self.p.symmetric_activations, percentile=self.p.percentile
        )

    def _choose_method(self, ref, eval_feeds) -> None:
        """calibration=auto: score minmax, mse and percentile ranges on the first ``AUTO_METHOD_FEEDS`` evaluation
        feeds, keep the best."""
        results, built = {}, {}
        sub = ref.head(AUTO_METHOD_FEEDS)
        for method in AUTO_METHODS:
            self.method = method
            self.ranges = {n: self._range(s, method) for n, s in self.tstats.items()}
            g, plan, _ = self._build()
            built[method] = (plan, self._export(g))
            results[method] = fid.score(sub, fid.run_model(built[method][1], sub.feeds, ref.feature_nodes))
        best = min(results, key=lambda m: fid.rank_key(results[m]))
        self._all_int8 = (best, *built[best])  # the float-layer search starts from it
        self.method = best
        self.ranges = {n: self._range(s, best) for n, s in self.tstats.items()}
        self.stats["calibration_auto"] = {
            m: {k: round(v, 5) for k, v in r.items()} for m, r in results.items()
        }

    def _probe_dtypes(self, chunk: int = 256) -> dict[str, np.dtype]:
        """Element type of every main-graph tensor: ONNX type inference from the inputs (declared value_info is
        dropped first), then one real feed through ORT for whatever inference could not type (custom ops ...),
        ``chunk`` tensors per session so memory stays bounded."""
        from onnxcompress.analyses.activations import expose_outputs
        from onnxcompress.runtime import Session

        dtypes: dict[str, np.dtype] = {}
        for t in self.base.tensors().values():
            if isinstance(t, gs.Constant):
                dtypes[t.name] = np.asarray(t.values).dtype
        try:
            m = onnx.ModelProto()
            m.CopyFrom(self.float_model)
            del m.graph.value_info[:]
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
            for vi in (
                list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
            ):
                et = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
                if et:
                    dtypes.setdefault(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)))
        except Exception as exc:  # inference is best effort; the probe below covers the rest
            log.debug("type inference failed: %s", exc)
        names = [
            t.name
            for t in self.base.tensors().values()
            if isinstance(t, gs.Variable) and t.name and t.name not in dtypes
        ]
        feed = self.ctx.calibration.first()
        for i in range(0, len(names), chunk):
            part = names[i : i + chunk]
            with Session(expose_outputs(self.float_model, part), optimize=False, what="probe model") as s:
                for n, a in zip(part, s.run(feed, part), strict=True):
                    dtypes[n] = np.asarray(a).dtype
        return dtypes

    # --------------------------------------------------------------------------------------------- main
    def run(self) -> PassResult:
        p, graph, ctx, stats = self.p, self.graph, self.ctx, self.stats
        t_start = time.perf_counter()
        self.calib_seconds = 0.0
        original_model = ctx.export(graph)
        stats["weight_bytes_before"] = _weight_bytes(original_model)
        if self.per_channel and not ensure_opset(graph, ctx, qo.PER_CHANNEL_OPSET, stats):
            self.per_channel = False
            stats["per_channel"] = "off: the opset upgrade to 13 failed"
            if not ensure_opset(graph, ctx, qo.PER_TENSOR_OPSET, stats):
                raise PassError("cannot upgrade the model to opset 10 (QuantizeLinear/DequantizeLinear)")
        names = tensor_names(graph)
        self.names = names
        prepared = name_unnamed_nodes(graph, names) > 0
        if p.fold_affine:
            k = fold_affine_into_conv(graph, names)
            if k:
                stats["affine_folded_into_conv"] = k
                prepared = True
            k = fold_offset_into_next_conv(graph, names)
            if k:
                stats["offset_folded_into_next_conv"] = k
                prepared = True
        if p.equalize:
            k = fid.equalize(graph, names)
            stats["cle_pairs"] = k
            prepared = prepared or bool(k)
        graph.toposort()
        self.base = graph.copy()
        self.float_model = ctx.export(self.base)
        self.dtypes = self._probe_dtypes()
        self.ranges: dict[str, tuple[float, float]] = {}
        self.minmax: dict[str, tuple[float, float]] = {}
        self.tstats: dict = {}
        self.bias_shift: dict[str, np.ndarray] = {}
        self.auto_float: dict[str, str] = {}
        self.method = "minmax" if p.calibration == "auto" else p.calibration
        self.depthwise = p.depthwise

        # calibrate everything the full placement needs (ranges of later, smaller placements are subsets)
        plan0 = plan_static(self.base.copy().toposort(), self.dtypes, self._placement_options())
        if not plan0.int8:
            stats["layers_kept_float"] = dict(plan0.kept_float)
            stats["skipped"] = "nothing to quantize: no Conv/MatMul/Gemm with a constant float weight"
            stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
            return PassResult(prepared or "opset_upgrade" in stats, stats)
        bc_anchors = self._bias_anchors() if p.bias_correction else {}
        bc_axes = {n.inputs[0].name: (1 if n.op == "Conv" else -1) for n in bc_anchors.values()}
        eval_feeds = list(self._feeds(p.eval_samples))
        ref = self._calibrate_with_reference(list(plan0.tensors), bc_axes, eval_feeds)

        if bc_anchors:
            self._bias_correction(bc_anchors)
        if p.calibration == "auto":
            self._choose_method(ref, eval_feeds)

        if p.auto_float_db > 0:
            self._auto_float(ref, eval_feeds)

        g, plan, counters = self._build()
        cand = self._export(g)
        sc = fid.score(ref, fid.run_model(cand, eval_feeds, ref.feature_nodes))
        float_layers: dict[str, str] = dict(self.auto_float)
        if p.min_cosine is not None or p.max_agreement_drop is not None:
            g, plan, counters, sc, float_layers = self._mixed_precision(
                ref, eval_feeds, g, plan, counters, sc
            )

        if p.latency_guard:
            outcome = self._latency_guard(g, plan, counters, sc, float_layers, ref, eval_feeds)
            if outcome is None:
                stats["seconds_calibration"] = round(self.calib_seconds, 3)
                stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
                return PassResult(prepared or "opset_upgrade" in stats, stats)
            g, plan, counters, sc = outcome

        qo.transplant(graph, g)
        from ._quant_dynamic import quantize_float_op_weights

        k = quantize_float_op_weights(graph, ("ConvTranspose",), self.per_channel, tuple(p.exclude))
        if k:
            stats["weights_only_float_ops"] = k
        if "Gather" in p.dynamic_ops:
            from ._quant_dynamic import quantize_gathers

            k = quantize_gathers(graph, tuple(p.exclude))
            if k:
                stats["embedding_tables_quantized"] = k
        final = ctx.export(graph)
        stats.update(counters)
        stats["nodes_quantized"] = dict(sorted(plan.int8_ops().items()))
        kept = dict(plan.kept_float)
        kept.update(float_layers)
        stats["layers_kept_float"] = kept
        stats["calibration"] = self.method
        stats["calibrated_tensors"] = len(self.ranges)
        stats["score_on_calibration"] = {k: round(v, 6) for k, v in sc.items()}
        stats["weight_bytes_after"] = _weight_bytes(final)
        stats["seconds_calibration"] = round(self.calib_seconds, 3)
        stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
        return PassResult(True, stats)

    # ------------------------------------------------------------------------------------ fidelity steps
    def _bias_anchors(self) -> dict[str, gs.Node]:
        """Layers whose bias absorbs the weight error: Conv/Gemm with a constant weight and a float input."""
        anchors = {}
        for n in self.base.nodes:
            if n.op in ("Conv", "Gemm") and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant):
                x = n.inputs[0]
                if self.dtypes.get(x.name) == np.float32:
                    anchors[n.name] = n
        return anchors

    def _bias_correction(self, anchors: dict[str, gs.Node]) -> None:
        """Bias correction of the weight error: ``b' = b − (Ŵ − W)·E[x]`` per output channel, ``E[x]`` the
        per-channel mean of the layer's input on the calibration feeds (``_quant_fidelity.weight_error_shift``),
        collected in the calibration pass itself."""
        means = {n: st.channel_mean for n, st in self.tstats.items() if st.channel_mean is not None}
        fixed = 0
        for n in anchors.values():
            m = means.get(n.inputs[0].name)
            if m is None:
                continue
            shift = fid.weight_error_shift(n, m, self.per_channel)
            if shift is None or not np.any(shift):
                continue
            self.bias_shift[n.name] = -shift
            fixed += 1
        self.stats["bias_corrected_layers"] = fixed

    def _auto_float(self, ref, eval_feeds) -> None:
        """Keep float the few layers that, alone, add a large share of the noise: leave-one-out on the SQNR of the
        last layers' input features; a layer whose float version lifts it by ``auto_float_db`` dB or more (1 dB:
        the layer contributes ~20% of all the quantization noise there) stays float. At most 5% of the layers,
        and only when those features are noisy at all (SQNR below ``AUTO_FLOAT_BELOW_DB``).
        Layers are left out one at a time: the effects are not additive (on PP-OCR's recognizer, keeping one early
        depthwise Conv float *lowers* the features' SQNR while keeping a later one float lifts it by 2 dB), so
        testing groups of layers misses the layers that matter. Each layer is ranked on a patched copy of the
        all-int8 model (``_quant_float_patch``: no rebuild), and only the best ``limit + AUTO_FLOAT_VERIFY`` are
        re-scored with real builds, which decide."""
        p = self.p
        cached = getattr(self, "_all_int8", None)
        if cached is not None and cached[0] == self.method and not self.auto_float:
            plan, model = cached[1], cached[2]
        else:
            g, plan, _ = self._build()
            model = self._export(g)
        layers = plan.int8_anchor_names()
        if not ref.feature_nodes or not layers or len(layers) > AUTO_FLOAT_MAX_LAYERS:
            return
        feeds = eval_feeds[: min(len(eval_feeds), AUTO_FLOAT_FEEDS)]
        ref_features = ref.features[: len(feeds)]
        base = fid.feature_sqnr_db(ref_features, fid.run_features(model, feeds, ref.feature_nodes))
        if base is None or not np.isfinite(base) or base >= AUTO_FLOAT_BELOW_DB:
            return  # already accurate: nothing worth a float layer
        t0 = time.perf_counter()

        def sqnr_gain(m: onnx.ModelProto) -> float:
            s_ = fid.feature_sqnr_db(ref_features, fid.run_features(m, feeds, ref.feature_nodes))
            return (base if s_ is None else s_) - base

        def gain(names: list[str]) -> float:  # a real build with these layers float
            return sqnr_gain(self._export(self._build(names)[0]))

        # rank every layer on the patched all-int8 model (cheap), then score the best few with real builds
        patcher = FloatPatcher(model, self.base)
        rank_feeds = feeds[:AUTO_FLOAT_RANK_FEEDS]
        rank_base = fid.feature_sqnr_db(
            ref_features[: len(rank_feeds)], fid.run_features(model, rank_feeds, ref.feature_nodes)
        )
        approx: dict[str, float] = {}
        for name in layers:
            if not patcher.can_patch(name):
                approx[name] = gain([name])
                continue
            with patcher.float_layer(name) as m:
                s_ = fid.feature_sqnr_db(
                    ref_features[: len(rank_feeds)], fid.run_features(m, rank_feeds, ref.feature_nodes)
                )
            approx[name] = (rank_base if s_ is None else s_) - rank_base
        limit = max(1, len(layers) // 20)
        shortlist = sorted(approx, key=lambda n: -approx[n])[: limit + AUTO_FLOAT_VERIFY]
        gains = {n: gain([n]) for n in shortlist}
        evaluations = len(layers) + len(shortlist)
        ranked = sorted(gains, key=lambda n: -gains[n])
        chosen = [n for n in ranked[:limit] if gains[n] >= p.auto_float_db]
        for n in chosen:
            self.auto_float[n] = (
                f"kept float automatically: alone it adds {gains[n]:.1f} dB of noise to the "
                f"features of the last layers (all-int8: {base:.1f} dB SQNR)"
            )
        self.stats["auto_float"] = {
            "feature_sqnr_db_all_int8": round(base, 2),
            "top_gains_db": {n: round(gains[n], 2) for n in ranked[:5]},
            "ranking_gains_db": {n: round(approx[n], 2) for n in shortlist},
            "kept_float": chosen,
            "evaluations": evaluations,
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def _mixed_precision(self, ref, eval_feeds, g, plan, counters, sc):
        p = self.p
        float_layers: dict[str, str] = {}
        self.stats["score_all_int8"] = {k: round(v, 6) for k, v in sc.items()}
        if fid.meets(sc, p.min_cosine, p.max_agreement_drop):
            return g, plan, counters, sc, float_layers
        layers = plan.int8_anchor_names()
        all_anchor_names = [n.name for n in plan.anchors]

        def evaluate(float_names: list[str]) -> dict[str, float]:
            gg, _, _ = self._build(float_names)
            return fid.score(ref, fid.run_model(self._export(gg), eval_feeds, ref.feature_nodes))

        t0 = time.perf_counter()
        if p.sensitivity == "leave_one_out":
            # the gain of keeping each layer float while every other layer is quantized
            sens = fid.sensitivity(layers, lambda name: evaluate([name]), self.ctx.progress)
            order = sorted(layers, key=lambda n: fid.rank_key(sens[n]))
            how = "float alone it lifts the score to"
        else:
            # the damage of quantizing each layer alone
            sens = fid.sensitivity(
                layers, lambda name: evaluate([x for x in all_anchor_names if x != name]), self.ctx.progress
            )
            order = sorted(layers, key=lambda n: fid.rank_key(sens[n]), reverse=True)
            how = "quantized alone the score drops to"

        self.stats["sensitivity_top"] = [
            {"layer": n, **{k: round(v, 5) for k, v in sens[n].items()}} for n in order[:10]
        ]
        k, best, evals = fid.search_float_set(order, evaluate, p.min_cosine, p.max_agreement_drop, sc)
        chosen = order[:k]
        for rank, n in enumerate(chosen, 1):
            s_ = sens[n]
            parts = [f"cosine {s_['cosine']:.5f}", f"SQNR {s_['sqnr_db']:.1f} dB"]
            if "agreement" in s_:
                parts.append(f"agreement {s_['agreement']:.4f}")
            float_layers[n] = (
                f"mixed precision: sensitivity rank {rank} of {len(layers)} ({how} " + ", ".join(parts) + ")"
            )
        reasons = tuple(float_layers.items())
        g, plan, counters = self._build(chosen, reasons)
        met = fid.meets(best, p.min_cosine, p.max_agreement_drop)
        self.stats["mixed_precision"] = {
            "target": {"min_cosine": p.min_cosine, "max_agreement_drop": p.max_agreement_drop},
            "met": met,
            "layers_float": len(chosen),
            "layers_total": len(layers),
            "evaluations": evals + len(layers),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if not met:
            log.warning("mixed precision: target not met even with %d layers float", len(chosen))
        return g, plan, counters, best, float_layers

    def _latency_ratio(self, cand: onnx.ModelProto, feed) -> float:
        """int8 / float latency (1 thread, interleaved medians): a short run settles clear wins, anything near 1
        is measured again, longer."""
        from onnxcompress.latency import measure_latency

        models = {"float": self.float_model, "int8": cand}
        lat = measure_latency(models, feed, threads=1, budget_s=0.6)
        ratio = lat["int8"] / lat["float"]
        if ratio >= GUARD_QUICK_ACCEPT:
            lat = measure_latency(models, feed, threads=1, budget_s=2.0)
            ratio = lat["int8"] / lat["float"]
        return ratio

    def _input_shapes(self, names: list[str], feed) -> dict[str, tuple[int, ...]]:
        from onnxcompress.analyses.activations import expose_outputs
        from onnxcompress.runtime import Session

        names = list(dict.fromkeys(names))
        with Session(expose_outputs(self.float_model, names), optimize=False, what="shape probe") as s:
            return {n: tuple(np.shape(a)) for n, a in zip(names, s.run(feed, names), strict=True)}

    def _latency_guard(self, g, plan, counters, sc, float_layers, ref, eval_feeds):
        """Never return a QDQ model slower than the float one. Fallbacks, each measured on the whole model:
        (1) the Convs whose integer kernel is slower than their float Conv, measured layer by layer
        (``_quant_layer_speed``), stay float; (2) every depthwise Conv stays float; else the graph stays float."""
        from ._quant_layer_speed import int8_speed_ratios

        feed = eval_feeds[0]
        ratio = self._latency_ratio(self._export(g), feed)
        self.stats["latency_ratio_measured"] = round(ratio, 3)
        if ratio < 1.0:
            return g, plan, counters, sc
        base_nodes = {n.name: n for n in self.base.nodes if n.name}  # float weights, float input names
        convs = [
            base_nodes[n.name]
            for n in plan.anchors
            if id(n) in plan.int8 and n.op == "Conv" and n.name in base_nodes
        ]
        if convs:
            shapes = self._input_shapes([n.inputs[0].name for n in convs], feed)
            speed = int8_speed_ratios(convs, shapes)
            slow = {n: r for n, r in speed.items() if r >= LAYER_KEEP_INT8_BELOW}
            self.stats["latency_layer_ratios"] = {n: round(r, 2) for n, r in sorted(speed.items())}
            if slow and len(slow) < len(convs):
                reasons = dict(float_layers)
                for n, r in slow.items():
                    reasons[n] = f"kept float for speed: ORT's int8 kernel measured {r:.2f}x its float Conv"
                g2, plan2, counters2 = self._build(list(reasons), tuple(reasons.items()))
                cand2 = self._export(g2)
                ratio2 = self._latency_ratio(cand2, feed)
                self.stats["latency_ratio_slow_layers_float"] = round(ratio2, 3)
                if ratio2 < 1.0:
                    float_layers.update(reasons)
                    sc2 = fid.score(ref, fid.run_model(cand2, eval_feeds, ref.feature_nodes))
                    return g2, plan2, counters2, sc2
        if self.depthwise and any(n.op == "Conv" for n in plan.anchors):
            self.depthwise = False
            g2, plan2, counters2 = self._build(list(float_layers), tuple(float_layers.items()))
            cand2 = self._export(g2)
            ratio2 = self._latency_ratio(cand2, feed)
            self.stats["latency_ratio_depthwise_float"] = round(ratio2, 3)
            if ratio2 < 1.0:
                sc2 = fid.score(ref, fid.run_model(cand2, eval_feeds, ref.feature_nodes))
                return g2, plan2, counters2, sc2
        self.stats["skipped"] = (
            f"the quantized model was slower than the float one under ORT (latency ratio "
            f"{ratio:.2f}); graph left float"
        )
        log.warning("quantize: %s", self.stats["skipped"])
        return None


__all__ = ["Quantize", "QUANTIZED_OPS"]
