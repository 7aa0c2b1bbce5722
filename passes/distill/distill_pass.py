"""``distill``: post-training knowledge distillation — the original model teaches the compressed one.

Teacher: ``ctx.original_model()``; student: the current graph. Layers are matched by the name of their output
tensor (passes keep names); when ``prune-channels`` cut a layer's outputs, the context's ``channel_map`` says which
teacher channel each kept student channel is.

For every weighted layer (Conv, depthwise Conv, Gemm, MatMul with a constant weight, with its bias — a Conv/Gemm
bias input or the Add that follows a MatMul) whose input differs from the teacher's (downstream of a cut or of
modified weights) or whose own weights were modified, the weights and bias are refit by ridge least squares so
that, on the calibration data, the layer maps the *student's* input to the *teacher's* output
(He et al. 2017, ThiNet): see ``ridge`` for the maths. Layers are processed in stages by depth — a layer is
refit only after every refit layer upstream of it, on inputs produced by the already refit student — so errors do
not accumulate. A weight read by several layers (tied) is refit once, from the sum of its readers' normal equations
at the stage of its last reader (``tied_solve``), and stays one tensor. Each stage streams the calibration feeds once through the student (its layer inputs) and the teacher
(the targets), keeping only X^T X and X^T Y per layer (``rows`` random rows in all; ``stage_statistics``).

Each layer's ridge is chosen on held-out calibration feeds (every 4th; ``select_ridge``), and a layer keeps its
current weights when no refit does better on them: with few calibration rows per unknown a fixed weak ridge
interpolates the calibration data (MiniLM's FFN projections) and distill made the student worse than the pruned one.

A layer whose output only feeds a residual Add (y + r) is fit to teacher(Add) - student(r) (``compensate``): it
absorbs the error that already reached the residual stream instead of reproducing the teacher's y. When that sum
feeds a LayerNormalization, what the model sees is (s - mean(s)) / std(s) per token, so an error e in s costs
e / std(s): each row (token) of the fit is weighted by 1 / std_teacher(s) (``ln_weight``). Unweighted, the few
tokens with a huge residual stream (BERT's [CLS]/[SEP]: std 10-15x the median in MiniLM's first layer) dominate the
least squares and the ordinary tokens are fit poorly.

Works after ``prune-weights`` (zeros stay zeros: each output is solved on its support) and after ``quantize``
(the float solution is re-quantized on the layer's existing grid and the bias re-solved); layers that cannot be
solved this way (ConvTranspose, grouped Conv, very wide layers) get bias correction:
b += E[y_teacher - y_student] per channel.

``mode=train`` replaces the layer-wise solve by gradient descent on the whole student (or block by block) against
the teacher's outputs (``train``: KL on class scores, cosine on embeddings, normalized MSE else), with PyTorch as
an optional extra; ``mode=refit+train`` trains from the refit student. Training changes the values of the graph's
float constants only; exact zeros stay zero, few-valued (clustered) weights train their codebook; a QDQ graph from
``quantize`` trains through fake quantization (straight-through; its integers, int32 biases and, with
``learn_scales``, its activation scales; the same nodes are written back), a graph of integer kernels (dynamic
mode) is refused. The default stays ``refit``: see the pass's README section for the measured
comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.errors import PassError
from onnxcompress.pass_base import Pass, PassResult, option, register

from .layer_solve import solve_layer
from .layers import find_layers
from .stage_statistics import stream_stage_statistics
from .tied_solve import solve_tied
from .train_entry import require_torch, train_student
from .train_losses import parse_augment, parse_loss
from .train_speed import PRECISIONS, STEP_SCALES

MODES = ("refit", "train", "refit+train")

log = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class Distill(Pass):
    name: ClassVar[str] = "distill"
    description: ClassVar[str] = (
        "refit layers by ridge least squares so the compressed model matches the original "
        "on calibration data, layer by layer; bias correction for the rest"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})
    #: none: new weight values invalidate activation statistics, and a bias input added to a Conv/Gemm is a
    #: constant the channel-group analysis does not know
    preserves: ClassVar[frozenset[str]] = frozenset()

    ridge: float = option(1e-2, "ridge strength relative to the mean diagonal of X^T X")
    samples: int = option(1024, "calibration feeds used (time grows with them; more feeds generalise better: "
                                "MiniLM-L3 cosine 0.969 with 256 sentences, 0.979 with 550)")
    rows: int = option(0, "design rows per layer (0: 32 x inputs, within 16k..64k), drawn evenly from the feeds")
    max_inputs: int = option(4096, "layers with more inputs per output (Cin*k) only get bias correction")
    layers: str = option("changed", "changed (layers whose input or weights differ from the teacher) or all")
    bias_correction: bool = option(True, "bias-correct layers that are not refit by least squares")
    compensate: bool = option(True, "a layer feeding a residual Add fits teacher(Add) - student(other branch): it "
                                    "absorbs the error that reached the residual stream")
    ln_weight: bool = option(True, "a residual sum that feeds LayerNormalization: weigh each token by 1 / std of "
                                   "the teacher's sum (the error LayerNorm passes on)")
    select_ridge: bool = option(True, "hold out every 4th feed and pick each layer's ridge (ridge x 1..1000) on it; "
                                      "keep the current weights when no refit does better there (needs >= 4 feeds)")
    mode: str = option("refit", "refit (closed-form, layer by layer), train (gradient descent on the whole student "
                                "against the teacher's outputs: needs the [train] extra, torch) or refit+train")
    steps: int = option(300, "train: optimizer steps (block-wise: shared among the blocks by weight count)")
    lr: float = option(1e-4, "train: Adam learning rate relative to each weight's RMS (cosine decay to 0 over "
                             "the steps)")
    warmup: float = option(0.1, "train: fraction of the steps (or of the time budget) with a linear lr warmup "
                                "from 0: Adam's first steps move every weight by the full lr")
    batch: int = option(8, "train: calibration feeds per step (stacked when their shapes agree)")
    precision: str = option("auto", "train: auto (bf16 autocast where the CPU has native bf16), fp32 or bf16")
    step_scale: str = option("tensor", "train: the lr is relative to each tensor's RMS (tensor) or, for Conv "
                                       "weights, to each output channel's (channel: BN-folded channels differ in "
                                       "scale by orders of magnitude)")
    ema: float = option(0.0, "train: decay of the weight average scored and kept (0: off; e.g. 0.995)")
    blockwise: bool = option(False, "train: block by block (BRECQ-style), each block from the current student's "
                                    "block input to the teacher's block output; else end-to-end")
    blocks: int = option(0, "train: blocks for blockwise / feature matching (0: 8)")
    augment: str = option("auto", "train: augmentation, auto (crop+noise on images, dropped when the student's loss "
                                   "on augmented copies is > 2x its loss on the feeds), none, or a '+'-joined subset "
                                   "of crop, zoom, flip, noise, mix (images) and span, swap (token ids; never "
                                   "by default)")
    loss: str = option("auto", "train: per-output loss, auto (kl on class scores, cosine on [batch, dim] "
                                "embeddings, normalized mse else), one of mse/kl/cosine/fields/detect (fields: mse per slice of a "
                                "detection output's box/score axis; detect: Bernoulli KL on its probability scores, "
                                "box mse weighted by the teacher's score), or 'out:kind;out:kind'")
    temperature: float = option(2.0, "train: KL temperature on class scores")
    features: float = option(0.0, "train: weight of normalized-MSE matching at block boundaries shared with the "
                                   "teacher (0: outputs only)")
    features_at: str = option("blocks", "train with features > 0: blocks (every block boundary shared with the "
                                        "teacher) or last (only the tensors after the last weighted node: a "
                                        "transformer's per-token hidden states before its pooling)")
    teacher: str = option("", "train: the teacher's ONNX file (default: the pipeline's input). Continue training "
                              "an already compressed model against the float original: e.g. a second QAT run "
                              "on the int8 output of the first; its outputs must match the student's")
    train_samples: int = option(0, "train: calibration feeds training draws from (0: samples); the refit keeps "
                                   "samples. The teacher labels every feed, so an unlabeled source larger than the "
                                   "refit's (a generator, a bigger file) gives training more distinct inputs")
    train_data: str = option("", "train: unlabeled feeds (.npz or a folder, like --calib) training draws "
                                 "train_samples from (0: all), with the calibration feeds not held out (early "
                                 "stopping: see heldout)")
    heldout: str = option("auto", "train: early-stop feeds: calibration (every 4th), pool (train_data feeds the "
                                  "training does not read) or auto (pool with train_data, else calibration). The "
                                  "refit fits every calibration feed it reads: their loss is its training loss")
    pack: bool = option(True, "train: token feeds with an attention mask are trimmed of padding and stacked "
                              "batch at a time by length (one forward per step instead of one per sentence)")
    max_minutes: float = option(15.0, "train: time budget; training stops (keeping the best weights) when it runs out")
    eval_every: int = option(25, "train: steps between held-out evaluations (every 4th calibration feed)")
    patience: int = option(4, "train: stop after this many held-out evaluations without improvement")
    backoff: bool = option(True, "train: a held-out evaluation worse than the best by more than 2 standard errors "
                                 "restores the best weights and halves the lr (the lr that suits the model is "
                                 "found on it)")
    masks: bool = option(True, "train: exact zeros of a weight stay zero (pruned weights)")
    learn_masks: bool = option(False, "train: a pruned MatMul/Gemm/Conv weight trains a dense shadow and which "
                                      "entries are zero is re-chosen from it (the N largest of every M for an N:M "
                                      "weight, the same count otherwise): pattern and sparsity kept, the pruning's "
                                      "choice of zeros no longer final")
    mask_every: int = option(20, "train with learn_masks: steps between mask updates (and before each held-out "
                                 "evaluation)")
    learn_scales: bool = option(True, "train on a QDQ graph (after quantize): also learn the activation scales "
                                      "(LSQ); false trains the integers of weights and biases only")

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.train_samples < 0:
            raise ValueError(f"train_samples must be >= 0, got {self.train_samples}")
        if self.rows < 0 or self.max_inputs < 1:
            raise ValueError("rows must be >= 0 and max_inputs >= 1")
        if self.layers not in ("changed", "all"):
            raise ValueError(f"layers must be 'changed' or 'all', got {self.layers!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.steps < 1 or self.lr <= 0 or self.batch < 1 or self.blocks < 0 or self.eval_every < 1:
            raise ValueError("steps, batch and eval_every must be >= 1, lr > 0, blocks >= 0")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.temperature <= 0 or self.features < 0 or self.max_minutes <= 0 or self.patience < 1:
            raise ValueError("temperature and max_minutes must be > 0, features >= 0, patience >= 1")
        if self.teacher and self.mode == "refit":
            raise ValueError("teacher= is for mode=train / refit+train (the refit matches the pipeline's input)")
        if self.teacher and self.features > 0:
            raise ValueError("teacher= matches outputs only: features must be 0 (feature tensors and channel maps "
                             "refer to the pipeline's input)")
        if self.features_at not in ("blocks", "last"):
            raise ValueError(f"features_at must be blocks or last, got {self.features_at!r}")
        if self.mask_every < 1:
            raise ValueError(f"mask_every must be >= 1, got {self.mask_every}")
        if self.precision not in PRECISIONS or not 0.0 <= self.ema < 1.0:
            raise ValueError(f"precision must be auto, fp32 or bf16 and ema in [0, 1), got {self.precision!r}, "
                             f"{self.ema}")
        if self.step_scale not in STEP_SCALES:
            raise ValueError(f"step_scale must be one of {', '.join(STEP_SCALES)}, got {self.step_scale!r}")
        if self.learn_masks and not self.masks:
            raise ValueError("learn_masks needs masks=true (with masks=false the zeros are not kept at all)")
        if self.heldout not in ("auto", "calibration", "pool"):
            raise ValueError(f"heldout must be auto, calibration or pool, got {self.heldout!r}")
        if self.heldout == "pool" and not self.train_data:
            raise ValueError("heldout=pool needs train_data (the pool)")
        parse_loss(self.loss)
        parse_augment(self.augment)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise PassError("distill needs calibration data (--calib)")

    # ------------------------------------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.mode == "refit":
            return self.refit(graph, ctx)
        require_torch()  # fail before any refit work when the extra is missing
        stats: dict = {}
        modified = False
        if self.mode == "refit+train":
            r = self.refit(graph, ctx)
            stats["refit"], modified = r.stats, r.modified
        stats["train"] = train_student(graph, ctx, self)
        modified = modified or stats["train"].get("improved", False) or bool(stats["train"].get("blocks_trained"))
        return PassResult(modified, stats, frozenset() if modified else frozenset({"all"}))

    def refit(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        teacher = ctx.original_model()
        io.lift_constant_nodes(teacher)
        layers, skipped = find_layers(graph, teacher, ctx.channel_map.positions, layers=self.layers,
                                      compensate=self.compensate, ln_weight=self.ln_weight)
        feeds = ctx.calibration.take(self.samples)  # re-iterated per stage, one feed in memory at a time
        rng = ctx.rng("distill")
        stats: dict = {"layers_refit": 0, "layers_bias_corrected": 0, "stages": 0}
        fit_before, fit_after = [], []
        stages = sorted({L.stage for L in layers})
        progress = getattr(ctx, "progress", None)
        for stage in progress(stages, total=len(stages), desc="distill") if progress else stages:
            todo = [L for L in layers if L.stage == stage]
            stream_stage_statistics(ctx.export(graph), teacher, todo, feeds, rng, rows=self.rows,
                                    select_ridge=self.select_ridge)
            for L in todo:
                if L.tied and L is not L.tied[0]:
                    continue  # refit with the first reader of its tied weight
                if L.tied:
                    result = solve_tied(L.tied, ridge=self.ridge, max_inputs=self.max_inputs,
                                        choose_ridge=self.select_ridge)
                else:
                    result = solve_layer(L, ridge=self.ridge, max_inputs=self.max_inputs,
                                         bias_correction=self.bias_correction, choose_ridge=self.select_ridge)
                for M in L.tied or [L]:
                    M.stats = M.hold = None
                if result is None:
                    continue
                kind, before, after = result
                if kind in ("ls", "ls shared"):
                    stats["layers_refit"] += len(L.tied or [L])
                    if L.tied:  # one weight read by several layers, refit once: it stays one tensor
                        stats["tied_weights_refit"] = stats.get("tied_weights_refit", 0) + 1
                    if kind == "ls shared":  # a clustered weight: its shared values and scales, the indices kept
                        stats["layers_refit_shared"] = stats.get("layers_refit_shared", 0) + 1
                    fit_before.append(before)
                    fit_after.append(after)
                elif kind == "bias":
                    stats["layers_bias_corrected"] += 1
                else:
                    skipped[kind] += len(L.tied or [L])
            stats["stages"] += 1
        stats["skipped"] = dict(skipped.most_common(8))
        if fit_before:
            stats["fit_residual_before"] = round(float(np.mean(fit_before)), 5)
            stats["fit_residual_after"] = round(float(np.mean(fit_after)), 5)
        modified = stats["layers_refit"] + stats["layers_bias_corrected"] > 0
        if not modified and not stats["skipped"]:
            stats["skipped"] = {"(model)": "no layer differs from the original model: nothing to recover (distill "
                                           "follows a lossy pass, or use layers=all)"}
        log.info(
            "distill: %d layers refit, %d bias-corrected in %d stages",
            stats["layers_refit"],
            stats["layers_bias_corrected"],
            stats["stages"],
        )
        return PassResult(modified, stats, frozenset() if modified else frozenset({"all"}))
