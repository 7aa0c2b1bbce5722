"""tune's ``metric`` is the model's task metric (validate's ``task``), named in the records and reports; trials run
single-threaded (BLAS too) when several run at once; per-trial CPU time is recorded."""

from __future__ import annotations

import json

import pytest
from test_tune import CALIB, MODEL, VAL, FixedLatency, _tune

from onnxcompress.errors import BadInputError
from onnxcompress.tune.targets import Target
from onnxcompress.tune.trial import TrialTask, run_trial


def blas_probe(task):
    """Trial function that reports the BLAS thread count the trial ran with."""
    rec = run_trial(task)
    from threadpoolctl import threadpool_info

    rec["probe"] = {"blas_threads": task.blas_threads,
                    "blas_pool": [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]}
    return rec


def test_two_workers_run_each_trial_with_one_blas_thread(tmp_path):
    pytest.importorskip("threadpoolctl")
    two = _tune(tmp_path / "two.onnx", trials=2, workers=2, trial_fn=blas_probe)
    assert all(r["probe"]["blas_threads"] == 1 and set(r["probe"]["blas_pool"]) == {1} for r in two.records)
    one = _tune(tmp_path / "one.onnx", trials=1, workers=1, trial_fn=blas_probe)
    assert one.records[0]["probe"]["blas_threads"] is None  # one worker: the libraries' own default
    for r in two.records + one.records:
        assert 0 < r["cpu_seconds"] and r["seconds"] > 0


def test_metric_is_the_task_metric_and_is_named(tmp_path):
    res = _tune(tmp_path / "m.onnx", trials=2)
    assert "top-1 agreement of output" in res.metric_name
    base = res.records[0]
    assert base["pipeline"] == "cleanup" and base["values"]["metric"] == 1.0  # FP32 vs itself
    assert "top-1 agreement" in (tmp_path / "m.tune.md").read_text()
    assert json.loads((tmp_path / "m.tune.json").read_text())["metric"].startswith("top-1 agreement")
    # another task: the journaled metrics were another task's, so resuming runs the trials again
    emb = _tune(tmp_path / "m.onnx", trials=2, task="embed", resume=True)
    assert emb.new_trials == 2 and emb.metric_name.startswith("mean per-sample cosine")
    assert all(r["task"] == "embed" for r in emb.records)


def test_trial_metric_follows_the_task():
    def trial(task):
        return run_trial(TrialTask(0, "cleanup,quantize{mode=dynamic}", str(MODEL), str(CALIB), str(VAL),
                                   Target.parse("metric>=0.5,minimize=size"), profile=FixedLatency(), task=task))

    top1, cos, none = trial("classify"), trial("embed"), trial("none")
    assert top1["metric_name"].startswith("top-1 agreement") and cos["metric_name"].startswith("mean per-sample")
    assert none["metric_name"] == "worst output cosine" and none["values"]["metric"] == none["values"]["cosine"]
    assert 0.5 < top1["values"]["metric"] <= 1.0 and 0.9 < cos["values"]["metric"] < 1.0


def test_unknown_task_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="--task"):
        _tune(tmp_path / "m.onnx", trials=1, task="segment")


def test_search_passes_can_pin_an_option_the_pass_does_not_search():
    from onnxcompress.tune.space import build_space

    space = build_space().restrict(["cluster{bits=4|6 refit=true}"])
    dims = space.get("cluster").dims
    assert dims["refit"].choices == (True,) and dims["bits"].choices == (4, 6)
    assert space.pipeline({"cluster": {"bits": 6, "refit": True}}) == "cleanup,cluster{bits=6 refit=true}"
    with pytest.raises(BadInputError, match="has no option 'nonsense'"):
        build_space().restrict(["cluster{nonsense=1}"])


def slow_trial(task):
    """Trial function that holds its worker a little, so two trials are surely in flight together."""
    import time

    time.sleep(1.0)
    return run_trial(task)


def test_a_pipeline_in_flight_is_not_run_twice_by_two_workers(tmp_path):
    # the sensitivity plan of this space lists 'cleanup,quantize{mode=dynamic}' twice (base and min_cosine=none)
    res = _tune(tmp_path / "m.onnx", trials=4, workers=2, trial_fn=slow_trial,
                search_passes=["quantize{mode=dynamic min_cosine=none|0.999}"])
    lines = [json.loads(x) for x in (tmp_path / "m.tune.jsonl").read_text().splitlines()[1:]]
    pipelines = [x["pipeline"] for x in lines]
    assert len(pipelines) == len(set(pipelines)) == len(res.records)


def test_distill_follows_the_last_pruning_pass():
    from onnxcompress.tune.space import build_space

    space = build_space()
    assert space.pipeline({"prune-weights": {"sparsity": 0.5}, "cluster": {"bits": 4}}) == \
        "cleanup,prune-weights,distill,cluster"  # as the hand-written small / deep-compression recipes
    assert space.pipeline({"prune-channels": {"target_macs": 0.8}, "prune-weights": {"sparsity": 0.5}}) == \
        "cleanup,prune-channels{target_macs=0.8},prune-weights,distill"
    assert space.pipeline({"cluster": {"bits": 4}}) == "cleanup,cluster"
