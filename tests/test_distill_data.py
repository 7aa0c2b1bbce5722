"""distill{mode=train}: the training draws from ``train_samples`` calibration feeds, the refit from ``samples``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxcompress.passes.distill import Distill

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline

pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
PRUNE = "cleanup,prune-channels{target_macs=0.4}"
FAST = "steps=6 batch=8 eval_every=3"


def _stats(model: onnx.ModelProto, pipeline: str, calib) -> dict:
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=load_feeds(calib, model)))
    return {r.stage: r.pass_stats for r in res.ledger if r.stage.startswith("distill")}


def _generator(n: int, seed: int):
    """A re-iterable source of ``n`` distinct unlabeled digits-like inputs (a callable returning a fresh iterator),
    as a user hands distill a generator: the same first feeds on every pass."""
    base = np.load(CALIB)["image"].astype(np.float32)

    def gen():
        rng = np.random.default_rng(seed)
        for i in range(n):
            x = base[i % len(base)][None]
            yield {"image": (x + rng.normal(0, 0.05 * x.std(), x.shape)).astype(np.float32)}

    return gen


def test_train_samples_sets_the_training_feeds_and_the_refit_keeps_samples():
    model = onnx.load(DIGITS)
    st = _stats(model, f"{PRUNE},distill{{mode=refit+train samples=16 train_samples=120 {FAST}}}", str(CALIB))
    train = next(iter(st.values()))["train"]
    # 120 feeds, the first 16 the refit's: 32 held out evenly from the 104 after them, 88 trained on
    assert train["train_feeds"] + train["heldout_feeds"] == 120
    assert train["heldout_feeds"] == 32
    base = next(iter(_stats(model, f"{PRUNE},distill{{mode=train samples=16 {FAST}}}", str(CALIB)).values()))
    assert base["train"]["train_feeds"] + base["train"]["heldout_feeds"] == 16  # 0: the refit's samples


def test_train_samples_reads_a_generator_beyond_the_calibration_file():
    model = onnx.load(DIGITS)
    st = _stats(model, f"{PRUNE},distill{{mode=train samples=8 train_samples=400 {FAST}}}", _generator(400, 0))
    train = next(iter(st.values()))["train"]
    assert train["train_feeds"] + train["heldout_feeds"] == 400 and train["heldout_feeds"] == 32


@pytest.mark.parametrize("bad", [-1, -64])
def test_negative_train_samples_is_refused(bad):
    with pytest.raises(ValueError, match="train_samples"):
        Distill(train_samples=bad)


def test_extra_photos_are_new_images_in_the_imagenet_format():
    pytest.importorskip("skimage", reason="the benchmark photos come from scikit-image")
    from benchmarks import distill_train, imagenet

    pools = set(imagenet.PHOTOS["calib"]) | set(imagenet.PHOTOS["eval"])
    assert not pools & set(distill_train.EXTRA_PHOTOS)
    feeds = distill_train.extra_photo_feeds(2 * len(distill_train.EXTRA_PHOTOS))
    x = np.concatenate([f["image"] for f in feeds])
    assert x.shape == (len(feeds), 3, imagenet.SIZE, imagenet.SIZE) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    flat = x.reshape(len(x), -1)
    assert len(np.unique(flat.round(3), axis=0)) == len(x)  # every crop differs
    # none is one of the calibration or evaluation crops
    ref = np.concatenate([imagenet.normalize(imagenet.crop(s, i)) for s in ("calib", "eval") for i in range(22)])
    d = np.abs(flat[:, None, :] - ref.reshape(len(ref), -1)[None]).mean(-1)
    assert d.min() > 0.01


def test_augment_none_from_a_pipeline_string_means_no_augmentation():
    from onnxcompress.passes.distill.train_losses import parse_augment

    (p,) = parse_pipeline("distill{mode=train augment=none}")
    assert parse_augment(p.augment) == ()


@pytest.mark.parametrize(("tolerance", "dropped"), [(0.0, True), (1e9, False)])
def test_auto_augmentation_is_kept_only_near_the_clean_loss(monkeypatch, tolerance, dropped):
    from onnxcompress.passes.distill import train as train_mod

    monkeypatch.setattr(train_mod, "AUGMENT_TOLERANCE", tolerance)
    model = onnx.load(DIGITS)
    st = next(iter(_stats(model, f"{PRUNE},distill{{mode=train samples=32 {FAST}}}", str(CALIB)).values()))
    probe = st["train"]["augment_probe"]
    assert probe["clean"] > 0 and probe["augmented"] > 0
    assert probe.get("dropped", False) is dropped
    # an explicit augmentation is never probed
    st = next(iter(_stats(model, f"{PRUNE},distill{{mode=train samples=32 augment=noise {FAST}}}",
                          str(CALIB)).values()))
    assert st["train"]["augment_probe"] is None


def test_distill_train_table_shows_blockwise_and_end_to_end_rows():
    from benchmarks import distill_train

    base = {"model": "m", "macs_ratio": 0.5, "metric_name": "agreement", "metric": 0.9, "cosine": 0.97,
            "seconds": 300.0, "cpu_seconds": 120.0, "peak_mb": 1600.0, "load_average": 5.1}
    e2e = base | {"stage": "refit+train[a]", "train": {"steps": 80, "stopped_by": "early stop",
                                                       "heldout_loss_start": 0.3, "heldout_loss_best": 0.25}}
    bw = base | {"stage": "refit+train[b]", "train": {"steps": None, "heldout_loss_start": None, "blocks": 5,
                                                      "blocks_trained": 4}}
    md = distill_train.render([e2e, bw], {"args": "x"})
    assert "| 80 (early stop) | 0.3 -> 0.25 |" in md
    assert "| block-wise: 4 of 5 blocks |  |" in md
