"""The input-noise reference: pixel-grid detection, padding mask, the original-vs-itself comparison in the report."""

from __future__ import annotations

import numpy as np

import tests.passes_for_tests  # noqa: F401
from onnxcompress.data import load_feeds
from onnxcompress.input_noise import content_mask, perturbation, pixel_level
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from onnxcompress.report import to_markdown
from onnxcompress.validate import compare_models, input_noise_for
from tests.conftest import ort_run
from tests.test_manager import conv_gemm_model


def pixel_feeds(n=6, seed=0, pad=True):
    """8-bit pixels normalised per channel ((p / 255 - mean) / std), padded right with the normalised black."""
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.5, 0.25, 0.2])
    out = []
    for _ in range(n):
        p = rng.integers(0, 256, (1, 3, 8, 8)).astype(np.float64)
        if pad:
            p[..., 6:] = 0
        x = (p / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
        out.append({"x": x.astype(np.float32)})
    return out


def test_pixel_level_is_the_smallest_channel_step():
    x = pixel_feeds(1, pad=False)[0]["x"]
    assert abs(pixel_level(x) - 1 / 255 / 0.5) < 1e-6


def test_no_level_off_the_grid_or_for_non_images():
    rng = np.random.default_rng(1)
    assert pixel_level(rng.standard_normal((1, 3, 8, 8)).astype(np.float32)) is None  # float-resized / features
    assert pixel_level(np.arange(64, dtype=np.float32).reshape(1, 64)) is None  # not an image
    assert pixel_level(np.arange(1000, dtype=np.float32).reshape(1, 1, 10, 100)) is None  # > 256 levels


def test_content_mask_strips_constant_edge_padding_only():
    rng = np.random.default_rng(1)
    x = np.zeros((1, 3, 20, 30), np.float32)
    x[:, :, 2:15, 0:21] = rng.random((1, 3, 13, 21))
    x[:, :, 8, 5] = 0.0  # an interior pixel equal to the pad value is image
    m = content_mask(x)
    assert m[2:15, :21].all() and m.sum() == 13 * 21


def test_perturbation_adds_the_level_scaled_noise_on_the_image_only():
    f = pixel_feeds(1)[0]
    noisy = perturbation(f, sigma_levels=0.5)(f)
    d = (noisy["x"] - f["x"]).astype(np.float64)
    assert np.all(d[..., 6:] == 0)  # the padding is exact
    level = 1 / 255 / np.array([0.5, 0.25, 0.2])
    spread = d[..., :6].std(axis=(0, 2, 3))
    assert abs(spread[0] - 0.5 * level[0]) < 0.3 * 0.5 * level[0]  # sigma of the smallest step on every channel
    assert perturbation({"ids": np.arange(4)[None]}) is None


def test_reference_equals_comparing_the_original_with_its_noisy_self():
    model = conv_gemm_model()
    val = load_feeds(pixel_feeds(), model)
    ref = compare_models(model, model, val, input_noise=input_noise_for(val)).input_noise_reference
    assert ref is not None and ref["sigma_levels"] == 0.5 and ref["feeds"] == 6
    # by hand: the same noise sequence (seed 0), ORT outputs, pooled SQNR of the one output
    add = perturbation(val.first(), 0.5)
    clean = [ort_run(model, f)[0] for f in val]
    noisy = [ort_run(model, add(f))[0] for f in val]
    a, b = np.concatenate([c.ravel() for c in clean]), np.concatenate([n.ravel() for n in noisy])
    sqnr = 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum((a - b).astype(np.float64) ** 2))
    assert abs(ref["worst"]["sqnr_db"] - sqnr) < 0.05
    assert compare_models(model, model, val).worst()["sqnr_db"] == float("inf")  # no noise without perturb


def test_lossy_run_reports_the_reference_and_an_exact_or_non_image_run_does_not():
    model = conv_gemm_model()
    val = load_feeds(pixel_feeds(), model)
    report = PassManager(parse_pipeline("test-scale{factor=1.05}"), validation=val).run(model).to_dict()
    assert "input_noise_reference" in report["fidelity"]
    assert "input-noise reference" in to_markdown(report)
    exact = PassManager(parse_pipeline("test-options"), validation=val).run(model).to_dict()
    assert "input_noise_reference" not in exact["fidelity"]
    rng = np.random.default_rng(2)
    floats = load_feeds([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)], model)
    other = PassManager(parse_pipeline("test-scale{factor=1.05}"), validation=floats).run(model).to_dict()
    assert "input_noise_reference" not in other["fidelity"]
