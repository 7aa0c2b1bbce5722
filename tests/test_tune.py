"""onnxcompress tune: search-space declarations, targets, the cheap-first plan, real trials on the bundled model
(run in worker processes), crash retry, resume, outputs that ``compress --recipe`` reproduces byte for byte, batch.

Latency is answered by ``FixedLatency``: a replayable profile that measures nothing, so the trials' numbers and the
passes' latency decisions are the same on any machine load."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import ClassVar

import pytest

import onnxcompress  # noqa: F401  (registers the passes)
from onnxcompress.errors import BadInputError
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.pass_base import Pass, option, parse_search, registered_passes, search_space
from onnxcompress.pipeline import build_pass, parse_pipeline
from onnxcompress.tune import plan
from onnxcompress.tune.space import build_space
from onnxcompress.tune.study import pareto_front, tune
from onnxcompress.tune.targets import Target
from onnxcompress.tune.trial import run_trial

ROOT = Path(__file__).resolve().parents[1]
MODEL, CALIB, VAL = (ROOT / "models" / n for n in ("digits_cnn.onnx", "digits_calib.npz", "digits_val.npz"))
EASY = "size<=0.5,metric>=0.95"
#: the quick part of the space (static int8, prune-weights' OBS and distill cost seconds per trial here)
QUICK = ["quantize{mode=dynamic|weight_only min_cosine=none}", "cluster{bits=2|4}"]


class FixedLatency(LatencyProfile):
    """Latency answers without a clock: int8 candidates 0.7x (quantize keeps them), a trial's ratio a fixed function
    of what is measured (its key), so every run of the same study gives the same numbers."""

    def measure(self, key, fn):
        if key in self.entries:
            self.replayed += 1
            return self.entries[key]
        if key.startswith("tune/latency-ratio/"):
            value = 0.4 + (int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) % 500) / 1000
        elif key.startswith(("quantize/model-ratio/", "quantize/conv-int8-ratio/")):
            value = 0.7
        else:
            raise AssertionError(f"unexpected latency key {key}")
        self.entries[key] = value
        self.measured += 1
        return value


def _tune(out: Path, **kw):
    args = dict(calibration=str(CALIB), validation=str(VAL), trials=4, workers=2, sampler="cheap",
                search_passes=QUICK, latency_profile=FixedLatency())
    args.update(kw)
    return tune(str(MODEL), args.pop("target", EASY), out, **args)


# ------------------------------------------------------------------------------------------------ search space
def test_search_space_of_every_registered_pass_parses_with_valid_bounds():
    space = build_space()
    assert "quantize" in space.names() and "prune-channels" in space.names()
    assert set(space.names()) | set(space.skipped) == set(registered_passes())
    for p in space.passes:
        for name, dim in p.dims.items():
            assert dim.kind in ("choice", "int", "float")
            if dim.kind == "choice":
                assert len(dim.choices) >= 1
            else:
                assert dim.low < dim.high and (not dim.log or dim.low > 0)
                assert all(dim.low <= v <= dim.high for v in dim.grid(5))
            for value in dim.grid(3):  # every grid value is an option value the pass accepts
                built = build_pass(p.name, {name: value})
                assert getattr(built, name) == value
    rows = space.describe()
    assert any(r[0] == "quantize" and r[1] == "mode" for r in rows)
    assert any(r[0] == "distill" and "not searched" in r[2] for r in rows)


def test_option_search_metadata_is_read_and_checked():
    @dataclasses.dataclass(frozen=True)
    class Demo(Pass):
        name: ClassVar[str] = "demo-search"
        ratio: float = option(0.5, "a ratio", search=(0.1, 0.9, 0.2))
        bits: int = option(4, "bits", search=(2, 8))
        mode: str = option("a", "mode", search=["a", "b"])
        lr: float = option(0.01, "rate", search=(1e-4, 1e-1, "log"))
        plain: int = option(1, "not searched")

    dims = search_space(Demo)
    assert list(dims) == ["ratio", "bits", "mode", "lr"]
    assert dims["ratio"].grid(9) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert dims["bits"].kind == "int" and dims["bits"].grid(3) == [2, 5, 8]
    assert dims["mode"].choices == ("a", "b")
    assert dims["lr"].log and dims["lr"].grid(4)[0] == pytest.approx(1e-4)
    for bad in [(1, 1), [], (0.0, 1.0, "log"), ("a", 2), (0.0, 1.0, 2.0), {"a": 1}]:
        with pytest.raises(ValueError):
            parse_search("x", bad)


# ------------------------------------------------------------------------------------------------ targets
def test_targets_parse_and_judge():
    t = Target.parse("latency<=0.5,metric>=0.99")
    assert t.bounds == {"latency": 0.5, "metric": 0.99} and t.minimize == "latency"
    assert Target.parse("metric>=0.99,minimize=size").minimize == "size"
    assert t.feasible({"latency": 0.4, "metric": 0.995})
    assert not t.feasible({"latency": 0.4})  # an unmeasured bound is not met
    assert t.misses({"latency": 0.6, "metric": 0.98}) == pytest.approx({"latency": 0.2, "metric": 0.01})
    assert "latency 0.6 > 0.5" in t.describe_misses({"latency": 0.6, "metric": 0.995})
    for bad in ["speed<=0.5", "metric<=0.9", "latency>=0.5", "latency<=x", "minimize=metric", "", "metric>=1.5"]:
        with pytest.raises(BadInputError):
            Target.parse(bad)


# ------------------------------------------------------------------------------------------------ the plan
def _rec(number, config, values, status="ok", phase="sensitivity"):
    return {"number": number, "config": config, "values": values, "status": status, "phase": phase,
            "pipeline": str(number)}


def test_combinations_are_predicted_from_single_pass_curves():
    space = build_space().restrict(["quantize", "prune-channels"])
    base = space.default_config()
    recs = [_rec(0, base, {"latency": 1.0, "size": 1.0, "metric": 1.0}),
            _rec(1, {**base, "quantize": {"mode": "static"}}, {"latency": 0.5, "size": 0.3, "metric": 0.995}),
            _rec(2, {**base, "prune-channels": {"target_macs": 0.6}}, {"latency": 0.7, "size": 0.6, "metric": 0.99}),
            _rec(3, {**base, "prune-channels": {"target_macs": 0.3}}, {"latency": 0.4, "size": 0.3, "metric": 0.9})]
    combos = plan.predict_combinations(space, recs, Target.parse("latency<=0.4,metric>=0.98"), 5)
    # static int8 + 0.6 MACs: latency 0.35, metric 0.985 -> predicted feasible, so verified first
    assert combos[0]["quantize"] == {"mode": "static"} and combos[0]["prune-channels"] == {"target_macs": 0.6}
    assert len(combos) == 2  # 2 combinations of the 3 levels across 2 passes
    assert plan.predict_combinations(space, recs[:2], Target.parse("latency<=0.4"), 5) == []  # one pass only


def test_neighbours_step_each_option_and_switch_each_pass():
    space = build_space().restrict(["quantize", "prune-channels"])
    config = {**space.default_config(), "prune-channels": {"target_macs": 0.6}}
    near = plan.neighbours(space, config)
    macs = sorted(c["prune-channels"]["target_macs"] for c in near if c["prune-channels"] and c["quantize"] is None)
    assert macs == [0.55, 0.65]
    assert {**config, "prune-channels": None} in near  # switched off
    assert {**config, "quantize": space.get("quantize").base()} in near  # switched on at its base options
    assert all(build_pass("prune-channels", c["prune-channels"]) for c in near if c["prune-channels"])


def test_pareto_front_keeps_the_non_dominated():
    t = Target.parse("metric>=0.9,minimize=size")
    recs = [_rec(0, {}, {"size": 1.0, "metric": 1.0}), _rec(1, {}, {"size": 0.3, "metric": 0.99}),
            _rec(2, {}, {"size": 0.5, "metric": 0.95}), _rec(3, {}, {"size": 0.2, "metric": 0.9}),
            _rec(4, {}, {"size": 0.1}, status="stopped")]
    assert [r["number"] for r in pareto_front(recs, t)] == [3, 1, 0]


# ------------------------------------------------------------------------------------------------ real trials
def test_four_trial_tune_meets_an_easy_target_and_compress_reproduces_it(tmp_path):
    from onnxcompress.cli import main

    out = tmp_path / "best.onnx"
    res = _tune(out)
    assert len(res.records) == 4 and res.new_trials == 4
    assert res.records[0]["pipeline"] == "cleanup" and res.records[0]["values"]["size"] > 0.9
    assert res.best is not None and res.target.feasible(res.best["values"])
    assert res.best["values"]["size"] <= 0.5
    assert res.best == min([r for r in res.records if res.target.feasible(r["values"])],
                           key=lambda r: r["values"]["size"])
    recipe = (tmp_path / "best.recipe.toml").read_text()
    assert json.dumps(res.best["pipeline"]) in recipe
    md = (tmp_path / "best.tune.md").read_text()
    assert all(r["pipeline"] in md for r in res.records) and "Pareto front" in md
    assert "<table>" in (tmp_path / "best.tune.html").read_text()
    again = tmp_path / "again.onnx"
    assert main(["compress", str(MODEL), "-o", str(again), "--recipe", str(tmp_path / "best.recipe.toml"),
                 "--calib", str(CALIB), "--latency-profile", str(tmp_path / "best.tune.profile.json"),
                 "--no-latency", "-q"]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert len(again.read_bytes()) / MODEL.stat().st_size == pytest.approx(res.best["values"]["size"], rel=1e-6)


def test_a_trial_stops_once_a_bound_is_missed_unless_asked_for_every_number():
    from onnxcompress.tune.executor import default_workers
    from onnxcompress.tune.trial import TrialTask

    def trial(target, full):
        return run_trial(TrialTask(0, "cleanup,quantize{mode=dynamic}", str(MODEL), str(CALIB), str(VAL),
                                   Target.parse(target), profile=FixedLatency(), full=full))

    stopped = trial("size<=0.1,metric>=0.9", full=False)
    assert stopped["status"] == "stopped" and stopped["missed"] == ["size"]
    assert set(stopped["values"]) == {"size", "macs", "zip"}  # neither validated nor timed
    assert "model_bytes" not in stopped
    full = trial("size<=0.1,metric>=0.9", full=True)
    assert full["status"] == "ok" and {"metric", "cosine", "latency"} <= set(full["values"])
    assert full["values"]["size"] == stopped["values"]["size"] and full["missed"] == ["size"]
    met = trial("size<=0.6,metric>=0.9", full=False)
    assert met["status"] == "ok" and met["missed"] == [] and met["model_bytes"]
    assert default_workers(1 << 50) == 1  # a model too large for two trials in memory: one worker


@pytest.mark.slow
def test_nsga2_runs_after_the_cheap_plan(tmp_path):
    pytest.importorskip("optuna")
    res = _tune(tmp_path / "m.onnx", trials=6, sampler="nsga2")
    assert res.sampler == "nsga2" and len(res.records) == 6 and res.records[-1]["phase"] == "model"
    assert res.best is not None


def kill_first_attempt(marker: Path, task):
    """Trial function of the crash test: the first attempt of trial 1 dies as if the OOM killer took it."""
    if task.number == 1 and task.attempt == 1:
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return run_trial(task)


def test_a_killed_trial_is_recorded_and_retried_once(tmp_path):
    marker = tmp_path / "killed"
    res = _tune(tmp_path / "m.onnx", trials=3, trial_fn=functools.partial(kill_first_attempt, marker))
    assert marker.exists() and res.retried == 1
    assert [r["status"] for r in res.records] == ["ok", "ok", "ok"]
    assert res.records[1]["attempt"] == 2
    lines = [json.loads(x) for x in (tmp_path / "m.tune.jsonl").read_text().splitlines()[1:]]
    crashed = [x for x in lines if x["status"] == "crashed"]
    assert len(crashed) == 1 and crashed[0]["number"] == 1 and "-9" in crashed[0]["error"]


def sleep_first_attempt(task):
    """Trial function of the time-out test: the first attempt of trial 1 hangs."""
    if task.number == 1 and task.attempt == 1:
        import time

        time.sleep(60)
    return run_trial(task)


def test_a_timed_out_trial_is_killed_recorded_and_retried(tmp_path):
    res = _tune(tmp_path / "m.onnx", trials=2, timeout=4.0, trial_fn=sleep_first_attempt)
    assert [r["status"] for r in res.records] == ["ok", "ok"] and res.retried == 1
    lines = [json.loads(x) for x in (tmp_path / "m.tune.jsonl").read_text().splitlines()[1:]]
    assert [x["status"] for x in lines if x["number"] == 1] == ["timeout", "ok"]


def test_space_is_printed(capsys):
    import argparse

    from onnxcompress.tune.commands import add_parsers

    ap = argparse.ArgumentParser()
    add_parsers(ap.add_subparsers())
    args = ap.parse_args(["tune", "--space"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for p in build_space().passes:
        assert p.name in text
    assert "target_macs" in text and "not searched" in text


def test_resume_continues_the_study_and_refuses_another_models_journal(tmp_path):
    out = tmp_path / "m.onnx"
    first = _tune(out, trials=2)
    assert len(first.records) == 2
    second = _tune(out, trials=4, resume=True)
    assert second.new_trials == 2 and len(second.records) == 4
    assert second.records[:2] == first.records  # the journaled trials are reused, not run again
    assert len({r["pipeline"] for r in second.records}) == 4
    other = tmp_path / "other.onnx"
    import onnx

    m = onnx.load(str(MODEL))
    m.producer_name = "someone else"
    onnx.save(m, str(other))
    with pytest.raises(BadInputError, match="another model"):
        tune(str(other), EASY, out, calibration=str(CALIB), trials=4, resume=True, sampler="cheap")
    with pytest.raises(BadInputError, match="no study journal"):
        _tune(tmp_path / "none.onnx", resume=True)


def test_optuna_phase_runs_after_the_cheap_plan_and_resumes(tmp_path):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "m.onnx"
    res = _tune(out, trials=6, sampler="optuna")
    phases = [r["phase"] for r in res.records]
    assert phases[0] == "sensitivity" and phases[-1] == "model" and len(res.records) == 6
    study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{tmp_path / 'm.tune.db'}")[0],
                              storage=f"sqlite:///{tmp_path / 'm.tune.db'}")
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the cheap phases' trials were given to the sampler, and the model phase's trial was told its result
    assert {t.user_attrs["journal_number"] for t in told} == {r["number"] for r in res.records}
    more = _tune(out, trials=8, sampler="optuna", resume=True)
    assert more.new_trials == 2 and len(more.records) == 8 and more.records[:6] == res.records
    assert len({r["pipeline"] for r in more.records}) == 8


def test_unreachable_target_exits_1_with_the_closest_trial(tmp_path, capsys):
    import argparse

    from onnxcompress.tune.commands import add_parsers

    ap = argparse.ArgumentParser()
    add_parsers(ap.add_subparsers())
    args = ap.parse_args(["tune", str(MODEL), "-o", str(tmp_path / "x.onnx"), "--calib", str(CALIB), "--target",
                          "size<=0.05,metric>=0.99", "--trials", "2", "--sampler", "cheap", "--search-passes",
                          ",".join(QUICK), "--workers", "2"])
    args.latency_profile = FixedLatency()
    assert args.func(args) == 1
    text = capsys.readouterr().out
    assert "not reached" in text and "closest: trial" in text and "missed size" in text
    assert not (tmp_path / "x.onnx").exists() and (tmp_path / "x.tune.md").exists()


def test_sampler_optuna_without_optuna_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(BadInputError, match=r"onnxcompress\[tune\]"):
        _tune(tmp_path / "m.onnx", sampler="optuna")


def test_ray_address_that_does_not_answer_is_bad_input():
    pytest.importorskip("ray", reason="Ray not installed (extra: distributed)")
    from onnxcompress.tune.executor import RayExecutor

    with pytest.raises(BadInputError, match="does not answer"):
        RayExecutor("127.0.0.1:1", 1)


@pytest.mark.slow
def test_ray_local_gives_the_same_best_trial_as_the_pool(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray not installed (extra: distributed)")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = _tune(tmp_path / "r.onnx", ray="auto")
    finally:
        ray.shutdown()
    pool = _tune(tmp_path / "p.onnx")
    assert on_ray.executor == "ray" and pool.executor == "local"
    assert on_ray.best["pipeline"] == pool.best["pipeline"] and on_ray.best["values"] == pool.best["values"]


def test_batch_runs_compress_and_tune_entries(tmp_path):
    from onnxcompress.tune.batch import read_manifest, run_manifest

    for f in (MODEL, CALIB, VAL):
        shutil.copy(f, tmp_path / f.name)
    manifest = tmp_path / "m.toml"
    manifest.write_text(f"""
[defaults]
calib = "{CALIB.name}"
[[model]]
name = "q"
path = "{MODEL.name}"
passes = "cleanup,quantize{{mode=dynamic}}"
target = "size<=0.6"
[[model]]
name = "t"
path = "{MODEL.name}"
val = "{VAL.name}"
target = "{EASY}"
trials = 2
sampler = "cheap"
search_passes = ["{QUICK[0]}"]
""")
    rows, ok = run_manifest(manifest, tmp_path / "out", workers=2)
    assert [r[0] for r in rows] == ["q", "t"] and [r[1] for r in rows] == ["compress", "tune"]
    assert rows[0][3] == "met" and float(rows[0][5]) < 0.6
    assert (tmp_path / "out" / "q.onnx").exists()
    assert ok == rows[1][3].startswith("met")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[model]]\npath = "x.onnx"\ntarget = "speed<=1"\n')
    with pytest.raises(BadInputError, match="unknown metric"):
        read_manifest(bad)
    assert parse_pipeline(rows[0][7])  # the summary's pipeline text parses back
