"""benchmarks/tune.py's bookkeeping: the hand-written rows it compares against, the verdict, the projections."""

from __future__ import annotations

import pytest

from benchmarks import tune as bench


def test_projection_with_phases_waits_for_each_phase():
    durations, phases = [2.0, 38.0, 3.0, 3.0, 30.0, 30.0], ["sensitivity"] * 4 + ["combine"] * 2
    assert bench.project(durations, 1) == pytest.approx(sum(durations))
    assert bench.project_phased(durations, phases, 1) == pytest.approx(sum(durations))
    # 2 workers: sensitivity waits for its 38 s trial, then the two combinations run side by side
    assert bench.project_phased(durations, phases, 2) == pytest.approx(38.0 + 30.0)
    assert bench.project(durations, 2) < bench.project_phased(durations, phases, 2) + 1e-9


def test_best_hand_written_row_and_verdict():
    rows = [{"source": "s", "pipeline": "int8", "latency": "0.41", "size": "0.29", "metric": "agreement 1.000",
             "cosine": "0.97"},
            {"source": "s", "pipeline": "c8", "latency": "0.90", "size": "0.25", "metric": "0.995", "cosine": "1"},
            {"source": "s", "pipeline": "c4", "latency": "0.90", "size": "0.12", "metric": "0.90", "cosine": "1"}]
    assert bench.best_hand_written(rows, bench.TARGET_A)["pipeline"] == "int8"
    best_b = bench.best_hand_written(rows, bench.TARGET_B)
    assert best_b["pipeline"] == "c8"  # c4 is smaller but misses the metric
    assert bench.verdict({"met": True, "values": {"size": 0.17}}, best_b, "size") == "beats"
    assert bench.verdict({"met": True, "values": {"size": 0.252}}, best_b, "size") == "matches"
    assert bench.verdict({"met": True, "values": {"size": 0.30}}, best_b, "size") == "worse"
    assert bench.verdict({"met": False, "values": {}}, best_b, "size").startswith("worse")
    assert bench.verdict({"met": True, "values": {}}, None, "size") == "no hand-written row meets it; tune does"


def test_hand_written_rows_are_read_from_the_result_files():
    if not (bench.RESULTS / "cluster.md").exists():
        pytest.skip("benchmarks/results/cluster.md not present")
    rows = bench.hand_written("ppocrv4_rec")
    sources = {r["source"] for r in rows}
    assert {"summary.md", "cluster.md"} <= sources
    assert all(bench.cell_number(r["size"]) is None or 0 < bench.cell_number(r["size"]) <= 1.1 for r in rows)
