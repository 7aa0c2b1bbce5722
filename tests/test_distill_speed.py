"""distill{mode=train} precision (bf16 autocast) and weight averaging (ema): what they change and what they keep."""

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

torch = pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")

from onnxcompress.passes.distill.train_speed import (  # noqa: E402
    WeightAverage,
    autocast,
    native_bf16,
    resolve_precision,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
PRUNE = "cleanup,prune-channels{target_macs=0.4}"
FAST = "steps=12 batch=8 eval_every=4 samples=64"


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


def _run(model, pipeline, seed=0):
    return PassManager(parse_pipeline(pipeline)).run(model, PassContext(calibration=load_feeds(str(CALIB), model),
                                                                        seed=seed))


def _train_stats(result):
    return next(r.pass_stats for r in result.ledger if r.stage.startswith("distill"))["train"]


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    with_flag = tmp_path / "a"
    with_flag.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    amx = tmp_path / "b"
    amx.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    without = tmp_path / "c"
    without.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\nbugs\t\t: avx512_bf16\n")
    assert native_bf16(str(with_flag)) and native_bf16(str(amx))
    assert not native_bf16(str(without))  # the flag named outside the flags line does not count
    assert not native_bf16(str(tmp_path / "missing"))
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto", fake_quant=True) == "fp32"  # QAT mirrors ORT's integer products
    assert resolve_precision("bf16", fake_quant=True) == "bf16"  # asked for: given
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")


def test_autocast_rounds_products_to_bf16_only_when_asked():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with autocast(torch, "bf16"):
        low = a @ b
    with autocast(torch, "fp32"):
        full = a @ b
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    exact = (a.double() @ b.double()).float()
    assert torch.allclose(full, exact, atol=1e-5)
    err = float((low.float() - exact).abs().max())
    assert 1e-5 < err < 0.1  # rounded to 8 mantissa bits: visibly inexact, still close


def test_weight_average_is_the_ramped_ema_and_applied_swaps_back():
    p = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage(torch, [p], 0.9)
    expect = np.zeros(3)
    for t in range(1, 30):
        with torch.no_grad():
            p.fill_(float(t))
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        expect = d * expect + (1 - d) * t
    np.testing.assert_allclose(avg.avg[0].numpy(), expect, rtol=1e-5)
    with avg.applied():
        np.testing.assert_allclose(p.detach().numpy(), expect, rtol=1e-5)
    assert float(p.detach()[0]) == 29.0  # the trained weights are back
    avg.reset()
    assert float(avg.avg[0][0]) == 29.0 and avg.steps == 0
    off = WeightAverage(torch, [p], 0.0)
    off.update()
    with off.applied():
        assert float(p.detach()[0]) == 29.0
    assert not off.active and off.avg == []


def test_bf16_and_ema_train_same_seed_same_bytes_and_improve(digits):
    x = np.load(VAL)["image"]
    (ref,) = ort_run(digits, {"image": x})
    pruned = _run(digits, PRUNE).model

    def err(m):
        (o,) = ort_run(m, {"image": x})
        return float(np.mean((o - ref) ** 2) / np.mean(ref ** 2))

    runs = {}
    for opts in ("precision=fp32", "precision=bf16", "precision=bf16 ema=0.9"):
        a = _run(digits, f"{PRUNE},distill{{mode=train {FAST} {opts}}}")
        st = _train_stats(a)
        assert st["improved"] and err(a.model) < err(pruned), opts
        runs[opts] = (a.model.SerializeToString(), st)
    again = _run(digits, f"{PRUNE},distill{{mode=train {FAST} precision=bf16 ema=0.9}}")
    assert again.model.SerializeToString() == runs["precision=bf16 ema=0.9"][0]
    assert runs["precision=bf16"][1]["precision"] == "bf16" and runs["precision=fp32"][1]["precision"] == "fp32"
    assert runs["precision=bf16 ema=0.9"][1]["ema"] == 0.9
    # each switch changes the trained weights (bf16 rounds the products; the average is what is written)
    assert len({v[0] for v in runs.values()}) == 3


def test_folded_masks_give_the_bytes_of_multiplied_masks(digits, monkeypatch):
    """A fixed pruning mask folded into its parameter (gradient hook) trains to the same bytes as W = P * M, and
    the pruned zeros stay zero."""
    from onnxcompress.passes.distill.torch_interpreter import TorchGraph

    import tests.test_distill_train  # noqa: F401  (registers test-train-sparsify)

    pipe = f"cleanup,test-train-sparsify,distill{{mode=train {FAST} precision=fp32}}"
    folded = _run(digits, pipe)
    assert _train_stats(folded)["improved"]
    monkeypatch.setattr(TorchGraph, "_fold_mask", lambda self, w: None)
    multiplied = _run(digits, pipe)
    assert folded.model.SerializeToString() == multiplied.model.SerializeToString()
    sparse = _run(digits, "cleanup,test-train-sparsify").model
    after = {t.name: onnx.numpy_helper.to_array(t) for t in folded.model.graph.initializer}
    zeros = 0
    for t in sparse.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim >= 2:
            assert np.all(after[t.name][w == 0] == 0), t.name
            zeros += int((w == 0).sum())
    assert zeros > 0
    monkeypatch.undo()
    from onnxcompress import io

    tg = TorchGraph(io.to_graph(sparse), torch)
    assert sum(w.folded for w in tg.weights.values()) >= 2  # the masks were folded in the first run


@pytest.mark.parametrize("opts", ["precision=fp16", "ema=1.0", "ema=-0.1"])
def test_bad_precision_or_ema_is_one_error_at_parse_time(opts):
    from onnxcompress.errors import BadInputError
    from onnxcompress.pipeline import parse_pipeline

    with pytest.raises(BadInputError, match="precision must be auto, fp32 or bf16 and ema in"):
        parse_pipeline(f"distill{{mode=train {opts}}}")
