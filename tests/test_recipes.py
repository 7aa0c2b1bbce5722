"""Shipped recipes: found by name or path, listed with descriptions, and every one runs on the bundled model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxcompress.recipes import RECIPES_DIR, list_recipes, recipe_path

from onnxcompress.context import PassContext
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import format_pipeline, load_recipe, parse_pipeline
from tests.conftest import ort_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
SHIPPED = ("int8", "int8-accurate", "int8-dynamic", "int8-dynamic-accurate", "fast", "small", "deep-compression")

#: fewer calibration feeds and trials than the recipes' defaults so the whole set runs in the test suite's budget;
#: the recipes' own settings are what benchmarks/results/cluster.md measures
FAST = {"samples": 24, "sensitivity_samples": 4, "calibration_samples": 24, "eval_samples": 8,
        "rounding_samples": 8, "select_ridge": False}


def _fast(p):
    names = {f.name for f in dataclasses.fields(p)}
    return dataclasses.replace(p, **{k: v for k, v in FAST.items() if k in names})


def test_shipped_recipes_are_listed_with_descriptions():
    listed = list_recipes()
    assert set(SHIPPED) <= set(listed)
    assert all(len(listed[n]) > 20 for n in SHIPPED)
    for name in SHIPPED:  # every recipe states a measured result in its leading comment
        lines = (RECIPES_DIR / f"{name}.toml").read_text().splitlines()
        assert lines[0].startswith(f"# {name}") and any(ln.startswith("# Measured") for ln in lines)


def test_name_and_path_give_the_same_passes(tmp_path):
    for name in SHIPPED:
        by_name = load_recipe(name)
        assert by_name == load_recipe(str(RECIPES_DIR / f"{name}.toml")) == load_recipe(recipe_path(name))
        assert parse_pipeline(name) == by_name  # --recipe NAME wherever a pipeline text is accepted
        assert parse_pipeline(format_pipeline(by_name)) == by_name
    own = tmp_path / "int8.toml"  # a path is a path, even when its stem is a shipped name
    own.write_text('passes = "cleanup"\n')
    assert format_pipeline(load_recipe(own)) == "cleanup"


def test_unknown_recipe_lists_the_known_ones(tmp_path):
    with pytest.raises(BadInputError, match="shipped recipes: .*deep-compression.*int8"):
        load_recipe("no-such-recipe")
    with pytest.raises(BadInputError, match="no such file"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(BadInputError, match="unknown pass"):
        parse_pipeline("no-such-recipe")


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_recipe_runs_on_the_bundled_model(digits, name):
    passes = [_fast(p) for p in load_recipe(name)]
    ctx = PassContext(calibration=load_feeds(str(CALIB), digits))
    result = PassManager(passes).run(digits, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.load(VAL)["image"][:200]
    (ref,), (got,) = ort_run(digits, {"image": x}), ort_run(result.model, {"image": x})
    assert float((ref.argmax(1) == got.argmax(1)).mean()) >= 0.95
    smaller = digits.ByteSize() / result.model.ByteSize()
    if name == "small":  # 4-bit codebooks (more bits where needed): the file really shrinks
        stats = result.ledger[-1].pass_stats
        assert stats["tensors_clustered"] >= 3 and min(int(b) for b in stats["bits"]) == 4
        assert stats["max_unique_per_row"] <= 2 ** max(int(b) for b in stats["bits"])
        assert smaller >= 4.0
    if name == "deep-compression":  # bits per tensor bought for a file 12x smaller than the input, raw
        stats = result.ledger[-1].pass_stats
        assert stats["tensors_clustered"] >= 3 and stats["size_ratio_of_bytes"] == digits.ByteSize()
        assert stats["max_unique_per_row"] <= 2 ** max(int(b) for b in stats["bits"] if b != "float")
        # as asked: the plan's decode overheads are measured constants; on 3 tensors one more level is ~10% of the file
        assert 11.8 <= smaller <= 13.5 and abs(stats["size_ratio_reached"] - smaller) < 0.05 * smaller
