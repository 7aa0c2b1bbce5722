"""The ``quantize`` pass class: what it needs and preserves, its contract, and the dispatch to the mode that does the
work (its options, with their help and validation, are ``options.QuantizeOptions``).

* ``mode=static`` (``static_run``) needs calibration feeds, and so does ``mode=dynamic`` given a fidelity target
  (``min_cosine`` ...: ``dynamic_mixed``): ``needs_calibration()`` is True for them, so the pipeline refuses to start
  without ``--calib`` before any pass runs; otherwise ``dynamic`` and ``weight_only`` (``dynamic``) need no data
  (dynamic mode uses it when given: ``dynamic_smoothing``, ``dynamic_rounding``).
* Preserves no analysis: every mode rewrites weights into integer initializers behind DequantizeLinear (and static
  folds affine ops into Convs), so channel groups and activation statistics of the float graph no longer hold.
* Determinism: static mode's latency decisions (guard, float-layer costs, per-Conv speeds) are measured once per
  machine and cached (``onnxcompress.latency_profile.MachineCache``, ``latency_cache`` option): the same model,
  options, data and seed give the same bytes in every run on the machine; ``latency_cache=refresh`` measures again
  (with hysteresis), ``--latency-profile`` replays a report's values over the cache. Generated names come from
  ``Namer`` over the sorted, ordered graph (no set or id order), so they repeat too.
* ``requires``: a model that already holds quantized ops (``QUANTIZED_OPS``, bodies included) is refused unless
  ``already_quantized=ignore`` (quantizing twice stacks the errors). ``ensures``: every constant Q/DQ scale is > 0,
  in the main graph and in every If/Loop/Scan body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.context import PassContext
from onnxcompress.errors import PassError
from onnxcompress.latency_profile import MachineCache
from onnxcompress.pass_base import Pass, PassResult, register

from . import dynamic_mixed
from .dynamic import run_weight_only
from .dynamic_run import run_dynamic
from .options import QuantizeOptions
from .static_run import run_static

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


@register
@dataclass(frozen=True)
class Quantize(QuantizeOptions, Pass):
    """The pass: its options are ``QuantizeOptions``' fields (``options.py``); here what it needs, its contract and the
    dispatch to the mode."""

    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = (
        "int8 QDQ quantization (static with calibration, dynamic, weight-only int8/int4) "
        "placed for ORT's integer kernels; calibration, bias correction, mixed precision"
    )
    exact: ClassVar[bool] = False
    #: calibration feeds, for mode=static only (``needs_calibration``)
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})
    #: none: integer weights and folded affines invalidate every analysis of the float graph
    preserves: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------------------------------------ contract
    def needs_calibration(self) -> bool:
        """Static mode, and dynamic mode with a fidelity target (``dynamic_mixed`` measures it on the feeds)."""
        return self.mode == "static" or (self.mode == "dynamic" and bool(dynamic_mixed.targets(self)))

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
        if self.mode == "weight_only":
            return run_weight_only(self, graph, ctx)
        cache = None if self.latency_cache == "off" else MachineCache.default(refresh=self.latency_cache == "refresh")
        with ctx.latency.machine_cache(cache):
            result = (run_dynamic if self.mode == "dynamic" else run_static)(self, graph, ctx)
        if cache is not None and (cache.hits or cache.stored):
            result.stats["latency_cache"] = {
                str(cache.path): f"{cache.hits} latency decisions read from this machine's cache, {cache.stored} "
                f"measured and stored (latency_cache=refresh measures them again)"
            }
        return result

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        for g in [graph, *graph.subgraphs(recursive=True)]:
            for n in g.nodes:
                if n.op in ("QuantizeLinear", "DequantizeLinear") and len(n.inputs) > 1:
                    s = n.inputs[1]
                    if isinstance(s, gs.Constant) and not np.all(np.asarray(s.values) > 0):
                        raise PassError(f"{n.name}: non-positive quantization scale")


__all__ = ["Quantize", "QUANTIZED_OPS"]
