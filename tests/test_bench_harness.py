"""The benchmark harness end to end on the bundled digits CNN: rows, ratios, error rows, JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import anchors, report
from benchmarks.run import RunConfig, run, split_methods
from benchmarks.spec import ModelSpec

MODELS = Path(__file__).resolve().parent.parent / "models"


def _inputs(n: int, split: str) -> list[dict[str, np.ndarray]]:
    with np.load(MODELS / ("digits_calib.npz" if split == "calib" else "digits_val.npz")) as z:
        images = z["image"][:n]
    return [{"image": images[i : i + 1]} for i in range(len(images))]


def _evaluate(feeds, ref, cand) -> dict[str, float]:
    labels = np.load(MODELS / "digits_val_labels.npy")[: len(feeds)]
    r = np.array([o[0].argmax(-1)[0] for o in ref])
    c = np.array([o[0].argmax(-1)[0] for o in cand])
    return {
        "top1_agreement": float(np.mean(r == c)),
        "accuracy": float(np.mean(c == labels)),
        "fp32_accuracy": float(np.mean(r == labels)),
    }


DIGITS = ModelSpec(
    name="digits_cnn",
    family="classifier",
    fetch=lambda cache: MODELS / "digits_cnn.onnx",
    make_inputs=_inputs,
    evaluate=_evaluate,
    primary_metric="top1_agreement",
)


def _raises(fp32, calib, out):
    raise RuntimeError("this tool always crashes\nsecond line of the message")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    methods = {
        m: anchors.resolve_method(m) for m in ("fp32", "ours_cleanup", "ort_dynamic", "ours:no-such-pass")
    }
    methods["in_process_crash"] = _raises  # not resolvable by name: runs in this process
    cfg = RunConfig(methods=list(methods), n_calib=16, n_eval=48, latency_budget_s=0.2, latency_min_rounds=3)
    records = run([DIGITS], cfg, out, methods)
    return out, records[0]


def test_json_and_summary_have_every_row(bench):
    out, rec = bench
    on_disk = json.loads((out / "digits_cnn.json").read_text())
    assert set(on_disk["methods"]) == {
        "fp32",
        "ours_cleanup",
        "ort_dynamic",
        "ours:no-such-pass",
        "in_process_crash",
    }
    summary = (out / "summary.md").read_text()
    for name in on_disk["methods"]:
        assert f"| digits_cnn | {name} |" in summary
    assert (out / "plot_size.png").stat().st_size > 0
    assert (out / "plot_latency.png").stat().st_size > 0


def test_fp32_row_is_the_reference(bench):
    _, rec = bench
    fp32 = rec["methods"]["fp32"]
    assert fp32["error"] is None
    assert fp32["metrics"]["top1_agreement"] == 1.0
    assert fp32["metrics"]["fp32_accuracy"] > 0.95
    assert fp32["size_ratio"] == 1.0
    assert fp32["fidelity"]["worst"]["sqnr_db"] == float("inf")
    assert set(fp32["latency"]) == {"t1", "t2"}


def test_ort_dynamic_shrinks_and_agrees(bench):
    _, rec = bench
    row = rec["methods"]["ort_dynamic"]
    assert row["error"] is None, row["error"]
    assert row["size_ratio"] < 0.5
    assert row["metrics"]["top1_agreement"] > 0.9
    assert row["tool"]["isolated"] and row["tool"]["peak_rss_mb"] > 0
    assert row["latency"]["t1"]["ratio"] > 0 and row["session_rss"]["peak_mb"] > 0


def test_ours_cleanup_row(bench):
    _, rec = bench
    row = rec["methods"]["ours_cleanup"]
    if row["error"] is None:  # the cleanup pass is exact and never grows the model
        assert row["metrics"]["top1_agreement"] == 1.0
        assert row["size_ratio"] <= 1.0
    else:
        assert row["error"]  # a failure is recorded with its message, not a crash


def test_failing_methods_are_error_rows(bench):
    out, rec = bench
    sub = rec["methods"]["ours:no-such-pass"]
    assert sub["path"] is None and "no-such-pass" in sub["error"]
    crash = rec["methods"]["in_process_crash"]
    assert crash["error"] == "RuntimeError: this tool always crashes"
    assert "latency" not in crash
    assert "this tool always crashes" in (out / "summary.md").read_text()


def test_feeds_roundtrip_with_ragged_shapes(tmp_path):
    feeds = [
        {"a": np.zeros((1, 3), np.float32), "b": np.ones(2, np.int64)},
        {"a": np.ones((1, 5), np.float32), "b": np.zeros(2, np.int64)},
    ]
    back = anchors.load_feeds(anchors.save_feeds(feeds, tmp_path / "f.npz"))
    assert len(back) == 2 and back[1]["a"].shape == (1, 5) and back[0]["b"].dtype == np.int64


def test_table_marks_model_setup_errors():
    text = report.table([{"model": "m", "error": "setup: FileNotFoundError: x"}])
    assert "setup: FileNotFoundError: x" in text


def test_method_list_keeps_pipeline_commas():
    assert split_methods("fp32,ours:cleanup,quantize{mode=static,exclude=a,b},ort_dynamic,ours:cleanup") == [
        "fp32",
        "ours:cleanup,quantize{mode=static,exclude=a,b}",
        "ort_dynamic",
        "ours:cleanup",
    ]


def test_train_speed_renders_the_conv_layout_rows():
    from benchmarks.train_speed import render

    row = {"model": "m", "batch": 8, "rounds": 4, "nchw_s": 2.65, "channels_last_s": 2.279, "speedup": 1.16,
           "load": 4.1}
    text = render([], {"layout": [row], "versions": {}})
    assert "| m | 8 | 4 | 2.650 | 2.279 | 1.16x | 4.1 |" in text
    assert "Conv layout" not in render([], {"versions": {}})
