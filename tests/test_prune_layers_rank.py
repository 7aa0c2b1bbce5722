"""prune-layers ``rank``: under a latency budget a step takes the unit with the least added output error per MAC it
removes (a cheap-but-harmless unit that buys no time is not preferred over a costly one); checked against errors
measured independently under ORT and MACs counted by hand on a graph whose blocks differ 72x in cost."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress.analyses.blocks_graph import bypass_model
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.manager import PassManager
from onnxcompress.output_error import relative_output_error
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run
from tests.test_blocks import Builder

C, HW = 8, 8


def two_cost_blocks(s_cheap: float = 0.15, s_wide: float = 0.35) -> onnx.ModelProto:
    """h0 = relu(conv0(x)); block "cheap": h1 = h0 + s * conv1x1(h0) (C*C*HW^2 MACs); block "wide":
    h2 = h1 + s * conv3x3(relu(conv3x3(h1, C->4C)), 4C->C) (72x the cheap block's MACs); GAP -> Gemm."""
    b = Builder(3)
    h0 = b.op("Relu", [b.op("Conv", ["x", b.rand("w0", C, 3, 3, 3)], "c0", pads=[1, 1, 1, 1])], "h0")
    f = b.op("Conv", [h0, b.rand("wc", C, C, 1, 1, scale=s_cheap)], "cc")
    h1 = b.op("Add", [h0, f], "add_cheap")
    a = b.op("Relu", [b.op("Conv", [h1, b.rand("wa", 4 * C, C, 3, 3)], "ca", pads=[1, 1, 1, 1])], "ra")
    g = b.op("Conv", [a, b.rand("wb", C, 4 * C, 3, 3, scale=s_wide)], "cb", pads=[1, 1, 1, 1])
    h2 = b.op("Add", [h1, g], "add_wide")
    p = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [h2], "h2r")], "gap")], "flat")
    b.op("Gemm", [p, b.rand("wfc", 5, C), b.rand("bfc", 5)], "y", transB=1)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, HW, HW])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])


def _feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, HW, HW)).astype(np.float32)} for _ in range(n)]


class _Latency(LatencyProfile):
    """Every measurement says 0.5 (the all-removed floor and the first step): one step meets target 0.7."""

    def measure(self, key, fn):
        return 0.5


def _steps(pipeline: str, model: onnx.ModelProto, feeds, latency=None) -> dict:
    ctx = PassContext(calibration=load_feeds(feeds, model))
    if latency is not None:
        ctx.latency = latency
    res = PassManager(parse_pipeline(pipeline)).run(model, ctx)
    return next(r.pass_stats for r in res.ledger if r.stage.startswith("prune-layers"))


def test_per_mac_rank_prefers_the_unit_that_buys_more_per_error():
    model = two_cost_blocks()
    feeds = _feeds(8)
    base = [ort_run(model, f) for f in feeds]
    units = {"add_cheap": ("h0", "add_cheap"), "add_wide": ("add_cheap", "add_wide")}
    err = {k: relative_output_error(base, [ort_run(bypass_model(model, [p]), f) for f in feeds])
           for k, p in units.items()}
    conv0 = C * 3 * 9 * HW * HW
    cheap, wide = C * C * HW * HW, 2 * 4 * C * C * 9 * HW * HW
    total = conv0 + cheap + wide + 5 * C
    share = {"add_cheap": cheap / total, "add_wide": wide / total}
    # the construction: the cheap block changes the outputs less, the wide one less per MAC
    assert err["add_cheap"] < err["add_wide"]
    assert err["add_wide"] / share["add_wide"] < err["add_cheap"] / share["add_cheap"]

    by_error = _steps("prune-layers{layers=1 kinds=[residual] trials=0 samples=8}", model, feeds)
    assert by_error["rank"] == "error" and by_error["steps"][0]["exit"] == "add_cheap"
    by_mac = _steps("prune-layers{layers=1 kinds=[residual] trials=0 samples=8 rank=per_mac}", model, feeds)
    step = by_mac["steps"][0]
    assert by_mac["rank"] == "per_mac" and step["exit"] == "add_wide"
    assert step["mac_share"] == pytest.approx(share["add_wide"], rel=1e-4)
    assert step["error"] == pytest.approx(err["add_wide"], rel=1e-3)


def test_latency_budget_ranks_per_mac_by_default():
    model = two_cost_blocks()
    st = _steps("prune-layers{target_latency=0.7 kinds=[residual] trials=0 samples=8}", model, _feeds(8),
                latency=_Latency())
    assert st["rank"] == "per_mac" and [s["exit"] for s in st["steps"]] == ["add_wide"]
    assert st["steps"][0]["latency_ratio"] == 0.5


def test_bad_rank_is_rejected():
    with pytest.raises(BadInputError, match="rank must be one of auto, error, per_mac"):
        parse_pipeline("prune-layers{layers=1 rank=fastest}")
