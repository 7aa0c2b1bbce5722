"""distill{mode=train}: the augmentations (zoom, mix) and the lr warmup option."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxcompress.passes.distill import Distill

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill.train_losses import augment_feed, mix_feeds, parse_augment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(1, 3, 32, 32)).astype(np.float32),
             "ids": np.arange(6, dtype=np.int64)[None] + i} for i in range(n)]


def test_mix_is_a_convex_combination_with_another_feed_and_leaves_token_ids():
    feeds = _images(4)
    mixed = mix_feeds(feeds, np.random.default_rng(3))
    stack = np.stack([f["image"].ravel() for f in feeds])
    for i, (f, m) in enumerate(zip(feeds, mixed, strict=True)):
        np.testing.assert_array_equal(m["ids"], f["ids"])  # token ids are never mixed
        # m = l a_i + (1 - l) a_j for one j != i: solve for (l, j) by least squares over the other feeds
        fits = []
        for j in range(len(feeds)):
            if j == i:
                continue
            d = stack[i] - stack[j]
            lam = float(d @ (m["image"].ravel() - stack[j]) / (d @ d))
            fits.append((float(np.abs(lam * stack[i] + (1 - lam) * stack[j] - m["image"].ravel()).max()), lam))
        err, lam = min(fits)
        assert err < 1e-5 and 0.0 <= lam <= 1.0
        assert not np.array_equal(m["image"], f["image"])
    # deterministic given the generator; a single feed is returned as it is
    again = mix_feeds(feeds, np.random.default_rng(3))
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(mixed, again, strict=True))
    assert mix_feeds(feeds[:1], np.random.default_rng(0)) == feeds[:1]


def test_zoom_keeps_the_shape_and_crops_wider_than_crop():
    """zoom draws boxes of 35-100% of each side (crop: 80-100%): on a ramp image, the value range a zoomed copy
    spans shrinks to about the box's share of the side, so some zooms span well under 80% of the ramp."""
    ramp = np.broadcast_to(np.linspace(0, 1, 64, dtype=np.float32), (1, 3, 64, 64)).copy()
    feed = {"image": ramp}
    rng = np.random.default_rng(0)
    spans = {}
    for kind in ("crop", "zoom"):
        out = [augment_feed(torch, feed, (kind,), rng)["image"] for _ in range(40)]
        assert all(o.shape == ramp.shape and o.dtype == ramp.dtype for o in out)
        spans[kind] = [float(o[0, 0, 0].max() - o[0, 0, 0].min()) for o in out]
    assert min(spans["crop"]) > 0.7
    assert min(spans["zoom"]) < 0.55
    assert parse_augment("zoom+flip+mix") == ("zoom", "flip", "mix")


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_warmup(bad):
    with pytest.raises(ValueError):
        Distill(warmup=bad)


def test_warmup_and_mix_train_deterministically_and_improve():
    model = onnx.load(DIGITS)
    x = np.load(VAL)["image"]
    (ref,) = ort_run(model, {"image": x})
    prune = "cleanup,prune-channels{target_macs=0.4}"
    train = "distill{mode=train steps=12 batch=8 eval_every=4 samples=64 warmup=0.25 lr=1e-3 augment=crop+mix}"

    def run(pipeline: str):
        return PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=load_feeds(str(CALIB), model),
                                                                            seed=0))

    def err(m) -> float:
        (o,) = ort_run(m, {"image": x})
        return float(np.mean((o - ref) ** 2) / np.mean(ref ** 2))

    a, b = run(f"{prune},{train}"), run(f"{prune},{train}")
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert err(a.model) < err(run(prune).model)
    assert replace(Distill(), warmup=0.5).warmup == 0.5


def test_span_and_swap_change_token_ids_consistently():
    from onnxcompress.passes.distill.train_losses import augment_feed, token_pool

    ids = np.array([[101, 7, 8, 9, 10, 11, 12, 13, 14, 102]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    pool = token_pool([feed, {**feed, "input_ids": ids + 100}])
    assert set(pool.tolist()) == set(ids.ravel().tolist()) | set((ids + 100).ravel().tolist())
    rng = np.random.default_rng(0)
    lengths, swapped = set(), 0
    for _ in range(30):
        out = augment_feed(torch, feed, ("span", "swap"), rng, pool)
        x = out["input_ids"]
        lengths.add(x.shape[1])
        assert x[0, 0] == 101 and x[0, -1] == 102  # [CLS] and [SEP] kept
        assert out["attention_mask"].shape == x.shape == out["token_type_ids"].shape
        assert np.all(out["attention_mask"] == 1) and np.all(out["token_type_ids"] == 0)
        assert set(x.ravel().tolist()) <= set(pool.tolist())
        swapped += int(np.any(x[0, 1:-1] >= 107))
    assert min(lengths) >= 2 + 4 and max(lengths) <= 10 and len(lengths) >= 3
    assert swapped >= 3
    # images untouched by token augmentations; token ids untouched by image ones
    img = {"image": np.ones((1, 3, 16, 16), np.float32)}
    assert augment_feed(torch, img, ("span", "swap"), rng, pool)["image"] is img["image"]
    np.testing.assert_array_equal(augment_feed(torch, feed, ("crop", "noise", "zoom"), rng)["input_ids"], ids)


def test_heldout_feeds_are_spread_over_the_whole_calibration_list():
    """550 ordered feeds: the 32 held-out ones come from the whole list (they used to be the first 32 every-4th
    feeds, indices 3..127: a refit on the first 128 feeds made them look far better than the rest)."""
    from onnxcompress.passes.distill.train import MAX_HELDOUT, Trainer

    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(550)]
    train, held = Trainer.split(None, feeds)
    ids = [int(f["x"][0, 0]) for f in held]
    assert len(held) == MAX_HELDOUT and all(i % 4 == 3 for i in ids)
    assert ids[0] == 3 and ids[-1] >= 540 and len(set(ids)) == len(ids)
    assert len(train) == 550 - MAX_HELDOUT and not ({int(f["x"][0, 0]) for f in train} & set(ids))
