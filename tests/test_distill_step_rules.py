"""distill{mode=train} step rules on CNNs: per-channel relative steps, the warmup's step floor, fp32 for Conv nets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxcompress.passes.distill import Distill

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill import train as train_module  # noqa: E402
from onnxcompress.passes.distill.train import MIN_WARMUP_STEPS, Trainer  # noqa: E402
from onnxcompress.passes.distill.train_speed import (  # noqa: E402
    CONV_SHARE_FP32,
    ChannelSteps,
    channel_rms,
    native_bf16,
    resolve_precision,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
PRUNE = "cleanup,prune-channels{target_macs=0.4}"


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


def _ctx(model):
    ctx = PassContext(calibration=load_feeds(str(CALIB), model), seed=0)
    ctx.original_bytes = model.SerializeToString()
    return ctx


def _trainer(digits, **opts):
    pruned = PassManager(parse_pipeline(PRUNE)).run(digits, _ctx(digits)).model
    ctx = _ctx(digits)
    graph = io.to_graph(pruned)
    return graph, ctx, Trainer(graph, ctx, pruned, ctx.original_model(),
                               replace(Distill(), mode="train", augment="none", **opts))


def test_channel_steps_make_every_channel_move_by_the_same_relative_amount():
    # a BN-folded Conv weight: output channel 1 is 1000x smaller than channel 0
    w0 = np.concatenate([np.ones((1, 2, 3, 3)), 1e-3 * np.ones((1, 2, 3, 3))]).astype(np.float32)
    grad = torch.from_numpy(np.random.default_rng(0).normal(size=w0.shape).astype(np.float32))
    lr = 1e-2

    def relative_change(per_channel: bool) -> np.ndarray:
        p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        rms = channel_rms(torch, p, 0)
        steps = ChannelSteps(torch, [(p, rms)] if per_channel else [])
        whole = float(p.detach().pow(2).mean().sqrt())
        opt = torch.optim.Adam([{"params": [p], "lr": lr * (1.0 if per_channel else whole)}])
        p.grad = grad.clone()
        steps.before()
        opt.step()
        steps.after()
        change = (p.detach().numpy() - w0) / w0
        return np.abs(change).reshape(2, -1).mean(axis=1)

    tensor = relative_change(False)
    channel = relative_change(True)
    # Adam's first step is a sign step: per channel both channels move by lr of their own size
    np.testing.assert_allclose(channel, [lr, lr], rtol=1e-3)
    # per tensor the small channel moves by lr x the tensor's RMS, 700x its own size
    assert tensor[1] > 300 * lr and tensor[0] < 2 * lr


def test_channel_rms_floor_and_axis():
    p = torch.zeros(3, 4, 1, 1)
    p[0] = 2.0
    rms = channel_rms(torch, p, 0, floor=1e-3)
    assert tuple(rms.shape) == (3, 1, 1, 1)
    whole = float(p.pow(2).mean().sqrt())
    np.testing.assert_allclose(rms.flatten().numpy(), [2.0, whole * 1e-3, whole * 1e-3], rtol=1e-6)


def test_channel_axes_are_the_conv_weights(digits):
    graph, _, tr = _trainer(digits)
    axes = tr.channel_axes()
    conv = {n.inputs[1].name for n in graph.nodes if n.op == "Conv"}
    names = {id(w.param): n for n, w in tr.tg.weights.items()}
    assert conv and {names[i] for i in axes} == conv
    assert set(axes.values()) == {0}
    assert 0.0 < tr.conv_share() <= 1.0
    # on a feed: Conv's share of the MACs (the digits CNN does nearly all of its products in Convs)
    feed = dict(next(iter(_ctx(digits).calibration.take(1))))
    by_macs = tr.conv_share(feed)
    assert by_macs > 0.5 and resolve_precision("auto", conv_share=by_macs) == "fp32"


def test_step_scale_channel_trains_and_lowers_the_held_out_loss(digits):
    result = PassManager(parse_pipeline(
        f"{PRUNE},distill{{mode=train steps=12 batch=8 eval_every=4 samples=64 step_scale=channel}}")).run(
        digits, _ctx(digits))
    stats = next(r.pass_stats for r in result.ledger if r.stage.startswith("distill"))["train"]
    assert stats["steps"] >= 4
    assert stats["heldout_loss_best"] < stats["heldout_loss_start"]


def test_warmup_lasts_at_least_min_warmup_steps_even_when_time_runs_fast(digits, monkeypatch):
    """A time budget that is nearly spent at the first step (a slow model) used to give Adam's first steps the
    full lr; now the ramp still rises over MIN_WARMUP_STEPS steps."""
    graph, ctx, tr = _trainer(digits, steps=MIN_WARMUP_STEPS + 5, lr=1e-3, warmup=0.1, eval_every=1000,
                              backoff=False, step_scale="tensor")
    seen: list[float] = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"] / self.param_groups[0]["relative_scale"])
        return real_step(self, *a, **k)

    real_init = torch.optim.Adam.__init__

    def init(self, groups, *a, **k):
        real_init(self, groups, *a, **k)
        for g, src in zip(self.param_groups, groups, strict=True):
            g["relative_scale"] = src["lr"] / 1e-3

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    monkeypatch.setattr(torch.optim.Adam, "__init__", init)
    clock = iter(np.arange(0.0, 1e6, 0.4))  # every perf_counter call advances 0.4 s of a 6 s budget
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    feeds = [dict(f) for f in ctx.calibration.take(64)]
    train, held = tr.split(feeds)
    forward = lambda f: tr.tg.forward(f, [])  # noqa: E731
    from onnxcompress.runtime import Session

    with Session(tr.teacher, what="teacher") as sess:
        want = list(tr.kinds)
        targets = lambda f: dict(zip(want, sess.run(f, want), strict=True))  # noqa: E731
        tr.fit(tr.tg.parameters(), tr.opts.steps, 6.0, train, held, forward, targets, [], "test")
    assert len(seen) >= 3
    ramp = np.array(seen[:3]) / 1e-3
    # the time fraction alone (0.6 s of warmup, 0.4 s a clock read) would have put the ramp at 1 from the second
    # step; the step floor keeps step k at k / MIN_WARMUP_STEPS at most
    assert np.all(ramp <= np.arange(1, 4) / MIN_WARMUP_STEPS + 1e-9)
    assert 0 < ramp[0] and ramp[1] < 0.5


def test_precision_auto_is_fp32_for_convolutional_networks():
    assert resolve_precision("auto", conv_share=CONV_SHARE_FP32 + 0.1) == "fp32"
    assert resolve_precision("auto", conv_share=0.0) == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("bf16", conv_share=1.0) == "bf16"  # asked for explicitly: kept


def test_bad_step_scale():
    with pytest.raises(ValueError, match="step_scale"):
        Distill(step_scale="row")


def test_held_out_feeds_avoid_the_refits_feeds_when_training_reads_more():
    from onnxcompress.passes.distill.train_entry import MAX_HELDOUT, held_out, refit_aware_split

    feeds = [{"x": np.full((1, 1), i, np.float32)} for i in range(200)]
    train, held = refit_aware_split(feeds, 64)
    ids = [int(f["x"][0, 0]) for f in held]
    assert len(held) == MAX_HELDOUT and min(ids) >= 64 and max(ids) >= 190  # spread over the refit-free tail
    assert len(train) + len(held) == len(feeds) and not {id(f) for f in train} & {id(f) for f in held}
    # no refit boundary (or too few feeds after it): every 4th feed, as before
    for fitted in (0, 195):
        t2, h2 = refit_aware_split(feeds, fitted)
        t3, h3 = held_out(feeds, MAX_HELDOUT)
        assert [id(f) for f in h2] == [id(f) for f in h3] and len(t2) == len(t3)
