"""Calibration stage of static quantization: activation statistics of the float model, streamed over the feeds.

One pass of the prepared float model over the calibration feeds (the first ``calibration_samples``) reduces every
tensor the placement quantizes to its statistics (``onnxcompress.analyses.calibration``: exact min/max, a growing
histogram unless ``calibration=minmax``, and per-channel sums of the inputs of bias-corrected layers). From them,
per tensor ``t``:

* ``minmax[t] = (min(t_min, 0), max(t_max, 0))``: what the placement's mixed-range Concat rule compares;
* ``ranges[t]``: the quantization range of the current range rule (``range_choice.activation_range``);
* a tensor that never held a finite value gets ``(0, 0)``.

The first pass also keeps the float model's outputs and last-layer features on the evaluation feeds (the first
``eval_samples`` calibration feeds): the ``fidelity.Reference`` every candidate is scored against, without running
the float model on them again. Later builds that need a tensor not calibrated yet calibrate just those tensors.

Every call of ``collect_statistics`` is in ``collect_activation_statistics``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from onnxcompress.analyses.calibration import TensorStats, collect_statistics
from onnxcompress.data import Feed

from . import fidelity as fid
from .range_choice import activation_range

if TYPE_CHECKING:  # pragma: no cover
    from .run_view import QuantizeRun


def collect_activation_statistics(
    run: QuantizeRun, names: list[str], channel_sums: dict[str, int] | None = None, **capture
) -> dict[str, TensorStats]:
    """Statistics of the float model's tensors ``names`` on the calibration feeds (per-channel sums on the given
    axes for ``channel_sums``); ``capture``: ``fetch`` / ``on_feed`` of ``collect_statistics``."""
    p = run.p
    return collect_statistics(
        run.float_model,
        names,
        run.feeds(p.calibration_samples),
        histograms=p.calibration != "minmax",  # auto needs them too
        channel_sums=channel_sums or {},
        **capture,
    )


def calibrate(run: QuantizeRun, names: list[str], channel_sums: dict[str, int] | None = None, **capture) -> None:
    """Ranges of ``names`` (and the per-channel means of ``channel_sums``) in one pass over the feeds, recorded in
    ``run.tstats`` / ``run.minmax`` / ``run.ranges``."""
    t0 = time.perf_counter()
    st = collect_activation_statistics(run, names, channel_sums, **capture)
    run.tstats.update(st)
    for n, s in st.items():
        run.minmax[n] = (min(s.min, 0.0), max(s.max, 0.0)) if np.isfinite(s.min) else (0.0, 0.0)
        run.ranges[n] = activation_range(s, run.method, run.qt, run.p)
    run.calib_seconds += time.perf_counter() - t0


def calibrate_with_reference(
    run: QuantizeRun, names: list[str], channel_sums: dict[str, int], eval_feeds: list[Feed]
) -> fid.Reference:
    """The first calibration pass; it also keeps the float model's outputs and last-layer features on
    ``eval_feeds`` and returns them as the reference."""
    features = fid.feature_nodes(run.base)
    feature_tensors = fid.feature_tensor_names(run.float_model, features)
    out_names = [o.name for o in run.float_model.graph.output]
    outputs: list[list[np.ndarray]] = []
    feats: list[list[np.ndarray]] = []

    def keep(i: int, acts: dict[str, np.ndarray]) -> None:
        if i < len(eval_feeds):
            outputs.append([np.asarray(acts[n]) for n in out_names])
            feats.append([np.asarray(acts[n]) for n in feature_tensors])

    calibrate(run, names, channel_sums, fetch=[*out_names, *feature_tensors], on_feed=keep)
    if len(outputs) != len(eval_feeds):  # feeds that are not a prefix of the calibration feeds: run them
        return fid.reference(run.float_model, eval_feeds, features)
    from onnxcompress.validate import class_score_outputs

    return fid.Reference(eval_feeds, outputs, out_names, features, feats,
                         frozenset(class_score_outputs(run.float_model)))
