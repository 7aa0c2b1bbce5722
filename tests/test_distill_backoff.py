"""distill{mode=train}: a held-out evaluation that is no better puts the best weights back and halves the lr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run

pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
PRUNE = "cleanup,prune-channels{target_macs=0.4}"
#: a relative lr of 0.3 throws the weights far off in a few Adam steps: the held-out loss rises
HOT = "mode=train lr=0.3 warmup=0 steps=16 batch=8 eval_every=2 patience=8 samples=64"


def _run(model: onnx.ModelProto, pipeline: str):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=load_feeds(str(CALIB), model)))
    stats = next(r.pass_stats for r in res.ledger if r.stage.startswith("distill"))["train"]
    return res.model, stats


def test_backoff_halves_the_lr_and_never_leaves_worse_weights():
    model = onnx.load(DIGITS)
    _, on = _run(model, f"{PRUNE},distill{{{HOT}}}")
    assert on["backoffs"] >= 1
    assert on["lr_final"] == pytest.approx(0.3 * 0.5 ** on["backoffs"])
    _, off = _run(model, f"{PRUNE},distill{{{HOT} backoff=false}}")
    assert off["backoffs"] == 0 and off["lr_final"] == pytest.approx(0.3)
    # with back-off the held-out loss ends at least as low as without it (it restarts from the best weights)
    assert on["heldout_loss_best"] <= off["heldout_loss_best"] + 1e-9
    # and the written-back model is no worse than the pruned one on unseen inputs
    x = np.load(VAL)["image"]
    (ref,) = ort_run(model, {"image": x})
    pruned = PassManager(parse_pipeline(PRUNE)).run(model, PassContext()).model
    trained, _ = _run(model, f"{PRUNE},distill{{{HOT}}}")

    def err(m: onnx.ModelProto) -> float:
        (o,) = ort_run(m, {"image": x})
        return float(np.mean((o - ref) ** 2) / np.mean(ref ** 2))

    assert err(trained) <= err(pruned) * 1.05


def test_backoff_needs_a_rise_beyond_the_evaluations_noise():
    from onnxcompress.passes.distill.train import NOISE_SIGMAS, clear_rise

    assert clear_rise(1.0 + NOISE_SIGMAS * 0.01 + 1e-9, 1.0, 0.01)
    assert not clear_rise(1.0 + NOISE_SIGMAS * 0.01 - 1e-9, 1.0, 0.01)
    assert clear_rise(1.0 + 1e-12, 1.0, 0.0)  # one minibatch of held-out feeds: no noise estimate, any rise counts
    # on the digits run every evaluation that neither improved nor backed off was held within the noise
    _, on = _run(onnx.load(DIGITS), f"{PRUNE},distill{{{HOT}}}")
    evals = len(on["loss_history"]) - 1
    assert on["backoffs"] + on["backoffs_held"] <= evals
