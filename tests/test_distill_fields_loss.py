"""``loss=fields`` of distill{mode=train}: per-field normalized MSE (passes/distill/train_losses.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxcompress.passes.distill.train_losses import field_axis, loss_kinds, output_loss, parse_loss

torch = pytest.importorskip("torch", reason="distill{mode=train} needs the [train] extra (torch)")


def _model(shape: list[int]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))


def test_field_axis_is_the_box_score_axis_of_a_detection_layout():
    assert field_axis((1, 22, 2100)) == 1        # YOLOv8 [N, 4+K, A]
    assert field_axis((1, 3549, 6)) == 2         # YOLOX [N, A, 4+1+K]
    assert field_axis((2, 8, 40, 40)) == 1       # a feature map: channels
    assert loss_kinds(_model([1, 22, 2100]), "fields") == {"y": ("fields", 1)}
    assert loss_kinds(_model([1, 22, 2100]), "auto") == {"y": ("mse", -1)}
    assert parse_loss("y:fields") == (None, {"y": "fields"})


def test_fields_loss_equals_numpy_reference_and_weighs_each_field_alike():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 6, 50))
    t[:, :4] *= 300.0  # coordinates
    t[:, 4:] = 1 / (1 + np.exp(-t[:, 4:]))  # probabilities
    s = t + rng.normal(size=t.shape) * np.array([30, 30, 30, 30, 0.05, 0.05])[None, :, None]
    ref = np.mean([np.mean((s[:, f] - t[:, f]) ** 2) / (np.var(t[:, f]) + 1e-8) for f in range(6)])
    got = output_loss(torch, "fields", torch.tensor(s), torch.tensor(t), 1, 2.0, False).item()
    assert got == pytest.approx(ref, rel=1e-9)
    # the same relative damage to a score field costs as much as to a coordinate field under `fields`,
    # and next to nothing under the whole-tensor `mse`
    hurt_score, hurt_coord = t.copy(), t.copy()
    hurt_score[:, 4] += np.std(t[:, 4])
    hurt_coord[:, 0] += np.std(t[:, 0])
    f = [output_loss(torch, "fields", torch.tensor(h), torch.tensor(t), 1, 2.0, False).item()
         for h in (hurt_score, hurt_coord)]
    m = [output_loss(torch, "mse", torch.tensor(h), torch.tensor(t), -1, 2.0, False).item()
         for h in (hurt_score, hurt_coord)]
    assert f[0] == pytest.approx(f[1], rel=1e-6)
    assert m[0] < 1e-3 * m[1]
