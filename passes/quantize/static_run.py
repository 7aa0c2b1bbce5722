"""``quantize{mode=static}``: the stages of one static int8 quantization, in order, and the state they share.

1. **Prepare** (exact): opset upgrade for per-channel Q/DQ (13; per tensor at 10 if that fails, ``opset_upgrade``),
   a name for every node, affine and offset folds into Convs (``prepare``), optional cross-layer equalization
   (``equalization``), linear-stream equalization (``stream_equalization``), activation smoothing of MatMul inputs with outlier channels (``smoothing``). The result is copied once: the float graph every build starts from (``StaticRun.base``) and
   its export (``float_model``); ``tensor_types`` gives each tensor's element type.
2. **Placement** of the full integer domain (``placement``), whose tensors are all calibrated at once; later, smaller
   placements need subsets of those ranges.
3. **Calibration** (``calibrate``): one streamed pass over the feeds for ranges, histograms, the bias-correction
   means and the float reference outputs together; **bias correction** of the weight error (``bias_correction``).
4. **Range choice** (``range_choice``): the rule's ranges, or for ``calibration=auto`` the best of minmax, mse and
   percentile on the evaluation feeds. **Weight rounding** (``rounding``): per-layer scales and rounding chosen
   against each layer's output on the all-int8 model's inputs (``weight_rounding``; ``auto`` keeps it only when the
   outputs improve).
5. **Float-layer search** (``float_layer_search``); ``weight_rounding=refit`` (``refit``) then refits the int8
   layers with that float set in place; ``empirical_bias`` (``empirical_bias``) matches their output means to the
   float layers', stage by depth; the **build** of the Q/DQ graph (``StaticRun.build``: placement, bias
   shifts, Q/DQ parameters and insertion, ``qdq_insert``) and its score (``fidelity``).
6. **Mixed precision** to a user target (``mixed_precision``), **latency guard** (``latency_guard``). A graph
   that stays float (the guard rejects every candidate, or no layer can be quantized) is returned as it came in:
   stage 1's rewrites serve the int8 graph only (smoothing adds a Mul per input and unshares the weights it
   scales: a float transformer's file grew 1.8x with nothing quantized), so they are undone with it.
7. The chosen build replaces the pass's graph; ConvTranspose weights and embedding tables are stored int8 too
   (``dynamic``).

Every build is a fresh copy of ``base``; the set of taken names (``StaticRun.names``) persists across builds, so a
name minted by an earlier build (a corrected bias ``<b>_bc``) gets a suffix in a later one: the output depends on
the sequence of builds, which is deterministic.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import io
from onnxcompress.data import FeedSet
from onnxcompress.errors import PassError
from onnxcompress.naming import graph_names
from onnxcompress.pass_base import PassResult

from . import fidelity as fid
from . import opset_upgrade as qo
from . import qparams_math as qm
from . import subgraphs as sg
from . import u8s8_saturation as u8s8
from .bias_correction import add_to_bias, bias_anchors, channel_axes, correct_biases
from .calibrate import calibrate, calibrate_with_reference
from .depthwise_equalization import equalize_depthwise
from .dynamic import quantize_float_op_weights, quantize_gathers
from .empirical_bias import empirical_bias_stage, scale_output_channels
from .equalization import equalize
from .error_sources import explain
from .float_layer_search import search_float_layers
from .latency_guard import latency_guard
from .mixed_precision import mixed_precision
from .opset_upgrade import ensure_opset
from .ort_int8_kernels import WEIGHT_ONLY_FLOAT_OPS
from .placement import PlacementOptions, Plan, plan_static
from .prepare import fold_affine_into_conv, fold_offset_into_next_conv, name_unnamed_nodes
from .qdq_insert import WeightOptions, insert_qdq, resolve_params
from .range_choice import choose_method
from .refit import refit_stage
from .rounding import optimise_rounding
from .run_view import Built
from .smoothing import candidates, smooth, tensor_ranks
from .smoothing_choice import choose_smoothing
from .stream_equalization import equalize_streams
from .tensor_types import probe_dtypes

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.analyses.calibration import TensorStats
    from onnxcompress.context import PassContext

    from .options import QuantizeOptions


def run_static(p: QuantizeOptions, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """``quantize{mode=static}`` on ``graph`` (modified in place); ``smooth=auto`` on a graph with smoothing
    candidates: the better of the two quantizations, with and without smoothing (``smoothing_choice``)."""
    if p.smooth == "auto" and candidates(graph, tensor_ranks(ctx.export(graph))):
        return choose_smoothing(StaticRun, p, graph, ctx)
    return StaticRun(p, graph, ctx).run()


class StaticRun:
    """One static quantization of one graph: the prepared float graph and what the stages learn about it."""

    def __init__(self, p: QuantizeOptions, graph: gs.Graph, ctx: PassContext):
        self.p, self.graph, self.ctx = p, graph, ctx
        self.qt = qm.qtype(p.activation_type)
        self.stats: dict = {"mode": "static"}
        #: weight codes stored uint8 in every build (``u8s8_saturation``: where ORT clamps uint8 x int8 products;
        #: weight_type=auto measures it in ``setup``)
        self.unsigned = p.weight_type == "uint8"
        if p.weight_type != "auto":
            self.stats["weight_type"] = p.weight_type
        #: weight_type=auto: the measured choice, shared by the runs of one pass (smoothing trials)
        self.weight_type_choice: dict = {}
        self.per_channel = p.per_channel
        self.depthwise = p.depthwise
        #: the range rule the ranges are computed with (calibration=auto: the one being tried, then the best)
        self.method = "minmax" if p.calibration == "auto" else p.calibration
        self.calib_seconds = 0.0
        #: set by ``prepare``: names taken in the graph, the float graph builds start from, its export, dtypes
        self.names: set[str] = set()
        self.base: gs.Graph
        self.float_model: onnx.ModelProto
        self.dtypes: dict[str, np.dtype] = {}
        #: calibration: statistics, (min(0), max(0)) and quantization range per tensor
        self.tstats: dict[str, TensorStats] = {}
        self.minmax: dict[str, tuple[float, float]] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        #: tensors quantized over their whole calibrated range whatever the range rule (``depthwise_equalization``)
        self.full_range: set[str] = set()
        #: bias correction: anchor name -> shift added to its bias when it is quantized
        self.bias_shift: dict[str, np.ndarray] = {}
        #: empirical gain: anchor name -> per-output-channel factor folded into its weight and bias (before the shift)
        self.channel_gain: dict[str, np.ndarray] = {}
        #: float-layer search: anchor name -> reason; every build keeps these float
        self.auto_float: dict[str, str] = {}
        #: anchor name -> what the float-layer search measured for it (``float_cost`` record)
        self.float_details: dict[str, dict] = {}
        #: optimised rounding: anchor name -> integer weights every build uses for that layer (``rounding``)
        self.rounded: dict[str, qm.QuantizedWeight] = {}
        #: set by ``setup``: whether preparing changed the graph
        self.prepared = False
        #: the graph as the pass received it (``prepare``'s first act); restored when it stays float
        self.untouched: gs.Graph | None = None
        #: calibration=auto: (method, plan, exported model) of the best all-int8 build, reused by the search
        self.all_int8: tuple[str, Plan, onnx.ModelProto] | None = None
        #: prepare smooths every smoothing candidate (``smooth=all``; ``smooth=auto``: the measured choice's run)
        self.smooth_all = p.smooth in ("all", "per_input")
        #: ... with this strength (``smooth_alpha``; ``smooth=auto``: one of ``smooth_alphas`` per run; None: one
        #: per input, ``smoothing_strength``)
        self.smooth_alpha: float | None = None if p.smooth == "per_input" else p.smooth_alpha
        #: ``smooth=auto``: the channel RMS its trials share (``smoothing.smooth``); None: measured by this run
        self.smooth_rms: dict | None = None

    # ----------------------------------------------------------------------------------------- shared helpers
    def feeds(self, n: int) -> FeedSet:
        """The first ``n`` calibration feeds (all of them for 0)."""
        feeds = self.ctx.calibration
        return feeds.take(n) if n and n < len(feeds) else feeds

    def placement_options(self, float_nodes=(), reasons=()) -> PlacementOptions:
        return PlacementOptions(
            exclude=tuple(self.p.exclude),
            depthwise=self.depthwise,
            mixed_range_ratio=self.p.mixed_range_ratio,
            binary_join=self.p.binary_join,
            float_nodes=frozenset(float_nodes),
            float_reasons=tuple(reasons),
        )

    def build(self, float_nodes=(), reasons=()) -> Built:
        """A quantized copy of the prepared float graph (layers in ``float_nodes`` and the automatically chosen
        float layers stay float; ``reasons``: (name, why) pairs for the stats)."""
        if self.auto_float:
            float_nodes = list(dict.fromkeys([*float_nodes, *self.auto_float]))
            reasons = tuple(self.auto_float.items()) + tuple(reasons)
        g = self.base.copy()
        g.toposort()
        main_uses = sg.main_readers_of_body_weights(g)
        plan = plan_static(g, self.dtypes, self.placement_options(float_nodes, reasons), self.minmax)
        for n in plan.anchors:  # bias correction (and the empirical gains) apply to the layers that are quantized
            if id(n) in plan.int8 and n.name in self.channel_gain:
                scale_output_channels(n, self.channel_gain[n.name], self.names)
            if id(n) in plan.int8 and n.name in self.bias_shift:
                add_to_bias(n, self.bias_shift[n.name], self.names)
        missing = [n for n in plan.tensors if n not in self.ranges]
        if missing:
            calibrate(self, missing)
        ranges = self.ranges
        if self.full_range:  # equalized into a depthwise Conv: its channels' headroom needs the whole range
            ranges = {**ranges, **{n: self.minmax[n] for n in self.full_range if n in self.minmax}}
        q, dq, rep = resolve_params(plan, ranges, self.qt, self.p.symmetric_activations)
        counters = insert_qdq(
            g, plan, q, dq, rep, self.qt, WeightOptions(per_channel=self.per_channel, qtype=qm.INT8, rounded=self.rounded)
        )
        bodies = sg.static_body_weights(g, main_uses, self.per_channel, tuple(self.p.exclude), self.names)
        if self.unsigned:
            u8s8.unsign_weight_dequantizers(g)
        return Built(g, plan, counters, bodies)

    def export(self, g: gs.Graph) -> onnx.ModelProto:
        return self.ctx.export(g)

    # -------------------------------------------------------------------------------------------- stages
    def prepare(self) -> bool:
        """Stage 1; True when it changed the graph (an opset upgrade is recorded in the stats instead)."""
        p, graph, ctx, stats = self.p, self.graph, self.ctx, self.stats
        self.untouched = graph.copy()  # shares the weight arrays: stage 1 assigns new ones, never writes in place
        if self.per_channel and not ensure_opset(graph, ctx, qo.PER_CHANNEL_OPSET, stats):
            self.per_channel = False
            stats["per_channel"] = "off: the opset upgrade to 13 failed"
            if not ensure_opset(graph, ctx, qo.PER_TENSOR_OPSET, stats):
                raise PassError("cannot upgrade the model to opset 10 (QuantizeLinear/DequantizeLinear)")
        self.names = names = graph_names(graph)
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
            k = equalize(graph, names)
            stats["cle_pairs"] = k
            prepared = prepared or bool(k)
        if p.depthwise_equalization:
            st = equalize_depthwise(self, graph, names)
            if st["pairs"]:
                stats["depthwise_equalization"] = st
                prepared = prepared or bool(st["rewritten"])
        if p.stream_equalization:
            st = equalize_streams(self, graph, names)
            if st["streams"]:
                stats["stream_equalization"] = st
                prepared = prepared or bool(st["rewritten"])
        if self.smooth_all:
            st = smooth(self, graph, names)
            stats["smoothing"] = st
            prepared = prepared or bool(st["smoothed"])
        graph.toposort()
        self.base = graph.copy()
        self.float_model = ctx.export(self.base)
        self.dtypes = probe_dtypes(self.base, self.float_model, ctx.calibration.first())
        return prepared

    def setup(self) -> tuple[fid.Reference, list] | None:
        """Stages 1-4 (prepare, calibration, bias correction, range choice, weight rounding): after it ``build``
        makes any candidate. Returns the float reference and the evaluation feeds, or None when the main graph has
        no layer to quantize (``stats["layers_kept_float"]`` says why)."""
        p = self.p
        self.stats["weight_bytes_before"] = io.weight_bytes(self.ctx.export(self.graph))
        self.prepared = self.prepare()
        # calibrate everything the full placement needs (ranges of later, smaller placements are subsets)
        plan0 = plan_static(self.base.copy().toposort(), self.dtypes, self.placement_options())
        if not plan0.int8:
            self.stats["layers_kept_float"] = dict(plan0.kept_float)
            return None
        anchors = bias_anchors(self.base, self.dtypes, p.matmul_bias) if p.bias_correction else {}
        eval_feeds = list(self.feeds(p.eval_samples))
        ref = calibrate_with_reference(self, list(plan0.tensors), channel_axes(anchors), eval_feeds)
        if anchors:
            correct_biases(self, anchors)
        if p.weight_type == "auto":
            self.choose_weight_type(eval_feeds)
        if p.calibration == "auto":
            choose_method(self, ref)
        if p.weight_rounding in ("matmul", "auto", "output") and self.per_channel:
            optimise_rounding(self, ref)
        return ref, eval_feeds

    def choose_weight_type(self, feeds: list) -> None:
        """weight_type=auto: int8 codes unless this machine's ORT clamps u8 x s8 products and, measured on this
        model's all-int8 build, uint8 codes bring its fused kernels closer to its QDQ maths (``u8s8_saturation``)."""
        shared = self.weight_type_choice
        if "unsigned" in shared:  # another run of the same pass measured it (smoothing trials)
            self.unsigned, self.stats["weight_type"] = shared["unsigned"], shared["label"]
            return
        self.unsigned = False
        if not u8s8.saturates():
            self.stats["weight_type"] = "int8"
        else:
            self.unsigned, scores = u8s8.static_choice(self.build().graph, self.export, feeds)
            self.stats["weight_type"] = (f"{'uint8' if self.unsigned else 'int8'}: this machine's ORT clamps uint8 x "
                                         f"int8 products; fused kernels vs the QDQ maths, int8 codes "
                                         f"{scores['int8']} dB, uint8 codes {scores['uint8']} dB")
        shared.update(unsigned=self.unsigned, label=self.stats["weight_type"])

    def run(self) -> PassResult:
        t_start = time.perf_counter()
        got = self.candidate()
        if got is None:
            return self.nothing_to_quantize(t_start)
        return self.finish(*got, t_start=t_start)

    def candidate(self) -> tuple[fid.Reference, list, Built, dict[str, float]] | None:
        """Stages 1-5: the quantized candidate before any user target or latency guard (``None``: nothing to
        quantize in the main graph)."""
        ready = self.setup()
        return None if ready is None else self.complete(*ready)

    def all_int8_model(self) -> onnx.ModelProto:
        """The all-int8 model after ``setup`` (``calibration=auto`` built it already while choosing the rule)."""
        if self.all_int8 is not None and self.all_int8[0] == self.method and not self.auto_float:
            return self.all_int8[2]
        return self.export(self.build().graph)

    def complete(self, ref: fid.Reference, eval_feeds: list) -> tuple[fid.Reference, list, Built, dict[str, float]]:
        """Stage 5 after ``setup``: the float-layer search, refit, the build and its score."""
        if self.p.auto_float_db > 0:
            search_float_layers(self, ref, eval_feeds)
        if self.p.weight_rounding == "refit" and self.per_channel:
            refit_stage(self, ref)
        if self.p.empirical_bias:
            empirical_bias_stage(self, ref)
        built = self.build()
        return ref, eval_feeds, built, fid.score_model(ref, self.export(built.graph))

    def nothing_to_quantize(self, t_start: float) -> PassResult:
        stats = self.stats
        kept = stats.get("layers_kept_float") or {}
        if kept:  # candidate layers exist, each kept float for its own reason (rank, dtype, exclusions...)
            why = Counter(str(v) for v in kept.values())
            stats["skipped"] = ("nothing to quantize in the main graph: every candidate layer kept float ("
                                + "; ".join(f"{r}: {c}" for r, c in why.most_common()) + ")")
        else:
            other = Counter(str(n.inputs[1].values.dtype) for n in self.graph.nodes
                            if n.op in ("Conv", "MatMul", "Gemm") and len(n.inputs) > 1
                            and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.dtype != np.float32
                            and n.inputs[1].values.dtype.kind == "f")
            stats["skipped"] = ("nothing to quantize in the main graph: no Conv/MatMul/Gemm with a constant float32 "
                                "weight" + (" (" + ", ".join(f"{c} with {d} weights" for d, c in other.items())
                                            + ": static int8 reads float32 tensors; export the model in float32)"
                                            if other else ""))
        bodies_done = self.bodies_only()
        stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
        return PassResult(bodies_done or self.left_float(), stats)

    def finish(self, ref: fid.Reference, eval_feeds: list, built: Built, sc: dict[str, float],
               t_start: float) -> PassResult:
        """Stages 6-7 on the candidate: mixed precision to a user target, the latency guard, adoption."""
        p, stats = self.p, self.stats
        float_layers: dict[str, str] = dict(self.auto_float)
        if p.min_cosine is not None or p.max_agreement_drop is not None or p.min_sqnr_db is not None or (
                p.max_latency is not None):
            built, sc, float_layers = mixed_precision(self, ref, built, sc)
        if p.latency_guard:
            outcome = latency_guard(self, built, sc, float_layers, ref, eval_feeds)
            if outcome is None:
                self.bodies_left_float(stats["skipped"])
                stats["seconds_calibration"] = round(self.calib_seconds, 3)
                stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
                return PassResult(self.left_float(), stats)
            built, sc = outcome
        self.adopt(built, sc, float_layers)
        if p.explain:
            explain(self, ref, self.ctx.export(self.graph))
        stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
        return PassResult(True, stats)

    def left_float(self) -> bool:
        """Nothing is quantized: put back the graph as the pass received it (module doc, stage 6). Returns whether
        the pass changed the graph (False)."""
        if self.untouched is not None:
            qo.transplant(self.graph, self.untouched)
            if "opset_upgrade" in self.stats:
                self.stats["opset_upgrade"] += " (undone: the graph stays float)"
        return False

    def bodies_left_float(self, reason: str) -> None:
        """Stats: every If/Loop/Scan body left as it was, and why."""
        labels = [s.label for s in sg.bodies(self.graph)]
        if labels:
            self.stats["subgraphs"] = sg.collapse_empty(labels, f"left float: {reason}")

    def bodies_only(self) -> bool:
        """The main graph has no layer to quantize: store the bodies' weights int8 (``subgraphs``), kept only if the
        result is not slower under ORT (``latency_guard``). True when the graph changed."""
        from .latency_guard import latency_ratio

        g = self.base.copy()
        bodies = sg.static_body_weights(g, {}, self.per_channel, tuple(self.p.exclude), self.names)
        if not bodies:
            return False
        if "weight-int8" not in " ".join(bodies.values()):
            self.stats["subgraphs"] = bodies
            return False
        if self.p.latency_guard:
            profile = self.ctx.latency
            before = profile.measured, profile.replayed, profile.cached
            ratio = latency_ratio(self, self.export(g), self.ctx.calibration.first())
            self.stats["latency_ratio_measured"] = round(ratio, 3)
            self.stats["latency_measurements"] = {"measured": profile.measured - before[0],
                                                  "replayed": profile.replayed - before[1],
                                                  "machine_cache": profile.cached - before[2]}
            if ratio >= 1.0:
                self.bodies_left_float(f"weight-int8 bodies measured {ratio:.2f}x the float model's latency")
                return False
        qo.transplant(self.graph, g)
        self.stats["subgraphs"] = bodies
        self.stats["weight_bytes_after"] = io.weight_bytes(self.ctx.export(self.graph))
        return True

    def kept_float_records(self, kept: dict[str, str]) -> list[dict]:
        """Every layer kept float as ``{layer, reason, macs_share, ...}`` (the search's measurements where it made
        the decision), largest MAC share first."""
        from .float_cost import macs_shares

        if not kept:
            return []
        shares = macs_shares(self, self.ctx.calibration.first())
        recs = []
        for name, reason in kept.items():
            rec = {"layer": name, "reason": reason, "macs_share": round(shares.get(name, float("nan")), 4)}
            rec.update({k: v for k, v in self.float_details.get(name, {}).items() if k not in rec})
            recs.append(rec)
        return sorted(recs, key=lambda r: -(r["macs_share"] if np.isfinite(r["macs_share"]) else -1.0))

    def adopt(self, built: Built, sc: dict[str, float], float_layers: dict[str, str]) -> None:
        """Stage 7: ``built`` becomes the pass's graph; the remaining float weights are stored int8; final stats."""
        p, graph, stats = self.p, self.graph, self.stats
        qo.transplant(graph, built.graph)
        k = quantize_float_op_weights(graph, tuple(sorted(WEIGHT_ONLY_FLOAT_OPS)), self.per_channel, tuple(p.exclude))
        if k:
            stats["weights_only_float_ops"] = k
        if "Gather" in p.dynamic_ops:
            k = quantize_gathers(graph, tuple(p.exclude))
            if k:
                stats["embedding_tables_quantized"] = k
        final = self.ctx.export(graph)
        stats.update(built.counters)
        if built.bodies:
            stats["subgraphs"] = built.bodies
        stats["nodes_quantized"] = dict(sorted(built.plan.int8_ops().items()))
        kept = dict(built.plan.kept_float)
        kept.update(float_layers)
        stats["layers_kept_float"] = kept
        stats["kept_float"] = self.kept_float_records(kept)
        stats["calibration"] = self.method
        stats["calibrated_tensors"] = len(self.ranges)
        stats["score_on_calibration"] = {k: round(v, 6) for k, v in sc.items()}
        stats["weight_bytes_after"] = io.weight_bytes(final)
        stats["seconds_calibration"] = round(self.calib_seconds, 3)
