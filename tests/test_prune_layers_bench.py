"""benchmarks.prune_layers bookkeeping: which earlier records a re-run keeps, how variants are labelled, and the
CNN goal (best of layers / channels / both at measured latency <= 0.7x, metric >= 0.99)."""

from __future__ import annotations

from benchmarks.prune_layers import (
    LATENCY_VARIANTS,
    describe,
    equal_latency,
    goals,
    kept_records,
    render,
    variants,
)


def _rec(model, pipelines, metric=0.9, lat=0.7, n_eval=32):
    methods = {"fp32": {"latency": {"t1": {"ratio": 1.0}}}}
    for p in pipelines:
        methods[f"ours:{p}"] = {"metrics": {"box_f1": metric}, "latency": {"t1": {"ratio": lat}}, "macs_ratio": lat}
    return {"model": model, "primary_metric": "box_f1", "methods": methods, "n_eval": n_eval}


def test_merge_keeps_other_models_and_drops_rerun_variants():
    a, b = "cleanup,prune-layers{layers=1 trials=8 samples=8}", LATENCY_VARIANTS["channels"]
    old = [_rec("nudenet_320n", [a, b]), _rec("ddddocr_det", [a]), _rec("nudenet_320n", [b])]
    kept = kept_records(old, {"nudenet_320n": [b]}, fresh=False)
    assert [r["model"] for r in kept] == ["nudenet_320n", "ddddocr_det"]  # the third had only b: dropped
    assert set(kept[0]["methods"]) == {"fp32", f"ours:{a}"}
    assert [r["model"] for r in kept_records(old, {"nudenet_320n": [b]}, fresh=True)] == ["ddddocr_det"]


def test_labels_and_curve_variants():
    vs = variants("ppocrv4_det")
    assert "cleanup,prune-layers{layers=3 trials=8 samples=8}" in vs
    assert "cleanup,prune-layers{layers=4 trials=8 samples=8},distill" in vs
    d = describe("cleanup,prune-layers{layers=4 trials=8 samples=8},distill")
    assert d == {"distill": True, "method": "layers", "layers": 4, "label": "layers=4", "distill_mode": "refit",
                 "budget": None}
    assert describe(LATENCY_VARIANTS["both"])["label"] == "layers @0.85 + channels @0.82"
    assert describe(LATENCY_VARIANTS["channels"])["method"] == "channels"


def test_cnn_goal_takes_the_best_variant_within_the_latency_budget():
    recs = [_rec("nudenet_320n", [LATENCY_VARIANTS["layers"]], metric=0.995, lat=0.74),  # too slow
            _rec("nudenet_320n", [LATENCY_VARIANTS["channels"]], metric=0.97, lat=0.66),
            _rec("nudenet_320n", [LATENCY_VARIANTS["both"]], metric=0.985, lat=0.69)]
    from benchmarks.prune_layers import rows_of

    rows = [r for rec in recs for r in rows_of(rec)]
    assert [r["method"] for r in equal_latency(rows, "nudenet_320n")] == ["layers", "channels", "both"]
    (g,) = goals(rows)
    assert g["variant"].startswith("layers @0.85 + channels") and g["metric"] == 0.985 and not g["met"]
    recs[2]["methods"][f"ours:{LATENCY_VARIANTS['both']}"]["metrics"]["box_f1"] = 0.992
    rows = [r for rec in recs for r in rows_of(rec)]
    assert goals(rows)[0]["met"]
    md = render(recs, rows, {})
    assert "| nudenet_320n | layers @0.85 + channels @0.82 + distill | 0.69 | 0.992 | 32 | met |" in md
    # a variant measured on more evaluation inputs decides, even when a 32-input row scored higher
    recs.append(_rec("nudenet_320n", ["cleanup,prune-channels{target_latency=0.66},distill{samples=64}"], metric=0.95,
                     lat=0.65, n_eval=64))
    rows = [r for rec in recs for r in rows_of(rec)]
    (g,) = goals(rows)
    assert g["metric"] == 0.95 and g["n_eval"] == 64 and not g["met"]


def test_training_rows_at_a_latency_budget_enter_the_comparison():
    train = ("cleanup,prune-channels{target_latency=0.7},distill{mode=refit+train max_minutes=12 samples=32 "
             "train_samples=1024}")
    d = describe(train)
    assert d["distill"] and d["distill_mode"] == "refit+train" and d["budget"] == [0.7] and d["method"] == "channels"
    assert d["label"].endswith("+ distill{mode=refit+train max_minutes=12 samples=32 train_samples=1024}")
    plain = describe("cleanup,prune-channels{target_latency=0.7}")
    assert not plain["distill"] and plain["distill_mode"] is None
    recs = [_rec("ddddocr_det", [LATENCY_VARIANTS["channels"]], metric=0.974, lat=0.69),
            _rec("ddddocr_det", [train], metric=0.992, lat=0.69),
            _rec("ddddocr_det", ["cleanup,prune-channels{target_latency=0.7}"], metric=0.999, lat=0.6)]
    recs[1]["methods"][f"ours:{train}"]["info"] = {"distill_train": {
        "steps": 120, "stopped_by": "time budget", "heldout_loss_start": 0.5, "heldout_loss_best": 0.4,
        "train_feeds": 992, "heldout_feeds": 32}}
    from benchmarks.prune_layers import rows_of

    rows = [r for rec in recs for r in rows_of(rec)]
    assert [r["distill_mode"] for r in equal_latency(rows, "ddddocr_det")] == ["refit", "refit+train"]  # no undistilled
    (g,) = goals(rows)
    assert g["metric"] == 0.992 and g["met"] and "refit+train" in g["variant"]
    md = render(recs, rows, {})
    assert "120 (time budget), held-out 0.5 -> 0.4, 992+32 feeds" in md
