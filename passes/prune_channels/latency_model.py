"""Latency cost model for ``prune-channels{target_latency=...}``: where pruning buys time, not only MACs.

MACs miss what dominates small CNNs on ORT CPU: on ppocr_cls (MobileNetV3) the Conv kernels are ~40% of the
profiled time; hard-swish Mul/Div/Add/Clip, pooling, Reshape and NCHWc reorders — memory-bound ops whose cost is
the size of the tensors they touch — are the rest. The model:

    t(keep) = c * K + a * MACs(keep) + b * sum_n E_n * f_n(keep)

over the nodes n that are not MAC ops (E_n: elements of n's output at the calibration shape; f_n: kept fraction of
that output's channel elements, 1 when its channels are not in any group), fitted from ONE profile of the model by
ORT at the calibration shape (1 thread): c = the 10th percentile of the K kernel times (every kernel's fixed cost,
which pruning does not remove), a = sum over MAC kernels of (t - c) / MACs, b = the same over every other kernel /
sum E_n. ``LatencyModel.estimate`` is vectorised over nodes; the plan uses it both to rank steps (error
per saved estimated time) and as the budget.

Accuracy, measured (benchmarks/results/prune.md): the profiler inflates small kernels, so the fitted per-kernel cost
is high and the model over-estimates the time left — ``target_latency=0.6`` measured 0.47-0.51x on ppocr_cls and
MTCNN rnet/onet (MACs 0.27-0.37x).

Determinism: the profile is a timing (on a busy machine ppocr_cls was cut to MACs 0.32x in one run, 0.35x in the
next), so it is taken through the run's latency profile, ``ctx.latency.measure(key, fn)``: the key
``prune-channels/op-times/<fingerprint of the model bytes, the feed shapes and the run count>`` names what is
profiled, the value is the op-times dict of ``profile_op_times`` (JSON). A run fed the recorded profile
(``--latency-profile``) replays it without profiling and makes the same cut, byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.analyses.channel_groups import ChannelGroups
from onnxcompress.analyses.macs import MAC_OPS, count_macs, infer_shapes
from onnxcompress.latency_profile import LatencyProfile, fingerprint

log = logging.getLogger(__name__)

#: ORT kernel names (profile ``op_name``) that are MAC work; everything else is counted as memory-bound
PROFILE_MAC_OPS = MAC_OPS | {"NhwcConv", "NchwcConv", "QAttention", "Attention"}


@dataclass
class LatencyModel:
    a: float  # seconds per MAC
    b: float  # seconds per element of a non-MAC node's output
    mac_total: float  # MACs at the profile shape
    cg_macs: float  # the channel-group analysis' total MACs (its own shapes): MACs(keep) scales with it
    elems: np.ndarray  # [n] elements of each grouped non-MAC node output
    owner: np.ndarray  # [m] index into elems for each channel element below
    chan_el: np.ndarray  # [m] channel element ids (cg element space)
    counts: np.ndarray  # [n] channel elements per node
    fixed: float  # elements of non-MAC outputs whose channels are in no group
    t_fixed: float = 0.0  # per-kernel overhead summed over the profiled kernels (pruning does not change it)

    def estimate(self, cg: ChannelGroups, keep_el: np.ndarray) -> float:
        macs = self.mac_total * (cg.macs_after(keep_el) / self.cg_macs if self.cg_macs else 1.0)
        kept = np.bincount(self.owner, weights=keep_el[self.chan_el].astype(float), minlength=len(self.elems))
        frac = np.divide(kept, self.counts, out=np.ones(len(self.elems)), where=self.counts > 0)
        return float(self.t_fixed + self.a * macs + self.b * (self.fixed + float(np.sum(self.elems * frac))))

    @property
    def share_of_macs(self) -> float:
        """Fraction of the modelled time that is MAC work (for the stats)."""
        t_mac = self.a * self.mac_total
        t_all = self.t_fixed + t_mac + self.b * (self.fixed + float(self.elems.sum()))
        return t_mac / t_all if t_all > 0 else 1.0


def profile_op_times(model: onnx.ModelProto, feed: dict[str, np.ndarray], runs: int = 20) -> dict[str, list[float]]:
    """Median kernel time per run (seconds) of every ORT node, listed per ORT op type (ORT's profiler, 1 thread)."""
    import onnxruntime as ort

    from onnxcompress.runtime import session_options

    so = session_options(1, True, spin=False)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "prune")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        for _ in range(runs + 2):
            sess.run(None, f)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"], []).append(float(e["dur"]))
            op_of[e["name"]] = e.get("args", {}).get("op_name", "?")
    out: dict[str, list[float]] = {}
    for n, durs in per_node.items():  # the first runs are warm-up
        out.setdefault(op_of[n], []).append(float(np.median(durs[2:] or durs)) * 1e-6)
    return out


def op_times_key(model: onnx.ModelProto, feed: dict[str, np.ndarray], runs: int) -> str:
    """The latency-profile key of ``profile_op_times(model, feed, runs)``: what is profiled, not when."""
    shapes_in = {k: tuple(v.shape) for k, v in feed.items()}
    return f"prune-channels/op-times/{fingerprint(model.SerializeToString(), str(shapes_in), str(runs))}"


def fit(model: onnx.ModelProto, cg: ChannelGroups, feed: dict[str, np.ndarray], runs: int = 20,
        profile: LatencyProfile | None = None) -> LatencyModel:
    """The latency model of ``model`` at ``feed``'s shapes, from one ORT profile taken through ``profile`` (the
    run's ``ctx.latency``: recorded, or replayed when it holds the key; None: a fresh, unrecorded profile)."""
    shapes_in = {k: tuple(v.shape) for k, v in feed.items()}
    shapes = infer_shapes(model, shapes_in)
    mac_total = float(count_macs(model, shapes_in).total)
    profile = profile if profile is not None else LatencyProfile()
    times = profile.measure(op_times_key(model, feed, runs), lambda: profile_op_times(model, feed, runs))
    every = np.concatenate([np.asarray(v) for v in times.values()]) if times else np.zeros(1)
    per_node = float(np.percentile(every, 10))  # fixed cost of any kernel: the floor of the small ones
    t_mac = sum(max(0.0, t - per_node) for op, v in times.items() if op in PROFILE_MAC_OPS for t in v)
    t_rest = sum(max(0.0, t - per_node) for op, v in times.items() if op not in PROFILE_MAC_OPS for t in v)
    t_fixed = per_node * every.size
    elems, owner, chan, counts = [], [], [], []
    fixed = 0.0
    for node in model.graph.node:
        if node.op_type in MAC_OPS or node.op_type in ("Constant", "Shape") or not node.output:
            continue
        shp = shapes.get(node.output[0])
        if not shp or any(d <= 0 for d in shp):
            continue
        e = float(np.prod(shp))
        lay = cg.layouts.get(node.output[0])
        el = np.unique(lay.el.reshape(-1)) if lay is not None and lay.el.size else None
        if el is None:
            fixed += e
            continue
        owner.append(np.full(el.size, len(elems)))
        chan.append(el)
        counts.append(el.size)
        elems.append(e)
    total_el = fixed + sum(elems)
    a = t_mac / mac_total if mac_total > 0 else 0.0
    b = t_rest / total_el if total_el > 0 else 0.0
    lm = LatencyModel(a, b, mac_total, float(cg.total_macs), np.asarray(elems, float),
                      np.concatenate(owner) if owner else np.zeros(0, np.int64),
                      np.concatenate(chan) if chan else np.zeros(0, np.int64),
                      np.asarray(counts, float), fixed, t_fixed)
    log.info("prune-channels latency model: %.0f%% of the profiled time is MAC kernels", 100 * lm.share_of_macs)
    return lm
