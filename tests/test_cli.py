"""The command line as a user meets it: the main job, inspect/validate/passes, and every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
VAL = ROOT / "models" / "digits_val.npz"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_cleanup_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "sub" / "small.onnx"
    before = sha(MODEL)
    code, stdout, err = run(capsys, "compress", MODEL, "-o", out, "--passes", "cleanup", "--calib", CALIB,
                            "--val", VAL, "--latency-budget", "0.2")
    assert code == 0, err
    assert sha(MODEL) == before
    assert out.exists()
    report = json.loads(out.with_name("small.onnx.report.json").read_text())
    assert report["pipeline"] == "cleanup"
    assert [r["stage"] for r in report["ledger"]] == ["original", "cleanup"]
    orig, final = report["ledger"][0]["model"], report["ledger"][-1]["model"]
    assert "BatchNormalization" in orig["ops"] and "BatchNormalization" not in final["ops"]
    assert final["nodes"] < orig["nodes"]
    assert report["fidelity"]["feeds"] == 397
    assert report["fidelity"]["worst"]["top1_agreement"] == 1.0
    assert report["fidelity"]["worst"]["rel_max_abs"] < 1e-4
    assert "latency_ms" in report and report["latency_ms"]["original"] > 0
    assert "cleanup" in stdout and "fidelity" in stdout
    assert out.with_name("small.onnx.report.md").read_text().startswith("# onnxcompress report")


def test_passes_lists_cleanup_with_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    assert "cleanup  [exact]" in out
    block = out.split("cleanup  [exact]")[1].split("\n\n")[0]
    assert "=" in block  # at least one option with its default


def test_inspect_reports_ops_params_macs(capsys):
    code, out, _ = run(capsys, "inspect", MODEL)
    assert code == 0
    assert "Conv" in out and "params" in out and "MACs" in out
    code, out, _ = run(capsys, "inspect", MODEL, "--json")
    info = json.loads(out)
    assert info["stats"]["macs"] > 0 and info["inputs"][0]["name"] == "image"


def test_inspect_lists_sparsity_channel_groups_and_removable_units(tmp_path, capsys):
    model = onnx.load(MODEL)
    w = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.reshape(-1)[: arr.size // 2] = 0  # half of conv2's weights zero
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    sparse = tmp_path / "half_zero.onnx"
    onnx.save(model, sparse)
    code, out, _ = run(capsys, "inspect", sparse, "--json")
    info = json.loads(out)
    row = next(r for r in info["sparsity"]["tensors"] if r["name"] == "conv2.weight")
    assert row["zeros"] >= arr.size // 2 and row["sparsity"] >= 0.5 and row["storage"] == "dense"
    assert info["sparsity"]["summary"]["zeros"] >= arr.size // 2
    assert any(g["prunable"] for g in info["channel_groups"])
    units = [u for u in info["removable_units"] if u["removable"]]
    assert [u["kind"] for u in units] == ["residual"]  # the digits CNN has one residual block
    code, out, _ = run(capsys, "inspect", sparse)
    assert code == 0 and "conv2.weight" in out and "removable units (prune-layers): 1" in out


def test_recipes_listed_and_used_by_name(tmp_path, capsys):
    code, out, _ = run(capsys, "recipes", "--json")
    recipes = json.loads(out)
    assert {"int8", "fast", "small", "deep-compression", "int8-accurate"} <= set(recipes)
    assert all(r["description"] and r["pipeline"] for r in recipes.values())
    out_model = tmp_path / "r.onnx"
    code, _, err = run(capsys, "compress", MODEL, "-o", out_model, "--recipe", "int8", "--calib", CALIB,
                       "--val", VAL, "--no-latency")
    assert code == 0, err
    report = json.loads((tmp_path / "r.onnx.report.json").read_text())
    assert report["pipeline"] == recipes["int8"]["pipeline"]  # the recipe's passes ran, as `recipes` lists them
    assert [row["stage"] for row in report["ledger"]][1:] == ["cleanup", "quantize"]
    code, _, err = run(capsys, "compress", MODEL, "-o", tmp_path / "x.onnx", "--recipe", "no-such-recipe")
    assert code == 2 and "shipped recipes" in err and "int8" in err
    assert not (tmp_path / "x.onnx").exists()


def test_validate_two_models(tmp_path, capsys):
    out = tmp_path / "s.onnx"
    assert run(capsys, "compress", MODEL, "-o", out, "--passes", "cleanup", "--calib", CALIB, "--no-latency")[0] == 0
    code, stdout, _ = run(capsys, "validate", MODEL, out, "--data", VAL, "--max-val", "20", "--latency-budget",
                          "0.2")
    assert code == 0
    assert "top1_agreement" in stdout and "size:" in stdout and "latency" in stdout


def _assert_clean_failure(code, err, out_path: Path, expect: str):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxcompress: error:"), err
    assert expect in lines[0], err
    assert "Traceback" not in err
    assert not out_path.exists()
    assert [p for p in out_path.parent.glob("*") if p.name.startswith(".")] == []


def test_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "corrupt.onnx"
    data = MODEL.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    before = sha(bad)
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", bad, "-o", out, "--passes", "cleanup")
    _assert_clean_failure(code, err, out, "not a readable ONNX model")
    assert sha(bad) == before


def test_non_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello, I am a text file\n")
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", bad, "-o", out, "--passes", "cleanup")
    _assert_clean_failure(code, err, out, "notes.onnx")


def test_external_data_outside_the_folder(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    model = onnx.load_model(str(MODEL))
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    shutil.move(folder / "m.data", tmp_path / "x.data")
    m = onnx.load_model(str(folder / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../x.data"
    (folder / "m.onnx").write_bytes(m.SerializeToString())
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", folder / "m.onnx", "-o", out, "--passes", "cleanup")
    _assert_clean_failure(code, err, out, "outside the model's folder")


def test_calibration_missing_an_input(tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", MODEL, "-o", out, "--passes", "cleanup", "--calib", calib)
    _assert_clean_failure(code, err, out, "no array for model input 'image'")


def test_calibration_wrong_shape(tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.zeros((4, 1, 9, 9), np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", MODEL, "-o", out, "--passes", "cleanup", "--calib", calib)
    _assert_clean_failure(code, err, out, "expects")


def test_unknown_op(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("FrobnicateX", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    p = tmp_path / "unknown.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", p, "-o", out, "--passes", "cleanup")
    _assert_clean_failure(code, err, out, "FrobnicateX")


@pytest.mark.parametrize("args,expect", [
    (["--passes", "no-such-pass"], "unknown pass"),
    (["--passes", "cleanup{bogus=1}"], "has no option"),
    ([], "give the passes"),
    (["--passes", "cleanup", "--dim", "N=x"], "--dim"),
    (["--passes", "cleanup", "--shape", "image=1x1x8"], "does not fit"),
])
def test_bad_arguments(tmp_path, capsys, args, expect):
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "compress", MODEL, "-o", out, *args)
    _assert_clean_failure(code, err, out, expect)


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    shutil.copy(MODEL, p)
    before = sha(p)
    code, _, err = run(capsys, "compress", p, "-o", p, "--passes", "cleanup")
    assert code != 0 and "never overwrites its input" in err
    assert sha(p) == before
