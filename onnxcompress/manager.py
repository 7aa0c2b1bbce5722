"""PassManager: import once, run passes under their contracts, record the ledger, export once, validate.

For each pass: ``requires -> run -> ensures``. Any failure is re-raised as ``PassError`` naming the pass and the
passes that ran before it. Analyses the pass did not declare preserved are dropped from the context. After each
pass the graph is exported to measure the ledger row (params, bytes raw/zip, nodes, ops, MACs, wall time) and,
when asked (``validate_each``), its fidelity against the original.

At the end: the structural gate (checker + ORT session), then fidelity against the original on the validation feeds.
If every pass in the pipeline is exact, the result must match the original within ``exact_tolerance``
(max-abs relative to the output's scale), else ``ValidationError``.

The original model is kept as serialised bytes (models over the protobuf limit, or with memory-mapped weights: as
the caller's ModelProto), never shared with the working graph: graphsurgeon's Graph.copy() shares weight arrays.

Memory-mapped models (``io.read_model(mapped=True)``, see ``mmap_weights``): the working copy, every export and the
original hold file references, not weights; the checker runs on ``mmap_weights.checkable`` (large weights as typed
inputs), and the structural gate's ORT session loads the written model without optimizations or pre-packing after
the working graph is released, so ORT's copy and ours never coexist.
"""

from __future__ import annotations

import gc
import logging
import time
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress import io, mmap_weights, progress
from onnxcompress.analyses.model_stats import model_stats
from onnxcompress.context import PassContext
from onnxcompress.data import FeedSet, bind_dims, count_nonfinite, feed_shapes, model_inputs
from onnxcompress.errors import BadInputError, OnnxCompressError, PassError, ValidationError
from onnxcompress.pass_base import Pass
from onnxcompress.pipeline import format_pass, format_pipeline
from onnxcompress.result import CompressResult, LedgerRow
from onnxcompress.runtime import Session
from onnxcompress.validate import compare_models, input_noise_for, structural_gate, structural_problems

log = logging.getLogger(__name__)


def nonfinite_error(name: str, keys: list[str], metrics: dict, original: onnx.ModelProto | bytes
                    ) -> OnnxCompressError:
    """The one error when an output's fidelity is not a number: which model produced the NaN/inf values, and the
    original's weights that hold some. An original that already does is bad input (exit 2), not a failed pass."""
    counts = metrics.get("nonfinite_values", {})
    head = f"fidelity of output {name!r} is not a number ({', '.join(keys)}): "
    if counts.get("original"):
        model = original if isinstance(original, onnx.ModelProto) else onnx.ModelProto.FromString(original)
        weights = nonfinite_initializers(model)
        where = f" (NaN/inf in its weights: {', '.join(weights)})" if weights else ""
        return BadInputError(head + f"the original model itself produced {counts['original']} non-finite value(s) "
                             f"(NaN/inf) on the validation feeds{where}, so nothing can be checked against it")
    if counts.get("compressed"):
        return ValidationError(head + f"the compressed model produced {counts['compressed']} non-finite value(s) "
                               "(NaN/inf) on the validation feeds where the original did not")
    return ValidationError(head + "the outputs overflow float64 sums on the validation feeds")


def nonfinite_initializers(model: onnx.ModelProto, most: int = 3) -> list[str]:
    """Up to ``most`` float initializers (main graph) holding NaN/inf, as "'name' (N values)"."""
    found = []
    for t in model.graph.initializer:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                               onnx.TensorProto.BFLOAT16) or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        bad = count_nonfinite(numpy_helper.to_array(t).astype(np.float32))
        if bad:
            found.append(f"{t.name!r} ({bad} values)")
            if len(found) == most:
                break
    return found


class PassManager:
    """Runs a list of passes over one model under their contracts and measures the result (module docstring)."""
    def __init__(
        self,
        passes: list[Pass],
        *,
        validation: FeedSet | None = None,
        validate_each: bool = False,
        measure: bool = True,
        gate: bool = True,
        exact_tolerance: float = 1e-4,
        progress: Callable | None = None,
        task: str = "auto",
    ):
        if not passes:
            raise ValueError("PassManager needs at least one pass")
        self.passes = list(passes)
        self.validation = validation
        self.validate_each = validate_each
        self.measure = measure
        self.gate = gate
        self.exact_tolerance = exact_tolerance
        self.progress = progress
        self.task = task

    # ----------------------------------------------------------------------------------------------- helpers
    def _input_shapes(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[dict, dict | None]:
        feeds = self.validation or ctx.calibration
        if feeds is not None:
            feed = feeds.first()
            return feed_shapes(feed), feed
        return bind_dims(model_inputs(model, tensors_only=True), ctx.dims, ctx.input_shapes), None

    def _stats(self, model: onnx.ModelProto, shapes: dict, feed: dict | None, streamed: bool = False) -> dict[str, Any]:
        if not self.measure:
            return {}
        return model_stats(model, shapes, feed, streamed=streamed).to_dict()

    # ------------------------------------------------------------------------------------------------ run
    def check_needs(self, ctx: PassContext) -> None:
        """Every pass's needs, checked before the first one runs: a missing input is bad input (exit 2), not a
        failure after the earlier passes spent their time."""
        if ctx.calibration is None:
            wanting = [format_pass(p) for p in self.passes if p.needs_calibration()]
            if wanting:
                raise BadInputError(f"{', '.join(wanting)} needs calibration data (--calib); none was given")

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> CompressResult:
        """Check every pass's needs, run the passes in order, gate and validate the result; ``model`` is not
        modified. Raises BadInputError / PassError / ValidationError (see ``onnxcompress.errors``)."""
        ctx = ctx or PassContext()
        self.check_needs(ctx)
        t_start = time.perf_counter()
        original = model
        mapped = mmap_weights.has_mapped(model)
        big = mapped or io.needs_external_data(model)
        ctx.original_bytes = None if big else model.SerializeToString()
        if mapped:
            ctx.original_proto = model
        original_ref: onnx.ModelProto | bytes = original if big else ctx.original_bytes
        original_problems = structural_problems(mmap_weights.checkable(original) if mapped else original) \
            if self.gate else []

        working = onnx.ModelProto()
        working.CopyFrom(original)
        lifted = io.prepare_for_import(working)
        ctx.model_template = working
        graph = io.to_graph(working)
        shapes, feed = self._input_shapes(original, ctx)

        ledger = [LedgerRow("original", model=self._stats(original, shapes, feed, mapped),
                            pass_stats={"constant_nodes_lifted": lifted} if lifted else {})]
        done: list[str] = []
        notes: list[str] = []
        current = working
        for index, p in enumerate(self.passes, 1):
            label = format_pass(p)
            t0 = time.perf_counter()
            progress.pass_started(label, index, len(self.passes), t0 - t_start)
            try:
                p.requires(graph, ctx)
                result = p.run(graph, ctx)
                p.ensures(graph, ctx)
                current = ctx.export(graph)
            except BadInputError as exc:  # the data the pass read is bad (non-finite, wrong shape): exit 2
                raise BadInputError(_failure(label, done, exc)) from exc
            except OnnxCompressError as exc:
                raise PassError(_failure(label, done, exc)) from exc
            except Exception as exc:  # a bug or an unexpected graph: still name the pass
                raise PassError(_failure(label, done, exc)) from exc
            seconds = time.perf_counter() - t0
            if result.modified:
                ctx.invalidate(frozenset(result.preserved) | type(p).preserves)
            row = LedgerRow(label, result.modified, seconds, self._stats(current, shapes, feed, mapped),
                            dict(result.stats), p.options(), p.exact)
            if self.validate_each and self.validation is not None:
                row.fidelity = compare_models(original_ref, current, self.validation, task=self.task).to_dict()
            ledger.append(row)
            done.append(label)
            if not result.modified and not p.exact:
                notes.append(unchanged_note(label, p, result.stats, ledger[0].model.get("ops", {})))
            progress.pass_finished(label, index, len(self.passes), time.perf_counter() - t_start, seconds,
                                   result.modified)

        final = current
        tolerated: list[str] = []
        if self.gate and mapped:
            del graph, current  # the graph's new arrays are in ``final`` too: release them before ORT loads it
            ctx.invalidate()
            gc.collect()
            tolerated = _mapped_gate(final, original_problems)
        elif self.gate:
            tolerated = structural_gate(final, original_problems)
        fidelity = None
        if self.validation is not None:
            lossy = not all(p.exact for p in self.passes)
            fidelity = compare_models(original_ref, final, self.validation, progress=self.progress,
                                      task=self.task, input_noise=input_noise_for(self.validation) if lossy else None)
            ledger[-1].fidelity = fidelity.to_dict()
            bad = {n: m["nonfinite_metrics"] for n, m in fidelity.outputs.items() if m.get("nonfinite_metrics")}
            if bad:
                name, keys = next(iter(bad.items()))
                raise nonfinite_error(name, keys, fidelity.outputs[name], original_ref)
            if all(p.exact for p in self.passes):
                notes.extend(self._check_exact(original_ref, fidelity))
        return CompressResult(final, format_pipeline(self.passes), ledger, fidelity, shapes, tolerated,
                              time.perf_counter() - t_start, latency_profile=ctx.latency.to_dict(),
                              counters=dict(ctx.counters), notes=notes)


    def _check_exact(self, original_ref, fidelity) -> list[str]:
        """An exact pipeline must reproduce the original up to float rounding.

        Per output: max|r - c| <= max(tol · max|r|, 8 · noise), where ``noise`` is the max-abs difference between
        the original run with and without onnxruntime's own graph optimizations on the same feeds (ORT folds
        BatchNorm into Conv too: its rounding is the scale of what an exact rewrite may change). The floor matters
        when an output's magnitude is tiny next to the values that produced it (a detection map near 3e-8 at a
        made-up input): then the rounding of the intermediate sums is all the difference there is. Returns a note for
        every output accepted by that floor."""
        noise = None
        notes: list[str] = []
        for name, m in fidelity.outputs.items():
            if m.get("mismatched_elements", 0):
                raise ValidationError(f"exact pipeline {format_pipeline(self.passes)!r} changed output {name!r}: "
                                      f"{m['mismatched_elements']} elements differ")
            if m.get("rel_max_abs", 0.0) <= self.exact_tolerance:
                continue
            if noise is None:
                noise = compare_models(original_ref, original_ref, self.validation, optimize_original=False,
                                       task="none").outputs
            floor = 8.0 * noise.get(name, {}).get("max_abs", 0.0)
            if m["max_abs"] <= floor:
                notes.append(f"exact check: output {name!r} differs by {m['max_abs']:.3g} (relative "
                             f"{m['rel_max_abs']:.3g}: its values peak at only {m['max_abs'] / m['rel_max_abs']:.3g}), "
                             f"within 8x onnxruntime's own rounding ({floor / 8:.3g}) — float rounding, not a change; "
                             "cosine/SQNR of such tiny outputs mean little")
                continue
            raise ValidationError(
                f"exact pipeline {format_pipeline(self.passes)!r} changed output {name!r}: relative max-abs "
                f"{m['rel_max_abs']:.3g} > {self.exact_tolerance:g} (max-abs {m['max_abs']:.3g}, onnxruntime's own "
                f"rounding {floor / 8:.3g})")
        return notes


def _mapped_gate(final: onnx.ModelProto, original_problems: list[str]) -> list[str]:
    """``validate.structural_gate`` for a model with memory-mapped weights: the checker on the stand-in without its
    large weights, ORT on the model itself (written with external data, no optimizations or pre-packing)."""
    problems = structural_problems(mmap_weights.checkable(final))
    if problems and not original_problems:
        raise ValidationError(f"the compressed model is invalid: {problems[0]}")
    with Session(final, what="compressed model", light=True):
        pass
    return problems


def unchanged_note(label: str, p: Pass, stats: dict[str, Any], ops: dict[str, int]) -> str:
    """What to tell the user when a lossy pass changed nothing: the pass's own reason when its stats give one
    (``skipped`` / ``reason``), else the op types its ``*_ops`` option for the active mode names and how many of them
    the model has; and the pass's other modes (from the option's declared choices)."""
    note = f"{label} changed nothing"
    opts = p.options()
    hints = typing.get_type_hints(type(p))
    mode = opts.get("mode")
    modes = typing.get_args(hints["mode"]) if typing.get_origin(hints.get("mode")) is typing.Literal else ()
    reason = next((stats[k] for k in ("skipped", "reason") if isinstance(stats.get(k), str) and stats[k]), None)
    op_lists = [v for k, v in opts.items() if k.endswith("_ops") and isinstance(v, (tuple, list)) and v
                and (not modes or k.startswith(f"{mode}_") or not any(k.startswith(f"{m}_") for m in modes))]
    if reason:
        note += f": {reason}"
    elif op_lists:
        wanted = list(op_lists[0])
        present = ", ".join(f"{op} {ops[op]}" for op in wanted if ops.get(op))
        top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:4])
        note += f": it works on {', '.join(wanted)}"
        if ops:
            note += (" and the model has " + (f"{present} (none it could change)" if present else "none of them")
                     + f"; the model's ops: {top}")
    others = [m for m in modes if m != mode]
    if others:
        note += f" (other modes: {', '.join(f'mode={m}' for m in others)}; see `onnxcompress passes`)"
    return note


def _failure(label: str, done: list[str], exc: BaseException) -> str:
    before = f" (after {', '.join(done)})" if done else " (first pass)"
    return f"pass {label}{before} failed: {type(exc).__name__}: {io.first_line(exc)}" if not isinstance(
        exc, OnnxCompressError) else f"pass {label}{before} failed: {io.first_line(exc)}"
