"""distill{mode=train loss=detect}: Bernoulli KL on detection scores, confidence-weighted box error."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill.train_losses import (  # noqa: E402
    detection_loss,
    fieldwise_mse,
    loss_kinds,
    output_loss,
)


def _teacher(anchors: int = 400, seed: int = 0) -> torch.Tensor:
    """[1, 4 + 3, A]: pixel boxes, a class that fires on 20 anchors, one that never fires, one always low."""
    rng = np.random.default_rng(seed)
    boxes = rng.uniform(0, 320, (4, anchors))
    firing = np.full(anchors, 1e-4)
    firing[:20] = rng.uniform(0.2, 0.9, 20)
    never = np.full(anchors, 1e-6) * rng.uniform(0.5, 1.5, anchors)
    low = rng.uniform(0.0, 0.02, anchors)
    return torch.from_numpy(np.concatenate([boxes, firing[None], never[None], low[None]])[None].astype(np.float32))


def test_zero_when_equal_and_positive_otherwise():
    t = _teacher()
    assert float(detection_loss(torch, t.clone(), t, 1)) == pytest.approx(0.0, abs=1e-9)
    s = t.clone()
    s[0, 4, :20] *= 0.8
    assert float(detection_loss(torch, s, t, 1)) > 1e-3


def test_a_class_that_never_fires_weighs_nothing_unlike_fields():
    t = _teacher()
    never = t.clone()
    never[0, 5] *= 30  # 1e-6 -> 3e-5 everywhere: far below any threshold
    firing = t.clone()
    firing[0, 4, :20] -= 0.1  # the firing class 0.1 lower on its 20 anchors: boxes lost at a 0.25 threshold
    assert float(detection_loss(torch, firing, t, 1)) > 20 * float(detection_loss(torch, never, t, 1))
    # the per-field normalized MSE ranks them the other way round
    assert float(fieldwise_mse(torch, never, t, 1)) > float(fieldwise_mse(torch, firing, t, 1))


def test_box_error_counts_where_the_teacher_is_confident():
    t = _teacher()
    on = t.clone()
    on[0, 0, :20] += 10.0  # 10 px on the 20 confident anchors
    off = t.clone()
    off[0, 0, 200:220] += 10.0  # the same on 20 background anchors
    assert float(detection_loss(torch, on, t, 1)) > 50 * float(detection_loss(torch, off, t, 1))


def test_scores_outside_0_1_fall_back_to_fieldwise_mse_and_gradients_flow():
    t = _teacher()
    t[0, 4:] = t[0, 4:] * 10 - 5  # logits, not probabilities
    s = (t + 0.05 * torch.randn_like(t)).requires_grad_()
    loss = output_loss(torch, "detect", s, t, 1, 2.0, False)
    loss.backward()
    assert float(loss) > 0 and torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0


def test_loss_kinds_gives_detect_the_field_axis():
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3549, 6])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3549, 6])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [out]))
    assert loss_kinds(model, "detect") == {"y": ("detect", 2)}
