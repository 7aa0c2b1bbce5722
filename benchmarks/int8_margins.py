"""int8 on inputs with thin margins (issue 12): hard inputs beside the easy ones, SQNR and cosine beside every task
metric, one row per quantization technique switched on alone, the default, and ORT's static quantizer.

    python -m benchmarks.int8_margins                                  # every model below, every variant
    python -m benchmarks.int8_margins --models ppocrv4_rec --variants nearest,default
    python -m benchmarks.int8_margins --render                         # rewrite the Markdown from the JSON
    python -m benchmarks.int8_margins --models ppocrv4_rec --variants default --explain 8 --merge

Inputs per model (calibration and evaluation from disjoint seeds):

* **PP-OCRv4 rec**: the harness's easy lines (English words, 28-40 px, FP32 exact match ~0.97) and **hard lines**
  (``hard_lines``): random characters (letters, digits, punctuation) 8-18 long in 12 DejaVu faces at 11-22 px
  (upscaled to the model's 48 px height), dim low-contrast ink, slight blur and pixel noise — lines where the FP32
  model's own exact match is about one half, so its logits' margins are thin. Calibration: half easy, half hard.
* **MiniLM-L3 / L6**: the harness's sentences and **long inputs** (``long_sentences``): 4-8 consecutive sentences in one
  feed, up to 128 tokens. Calibration: half each.
* EfficientNet-Lite2 (ImageNet): the harness's photo crops at several scales (``benchmarks.imagenet``).
* det / nudenet / ddddocr_det: the harness's inputs.

Per evaluation set and variant: the model's task metric (``ModelSpec.evaluate``: string agreement / CER for rec, box
F1 / map IoU for detectors, embedding cosine for MiniLM), the SQNR and cosine of the logits (the worst float output;
MiniLM: the sentence embedding), latency vs FP32 (1 thread, interleaved in one call), weight bytes, tool seconds.
A model whose outputs are Softmax probabilities (rec) also gets the SQNR of the Softmax inputs (``logits SQNR``): the
probabilities of a 6625-way softmax move far more than its logits when two classes are close.
``--explain N`` adds, for the ``default`` variant on the last (hardest) set's first 8 feeds, where its error enters
(``passes.quantize.error_sources``): each activation rounding taken out alone (leave-one-out gain), and the SQNR with
only the weights int8.

Variants (``VARIANTS``): ``before`` (the float-layer rule before issue 18: the gain alone decides, no cost),
``nearest`` (round-to-nearest weights, what the pass did before ``weight_rounding``), ``dweq`` (the default
with ``depthwise_equalization``), ``no-dweq`` (an interim default without it: the default now), ``minmax`` /
``minmax+dweq`` (``calibration=minmax`` without / with ``depthwise_equalization``: its effect with the range rule
held fixed; with ``calibration=auto`` it flips the rule to mse on rec, which costs the easy lines),
``rounding`` (``weight_rounding=output``: scales and rounding fitted to each layer's output), ``smooth``
(``smooth=all``: SmoothQuant factors on every MatMul input, round-to-nearest weights), ``smooth-auto``
(``smooth=auto``: only inputs whose largest channel RMS is >= 8x the median), ``default`` (the pass's
defaults, ``weight_rounding=auto``), ``all-int8`` (no automatic float layers), and ``ort_minmax`` (ORT's
``quantize_static``, QDQ, per channel, MinMax). Issue 12's mixed-precision rows: ``default-layers``
(``auto_float_units=false``: the automatic float search over single layers only, the default before rounding
groups), ``greedy-0.5x`` (``sensitivity=greedy_cost max_latency=0.5``: the best feature/output SQNR within 0.5x the
float model's measured latency), ``greedy-25dB`` (``... min_sqnr_db=25 max_latency=0.6``), ``accurate``
(the ``int8-accurate`` recipe: ``min_cosine=0.995``, per-layer leave-one-out) and ``accurate-greedy`` (the same
target with ``sensitivity=greedy_cost``). Ninth session: ``refit`` (``weight_rounding=refit``: each layer refit
to the float layer's output on its int8-model input, ``passes.quantize.refit``), ``refit-data`` (the same on
``N_TRAIN`` calibration feeds; the ranges from the usual ones), ``streq`` (``stream_equalization=true``) and
``distill`` (``quantize,distill``: distill's layer-wise refit of the QDQ graph). Tenth session: ``qat-lines``
(quantization-aware distillation at data scale: ``distill{mode=train}`` on the QDQ graph drawing from ``N_POOL``
distinct generated inputs, ``train_pool``: rec half easy, half hard lines, disjoint from the calibration and
evaluation ones, ``N_POOL_HELD`` more watching the early stopping; KL on the CTC softmax, ``QAT_MINUTES`` of
training, 1 thread), ``qat-lines-lr5e-4`` (the same at a higher learning rate) and ``refit+qat-lines`` (the same
from ``weight_rounding=refit``); PP-OCRv4 rec only: ``rec-stem-float`` (``exclude`` its stem Conv and the depthwise
Conv after it: the rounding between them holds most of the hard-line damage, ``--attribute``) and
``rec-stem-float+qat-lines``. Eleventh session: ``feed-worst`` / ``feed-mean`` (``auto_float_score=worst_feed`` /
``mean_feed_db``: the automatic float-layer search scores each candidate feed by feed, by the worst feed's SQNR or
the mean of per-feed SQNRs in dB, instead of one SQNR pooled over the feeds, on the search's usual 4 feeds),
``feed-worst-16`` / ``feed-mean-16`` / ``feed-nsr-16`` (the same on 16 feeds, ``auto_float_feeds=16``; ``nsr``:
``mean_feed_nsr``, the mean of per-feed noise-to-signal ratios), ``pooled-16`` (the pooled score on 16 feeds),
``least-sure-8`` / ``least-sure-16`` (pooled over the half of the first 8 / 16 feeds where FP32's top-1 margin is
smallest, ``least_sure_half``) and
``feed-worst+qat-lines``; ``continue-qat-lines`` (the model in ``INT8_MARGINS_FROM``, a first QAT run's output,
trained ``QAT_MINUTES`` more against the float model: ``distill{mode=train teacher=...}``). Twelfth session
(``smooth=auto`` decided by measurement, ``passes.quantize.smoothing_choice``): ``smooth-auto`` (from then on: the
model quantized without smoothing and with every MatMul/Gemm input smoothed at each of ``smooth_alphas``, the best
worst-output SQNR on the evaluation feeds kept; before: the 8x channel-ratio rule), ``no-smooth``
(``smooth=none``), ``smooth-a0.65`` / ``smooth-a0.8`` (``smooth=all`` at that strength), ``smooth-all-int8``
(``smooth=all auto_float_db=0``; ``-a0.65`` / ``-a0.8``: at that strength), ``smooth+rounding`` / ``smooth+refit`` (``smooth=all`` with
``weight_rounding=output`` / ``refit``), ``smooth-a0.8+rounding``; MiniLM-L6 (all-MiniLM-L6-v2) joins with the
same sentence and long-input sets. Thirteenth session (the weights of smoothed transformers): ``s12-default`` (the
twelfth session's default: ``weight_rounding=nearest matmul_bias=false smooth_per_input=false``), ``s13-bias``
(MatMul bias correction alone), ``s13-per-input`` (the per-input strength trial alone), ``s13-gptq``
(``weight_rounding=matmul matmul_bias=true``: the new default) and ``s13-all`` (that with ``smooth_per_input``). Fourteenth
session (the CNNs' activation noise): ``ebc`` (``empirical_bias=true``: each int8 Conv's per-channel output mean
matched to the float Conv's on the calibration feeds, stage by depth, through its bias; ``passes.quantize.empirical_bias``)
and ``ebc-gain`` (``empirical_gain=true`` too: a per-channel gain and offset fitted to the float output). Sixteenth
session: ``qat-text`` (MiniLM: quantization-aware distillation on the unlabeled sentences of Python's standard library,
``benchmarks.distill_train.text_feeds_file``, kept in ``INT8_MARGINS_TEXT_CACHE``; cosine on the sentence embedding,
``QAT_MINUTES`` of training). Eighteenth session: ``dynamic`` (``mode=dynamic``: per-tensor activation ranges
measured at run time, ``DynamicQuantizeLinear`` + ``MatMulInteger``; given the calibration feeds it smooths by
measurement, ``passes.quantize.dynamic_smoothing``), ``dynamic-plain`` (``smooth=none``: dynamic quantization as
without data) and ``dynamic-matmul`` (``weight_rounding=matmul``: the weights rounded against the layer outputs,
``passes.quantize.dynamic_rounding``), ``dynamic-matmul-30db`` / ``-31db`` (the same with ``min_sqnr_db``: layers kept
float, most sensitive first, until the calibration feeds' embedding SQNR reaches the target,
``passes.quantize.dynamic_mixed``). Twenty-first session: ``dynamic-matmul-30db-float`` (the layers lifted stay float,
as the eighteenth session's ``-30db``), ``-30db-2p`` / ``-31db-2p`` (lifted to two-pass: the input quantized twice,
``passes.quantize.two_pass``); ``-30db`` / ``-31db`` are now ``lift_to=auto``. Twenty-second session:
``dynamic-matmul-rows`` (``activation_ranges=row``: every layer's input one range per row,
``passes.quantize.row_ranges``), ``-30db-row`` / ``-31db-row`` / ``-32db-row`` (``lift_to=row``: the row pipeline alone);
``-30db`` / ``-31db`` / ``-32db`` (``lift_to=auto``) now also run the row pipeline and keep the faster model meeting the target.
``--explain-variant`` names the variant ``--explain`` explains.

``--attribute-scores`` (PP-OCRv4 rec) ranks the attribution's first rounding by the quantizer's own scores, each
rounding of the default int8 model taken out alone, with the feeds combined each way of
``fidelity.FEED_SCORES``, on the search's 4 feeds, 16 calibration feeds and their hard half.

``--attribute`` (PP-OCRv4 rec) says where the default int8 model's hard-line damage enters, on the task metric
(``attribute``): each activation rounding taken out alone, ranked on hard lines of a third seed, then the largest
k taken out together, each region's roundings (``rec_regions``), and the weights alone, scored on the held-out
evaluation hard lines and timed.

``--frontier N`` (with ``--frontier-unit layer|rounding``) measures the mixed-precision frontier instead: one
calibration, the greedy path of ``passes.quantize.float_frontier`` (at most N float layers) and the leave-one-out
order, each built at ``FRONTIER_POINTS`` float-set sizes, scored on the evaluation sets and timed with FP32 in one
interleaved call. Writes ``benchmarks/results/int8_margins.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import anchors, measure
from benchmarks.run import RESULTS, load_specs, versions
from benchmarks.spec import Feed, ModelSpec, Outputs

log = logging.getLogger("benchmarks.int8_margins")

MODELS = ["ppocrv4_rec", "minilm_l3", "minilm_l6", "nudenet_320n", "ddddocr_det", "ppocrv4_det", "efficientnet_lite2"]
VARIANTS: dict[str, str] = {
    "before": "cleanup,quantize{weight_rounding=nearest auto_float_cost_per_db=inf}",
    "nearest": "cleanup,quantize{weight_rounding=nearest}",
    "dweq": "cleanup,quantize{depthwise_equalization=true}",
    "minmax": "cleanup,quantize{calibration=minmax}",
    "minmax+dweq": "cleanup,quantize{calibration=minmax depthwise_equalization=true}",
    "rounding": "cleanup,quantize{weight_rounding=output}",
    "smooth": "cleanup,quantize{smooth=all weight_rounding=nearest}",
    "smooth-auto": "cleanup,quantize{smooth=auto}",
    # twelfth session: smoothing strength, and the smoothing decided by measurement (``smooth=auto`` since then)
    "smooth-a0.65": "cleanup,quantize{smooth=all smooth_alpha=0.65}",
    "smooth-a0.8": "cleanup,quantize{smooth=all smooth_alpha=0.8}",
    "no-smooth": "cleanup,quantize{smooth=none}",
    "smooth-all-int8": "cleanup,quantize{smooth=all auto_float_db=0}",
    "smooth-all-int8-a0.65": "cleanup,quantize{smooth=all smooth_alpha=0.65 auto_float_db=0}",
    "smooth-all-int8-a0.8": "cleanup,quantize{smooth=all smooth_alpha=0.8 auto_float_db=0}",
    "smooth+rounding": "cleanup,quantize{smooth=all weight_rounding=output}",
    "smooth+refit": "cleanup,quantize{smooth=all weight_rounding=refit}",
    "smooth-a0.8+rounding": "cleanup,quantize{smooth=all smooth_alpha=0.8 weight_rounding=output}",
    "default": "cleanup,quantize",
    "default-layers": "cleanup,quantize{auto_float_units=false}",
    "greedy-0.5x": "cleanup,quantize{sensitivity=greedy_cost max_latency=0.5}",
    "greedy-25dB": "cleanup,quantize{sensitivity=greedy_cost min_sqnr_db=25 max_latency=0.6}",
    "accurate": "cleanup,quantize{mode=static min_cosine=0.995}",
    "accurate-greedy": "cleanup,quantize{mode=static min_cosine=0.995 sensitivity=greedy_cost}",
    "all-int8": "cleanup,quantize{auto_float_db=0}",
    "distill": "cleanup,quantize,distill",
    "refit": "cleanup,quantize{weight_rounding=refit}",
    "streq": "cleanup,quantize{stream_equalization=true}",
    "refit-data": "cleanup,quantize{weight_rounding=refit calibration_samples=CALIB eval_samples=EVAL}",
    "qat": "cleanup,quantize,distill{mode=train lr=1e-3 steps=400 eval_every=10 max_minutes=8}",
    "qat-wonly": "cleanup,quantize,distill{mode=train lr=1e-3 steps=400 eval_every=10 max_minutes=8 "
                 "learn_scales=false}",
    "qat-lr1e-4": "cleanup,quantize,distill{mode=train lr=1e-4 steps=400 eval_every=10 max_minutes=8}",
    "qat-data": "cleanup,quantize{calibration_samples=CALIB eval_samples=EVAL},"
                "distill{mode=train lr=1e-3 steps=400 eval_every=10 max_minutes=8}",
    "qat-lines": "cleanup,quantize,distill{mode=train train_data=POOL train_samples=NPOOL lr=2e-4 steps=100000 "
                 "eval_every=20 patience=6 max_minutes=MINUTES augment=none}",
    "qat-lines-lr5e-4": "cleanup,quantize,distill{mode=train train_data=POOL train_samples=NPOOL lr=5e-4 "
                        "steps=100000 eval_every=20 patience=6 max_minutes=MINUTES augment=none}",
    # PP-OCRv4 rec only: the stem Conv and the depthwise Conv after it float (their rounding, batch_norm_2.tmp_2,
    # holds most of the hard-line damage: ``--attribute``)
    "rec-stem-float": "cleanup,quantize{exclude=[p2o.Conv.0,p2o.Conv.1]}",
    "rec-stem-float+qat-lines": "cleanup,quantize{exclude=[p2o.Conv.0,p2o.Conv.1]},distill{mode=train "
                                "train_data=POOL train_samples=NPOOL lr=2e-4 steps=100000 eval_every=20 patience=6 "
                                "max_minutes=MINUTES augment=none}",
    "refit+qat-lines": "cleanup,quantize{weight_rounding=refit},distill{mode=train train_data=POOL "
                       "train_samples=NPOOL lr=2e-4 steps=100000 eval_every=20 patience=6 max_minutes=MINUTES "
                       "augment=none}",
    # eleventh session: the automatic float-layer search scored feed by feed (``auto_float_score``)
    "feed-worst": "cleanup,quantize{auto_float_score=worst_feed}",
    "feed-mean": "cleanup,quantize{auto_float_score=mean_feed_db}",
    "feed-worst-16": "cleanup,quantize{auto_float_score=worst_feed auto_float_feeds=16}",
    "feed-mean-16": "cleanup,quantize{auto_float_score=mean_feed_db auto_float_feeds=16}",
    "feed-nsr-16": "cleanup,quantize{auto_float_score=mean_feed_nsr auto_float_feeds=16}",
    "pooled-16": "cleanup,quantize{auto_float_feeds=16}",
    "least-sure-8": "cleanup,quantize{auto_float_score=least_sure_half auto_float_feeds=8}",
    "least-sure-16": "cleanup,quantize{auto_float_score=least_sure_half auto_float_feeds=16}",
    "feed-worst+qat-lines": "cleanup,quantize{auto_float_score=worst_feed},distill{mode=train train_data=POOL "
                            "train_samples=NPOOL lr=2e-4 steps=100000 eval_every=20 patience=6 max_minutes=MINUTES "
                            "augment=none}",
    # QAT continued (``distill{teacher=}``): the model in ``INT8_MARGINS_FROM`` (a first QAT run's output, e.g.
    # ``rec-stem-float+qat-lines`` kept with ``INT8_MARGINS_KEEP``) trained further against the float model
    "continue-qat-lines": "distill{mode=train teacher=TEACHER train_data=POOL train_samples=NPOOL lr=2e-4 "
                          "steps=100000 eval_every=20 patience=6 max_minutes=MINUTES augment=none}",
    # thirteenth session: the weights of smoothed transformers (issue 12, MiniLM-L6): the twelfth session's default
    # spelt out, and each lever of this session on its own and together
    "s12-default": "cleanup,quantize{weight_rounding=nearest matmul_bias=false smooth_per_input=false}",
    "s13-bias": "cleanup,quantize{weight_rounding=nearest matmul_bias=true smooth_per_input=false}",
    "s13-gptq": "cleanup,quantize{weight_rounding=matmul matmul_bias=true smooth_per_input=false}",
    "s13-per-input": "cleanup,quantize{weight_rounding=nearest matmul_bias=false smooth_per_input=true}",
    "s13-all": "cleanup,quantize{weight_rounding=matmul matmul_bias=true smooth_per_input=true}",
    # fourteenth session: the int8 layers' output means matched to the float layers' (empirical bias correction)
    "ebc": "cleanup,quantize{empirical_bias=true}",
    "ebc-gain": "cleanup,quantize{empirical_bias=true empirical_gain=true}",
    # sixteenth session: MiniLM's QAT on 22,000 unlabeled stdlib sentences (``STDLIB_TEXT``: their .npz) instead of
    # the 2,000 feeds cut from the calibration split's 550 sentences
    "qat-text": "cleanup,quantize,distill{mode=train train_data=STDLIB_TEXT train_samples=22000 batch=16 lr=2e-4 "
                "steps=100000 eval_every=50 patience=12 max_minutes=MINUTES}",
    # eighteenth session: runtime (dynamic) activation ranges, per inference, instead of calibrated ones
    "dynamic": "cleanup,quantize{mode=dynamic}",
    "dynamic-plain": "cleanup,quantize{mode=dynamic smooth=none}",
    "dynamic-matmul": "cleanup,quantize{mode=dynamic weight_rounding=matmul}",
    "dynamic-matmul-30db": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=30}",
    "dynamic-matmul-31db": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=31}",
    "dynamic-matmul-32db": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=32}",
    # twentieth session: the same with int8 weight codes forced (weight_type=int8), beside the default (auto: uint8
    # where this machine's onnxruntime clamps uint8 x int8 product pairs, passes.quantize.u8s8_saturation)
    "default-int8w": "cleanup,quantize{weight_type=int8}",
    "dynamic-int8w": "cleanup,quantize{mode=dynamic weight_type=int8}",
    "dynamic-matmul-int8w": "cleanup,quantize{mode=dynamic weight_rounding=matmul weight_type=int8}",
    # twenty-first session: the layers the search lifts become two-pass (passes.quantize.two_pass: the input
    # quantized twice, int8 weights) or float; ``-30db`` / ``-31db`` above are now lift_to=auto (both searched where
    # a two-pass layer measured faster than float, the faster model that meets the target kept)
    "dynamic-matmul-30db-float": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=30 lift_to=float}",
    "dynamic-matmul-30db-2p": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=30 lift_to=two_pass}",
    "dynamic-matmul-31db-2p": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=31 lift_to=two_pass}",
    "dynamic-matmul-rows": "cleanup,quantize{mode=dynamic weight_rounding=matmul activation_ranges=row}",
    "dynamic-matmul-30db-row": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=30 lift_to=row}",
    "dynamic-matmul-31db-row": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=31 lift_to=row}",
    "dynamic-matmul-32db-row": "cleanup,quantize{mode=dynamic weight_rounding=matmul min_sqnr_db=32 lift_to=row}",
    # twenty-first session: element-wise Add/Mul join the integer domain when any input is integer
    "binary-any": "cleanup,quantize{binary_join=any}",
    "ort_minmax": "ort",
}
#: variants whose calibration list is the usual one followed by more feeds of the same kinds (``train_feeds``),
#: up to this many in all: quantize reads only the usual ones (``CALIB``/``EVAL`` = their count), distill's training
#: draws from all (the teacher labels them)
N_TRAIN = 256
MORE_DATA = {"qat-data", "refit-data"}
#: variants whose training draws from a pool of distinct generated inputs (``train_pool``, disjoint from the
#: calibration and evaluation feeds: ``POOL``): ``NPOOL`` trained on, ``N_POOL_HELD`` more watched by the early
#: stopping (distill's ``heldout=pool``); ``MINUTES`` of training
N_POOL = int(os.environ.get("INT8_MARGINS_POOL", "2000"))
N_POOL_HELD = 64
QAT_MINUTES = float(os.environ.get("INT8_MARGINS_QAT_MINUTES", "20"))
#: where ``qat-text``'s tokenized stdlib sentences are kept (made there on first use)
TEXT_CACHE = Path(os.environ.get("INT8_MARGINS_TEXT_CACHE", str(Path(tempfile.gettempdir()) / "distill_text")))
#: calibration / evaluation feeds per set (2 shared cores: modest counts)
N_CALIB = {"ppocrv4_rec": 64, "minilm_l3": 64, "minilm_l6": 64, "nudenet_320n": 32, "ddddocr_det": 32, "ppocrv4_det": 16,
           "efficientnet_lite2": 32}
N_EVAL = {"ppocrv4_rec": 64, "minilm_l3": 48, "minilm_l6": 48, "nudenet_320n": 32, "ddddocr_det": 32, "ppocrv4_det": 12,
          "efficientnet_lite2": 64}
#: the embedding output of paraphrase-MiniLM-L3 (speech_text.L3_EMBEDDING_OUTPUT)
MINILM_L3_EMBEDDING = 3

# ------------------------------------------------------------------------------------------------- hard text lines
HARD_CHARS = string.ascii_letters + string.digits + "-.,:;!?()/%&+#@'"
HARD_FONTS = (
    "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSans-ExtraLight.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSansCondensed-Oblique.ttf",
)
HARD_SIZES = (11, 22)
_SPLIT_SEED = {"calib": 0, "eval": 1, "attr": 2}


def _font(file: str, size: int):
    from PIL import ImageFont

    root = Path(os.environ.get("ONNXCOMPRESS_FONT_DIR") or "/usr/share/fonts/truetype/dejavu")
    path = root / file
    return ImageFont.truetype(str(path if path.is_file() else root / "DejaVuSans.ttf"), size)


def hard_line(rng: np.random.Generator):
    """(PIL image, text) of one hard line (module docstring)."""
    from PIL import Image, ImageDraw, ImageFilter

    n = int(rng.integers(8, 19))
    text = "".join(HARD_CHARS[i] for i in rng.integers(0, len(HARD_CHARS), n))
    font = _font(HARD_FONTS[int(rng.integers(len(HARD_FONTS)))], int(rng.integers(*HARD_SIZES)))
    left, _, right, _ = font.getbbox(text)
    ascent, descent = font.getmetrics()
    pad = int(rng.integers(1, 4))
    w, h = right - left + 2 * pad, int((ascent + descent) * 1.1)
    bg = int(rng.integers(120, 230))
    ink = int(np.clip(bg - rng.integers(50, 110), 0, 255))
    im = Image.new("L", (w, h), bg)
    ImageDraw.Draw(im).text((pad - left, (h - ascent - descent) // 2), text, font=font, fill=ink)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    a = np.asarray(im, np.float32) + rng.normal(0, 8, (h, w))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB"), text


def _rec_norm(im, height: int = 48, width: int = 320) -> np.ndarray:
    """rapidocr's resize_norm_img (as ``vision``): aspect kept at ``height``, capped at ``width``, right-padded; BGR,
    NCHW, [-1, 1]."""
    from PIL import Image

    w, h = im.size
    rw = max(1, min(width, int(np.ceil(height * w / h))))
    a = np.asarray(im.resize((rw, height), Image.BILINEAR), np.float32)[:, :, ::-1]
    x = np.zeros((1, 3, height, width), np.float32)
    x[0, :, :, :rw] = (a.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return x


def hard_lines(n: int, split: str) -> tuple[list[Feed], list[str]]:
    """``n`` hard lines as PP-OCRv4 rec feeds, and their texts."""
    feeds, texts = [], []
    for i in range(n):
        im, text = hard_line(np.random.default_rng([21, _SPLIT_SEED[split], i]))
        feeds.append({"x": _rec_norm(im)})
        texts.append(text)
    return feeds, texts


def rec_strings(outs: list[Outputs]) -> list[str]:
    from benchmarks.vision import ctc_greedy, rec_charset

    chars = rec_charset()
    return [ctc_greedy(o[0][0], chars) for o in outs]


def cer(refs: list[str], hyps: list[str]) -> float:
    from benchmarks.vision import levenshtein

    return sum(levenshtein(r, h) for r, h in zip(refs, hyps, strict=True)) / max(sum(len(r) for r in refs), 1)


def hard_rec_metrics(truth: list[str], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    r, c = rec_strings(ref), rec_strings(cand)
    return {
        "agreement": float(np.mean([a == b for a, b in zip(r, c, strict=True)])),
        "cer_vs_fp32": cer(r, c),
        "fp32_exact_match": float(np.mean([a == t for a, t in zip(r, truth, strict=True)])),
        "exact_match": float(np.mean([a == t for a, t in zip(c, truth, strict=True)])),
        "fp32_cer": cer(truth, r),
        "cer": cer(truth, c),
    }


# -------------------------------------------------------------------------------------------------- long sentences
def long_sentences(n: int, split: str, token_types: bool = False) -> list[Feed]:
    """``n`` feeds of 4-8 consecutive sentences each (up to 128 tokens), for MiniLM-L3 / L6 (``token_types``: with
    an all-zero ``token_type_ids``, as L6's export reads)."""
    from benchmarks.speech_text import split_sentences, tokenizer

    tok = tokenizer()
    sents = split_sentences(split)
    rng = np.random.default_rng([22, _SPLIT_SEED[split]])
    feeds = []
    for _ in range(n):
        k = int(rng.integers(4, 9))
        i = int(rng.integers(0, len(sents) - k))
        ids = np.asarray([tok.encode(" ".join(sents[i : i + k]), max_length=128)], dtype=np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        if token_types:
            feeds[-1]["token_type_ids"] = np.zeros_like(ids)
    return feeds


def _token_types(spec: ModelSpec) -> bool:
    return "token_type_ids" in spec.make_inputs(1, "calib")[0]


# ----------------------------------------------------------------------------------------------------- data sets
def eval_sets(spec: ModelSpec) -> tuple[list[Feed], dict[str, tuple[list[Feed], Any]]]:
    """(calibration feeds, {set name: (eval feeds, ground truth or None)}) for one model."""
    n_c, n_e = N_CALIB.get(spec.name, 32), N_EVAL.get(spec.name, 32)
    if spec.name == "ppocrv4_rec":
        hard_c, _ = hard_lines(n_c // 2, "calib")
        hard_e, truth = hard_lines(n_e, "eval")
        calib = [f for pair in zip(spec.make_inputs(n_c - n_c // 2, "calib"), hard_c, strict=False) for f in pair]
        return calib, {"easy": (spec.make_inputs(n_e, "eval"), None), "hard": (hard_e, truth)}
    if spec.name.startswith("minilm"):
        tt = _token_types(spec)
        long_c = long_sentences(n_c // 2, "calib", tt)
        calib = [f for pair in zip(spec.make_inputs(n_c - n_c // 2, "calib"), long_c, strict=False) for f in pair]
        return calib, {"easy": (spec.make_inputs(n_e, "eval"), None),
                       "long": (long_sentences(n_e, "eval", tt), None)}
    return spec.make_inputs(n_c, "calib"), {"easy": (spec.make_inputs(n_e, "eval"), None)}


def logit_fidelity(spec: ModelSpec, names: list[str], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    """SQNR (dB) and cosine of the logits: the worst float output, or MiniLM's sentence embedding."""
    if spec.name == "minilm_l3":
        names = [names[MINILM_L3_EMBEDDING]]
        ref = [[o[MINILM_L3_EMBEDDING]] for o in ref]
        cand = [[o[MINILM_L3_EMBEDDING]] for o in cand]
    worst = measure.fidelity(names, ref, cand)["worst"]
    return {"sqnr_db": worst.get("sqnr_db"), "cosine": worst.get("cosine_min", worst.get("cosine"))}


def softmax_logits(path: Path) -> list[str]:
    """The inputs of the Softmax nodes that produce graph outputs: the logits of a model that outputs
    probabilities (PP-OCRv4 rec), whose SQNR the issue's goals are stated on."""
    from onnxcompress import io

    g = io.read_model(path).graph
    outs = {o.name for o in g.output}
    return [n.input[0] for n in g.node if n.op_type == "Softmax" and n.output[0] in outs]


def logits_sqnr(fp32: Path, cand: Path, feeds: list[Feed], tensors: list[str]) -> float | None:
    """SQNR (dB) of ``tensors`` (pooled) of ``cand`` against ``fp32`` on ``feeds``; None when a model lacks one."""
    from onnxcompress import io
    from onnxcompress.analyses.activations import expose_outputs
    from onnxcompress.runtime import Session

    got = []
    for path in (fp32, cand):
        m = io.read_model(path)
        known = {o for n in m.graph.node for o in n.output}
        if any(t not in known for t in tensors):
            return None
        with Session(expose_outputs(m, tensors), threads=1, what=path.name) as s:
            got.append([np.concatenate([np.asarray(a, np.float64).ravel() for a in s.run(f, tensors)])
                        for f in feeds])
    num = sum(float(np.sum(r * r)) for r in got[0])
    den = sum(float(np.sum((r - c) ** 2)) for r, c in zip(got[0], got[1], strict=True))
    return float(10 * np.log10(num / den)) if den > 0 else float("inf")


def explain_errors(fp32: Path, cand: Path, feeds: list[Feed], top: int) -> dict[str, Any]:
    """``passes.quantize.error_sources`` on ``cand`` (leave-one-out of each activation rounding, and the
    weights-only bound) against the FP32 model on ``feeds``; by the outputs when ``cand``'s last layers read other
    tensors than FP32's (smoothing divided them by its factors)."""
    import onnx_graphsurgeon as gs
    from onnxcompress.passes.quantize import fidelity as fid
    from onnxcompress.passes.quantize.error_sources import error_sources

    from onnxcompress import io

    model, quant = io.read_model(fp32), io.read_model(cand)
    nodes = fid.feature_nodes(gs.import_onnx(model))
    if fid.feature_tensor_names(quant, nodes) != fid.feature_tensor_names(model, nodes):
        nodes = []  # the candidate's last layers read other tensors (smoothed ``x/s``): score the outputs
    ref = fid.reference(model, feeds, nodes)
    t0 = time.perf_counter()
    out = error_sources(ref, quant, top)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------------ variants
class PeakRSS:
    """Peak resident memory (MB) of this process while the block runs, sampled every 0.1 s from /proc."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.peak, self._stop = self.rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def train_feeds(spec: ModelSpec, calib: list[Feed], n: int) -> list[Feed]:
    """``calib`` followed by more calibration-split feeds of the same kinds, ``n`` in all (``MORE_DATA``)."""
    more = n - len(calib)
    if more <= 0:
        return calib
    if spec.name == "ppocrv4_rec":
        hard, _ = hard_lines(len(calib) // 2 + more // 2, "calib")
        easy = spec.make_inputs(len(calib) - len(calib) // 2 + more - more // 2, "calib")
        extra = easy[len(calib) - len(calib) // 2:] + hard[len(calib) // 2:]
    elif spec.name.startswith("minilm"):
        extra = spec.make_inputs(len(calib) - len(calib) // 2 + more // 2, "calib")[len(calib) - len(calib) // 2:]
        extra += long_sentences(len(calib) // 2 + more - more // 2, "calib", _token_types(spec))[len(calib) // 2:]
    else:
        extra = spec.make_inputs(n, "calib")[len(calib):]
    return calib + extra


def train_pool(spec: ModelSpec, n_calib: int, n: int) -> list[Feed]:
    """``n`` calibration-split feeds after the ``n_calib`` calibration ones (``eval_sets``), of the same kinds
    alternating (rec: easy, hard; MiniLM: sentences, long inputs): distinct inputs for training."""
    if spec.name == "ppocrv4_rec":
        k, h = n_calib - n_calib // 2, n_calib // 2
        a = spec.make_inputs(k + n - n // 2, "calib")[k:]
        b = hard_lines(h + n // 2, "calib")[0][h:]
    elif spec.name.startswith("minilm"):
        k, h = n_calib - n_calib // 2, n_calib // 2
        a = spec.make_inputs(k + n - n // 2, "calib")[k:]
        b = long_sentences(h + n // 2, "calib", _token_types(spec))[h:]
    else:
        return spec.make_inputs(n_calib + n, "calib")[n_calib:]
    return [f for pair in zip(a, b, strict=False) for f in pair] + a[len(b):]


def write_pool(feeds: list[Feed], path: Path) -> Path:
    """The feeds as one .npz (every input stacked on a new first axis, as ``--calib`` reads it). Token inputs of
    different lengths (MiniLM sentences) are padded on the last axis with id 0 / mask 0, which ``distill`` trims."""
    def stacked(arrays: list[np.ndarray]) -> np.ndarray:
        if not np.issubdtype(arrays[0].dtype, np.integer):  # images, audio: stacked as they are
            return np.stack(arrays)
        longest = max(a.shape[-1] for a in arrays)
        return np.stack([np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, longest - a.shape[-1])]) for a in arrays])

    np.savez(path, **{k: stacked([f[k] for f in feeds]) for k in feeds[0]})
    return path


def _pipeline(variant: str, n_calib: int = 0, pool: Path | None = None) -> str:
    """The variant's pipeline text."""
    text = VARIANTS[variant].replace("CALIB", str(n_calib)).replace("EVAL", str(min(32, n_calib))).replace(
        "MINUTES", str(QAT_MINUTES))
    return text.replace("NPOOL", str(N_POOL)).replace("POOL", str(pool)) if pool is not None else text


def produce(variant: str, fp32: Path, calib: list[Feed], out: Path, spec: ModelSpec | None = None
            ) -> dict[str, Any]:
    """Make one candidate at ``out``; {tool_seconds, peak_rss_mb, load, quantize / distill stats | error}."""
    n_calib = len(calib)
    if variant in MORE_DATA and spec is not None:
        calib = train_feeds(spec, calib, N_TRAIN)
    pool = None
    if "POOL" in VARIANTS[variant] and spec is not None:
        pool = write_pool(train_pool(spec, n_calib, N_POOL + N_POOL_HELD), out.with_suffix(".pool.npz"))
    t0 = time.perf_counter()
    load = [round(v, 2) for v in os.getloadavg()]
    if VARIANTS[variant] == "ort":
        with PeakRSS() as mem:
            res = anchors.run_method(variant, anchors.ort_static("MinMax"), fp32, calib, out)
        return {"tool_seconds": time.perf_counter() - t0, "error": res.error, "peak_rss_mb": round(mem.peak),
                "load": load}
    from onnxcompress import io
    from onnxcompress.api import compress

    source, text = fp32, _pipeline(variant, n_calib, pool)
    if "STDLIB_TEXT" in text and spec is not None:
        from benchmarks.distill_train import text_feeds_file

        text = text.replace("STDLIB_TEXT", str(text_feeds_file(spec, "stdlib", TEXT_CACHE)))
    if "TEACHER" in text:  # continue from an earlier run's output, against the float model
        source, text = Path(os.environ["INT8_MARGINS_FROM"]), text.replace("TEACHER", str(fp32))
    try:
        with PeakRSS() as mem:
            result = compress(source, text, calibration=calib, validate=False, measure=False)
    except Exception as exc:  # a failing variant becomes its row's error
        return {"tool_seconds": time.perf_counter() - t0, "error": anchors.first_line(exc), "load": load}
    io.save_model(result.model, out)
    stats = next((r.pass_stats for r in result.ledger if r.stage.startswith("quantize")), {})
    keep = ("kept_float", "weight_rounding", "auto_float", "calibration", "latency_ratio_measured", "skipped",
            "mixed_precision", "ranges_search", "row_range_layers",
            "empirical_bias", "stream_equalization", "smoothing")
    kept = {k: stats[k] for k in keep if k in stats}
    train = next((r.pass_stats.get("train") for r in result.ledger if r.stage.startswith("distill")), None)
    if train:
        kept["train"] = {k: train.get(k) for k in (
            "steps", "stopped_by", "seconds", "cpu_seconds", "heldout_loss_start", "heldout_loss_best", "improved",
            "backoffs", "lr_final", "fake_quant", "losses", "train_feeds", "heldout_feeds", "loss_history",
            "train_source")}
    return {"tool_seconds": time.perf_counter() - t0, "error": None, "stats": kept, "peak_rss_mb": round(mem.peak),
            "load": load + [round(v, 2) for v in os.getloadavg()]}


def bench_model(spec: ModelSpec, variants: list[str], budget_s: float, explain: int = 0,
                explain_variant: str = "default") -> dict[str, Any]:
    from benchmarks.fetch import cache_dir

    t_model = time.perf_counter()
    fp32 = Path(spec.fetch(cache_dir()))
    calib, sets = eval_sets(spec)
    rec: dict[str, Any] = {"model": spec.name, "n_calib": len(calib), "commit": _commit(),
                           "sets": {k: len(v[0]) for k, v in sets.items()}, "variants": {}}
    refs = {k: measure.run_outputs(fp32, feeds) for k, (feeds, _) in sets.items()}
    logits = softmax_logits(fp32)
    rec["fp32"] = {k: _set_truth(spec, k, sets[k], refs[k][1]) for k in sets}
    with tempfile.TemporaryDirectory(prefix=f"margins-{spec.name}-") as tmp:
        paths = {}
        for v in variants:
            out = Path(tmp) / f"{v}.onnx"
            row = produce(v, fp32, calib, out, spec)
            log.info("%s / %s: %s (%.1f s)", spec.name, v, row["error"] or "ok", row["tool_seconds"])
            if row["error"] is None:
                paths[v] = out
                if os.environ.get("INT8_MARGINS_KEEP"):  # a folder the candidates are copied to (re-timing)
                    import shutil

                    Path(os.environ["INT8_MARGINS_KEEP"]).mkdir(parents=True, exist_ok=True)
                    shutil.copy(out, Path(os.environ["INT8_MARGINS_KEEP"]) / f"{spec.name}-{v}.onnx")
                row["weight_bytes"] = _weight_bytes(out)
                row["sets"] = {}
                for k, (feeds, truth) in sets.items():
                    names, ref = refs[k]
                    _, cand = measure.run_outputs(out, feeds, names)
                    row["sets"][k] = {**logit_fidelity(spec, names, ref, cand), **_task(spec, k, feeds, truth, ref,
                                                                                         cand)}
                    if logits:
                        row["sets"][k]["logits_sqnr_db"] = logits_sqnr(fp32, out, feeds, logits)
                if explain and v == explain_variant:
                    k = list(sets)[-1]
                    row["error_sources"] = {"set": k, **explain_errors(fp32, out, sets[k][0][:8], explain)}
            rec["variants"][v] = row
        rec["fp32_weight_bytes"] = _weight_bytes(fp32)
        first = next(iter(sets.values()))[0][0]
        rec["latency_load"] = [round(v, 2) for v in os.getloadavg()]
        lat = measure.latency_ratios({"fp32": fp32, **paths}, "fp32", first, threads=1, budget_s=budget_s)
        for v, r in lat.items():
            if v in rec["variants"]:
                rec["variants"][v]["latency_ratio"] = r["ratio"]
        rec["fp32_ms"] = lat["fp32"]["ms"]
    rec["seconds"] = time.perf_counter() - t_model
    return rec


def _task(spec: ModelSpec, set_name: str, feeds, truth, ref, cand) -> dict[str, float]:
    if set_name == "hard":
        return hard_rec_metrics(truth, ref, cand)
    return spec.evaluate(feeds, ref, cand)


def _set_truth(spec: ModelSpec, set_name: str, data, ref_outs) -> dict[str, float]:
    """The FP32 model's own task score on a set with ground truth (hard lines)."""
    feeds, truth = data
    if set_name == "hard" and truth is not None:
        m = hard_rec_metrics(truth, ref_outs, ref_outs)
        return {"exact_match": m["fp32_exact_match"], "cer": m["fp32_cer"]}
    return {}


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return ""


def _weight_bytes(path: Path) -> int:
    from onnxcompress import io

    return io.weight_bytes(io.read_model(path))


# ------------------------------------------------------------------------------------ task-metric attribution (rec)
#: numbers of activation roundings taken out (the largest leave-one-out gains first) at which the held-out hard
#: lines are scored and the model timed
ATTR_TOPS = (1, 2, 4, 8, 16, 32)
REGIONS = ("backbone", "neck-in", "svtr", "neck-out", "head")


def rec_regions(model: Any) -> dict[str, str]:
    """Output tensor -> region of PP-OCRv4 rec (SVTR-LCNet) by graph position: ``svtr`` (the LayerNorm / attention
    / MLP blocks: after the last Conv before the first ReduceMean or LayerNormalization, up to the next Conv after
    the last one), ``neck-in`` (from the last pooling node before them: pool and Convs), ``neck-out`` (the Convs
    after them), ``head`` (after the last Conv: its activation and the CTC projection), ``backbone`` (before)."""
    nodes = list(model.graph.node)
    norm = [i for i, n in enumerate(nodes) if n.op_type in ("ReduceMean", "LayerNormalization")]
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    pools = [i for i, n in enumerate(nodes) if n.op_type in ("AveragePool", "MaxPool") and i < norm[0]]
    svtr0 = max(c for c in convs if c < norm[0]) + 1
    neck0 = pools[-1] if pools else svtr0
    svtr1, last_conv = min(c for c in convs if c > max(norm)) - 1, max(convs)

    def region(i: int) -> str:
        if i > last_conv:
            return "head"
        if i > svtr1:
            return "neck-out"
        if i >= svtr0:
            return "svtr"
        return "neck-in" if i >= neck0 else "backbone"

    return {o: region(i) for i, n in enumerate(nodes) for o in n.output}


def rec_scores(model: Any, feeds: list[Feed], ref: list[str], batch: int = 16) -> dict[str, float]:
    """String agreement and CER of ``model``'s greedy CTC strings against ``ref`` (FP32's) on ``feeds``, run
    ``batch`` lines at a time (1 thread)."""
    hyp = rec_strings([[y] for y in rec_batched(model, feeds, batch)])
    return {"agreement": float(np.mean([a == b for a, b in zip(ref, hyp, strict=True)])),
            "cer_vs_fp32": cer(ref, hyp)}


def attribute(spec: ModelSpec, budget_s: float, pipeline: str = "cleanup,quantize", n_rank: int = 64
              ) -> dict[str, Any]:
    """Where the int8 model's hard-line damage comes from, scored on the task metric: each activation rounding
    taken out alone (``error_sources.without_rounding``; leave-one-out, ranked on ``n_rank`` hard lines of a third
    seed), then the largest ``k`` taken out together, each region's roundings taken out, each region's alone kept,
    and every one taken out (only the weights int8), scored on the held-out evaluation hard lines."""
    from onnxcompress.passes.quantize.error_sources import activation_roundings, without_rounding

    from benchmarks.fetch import cache_dir
    from onnxcompress import io
    from onnxcompress.api import compress

    t0 = time.perf_counter()
    fp32 = Path(spec.fetch(cache_dir()))
    calib, sets = eval_sets(spec)
    held, _ = sets["hard"]
    rank, _ = hard_lines(n_rank, "attr")
    f32 = io.read_model(fp32)
    ref = {k: rec_strings([[o] for o in rec_batched(f32, feeds)]) for k, feeds in (("rank", rank), ("held", held))}
    q = compress(fp32, pipeline, calibration=calib, validate=False, measure=False).model
    tool = time.perf_counter() - t0
    roundings = activation_roundings(q)
    where = rec_regions(q)
    region = {t: where.get(t, "backbone") for t in roundings}
    base = {"rank": rec_scores(q, rank, ref["rank"]), "held": rec_scores(q, held, ref["held"])}
    loo = {}
    for t in roundings:
        sc = rec_scores(without_rounding(q, {t}), rank, ref["rank"])
        loo[t] = {"agreement_gain": sc["agreement"] - base["rank"]["agreement"],
                  "cer_gain": base["rank"]["cer_vs_fp32"] - sc["cer_vs_fp32"], "region": region[t]}
    order = sorted(roundings, key=lambda t: (-loo[t]["cer_gain"], -loo[t]["agreement_gain"]))
    rec: dict[str, Any] = {"model": spec.name, "pipeline": pipeline, "commit": _commit(), "n_rank": n_rank,
                           "n_held": len(held), "roundings": len(roundings), "quantize_seconds": round(tool, 1),
                           "base": base, "loo": loo, "order": order, "points": [],
                           "regions": {r: sum(v == r for v in region.values()) for r in REGIONS},
                           "load": [round(v, 2) for v in os.getloadavg()]}
    cands: dict[str, Any] = {"int8": q, "weights-only": without_rounding(q, set(roundings))}
    for k in ATTR_TOPS:
        if k <= len(order):
            cands[f"top-{k}"] = without_rounding(q, set(order[:k]))
    for r in REGIONS:
        inside = {t for t in roundings if region[t] == r}
        if inside:
            cands[f"{r} float"] = without_rounding(q, inside)
            cands[f"only {r} int8"] = without_rounding(q, set(roundings) - inside)
    with tempfile.TemporaryDirectory(prefix="attr-") as tmp:
        paths = {}
        for name, m in cands.items():
            paths[name] = Path(tmp) / f"{len(paths)}.onnx"
            io.save_model(m, paths[name])
            rec["points"].append({"name": name, **rec_scores(m, held, ref["held"]),
                                  "taken_out": len(roundings) if name == "weights-only" else
                                  int(name.split("-")[1]) if name.startswith("top-") else None})
        rec["latency_load"] = [round(v, 2) for v in os.getloadavg()]
        lat = measure.latency_ratios({"fp32": fp32, **paths}, "fp32", held[0], threads=1, budget_s=budget_s)
    for pt in rec["points"]:
        pt["latency_ratio"] = lat[pt["name"]]["ratio"]
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def attribution_scores(spec: ModelSpec, top: str, n: int = 16) -> dict[str, Any]:
    """Whether the quantizer's own scores (``fidelity.score_model``: feature / output SQNR, cosine, per-step
    agreement) rank the rounding ``top`` (the task-metric attribution's first) first, each rounding of the default
    int8 model taken out alone: on the first 4 calibration feeds (what the float-layer search scores), the first
    ``n`` (easy and hard alternating) and their hard half alone; the SQNRs with the feeds combined each way of
    ``fidelity.FEED_SCORES`` (one model run per rounding, scored every way)."""
    import onnx_graphsurgeon as gs
    from onnxcompress.passes.quantize import fidelity as fid
    from onnxcompress.passes.quantize.error_sources import activation_roundings, without_rounding

    from benchmarks.fetch import cache_dir
    from onnxcompress import io
    from onnxcompress.api import compress

    fp32 = Path(spec.fetch(cache_dir()))
    calib, _ = eval_sets(spec)
    q = compress(fp32, "cleanup,quantize", calibration=calib, validate=False, measure=False).model
    f32 = io.read_model(fp32)
    full = fid.reference(f32, calib[:n], fid.feature_nodes(gs.import_onnx(f32)))
    subsets = {"search 4 (easy, hard, easy, hard)": list(range(4)), "first 8 (easy + hard)": list(range(8)),
               f"first {n} (easy + hard)": list(range(n)), f"first {n}: the {n // 2} hard": list(range(1, n, 2))}

    def part(x: list, idx: list[int]) -> list:
        return [x[i] for i in idx]

    runs = {t: fid.run_model(without_rounding(q, {t}), full.feeds, full.feature_nodes) for t in activation_roundings(q)}
    base_run = fid.run_model(q, full.feeds, full.feature_nodes)
    out: dict[str, Any] = {"top": top, "commit": _commit(), "sets": {}}
    for name, idx in subsets.items():
        sub = fid.Reference(part(full.feeds, idx), part(full.outputs, idx), full.names, full.feature_nodes,
                            part(full.features, idx), full.class_outputs)
        out["sets"][name] = {"roundings": len(runs), "by_feed_score": {}}
        for how in fid.FEED_SCORES:
            ref = sub.scored_by(how)
            base = fid.score(ref, (part(base_run[0], idx), part(base_run[1], idx)))
            gains = {t: {k: float(v - base[k]) for k, v in fid.score(ref, (part(r[0], idx), part(r[1], idx))).items()
                         if k in base} for t, r in runs.items()}
            ranks = {}
            for k in ("feature_sqnr_db", "sqnr_db", "cosine", "agreement"):
                order = sorted(gains, key=lambda t, k=k: -gains[t].get(k, 0.0))
                ranks[k] = {"rank": 1 + order.index(top), "gain": gains[top].get(k), "best": order[0],
                            "best_gain": gains[order[0]].get(k)}
            out["sets"][name]["by_feed_score"][how] = {"base": {k: float(v) for k, v in base.items()}, "ranks": ranks}
    return out


def rec_batched(model: Any, feeds: list[Feed], batch: int = 16) -> list[np.ndarray]:
    """The first output of ``model`` on every feed (one line each), run ``batch`` at a time (1 thread)."""
    from onnxcompress.runtime import Session

    outs = []
    with Session(model, threads=1, what="model") as s:
        for i in range(0, len(feeds), batch):
            y = np.asarray(s.run({"x": np.concatenate([f["x"] for f in feeds[i : i + batch]])})[0])
            outs += [y[j : j + 1] for j in range(y.shape[0])]
    return outs


def _attribution_lines(at: dict[str, Any]) -> list[str]:
    """Markdown of one ``attribute`` record."""
    b = at["base"]
    lines = [f"## Where the hard-line damage enters: {at['model']}, scored on the task metric", "",
             f"`python -m benchmarks.int8_margins --attribute` (`{at['pipeline']}`); code at {at.get('commit') or '?'};"
             f" {at['roundings']} activation roundings ({', '.join(f'{r} {n}' for r, n in at['regions'].items())}); "
             f"each taken out alone (its Q -> DQ removed, the rest of the int8 model unchanged: "
             f"`error_sources.without_rounding`) and ranked by the CER-vs-FP32 gain on {at['n_rank']} hard lines of a "
             f"third seed (int8 there: agreement {b['rank']['agreement']:.3f}, CER {b['rank']['cer_vs_fp32']:.3f});"
             f" the rows are scored on the {at['n_held']} held-out evaluation hard lines (the table's `hard` set) "
             f"and timed with FP32 in one interleaved call (1 thread, load {_load(at.get('latency_load'))}); "
             f"{at['seconds']:.0f} s in all. `top-k`: the k largest leave-one-out gains taken out together; "
             "`<region> float`: every rounding of the region taken out; `only <region> int8`: every rounding but the "
             "region's taken out; `weights-only`: every activation rounding taken out.", "",
             "| point | roundings taken out | latency | hard: agreement | hard: cer_vs_fp32 |", "|---|---|---|---|---|"]
    for p in at["points"]:
        lines.append(f"| {p['name']} | {p['taken_out'] if p['taken_out'] is not None else '—'} | "
                     f"{_f(p.get('latency_ratio'), '{:.2f}x')} | {p['agreement']:.3f} | {p['cer_vs_fp32']:.3f} |")
    top = at["order"][:12]
    lines += ["", "Largest leave-one-out gains (rank set; agreement / CER points): " + ", ".join(
        f"`{t}` ({at['loo'][t]['region']}) {at['loo'][t]['agreement_gain']:+.3f} / "
        f"{at['loo'][t]['cer_gain']:+.3f}" for t in top), ""]
    return lines


# ------------------------------------------------------------------------------------------ mixed-precision frontier
#: float-set sizes at which each search order is built, scored on the evaluation sets and timed
FRONTIER_POINTS = (0, 1, 2, 4, 8, 12, 16, 24, 32)


def static_run(fp32: Path, calib: list[Feed], options: str = ""):
    """(StaticRun after stages 1-4 and the automatic float-layer search, Reference, evaluation feeds) for the cleaned
    ``fp32`` model: every later build shares calibration, ranges and bias correction, so frontier points differ
    only in their float layers."""
    from onnxcompress.passes.quantize.float_layer_search import search_float_layers
    from onnxcompress.passes.quantize.static_run import StaticRun

    from onnxcompress import io
    from onnxcompress.api import compress, resolve_passes
    from onnxcompress.context import PassContext
    from onnxcompress.data_sources import feeds_from_any

    cleaned = compress(fp32, "cleanup", calibration=calib, validate=False, measure=False).model
    ctx = PassContext(calibration=feeds_from_any(calib, cleaned))
    ctx.original_bytes = cleaned.SerializeToString()
    working = cleaned
    io.prepare_for_import(working)
    ctx.model_template = working
    (q,) = resolve_passes(f"quantize{{{options}}}" if options else "quantize")
    run = StaticRun(q, io.to_graph(working), ctx)
    ref, eval_feeds = run.setup()
    if q.auto_float_db > 0:
        search_float_layers(run, ref, eval_feeds)
    return run, ref, eval_feeds


def frontier(spec: ModelSpec, max_steps: int, budget_s: float, options: str = "", unit: str = "layer"
             ) -> dict[str, Any]:
    """The float-layer frontier of one model: the greedy path (``float_frontier``: measured gain per measured
    latency cost, re-measured after each pick) and the leave-one-out order (gain alone, as the ``min_cosine`` search
    ranks), each built at ``FRONTIER_POINTS`` float layers, scored on the evaluation sets, all timed with FP32 in
    one interleaved call."""
    from onnxcompress.passes.quantize.float_frontier import greedy_path

    from benchmarks.fetch import cache_dir
    from onnxcompress import io
    from onnxcompress.latency_profile import MachineCache

    fp32 = Path(spec.fetch(cache_dir()))
    calib, sets = eval_sets(spec)
    refs = {k: measure.run_outputs(fp32, feeds) for k, (feeds, _) in sets.items()}
    logits = softmax_logits(fp32)
    t0 = time.perf_counter()
    load0 = [round(v, 2) for v in os.getloadavg()]
    run, ref, _ = static_run(fp32, calib, options)
    with run.ctx.latency.machine_cache(MachineCache.default()):
        fr = greedy_path(run, ref, max_steps, unit=unit)
    search_s = time.perf_counter() - t0
    loo = sorted(fr.first_gains, key=lambda n: -fr.first_gains[n])
    units = rounding_units_of(run, unit)
    loo_sets = [list(dict.fromkeys(n for u in loo[:k] for n in units.get(u, [u]))) for k in range(len(loo) + 1)]
    orders = {"greedy": [s.float_layers for s in fr.steps], "loo": loo_sets}
    rec: dict[str, Any] = {"model": spec.name, "options": options, "unit": unit, "n_calib": len(calib),
                           "sets": {k: len(v[0]) for k, v in sets.items()}, "commit": _commit(),
                           "auto_float": list(run.auto_float), "scored_by": fr.scored_by,
                           "search_seconds": round(search_s, 1), "evaluations": fr.evaluations, "load": load0,
                           "costs": {n: round(c, 4) for n, c in fr.costs.items()},
                           "first_gains_db": {n: round(g, 3) for n, g in fr.first_gains_db().items()},
                           "unit_costs": {u: round(sum(fr.costs.get(n, 0.0) for n in units.get(u, [u])), 4)
                                          for u in fr.first_gains},
                           "max_steps": max_steps,
                           "greedy_steps": [{"layer": s.pick or None, "layers": len(s.float_layers),
                                             "gain_db": s.gain_db, "cost": round(s.cost, 4),
                                             "latency_est": round(s.latency_est, 3),
                                             "calib_score": {k: round(v, 4) for k, v in s.score.items()}}
                                            for s in fr.steps],
                           "points": []}
    with tempfile.TemporaryDirectory(prefix=f"frontier-{spec.name}-") as tmp:
        paths: dict[str, Path] = {}
        for order, prefixes in orders.items():
            for k in FRONTIER_POINTS:
                if k >= len(prefixes) or (order == "loo" and k == 0):
                    continue
                names = prefixes[k]
                label = f"{order}-{k}" + ("r" if unit == "rounding" else "")
                out = Path(tmp) / f"{label}.onnx"
                io.save_model(run.export(run.build(names).graph), out)
                paths[label] = out
                row: dict[str, Any] = {"label": label, "order": order, "float_layers": names,
                                       "est_cost": round(sum(fr.costs[n] for n in names), 4),
                                       "weight_bytes": _weight_bytes(out), "sets": {}}
                for sname, (feeds, truth) in sets.items():
                    onames, r = refs[sname]
                    _, cand = measure.run_outputs(out, feeds, onames)
                    row["sets"][sname] = {**logit_fidelity(spec, onames, r, cand),
                                          **_task(spec, sname, feeds, truth, r, cand)}
                    if logits:
                        row["sets"][sname]["logits_sqnr_db"] = logits_sqnr(fp32, out, feeds, logits)
                rec["points"].append(row)
                log.info("%s frontier %s: %s", spec.name, label, row["sets"])
        first = next(iter(sets.values()))[0][0]
        rec["latency_load"] = [round(v, 2) for v in os.getloadavg()]
        lat = measure.latency_ratios({"fp32": fp32, **paths}, "fp32", first, threads=1, budget_s=budget_s)
        rec["latency_load"] += [round(v, 2) for v in os.getloadavg()]
        for row in rec["points"]:
            row["latency_ratio"] = lat[row["label"]]["ratio"]
        rec["fp32_ms"] = lat["fp32"]["ms"]
        rec["fp32_weight_bytes"] = _weight_bytes(fp32)
    return rec


# ------------------------------------------------------------------------------------- 16-bit activations, measured
#: Conv shapes timed with 8-bit and 16-bit QDQ activations: (C_in, C_out, H=W, group, kernel)
INT16_CONVS = ((128, 256, 40, 1, 1), (64, 64, 80, 64, 3), (96, 96, 40, 1, 3))


def _qdq_conv(act: str, cin: int, cout: int, hw: int, group: int, k: int):
    """One Conv: float, or Q -> DQ -> Conv(DQ(int8 W)) -> Q with uint8 / uint16 activations (opset 21)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((cout, cin // group, k, k)) * 0.1).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])
    attrs = {"group": group, "pads": [k // 2] * 4}
    if act == "float":
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], **attrs)]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    else:
        et, dt, z = (TensorProto.UINT8, np.uint8, 128) if act == "uint8" else (TensorProto.UINT16, np.uint16, 32768)
        sw = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
        sx = np.float32(0.01 if act == "uint8" else 0.01 / 256)
        inits = [numpy_helper.from_array(a, n) for n, a in (
            ("sx", sx), ("zx", np.array(z, dt)), ("sw", sw), ("zw", np.zeros(cout, np.int8)),
            ("Wq", np.clip(np.rint(w / sw[:, None, None, None]), -127, 127).astype(np.int8)),
            ("Bq", np.zeros(cout, np.int32)), ("sb", (sw * sx).astype(np.float32)), ("zb", np.zeros(cout, np.int32)))]
        nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], axis=0),
                 helper.make_node("DequantizeLinear", ["Bq", "sb", "zb"], ["Bd"], axis=0),
                 helper.make_node("Conv", ["xd", "Wd", "Bd"], ["yf"], **attrs),
                 helper.make_node("QuantizeLinear", ["yf", "sx", "zx"], ["y"])]
        out = helper.make_tensor_value_info("y", et, None)
    g = helper.make_graph(nodes, "conv", [x], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def int16_conv_speed(budget_s: float = 4.0) -> list[dict[str, Any]]:
    """Latency of each ``INT16_CONVS`` Conv with 8- and 16-bit QDQ activations over its float Conv (1 thread, one
    interleaved call per shape): where 16-bit activations would be an alternative to keeping a layer float."""
    from onnxcompress.latency import measure_latency

    rows = []
    for shape in INT16_CONVS:
        feed = {"x": np.random.default_rng(1).standard_normal((1, shape[0], shape[2], shape[2])).astype(np.float32)}
        lat = measure_latency({a: _qdq_conv(a, *shape) for a in ("float", "uint8", "uint16")}, feed, threads=1,
                              budget_s=budget_s)
        rows.append({"conv": dict(zip(("cin", "cout", "hw", "group", "k"), shape, strict=True)),
                     **{a: lat[a] / lat["float"] for a in ("uint8", "uint16")}})
    return rows


# ------------------------------------------------------------------------------------------------------- report
def _f(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return fmt.format(v)


#: the task metric shown per set (the harness's primary metric; hard lines: agreement with FP32)
def _task_cols(model: str, set_name: str) -> list[str]:
    if model == "ppocrv4_rec":
        return ["agreement", "cer_vs_fp32", "exact_match"] if set_name == "hard" else ["agreement", "cer_vs_fp32"]
    if model.startswith("minilm"):
        return ["cosine_mean", "cosine_min"]
    specs = load_specs()
    return [specs[model].primary_metric] if model in specs else []


def render(records: list[dict[str, Any]], meta: dict[str, Any], fronts: list[dict[str, Any]] | None = None) -> str:
    lines = [
        "# int8 on thin margins (issue 12)",
        "",
        "Written by `python -m benchmarks.int8_margins` (module docstring: inputs, variants). Latency: 1 thread, "
        "interleaved with FP32 in one call per run (rows from different runs: different calls; the machine was shared, "
        "so ratios move by ~0.05), on the first feed of the first set; SQNR: the worst float output (MiniLM: the "
        "sentence embedding) against FP32 over the set; cosine: the lowest per-feed cosine (a near-empty detection "
        "map makes it small); bytes: initializers; `code at`: the commit the first rows of a model ran at; the `before` and `default` rows "
        "ran at e6b2c43 or later (ddddocr_det's `default` at edbe659, the greedy float set); `rounding-auto` is the "
        "interim default that tried optimised rounding on every model. Variants: module docstring. The rows of "
        "ppocrv4_rec, ppocrv4_det, minilm_l3 and efficientnet_lite2 named nearest, smooth, smooth-auto, ort_minmax, "
        "default, dweq, no-dweq, minmax and minmax+dweq were re-run on 2026-12-06 09:00-10:10 UTC (code 8db3f7c + "
        "this issue's commits) with the load average at 4-7 on the 2 shared cores: their latency ratios move by "
        "~0.05-0.1 between runs. The `qat*` rows (quantization-aware distillation: `distill{mode=train}` on the "
        "QDQ graph, at most 8 minutes of training) ran from 2026-12-06 11:16 UTC, each model's `default` row "
        "re-run in the same invocation; `peak MB`: the process's resident memory while the variant was made; "
        "`load`: the 1-minute load average when it started and ended (2 shared cores). QAT in 8 minutes on 2 "
        "loaded cores (46-330 steps) moved the SQNR by -1.2..+2.3 dB and the task metrics by -0.03..+0.06; "
        "EfficientNet-Lite2's top-1 agreement fell (0.891 -> 0.875 / 0.859 on 64 crops) while its KL, SQNR "
        "and cosine improved: not on by default, not in a recipe. The `default`, `default-layers` and `greedy-*` "
        "rows ran on 2026-12-06 14:31-15:15 UTC (code ead4c39 and later: see each row's `load`), each model's rows "
        "in one invocation: `default` also keeps float the layers around one activation rounding where that costs "
        "<= 2% of the float model's measured latency; `default-layers` is the search over single layers (the "
        "default before). On every model but EfficientNet-Lite2 both kept the same float layers and gave the same "
        "outputs (their latency ratios differ by the measurement noise, ~0.05 at load 3-4); the extra tool time is "
        "the ranking of the groups (one run per group on 4 feeds). Ninth session (2026-12-06 16:30-18:00 UTC, "
        "code b5cd403 and later, see each model's `code at`): `refit` (`weight_rounding=refit`, layers refit to "
        "the float layers' outputs on their int8 inputs, stage by depth), `refit-data` (the same on 256 "
        "calibration feeds), `streq` (`stream_equalization`); the rows of one model that ran in different "
        "invocations differ in latency by the run-to-run noise (~0.05). Tenth session (2026-12-06 18:50-20:40 UTC): "
        "`qat-lines`, `rec-stem-float*`, `refit+qat-lines` and the task-metric attribution: see the summary below. "
        "Eleventh session (2026-12-06 21:26-23:02 UTC): `feed-*`, `least-sure-*`, `pooled-16`, `continue-qat-lines` "
        "and the rankings by feed score: see its summary; each model's `default` row is the re-run beside "
        "`least-sure-16`. Twelfth session (2026-12-07 00:00-02:10 UTC): `smooth=auto` measured and on by default; "
        "`default` rows of MiniLM-L3/L6, EfficientNet-Lite2 and PP-OCRv4 rec are the new default beside "
        "`no-smooth` (the old default) in one invocation; the detectors' `default` / `smooth-auto` pairs are the "
        "old default beside the measured smoothing (no candidates there): see its summary. Thirteenth session "
        "(2026-12-07 02:54-04:10 UTC): `s12-default` (the twelfth session's default spelt out) beside the new "
        "default (`s13-gptq` / `s13-all` for MiniLM, `default` for PP-OCRv4 rec) and `s13-bias` / `s13-per-input` "
        "(each lever alone), one invocation per model: see its summary. Fourteenth session (2026-12-07 05:27-06:50 "
        "UTC, code de1b809 and later): `ebc` (`empirical_bias=true`) and `ebc-gain` (`empirical_gain=true` too) "
        "beside a re-run `default` in one invocation per model (`ebc-gain` in a second invocation with its own "
        "`default`, same outputs): see its summary. Sixteenth session (2026-12-07 10:47-12:26 UTC): MiniLM-L6 "
        "`qat-lines` and `qat-text` (QAT on the embedding), each in its own invocation beside a `default`: see its "
        "summary.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}",
        "",
    ]
    if meta.get("summary"):  # a session's findings, written beside the numbers they rest on (list of lines)
        lines += [*meta["summary"], ""]
    for rec in records:
        m = rec["model"]
        lines += [f"## {m}", "", f"calibration feeds {rec['n_calib']}; evaluation sets {rec['sets']}; "
                  f"FP32 {rec.get('fp32_ms', float('nan')):.1f} ms; code at {rec.get('commit') or '?'}"
                  + (f"; load average {rec['latency_load'][0]:.1f} when the latencies were measured"
                     if rec.get("latency_load") else "")]
        for k, v in rec.get("fp32", {}).items():
            if v:
                lines.append(f"FP32 on the {k} set vs ground truth: " + ", ".join(f"{a} {b:.3f}" for a, b in v.items()))
        lines.append("")
        sets = list(rec["sets"])
        head = ["variant", "latency", "bytes", "tool s", "peak MB", "load"]
        has_logits = any("logits_sqnr_db" in (row.get("sets") or {}).get(k, {})
                         for row in rec["variants"].values() for k in sets)
        for k in sets:
            head += [f"{k}: SQNR dB"] + ([f"{k}: logits SQNR dB"] if has_logits else []) + [f"{k}: cosine"]
            head += [f"{k}: {c}" for c in _task_cols(m, k)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, row in rec["variants"].items():
            if row.get("error"):
                lines.append(f"| {v} | error: {row['error']} |")
                continue
            cells = [v, _f(row.get("latency_ratio"), "{:.2f}x"),
                     _f(row["weight_bytes"] / rec["fp32_weight_bytes"], "{:.2f}x"), _f(row["tool_seconds"], "{:.0f}"),
                     _f(row.get("peak_rss_mb"), "{:.0f}"), _load(row.get("load"))]
            for k in sets:
                r = row["sets"][k]
                cells += [_f(r.get("sqnr_db"), "{:.1f}")]
                cells += [_f(r.get("logits_sqnr_db"), "{:.1f}")] if has_logits else []
                cells += [_f(r.get("cosine"), "{:.4f}")]
                cells += [_f(r.get(c)) for c in _task_cols(m, k)]
            lines.append("| " + " | ".join(cells) + " |")
        notes = []
        for v, row in rec["variants"].items():
            st = row.get("stats") or {}
            wr = st.get("weight_rounding")
            if wr and "score_refit" in wr:
                sn, sr = wr["score_nearest"], wr["score_refit"]
                notes.append(f"- {v}: refit {wr.get('layers')} layers in {wr.get('stages')} stages on "
                             f"{wr['samples']['fit']} feeds ({wr['samples']['held_out']} held out; median held-out "
                             f"layer-output gain {wr.get('heldout_db_gain_median')} dB; ridges {wr.get('ridges')}), "
                             f"{wr.get('seconds')} s; on the quantizer's evaluation feeds (in-sample) SQNR "
                             f"{sn['sqnr_db']:.1f} -> {sr['sqnr_db']:.1f} dB; round-to-nearest kept "
                             f"{len(wr.get('kept_nearest', []))}, skipped {len(wr.get('skipped', {}))}")
            elif wr:
                gain = wr.get("output_error_db_gain_median")
                gain = f" (median per-layer output-error gain {gain} dB)" if gain is not None else ""
                sc = (f"; in-sample SQNR {wr['score_nearest']['sqnr_db']:.1f} -> {wr['score_rounded']['sqnr_db']:.1f} dB"
                      if wr.get("score_nearest") and wr.get("score_rounded") else "")
                notes.append(f"- {v}: weight_rounding {wr.get('layers')} layers{gain}, kept={wr.get('kept')}, "
                             f"{wr.get('seconds')} s{sc}; skipped {len(wr.get('skipped', {}))}")
            sm = st.get("smoothing") or {}
            if sm.get("measured"):
                scr = ", ".join(f"{k} {x['sqnr_db']:.2f}" for k, x in (sm.get("all_int8_by_strength") or {}).items())
                notes.append(f"- {v}: smooth=auto {sm.get('decision')}"
                             + (f" at alpha {sm['alpha']:g}" if sm.get("alpha") is not None else "")
                             + " (in-sample worst-output SQNR dB: "
                             + ", ".join(f"{k} {x['sqnr_db']:.2f}" for k, x in sm["measured"].items())
                             + (f"; all-int8 by strength: {scr}" if scr else "") + f"; seconds {sm.get('seconds')})")
            if sm.get("dynamic_by_strength"):
                notes.append(f"- {v}: dynamic smoothing {sm.get('decision')}"
                             + (f" at alpha {sm['alpha']:g}" if sm.get("alpha") is not None else "")
                             + " (in-sample worst-output SQNR dB: "
                             + ", ".join(f"{k} {x['sqnr_db']:.2f}" for k, x in sm["dynamic_by_strength"].items())
                             + f"; {sm.get('seconds')} s)")
            mp = st.get("mixed_precision") or {}
            if "float_layers" in mp:  # dynamic mode's mixed precision (``dynamic_mixed``)
                notes.append(f"- {v}: mixed precision to {mp.get('target')}: {len(mp['float_layers'])} layers float "
                             f"({', '.join(f'`{x}`' for x in mp['float_layers'])}), in-sample SQNR "
                             f"{mp['all_int8']['sqnr_db']:.2f} -> {mp['score']['sqnr_db']:.2f} dB, met={mp.get('met')}, "
                             f"{mp.get('builds')} builds in {mp.get('seconds')} s")
            eb = st.get("empirical_bias")
            if eb and eb.get("layers"):
                b, a = eb["score_before"], eb["score_after"]
                notes.append(f"- {v}: empirical bias{' and gain' if 'median_abs_gain_change' in eb else ''} on "
                             f"{eb['layers']} layers in {eb['stages']} stages ({eb['feeds']} feeds, "
                             f"{len(eb.get('not_corrected', {}))} with one value per channel per feed not corrected), "
                             f"kept={eb['kept']}, {eb['seconds']} s; in-sample output SQNR {b['sqnr_db']:.2f} -> "
                             f"{a['sqnr_db']:.2f} dB, features {b.get('feature_sqnr_db', 0):.2f} -> "
                             f"{a.get('feature_sqnr_db', 0):.2f} dB")
            same = row.get("same_call_default")
            if same:
                got = "; ".join(f"{k}: SQNR {x.get('sqnr_db', float('nan')):.1f} dB, cosine "
                                f"{x.get('cosine', float('nan')):.4f}" + "".join(
                                    f", {c} {x[c]:.3f}" for c in _task_cols(m, k) if c in x)
                                for k, x in (same.get("sets") or {}).items())
                notes.append(f"- {v}: ran in its own invocation; the `default` of that call: "
                             f"{_f(same.get('latency_ratio'), '{:.2f}x')}, {got}")
            tr = st.get("train")
            if tr:
                fq = tr.get("fake_quant") or {}
                notes.append(
                    f"- {v}: distill train {tr.get('steps')} steps in {tr.get('seconds')} s ({tr.get('stopped_by')}, "
                    f"{tr.get('backoffs')} back-offs, lr {tr.get('lr_final')}), held-out loss "
                    f"{tr.get('heldout_loss_start')} -> {tr.get('heldout_loss_best')} ({tr.get('losses')}, "
                    f"{tr.get('train_feeds')} training / {tr.get('heldout_feeds')} held-out feeds); trained "
                    f"{fq.get('weights')} int8 weights, {fq.get('biases')} int32 biases, {fq.get('scales_learned')} "
                    f"activation scales (+{fq.get('scales_tied')} tied); {fq.get('integers_changed')} integers "
                    f"changed ({fq.get('integers_changed_share', 0):.2%})")
            by_reason: dict[str, list[dict]] = {}
            for kf in st.get("kept_float", []):  # the layers of one group share a reason: one line
                by_reason.setdefault(kf["reason"], []).append(kf)
            for reason, kfs in by_reason.items():
                names = ", ".join(f"`{k['layer']}`" for k in kfs)
                share = sum(k.get("macs_share", 0) or 0 for k in kfs)
                notes.append(f"- {v}: float {names} ({share:.1%} of MACs): {reason}")
            for rj in (st.get("auto_float") or {}).get("rejected", []):
                notes.append(f"- {v}: int8 `{rj['layer']}` ({rj.get('macs_share', 0):.1%} of MACs): {rj['reason']}")
        lines += ["", *notes, ""]
        for v, row in rec["variants"].items():
            if row.get("error_sources"):
                lines += _explain_lines(v, row["error_sources"])
    if meta.get("attribution_scores_by_feed"):
        lines += _feed_score_lines(meta["attribution_scores_by_feed"])
    if meta.get("int16_conv_speed"):
        lines += ["## 16-bit activations under ORT (`--int16`)", "",
                  "One Conv, latency over its float Conv (1 thread, interleaved): ORT's CPU EP has no 16-bit "
                  "integer Conv; a uint16 QDQ Conv runs as DQ -> float Conv -> Q.", "",
                  "| Conv (Cin, Cout, HxW, group, k) | uint8 QDQ | uint16 QDQ |", "|---|---|---|"]
        for r in meta["int16_conv_speed"]:
            c = r["conv"]
            lines.append(f"| {c['cin']}, {c['cout']}, {c['hw']}x{c['hw']}, {c['group']}, {c['k']} | "
                         f"{r['uint8']:.2f}x | {r['uint16']:.2f}x |")
        lines.append("")
    for at in meta.get("attribution", []):
        lines += _attribution_lines(at)
    for fr in fronts or []:
        lines += _frontier_lines(fr)
    return "\n".join(lines) + "\n"


def rounding_units_of(run, unit: str) -> dict[str, list[str]]:
    """The layers of each unit of the frontier search (``float_frontier.rounding_units``); {} for ``layer``."""
    if unit != "rounding":
        return {}
    from onnxcompress.passes.quantize.float_frontier import rounding_units

    b = run.build()
    return rounding_units(run, run.export(b.graph), b.plan.int8_anchor_names())


def _frontier_lines(fr: dict[str, Any]) -> list[str]:
    """Markdown of one ``frontier`` record."""
    sets = list(fr["sets"])
    task = {k: _task_cols(fr["model"], k)[:1] for k in sets}
    has_logits = any("logits_sqnr_db" in p["sets"][k] for p in fr["points"] for k in sets)
    per = "activation rounding (every layer around it float)" if fr.get("unit") == "rounding" else "layer"
    lines = [f"## Mixed-precision frontier: {fr['model']}, one {per} per pick", "",
             f"`python -m benchmarks.int8_margins --models {fr['model']} --frontier "
             f"{fr.get('max_steps', len(fr['greedy_steps']) - 1)}"
             + (f" --frontier-options '{fr['options']}'" if fr.get("options") else "")
             + (f" --frontier-unit {fr['unit']}" if fr.get("unit", "layer") != "layer" else "") + "`; code at "
             f"{fr.get('commit') or '?'}; calibration feeds {fr['n_calib']}, evaluation sets {fr['sets']}; FP32 "
             f"{fr['fp32_ms']:.1f} ms; every point built from one calibration (same ranges, bias correction, "
             f"automatic float layers {fr['auto_float'] or 'none'}) and timed with FP32 in one interleaved call "
             f"(1 thread, load average {_load(fr.get('latency_load'))}); search {fr['search_seconds']:.0f} s "
             f"({fr['evaluations']} candidate builds scored, load {_load(fr.get('load'))}), scored by "
             f"{fr['scored_by']}. `greedy-k`: the first k picks of the greedy path (measured gain per measured "
             "latency cost, re-measured after each pick); `loo-k`: the k layers with the largest leave-one-out gain "
             "in the all-int8 model (gain alone); `est cost`: the picked layers' isolated float-minus-int8 times over "
             "the FP32 model's; a `r` suffix: picks are activation roundings (every quantized layer around one).",
             ""]
    head = ["point", "float layers", "latency", "est cost", "bytes"]
    for k in sets:
        head += [f"{k}: SQNR dB"] + ([f"{k}: logits SQNR dB"] if has_logits else []) + [f"{k}: cosine"]
        head += [f"{k}: {c}" for c in task[k]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(fr["points"], key=lambda p: (p["order"] != "greedy", len(p["float_layers"]))):
        cells = [p["label"], str(len(p["float_layers"])), _f(p.get("latency_ratio"), "{:.2f}x"),
                 _f(p["est_cost"], "{:+.3f}"), _f(p["weight_bytes"] / fr["fp32_weight_bytes"], "{:.2f}x")]
        for k in sets:
            r = p["sets"][k]
            cells += [_f(r.get("sqnr_db"), "{:.1f}")] + ([_f(r.get("logits_sqnr_db"), "{:.1f}")] if has_logits
                                                         else [])
            cells += [_f(r.get("cosine"), "{:.4f}")] + [_f(r.get(c)) for c in task[k]]
        lines.append("| " + " | ".join(cells) + " |")
    picks = [s for s in fr["greedy_steps"] if s["layer"]]
    if picks:
        lines += ["", "Greedy picks (gain on the calibration evaluation feeds; cost: isolated float-minus-int8 time "
                  "over FP32):", ""]
        lines += [f"{i}. `{s['layer']}`: {s['gain_db']:+.2f} dB for {s['cost']:+.3f}" for i, s in enumerate(picks, 1)]
    top = sorted(fr["first_gains_db"].items(), key=lambda kv: -kv[1])[:8]
    lines += ["", "Largest leave-one-out gains in the all-int8 model (dB, with the layer's cost): " + ", ".join(
        f"`{n}` {g:+.2f} ({fr.get('unit_costs', fr['costs']).get(n, float('nan')):+.3f})" for n, g in top), ""]
    return lines


def _feed_score_lines(at: dict[str, Any]) -> list[str]:
    """The ranking of the attribution's first rounding by the quantizer's scores, the feeds combined each way."""
    lines = ["## How the search's scores rank the rec stem rounding, the feeds combined each way (`--attribute-scores`)",
             "", f"Each of the default int8 model's {next(iter(at['sets'].values()))['roundings']} activation "
             f"roundings taken out alone (`error_sources.without_rounding`), scored by `fidelity.score` against "
             f"FP32; rank of `{at['top']}` (the task-metric attribution's first) by the gain, and the best gain; "
             f"code at {at.get('commit')}. `pooled`: SQNR of all feeds' signal over all their error; `worst_feed`: "
             "the lowest per-feed SQNR; `mean_feed_db`: the mean of per-feed SQNRs (dB); `mean_feed_nsr`: the mean of "
             "per-feed noise-to-signal ratios (in dB).", "",
             "| feeds | feeds combined | feature SQNR: rank (gain dB) | best feature gain | output SQNR: rank "
             "(gain dB) | best output gain |", "|---|---|---|---|---|---|"]
    for name, st in at["sets"].items():
        for how, r in st["by_feed_score"].items():
            f, o = r["ranks"]["feature_sqnr_db"], r["ranks"]["sqnr_db"]
            lines.append(f"| {name} | {how} | {f['rank']} ({f['gain']:+.2f}) | `{f['best']}` {f['best_gain']:+.2f} | "
                         f"{o['rank']} ({o['gain']:+.2f}) | `{o['best']}` {o['best_gain']:+.2f} |")
    return [*lines, ""]


def _load(load: Any) -> str:
    """The 1-minute load average when the variant started (and ended)."""
    if not load:
        return "—"
    return f"{load[0]:.1f}" + (f"-{load[3]:.1f}" if len(load) > 3 else "")


def _explain_lines(variant: str, es: dict[str, Any]) -> list[str]:
    """Markdown of one ``error_sources`` record."""
    key = es["scored_by"]
    what = "last layers' input features" if key == "feature_sqnr_db" else "outputs"
    lines = [
        f"Where the error of `{variant}` enters (``quantize{{explain}}``, {es['set']} set, {es['feeds']} feeds, "
        f"{es['activation_tensors']} activation roundings, {es.get('seconds', '?')} s): SQNR of the {what} "
        f"{es['int8'][key]:.1f} dB int8, {es['weights_only_int8'][key]:.1f} dB with only the weights int8 "
        f"(outputs {es['int8']['sqnr_db']:.1f} / {es['weights_only_int8']['sqnr_db']:.1f} dB); the leave-one-out "
        f"gains of all roundings add up to {es['sum_of_gains_db']:.1f} dB. Largest:",
        "",
        "| activation (producer) | gain dB | outputs gain dB |",
        "|---|---|---|",
    ]
    lines += [f"| `{r['tensor']}` ({r['producer']}) | {r['gain_db']:+.2f} | {r['output_gain_db']:+.2f} |"
              for r in es["top"]]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--latency-budget", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_margins")
    ap.add_argument("--merge", action="store_true", help="replace only these models/variants in the existing JSON")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the JSON")
    ap.add_argument("--int16", action="store_true", help="only time Convs with 8/16-bit QDQ activations")
    ap.add_argument("--frontier", type=int, default=0,
                    help="only the mixed-precision frontier of --models: greedy path of at most N float layers")
    ap.add_argument("--frontier-options", default="", help="quantize options of the frontier runs")
    ap.add_argument("--frontier-unit", choices=("layer", "rounding"), default="layer",
                    help="what one greedy pick keeps float: a layer, or every layer around one activation rounding")
    ap.add_argument("--attribute", action="store_true",
                    help="PP-OCRv4 rec only: where the int8 model's hard-line damage enters, scored on the task metric")
    ap.add_argument("--attribute-scores", action="store_true",
                    help="PP-OCRv4 rec: the quantizer's own scores' rank of the attribution's first rounding")
    ap.add_argument("--attribute-pipeline", default="cleanup,quantize", help="the int8 model --attribute explains")
    ap.add_argument("--explain", type=int, default=0,
                    help="for the default variant: the N activation roundings costing most (error_sources)")
    ap.add_argument("--explain-variant", default="default", help="the variant --explain explains")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    old = json.loads(json_path.read_text()) if json_path.is_file() else {"records": [], "meta": {}}
    if args.render:
        md_path.write_text(render(old["records"], old["meta"], old.get("frontier")))
        return 0
    if args.int16:
        old["meta"]["int16_conv_speed"] = int16_conv_speed()
        json_path.write_text(json.dumps(old, indent=1, default=_json_default))
        md_path.write_text(render(old["records"], old["meta"], old.get("frontier")))
        return 0
    specs = load_specs()
    if args.attribute_scores:
        at = next(a for a in old["meta"]["attribution"] if a["pipeline"] == "cleanup,quantize")
        old["meta"]["attribution_scores_by_feed"] = attribution_scores(specs["ppocrv4_rec"], at["order"][0])
        json_path.write_text(json.dumps(old, indent=1, default=_json_default))
        return 0
    if args.attribute:
        at = attribute(specs["ppocrv4_rec"], args.latency_budget, args.attribute_pipeline)
        old["meta"]["attribution"] = [a for a in old["meta"].get("attribution", [])
                                      if a["pipeline"] != at["pipeline"]] + [at]
        json_path.write_text(json.dumps(old, indent=1, default=_json_default))
        md_path.write_text(render(old["records"], old["meta"], old.get("frontier")))
        return 0
    if args.frontier:
        fronts = {r["model"] + ("" if r.get("unit", "layer") == "layer" else "/" + r["unit"]): r
                  for r in old.get("frontier", [])}
        for name in [m for m in args.models.split(",") if m]:
            fr = frontier(specs[name], args.frontier, args.latency_budget, args.frontier_options, args.frontier_unit)
            fronts[f"{name}/{args.frontier_unit}" if args.frontier_unit != "layer" else name] = fr
            old["frontier"] = list(fronts.values())
            json_path.write_text(json.dumps(old, indent=1, default=_json_default))
            md_path.write_text(render(old["records"], old["meta"], old["frontier"]))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    records = {r["model"]: r for r in old["records"]} if args.merge else {}
    for name in [m for m in args.models.split(",") if m]:
        rec = bench_model(specs[name], variants, args.latency_budget, args.explain, args.explain_variant)
        if args.merge and name in records:
            records[name]["variants"].update(rec["variants"])
            for k in ("fp32", "fp32_ms", "sets", "n_calib", "fp32_weight_bytes", "latency_load"):
                records[name][k] = rec[k]
        else:
            records[name] = rec
        meta = {**old.get("meta", {}), "versions": versions(),
                "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        json_path.write_text(json.dumps({"records": list(records.values()), "meta": meta,
                                         **({"frontier": old["frontier"]} if old.get("frontier") else {})}, indent=1,
                                        default=_json_default))
        md_path.write_text(render(list(records.values()), meta, old.get("frontier")))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
