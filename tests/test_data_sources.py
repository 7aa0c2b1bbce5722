"""Calibration data as users have it (data_sources / image_feeds), through ``compress()`` and the CLI.

Images are made with PIL in tmp_path; values are checked against PIL's own resize and the stated formula
``(pixel / 255 - mean) / std``. Sentences use a tiny WordPiece tokenizer built with the ``tokenizers`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.data_sources import feeds_from_any
from onnxcompress.errors import BadInputError

PIL = pytest.importorskip("PIL.Image")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"


def image_model(shape=(1, 3, 8, 8)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["image", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def write_images(folder: Path, size=(8, 8), n=3) -> list[np.ndarray]:
    """RGB PNGs in class sub-folders (a/, b/); returns the pixel arrays in sorted-path order."""
    rng = np.random.default_rng(1)
    pixels = []
    for i in range(n):
        sub = folder / ("a" if i < 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        PIL.fromarray(arr, "RGB").save(sub / f"{i}.png")
        pixels.append(arr)
    return pixels


def test_image_folder_values_follow_the_stated_formula(tmp_path):
    pixels = write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"not an image")  # hidden files are skipped
    feeds = feeds_from_any(tmp_path / "imgs", image_model(), "mean=0.5:0.4:0.3,std=0.25:0.5:1,bgr=true")
    got = [f["image"] for f in feeds]
    assert len(got) == 3 and got[0].shape == (1, 3, 8, 8) and got[0].dtype == np.float32
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.25, 0.5, 1.0], np.float32)
    for arr, feed in zip(pixels, got, strict=True):
        want = ((arr[:, :, ::-1].astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
        np.testing.assert_allclose(feed, want, rtol=1e-6, atol=1e-6)


def test_image_resize_short_side_then_centre_crop(tmp_path):
    write_images(tmp_path / "imgs", size=(20, 12), n=1)  # 20 wide, 12 high
    feed = feeds_from_any(tmp_path / "imgs", image_model(), "resize=8").first()["image"]
    with PIL.open(next((tmp_path / "imgs").rglob("*.png"))) as img:
        resized = np.asarray(img.convert("RGB").resize((13, 8), PIL.BILINEAR))  # short side 12 -> 8, 20 -> 13
    want = (resized[:, 2:10].astype(np.float32) / 255).transpose(2, 0, 1)[None]  # crop left round(2.5) = 2
    np.testing.assert_allclose(feed, want, atol=1e-6)


def test_image_folder_needs_a_size_for_symbolic_hw(tmp_path):
    write_images(tmp_path / "imgs", n=1)
    with pytest.raises(BadInputError, match="resize="):
        feeds_from_any(tmp_path / "imgs", image_model((1, 3, "h", "w")))
    feed = feeds_from_any(tmp_path / "imgs", image_model((1, 3, "h", "w")), "resize=6x10").first()
    assert feed["image"].shape == (1, 3, 6, 10)


def test_compress_from_an_image_folder_api_and_cli(tmp_path, capsys):
    write_images(tmp_path / "imgs", n=4)
    src = tmp_path / "m.onnx"
    onnx.save_model(image_model(), str(src))
    result = api.compress(src, "quantize{mode=static}", calibration=tmp_path / "imgs",
                          preprocess="mean=0.5,std=0.25", measure=False)
    calib = result.provenance["calibration"]
    assert calib["samples"] == 4 and "4 images" in calib["source"] and "mean=0.5" in calib["source"]
    assert result.fidelity.feeds == 4 and not result.fidelity.synthetic
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--passes", "cleanup", "--calib",
                 str(tmp_path / "imgs"), "--preprocess", "resize=8,mean=0.5,std=0.25,layout=NCHW,bgr=false",
                 "--no-latency"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "o.onnx.report.json").read_text())
    assert report["calibration"]["samples"] == 4
    code = main(["compress", str(src), "-o", str(tmp_path / "p.onnx"), "--passes", "cleanup", "--calib",
                 str(tmp_path / "imgs"), "--preprocess", "size=8"])
    assert code == 2 and "size" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ text
def write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "cat": 5, "sat": 6, "on": 7, "mat": 8,
             "##s": 9}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return path


def text_model(seq: int | str = "seq") -> onnx.ModelProto:
    emb = nh.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "emb")
    axes = nh.from_array(np.array([-1], np.int64), "axes")
    seq_axis = nh.from_array(np.array([1], np.int64), "seq_axis")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("ReduceSum", ["em", "seq_axis"], ["y"], keepdims=0)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, seq]) for n in ("input_ids", "attention_mask")]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [emb, axes, seq_axis])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_sentences_are_tokenized_one_feed_per_line(tmp_path):
    tok = write_tokenizer(tmp_path / "tokenizer.json")
    txt = tmp_path / "s.txt"
    txt.write_text("the cat sat\n\n  the mats  \n", encoding="utf-8")
    feeds = list(feeds_from_any(txt, text_model(), tokenizer=tok))
    assert [f["input_ids"].tolist() for f in feeds] == [[[2, 4, 5, 6, 3]], [[2, 4, 8, 9, 3]]]
    assert all(f["attention_mask"].tolist() == [[1] * 5] and f["input_ids"].dtype == np.int64 for f in feeds)
    padded = feeds_from_any(txt, text_model(seq=8), tokenizer=tok).first()
    assert padded["input_ids"].tolist() == [[2, 4, 5, 6, 3, 0, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_compress_from_sentences_cli(tmp_path, capsys):
    tok = write_tokenizer(tmp_path / "tokenizer.json")
    txt = tmp_path / "s.txt"
    txt.write_text("the cat sat on the mat\nthe cats sat\nthe mat\n", encoding="utf-8")
    src = tmp_path / "t.onnx"
    onnx.save_model(text_model(), str(src))
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--passes", "cleanup", "--calib", str(txt),
                 "--tokenizer", str(tok), "--no-latency"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "o.onnx.report.json").read_text())
    assert report["calibration"]["samples"] == 3 and "3 sentences" in report["calibration"]["source"]
    assert report["fidelity"]["feeds"] == 3
    code = main(["compress", str(src), "-o", str(tmp_path / "p.onnx"), "--passes", "cleanup", "--calib", str(txt)])
    assert code == 2 and "--tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ arrays in memory
def _sources():
    with np.load(CALIB) as z:
        image = z["image"][:6]
    return {
        "dict of arrays": ({"image": image}, 6),
        "list of feed dicts": ([{"image": image[i : i + 1]} for i in range(5)], 5),
        "callable": (lambda: iter([{"image": image[i : i + 1]} for i in range(4)]), 4),
        "generator": ((({"image": image[i : i + 1]}) for i in range(3)), 3),
    }


@pytest.mark.parametrize("kind", ["dict of arrays", "list of feed dicts", "callable", "generator"])
def test_compress_accepts_data_in_memory(kind):
    data, n = _sources()[kind]
    result = api.compress(MODEL, "cleanup", calibration=data, measure=False)
    assert result.provenance["calibration"]["samples"] == n
    assert result.fidelity.feeds == n and result.fidelity.worst()["rel_max_abs"] < 1e-4


def test_compress_accepts_an_np_load_result():
    with np.load(CALIB) as z:
        result = api.compress(MODEL, "cleanup", calibration=z, max_validation=5, measure=False)
    assert result.provenance["calibration"]["samples"] == len(np.load(CALIB)["image"])
    assert result.fidelity.feeds == 5
    closed = np.load(CALIB)
    closed.close()
    with pytest.raises(BadInputError, match="closed"):
        api.compress(MODEL, "cleanup", calibration=closed)


def test_unreadable_in_memory_data_is_bad_input():
    with pytest.raises(BadInputError, match="cannot read a int"):
        api.compress(MODEL, "cleanup", calibration=3)
    with pytest.raises(BadInputError, match="no array for model input 'image'"):
        api.compress(MODEL, "cleanup", calibration={"pixels": np.zeros((2, 1, 8, 8), np.float32)})


@pytest.mark.realmodel
def test_minilm_sentences_match_the_benchmarks_tokenizer(tmp_path):
    cache = Path.home() / ".cache" / "onnxcompress" / "files"
    vocab, model_path = cache / "all-MiniLM-L6-v2" / "vocab.txt", cache / "paraphrase-MiniLM-L3-v2.onnx"
    if not (vocab.exists() and model_path.exists()):
        pytest.skip("MiniLM vocab/model not in the model cache (python -m benchmarks.models fetch)")
    from tokenizers import BertWordPieceTokenizer

    from benchmarks.speech_text import WordPieceTokenizer

    BertWordPieceTokenizer(str(vocab), lowercase=True).save(str(tmp_path / "tokenizer.json"))
    sentences = ["The quick brown fox jumps over the lazy dog.", "Tokenizers split unbelievable words: 3.14!",
                 "onnxcompress measures fidelity against onnxruntime."]
    (tmp_path / "s.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    model = onnx.load(str(model_path), load_external_data=False)
    feeds = list(feeds_from_any(tmp_path / "s.txt", model, tokenizer=tmp_path / "tokenizer.json"))
    reference = WordPieceTokenizer.from_file(vocab)  # the benchmarks' own BERT tokenizer: an independent oracle
    assert [f["input_ids"][0].tolist() for f in feeds] == [reference.encode(s) for s in sentences]
    assert all(f["attention_mask"].min() == 1 and f["input_ids"].dtype == np.int64 for f in feeds)
