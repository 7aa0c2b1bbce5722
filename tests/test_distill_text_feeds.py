"""distill{mode=train}: token feeds packed by length, and ``train_data`` (an unlabeled pool) beside the calibration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes.distill import Distill
from onnxcompress.passes.distill.train_entry import held_out
from onnxcompress.passes.distill.train_losses import mask_input, pack_tokens

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from tests.conftest import ort_run

VOCAB, DIM = 50, 8


def _token_model(seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    """ids, mask [b, s] -> masked mean of relu(E[ids] W): an embedding that ignores masked positions."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(VOCAB, DIM)).astype(np.float32)
    w = rng.normal(size=(DIM, DIM)).astype(np.float32) / np.sqrt(DIM)
    w = (w + noise * np.random.default_rng(seed).normal(size=w.shape)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "W"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axis2"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["num"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["den"], keepdims=0),
        helper.make_node("Div", ["num", "den"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tok",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W"),
         numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _sentences(n: int, seed: int, pad_to: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 12))
        ids = rng.integers(1, VOCAB, size=(1, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if pad_to:
            ids = np.pad(ids, ((0, 0), (0, pad_to - length)))
            mask = np.pad(mask, ((0, 0), (0, pad_to - length)))
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_pack_trims_padding_sorts_by_length_and_keeps_every_sentence():
    feeds = _sentences(10, 1, pad_to=16)
    packs, stats = pack_tokens(feeds, 4)
    assert stats["feeds"] == 10 and stats["packs"] == 3 and [p["input_ids"].shape[0] for p in packs] == [4, 4, 2]
    lengths = [int(f["attention_mask"].sum()) for f in feeds]
    widths = [p["input_ids"].shape[1] for p in packs]
    assert widths == sorted(widths) and widths[-1] == max(lengths) < 16  # trimmed to each pack's longest
    rows = sorted(tuple(r[m == 1]) for p in packs for r, m in zip(p["input_ids"], p["attention_mask"], strict=True))
    assert rows == sorted(tuple(f["input_ids"][0, :n]) for f, n in zip(feeds, lengths, strict=True))
    real = sum(lengths)
    assert stats["pad_fraction"] == pytest.approx(1 - real / sum(p["attention_mask"].size for p in packs), abs=1e-4)


def test_feeds_without_a_mask_or_of_other_inputs_are_not_packed():
    no_mask = [{"input_ids": f["input_ids"]} for f in _sentences(6, 2)]
    assert mask_input(no_mask[0]) is None
    assert pack_tokens(no_mask, 4) == (no_mask, None)
    images = [{"x": np.zeros((1, 3, 8, 8), np.float32)} for _ in range(4)]
    assert pack_tokens(images, 4) == (images, None)
    feeds = _sentences(4, 3)
    assert pack_tokens(feeds, 1) == (feeds, None)


def test_a_padded_pack_gives_each_sentence_its_unpadded_output_under_ort():
    model = _token_model()
    feeds = _sentences(8, 4)
    packs, _ = pack_tokens(feeds, 8)
    (got,) = ort_run(model, packs[0])
    ref = np.concatenate([ort_run(model, f)[0] for f in feeds])
    order = np.argsort([f["input_ids"].shape[1] for f in feeds], kind="stable")
    np.testing.assert_allclose(got, ref[order], rtol=1e-5, atol=1e-6)


def test_heldout_is_every_fourth_feed_spread_and_capped():
    feeds = [{"x": np.full((1, 1), i)} for i in range(600)]
    rest, held = held_out(feeds, 128)
    ids = [int(f["x"][0, 0]) for f in held]
    assert len(held) == 128 and all(i % 4 == 3 for i in ids) and ids[0] == 3 and ids[-1] == 599
    assert len(rest) == 600 - 128 and not {int(f["x"][0, 0]) for f in rest} & set(ids)


def _train(tmp_path, **opts) -> tuple[dict, onnx.ModelProto, list]:
    pytest.importorskip("torch", reason="distill{mode=train} needs torch (pip install onnxcompress[train])")
    teacher, student = _token_model(), _token_model(seed=1, noise=0.3)
    calib = _sentences(40, 5)
    pool = _sentences(200, 6, pad_to=12)
    np.savez(tmp_path / "pool.npz", **{k: np.concatenate([f[k] for f in pool]) for k in pool[0]})
    ctx = PassContext(calibration=load_feeds(calib, teacher), original_bytes=teacher.SerializeToString())
    graph = io.to_graph(student)
    p = Distill(mode="train", train_data=str(tmp_path / "pool.npz"), steps=40, eval_every=5, batch=8, lr=2e-2,
                warmup=0.0, **opts)
    res = p.run(graph, ctx)
    return res.stats["train"], ctx.export(graph), calib


def test_train_data_trains_on_the_pool_and_holds_out_pool_feeds_it_does_not_read(tmp_path):
    stats, trained, calib = _train(tmp_path, train_samples=120)
    src = stats["train_source"]
    assert src["heldout"] == "pool" and src["train_feeds"] == 120 + 40 and src["heldout_feeds"] == 80
    assert stats["packed"]["packs"] == 20 and stats["packed"]["pad_fraction"] < 0.25
    assert stats["improved"] and stats["heldout_loss_best"] < stats["heldout_loss_start"]
    teacher, student = _token_model(), _token_model(seed=1, noise=0.3)

    def cos_err(m: onnx.ModelProto) -> float:
        t = np.concatenate([ort_run(teacher, f)[0] for f in calib])
        s = np.concatenate([ort_run(m, f)[0] for f in calib])
        cos = (t * s).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(s, axis=1)
        return float(1 - cos.mean())

    assert cos_err(trained) < 0.8 * cos_err(student)


def test_heldout_calibration_holds_out_every_fourth_calibration_feed(tmp_path):
    src = _train(tmp_path, train_samples=120, heldout="calibration")[0]["train_source"]
    assert src["heldout"] == "calibration" and src["train_feeds"] == 120 + 30 and src["heldout_feeds"] == 10
    src = _train(tmp_path, train_samples=196)[0]["train_source"]  # < 8 pool feeds left: every 4th of the 196
    assert src["heldout_feeds"] == 49 and src["train_feeds"] == 196 - 49 + 40


@pytest.mark.parametrize("bad", [{"heldout": "eval"}, {"heldout": "pool"}])
def test_bad_heldout_is_refused(bad):
    with pytest.raises(ValueError, match="heldout"):
        Distill(mode="train", **bad)


def test_train_data_is_deterministic_and_pack_false_runs_sentence_by_sentence(tmp_path):
    a = _train(tmp_path, train_samples=60)[1]
    b = _train(tmp_path, train_samples=60)[1]
    assert a.SerializeToString() == b.SerializeToString()
    stats = _train(tmp_path, train_samples=60, pack=False)[0]
    assert "packed" not in stats and stats["train_feeds"] == 60 + 40


def test_a_missing_train_data_file_is_one_clear_error(tmp_path):
    from onnxcompress.errors import PassError

    pytest.importorskip("torch")
    teacher = _token_model()
    ctx = PassContext(calibration=load_feeds(_sentences(8, 0), teacher), original_bytes=teacher.SerializeToString())
    with pytest.raises(PassError, match="train_data"):
        Distill(mode="train", train_data=str(tmp_path / "nope.npz"), steps=2).run(io.to_graph(_token_model()), ctx)
