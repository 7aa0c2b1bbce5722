"""benchmarks.calib_time on the bundled digits CNN: ORT and ours with the same rule, timed in subprocesses, scored."""

from __future__ import annotations

from test_bench_harness import DIGITS

from benchmarks import anchors, calib_time


def test_matched_methods_resolve_to_our_pass_with_the_same_rule_and_no_search():
    for rule in calib_time.RULES:
        m = anchors.resolve_method(f"ours_int8_{rule}")
        assert f"calibration={rule}" in m.pipeline and "auto_float_db=0" in m.pipeline
    assert "ours_int8_minmax" not in anchors.METHODS  # not part of the default benchmark run
    assert calib_time.method_names(("minmax",)) == ["ort_static_minmax", "ours_int8_minmax", "ours_int8"]


def test_one_model_end_to_end_rows_times_metrics_and_report(tmp_path):
    cfg = calib_time.parser().parse_args(["--n-calib", "16", "--n-eval", "16", "--no-default"])
    rec = calib_time.benchmark_model("digits_cnn", ("minmax",), cfg, spec=DIGITS)
    rows = rec["rows"]
    assert list(rows) == ["ort_static_minmax", "ours_int8_minmax"]
    for name, row in rows.items():
        assert row.get("error") is None, (name, row.get("error"))
        assert row["tool"]["seconds"] > 0 and row["tool"]["runs_seconds"] == [row["tool"]["seconds"]]
        assert 0.9 <= row["primary"] <= 1.0  # top-1 agreement with FP32 on the eval digits
    q = rows["ours_int8_minmax"]["info"]["quantize"]
    assert q["seconds_calibration"] > 0 and "auto_float" not in q
    if "skipped" in q:  # the latency guard may keep this tiny CNN float on a loaded machine: it must say so
        assert "slower than the float one" in q["skipped"] and q["latency_ratio_measured"] >= 1.0
    else:
        assert q["calibration"] == "minmax"
    text = calib_time.render([rec], ("minmax",))
    line = next(ln for ln in text.splitlines() if ln.startswith("| digits_cnn | minmax |"))
    ort_s, ours_s, ratio = (float(x) for x in line.split("|")[3:6])
    # the table prints seconds to 0.1 and the ratio (of the unrounded times) to 0.01
    low, high = (ours_s - 0.05) / (ort_s + 0.05), (ours_s + 0.05) / max(ort_s - 0.05, 1e-9)
    assert low - 0.005 <= ratio <= high + 0.005


def test_report_marks_a_crashed_anchor_as_failed():
    rec = {
        "model": "m",
        "primary_metric": "agreement",
        "n_calib": 1,
        "n_eval": 1,
        "rows": {
            "ort_static_entropy": {"error": "tool process died (killed by signal 9)", "tool": {"seconds": None}},
            "ours_int8_entropy": {"tool": {"seconds": 2.0}, "primary": 0.9},
        },
    }
    text = calib_time.render([rec], ("entropy",))
    assert "| m | entropy | failed | 2.0 | - | - | 0.900 |" in text
    assert "killed by signal 9" in text
