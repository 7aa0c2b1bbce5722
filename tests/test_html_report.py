"""The HTML report: one self-contained file beside the JSON and Markdown, checked as text and in a real headless
browser (Debian's chromium; skipped with a reason when it is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnxcompress import api
from onnxcompress.report_html import to_html

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"
PIPELINE = "cleanup,prune-channels{ratio=0.3},quantize{mode=static}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pytest.importorskip("matplotlib")
    folder = tmp_path_factory.mktemp("html")
    result = api.compress(MODEL, PIPELINE, calibration=CALIB, validation=VAL, max_validation=64,
                          validate_each=True, latency=True, latency_budget=0.2)
    model_path, report_path = result.save(folder / "small.onnx")
    return result, report_path


def test_html_is_written_beside_json_and_markdown_and_self_contained(saved):
    result, report_path = saved
    html_path = report_path.with_suffix(".html")
    text = html_path.read_text(encoding="utf-8")
    assert report_path.with_suffix(".md").exists()
    assert "<script" not in text.lower() and not re.search(r"(src|href)=\"(https?:|//|file:)", text)
    images = re.findall(r"<img [^>]*src=\"data:image/png;base64,", text)
    assert len(images) >= 5  # size, MACs, ratios, latency, fidelity + per-pass choices
    report = json.loads(report_path.read_text())
    # every pass's statistics in full, also in the HTML (nothing cut at 120 characters as the console does)
    for row in report["ledger"][1:]:
        assert row["stage"] in text
        for key in row["pass_stats"]:
            assert f">{key}<" in text, key
    assert report["input_sha256"] in text and report["versions"]["onnxruntime"] in text
    assert "200 samples" in text and "64 samples" in text


def test_json_report_carries_provenance_and_full_stats(saved):
    result, report_path = saved
    report = json.loads(report_path.read_text())
    import hashlib

    assert report["input_sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert set(report["versions"]) >= {"onnxcompress", "onnx", "onnxruntime", "numpy"}
    assert report["calibration"] == {"source": str(CALIB), "samples": 200, "synthetic": False}
    assert report["validation"]["samples"] == 64 and report["seed"] == 0
    assert report["pipeline"] == result.pipeline
    assert report["ledger"][-1]["pass_stats"] == json.loads(json.dumps(result.ledger[-1].pass_stats, default=str))
    assert all(r["fidelity"] for r in report["ledger"][1:])  # --validate-each: fidelity per pass


def test_stats_are_rendered_by_shape_never_cut():
    long_list = list(range(300))
    report = {"input": "m.onnx", "pipeline": "x", "ledger": [
        {"stage": "original", "model": {"nodes": 3}, "pass_stats": {}},
        {"stage": "x", "model": {"nodes": 2}, "pass_stats": {"kept": {"g0": 4, "g1": 7}, "ids": long_list,
                                                              "layers": [{"name": "conv1", "kept_float": "too big"}]}}]}
    text = to_html(report)
    assert ", ".join(map(str, long_list)) in text  # the whole list
    assert ">conv1<" in text and ">too big<" in text and ">g1<" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_renders_in_a_headless_browser(saved, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    _, report_path = saved
    page = tmp_path / "page.html"
    probe = ("<script>window.addEventListener('load', () => { const d = document.createElement('div'); d.id = 'probe';"
             " d.textContent = [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',');"
             " document.body.appendChild(d); });</script></body>")
    page.write_text(report_path.with_suffix(".html").read_text(encoding="utf-8").replace("</body>", probe))
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    widths = [int(w) for w in re.search(r"<div id=\"probe\">([-\d,]*)</div>", dom).group(1).split(",")]
    assert len(widths) >= 5 and all(w > 100 for w in widths)  # every embedded plot decoded
    assert dom.count("<tr") >= 20 and "Ledger" in dom and "quantize" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1400,2400", f"--screenshot={shot}",
                    report_path.with_suffix(".html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1400)
    ink = np.abs(pixels - 255).sum(axis=2) > 60
    assert 0.02 < ink.mean() < 0.6  # text and tables drawn, not a blank or black page
    plot_blue = (np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 40).sum()
    assert plot_blue > 2000  # matplotlib's lines and bars are on screen
