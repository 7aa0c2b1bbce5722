"""The ``quantize`` pass's options: every field with its default and help, and their validation.

Kept apart from the pass class (``quantize_pass.Quantize`` subclasses ``QuantizeOptions`` and ``Pass``) so the
stage modules that read options (``p.calibration``, ``p.weight_rounding`` ...) type against this leaf module and
never import the pass, which imports them (``static_run`` -> stages): the package's imports run one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnxcompress.analyses.calibration import METHODS
from onnxcompress.pass_base import option

from .fidelity import FEED_SCORES


@dataclass(frozen=True)
class QuantizeOptions:
    """The options of ``quantize`` (see ``Quantize`` for the pass; ``option`` carries each field's help)."""

    mode: Literal["static", "dynamic", "weight_only"] = option(
        "static",
        "static (needs --calib) | dynamic (MatMul/Gemm, run-time activation ranges) | weight_only",
        search=["static", "dynamic", "weight_only"],
    )
    per_channel: bool = option(True, "one weight scale per output channel (opset 13, upgraded automatically)")
    activation_type: Literal["uint8", "int8"] = option("uint8", "integer type of activations in static mode")
    symmetric_activations: bool = option(
        False,
        "zero point fixed at 0 (int8) / 128 (uint8); Relu/Clip outputs stay one-sided",
    )
    calibration: Literal["auto", "minmax", "percentile", "entropy", "mse"] = option(
        "auto",
        "activation range rule: minmax | percentile | entropy (KL) | mse | auto (the best of minmax, mse, "
        "percentile on the evaluation feeds)",
    )
    percentile: float = option(99.999, "percentile kept by calibration=percentile")
    calibration_samples: int = option(128, "calibration feeds used (0: all)")
    weight_bits: int = option(8, "8, or 4 (weight_only only)")
    block_size: int = option(32, "4-bit block length along the reduction axis (power of 2, >= 16)")
    weight_format: Literal["qdq", "matmulnbits"] = option(
        "qdq",
        "weight_only storage: qdq (DequantizeLinear) | matmulnbits (com.microsoft.MatMulNBits)",
    )
    exclude: tuple[str, ...] = option((), "node names or op types kept float")
    depthwise: bool = option(True, "quantize depthwise Conv too")
    min_cosine: float | None = option(
        None,
        "mixed precision: keep the most sensitive layers float until output cosine >= this",
        search=[None, 0.99, 0.995, 0.999],
    )
    max_agreement_drop: float | None = option(None, "mixed precision: ... until top-1 agreement drop <= this")
    min_sqnr_db: float | None = option(None, "mixed precision: ... until the worst output's SQNR (dB) >= this")
    max_latency: float | None = option(
        None,
        "mixed precision with sensitivity=greedy_cost: keep layers float only while the model's latency stays "
        "<= this ratio of the float model's (measured under ORT); alone (no target): the best SQNR within it",
    )
    eval_samples: int = option(
        32,
        "calibration feeds used to score candidates (mixed precision, sensitivity)",
    )
    sensitivity: Literal["leave_one_out", "one_at_a_time", "greedy_cost"] = option(
        "leave_one_out",
        "per-layer sensitivity for mixed precision: leave_one_out (gain of keeping the layer float in the "
        "quantized model) | one_at_a_time (damage of quantizing the layer alone) | greedy_cost (the layers around "
        "one activation rounding at a time, best measured noise removed per measured latency cost, re-measured "
        "after each pick; EfficientNet-Lite2 18.4 -> 24.7 dB for +0.02x latency). The last two need a target or "
        "max_latency (a one-line error otherwise)",
    )
    weight_rounding: Literal["matmul", "auto", "output", "refit", "nearest"] = option(
        "nearest",
        "weight scales and rounding: nearest | matmul (output, on the MatMul/Gemm layers whose input has positions "
        "only: transformers; kept where the outputs improve on the evaluation feeds, else the MatMul bias "
        "corrections go too; a CNN is quantized as with nearest. With matmul_bias=true, held out: MiniLM-L3 "
        "embedding 31.0 / 30.2 -> 31.7 / 32.2 dB, MiniLM-L6 25.5 / 26.0 -> 25.9 / 26.6 dB, PP-OCRv4 rec the same "
        "outputs, but the lowest per-sentence cosine fell, L6 0.9975 -> 0.9959, L3 0.9991 -> 0.9989: not the "
        "default) | output (chosen per layer against its output on calibration "
        "inputs, closed form; per-layer output error -6..-9 dB, but on PP-OCRv4 rec, nudenet and MiniLM-L3 the "
        "model's outputs moved < 0.2 dB: activation noise dominates) | auto (output where the outputs improve) | "
        "refit (each layer refit, stage by depth, so that on its int8-model input it reproduces the float "
        "layer's output, then rounded the same way: it also absorbs its input's error; held-out, same latency: "
        "PP-OCRv4 rec hard lines agreement 0.27 -> 0.33, logits 13.3 -> 16.3 dB, nudenet 30.4 -> 36.1 dB, "
        "ddddocr_det 21.6 -> 25.3 dB, EfficientNet-Lite2 24.7 -> 25.6 dB, MiniLM-L3 +-0.5 dB, but box F1 / top-1 "
        "0.007 / 0.03 lower on the last two CNNs and 3-13x the tool time: not the default). mode=dynamic given "
        "calibration data: any value but nearest rounds the MatMuls with a bias Add and positional inputs against "
        "their float inputs, kept by measurement (output: always; passes.quantize.dynamic_rounding; held out "
        "MiniLM-L3 28.0 / 23.8 -> 30.6 / 30.0 dB, L6 25.3 / 25.5 -> 26.2 / 26.5 dB)",
    )
    rounding_samples: int = option(
        64,
        "calibration feeds whose layer inputs weight_rounding fits to (H = X^T X needs many more rows than K: on "
        "MiniLM-L6 16 feeds gave ~1,000 rows for K = 1,536: weights-only embedding 28.5 dB, round-to-nearest 28.1, "
        "64 feeds 30.7 dB)",
    )
    refit_samples: int = option(
        0,
        "calibration feeds weight_rounding=refit fits to (every 4th held out for its checks; 0: all): it fits "
        "~K weights per output channel, so it needs many more feeds than the ranges",
    )
    bias_correction: bool = option(
        True,
        "correct per-channel output mean shifts measured on calibration data",
    )
    empirical_bias: bool = option(
        False,
        "after the float-layer search, match each int8 Conv's per-channel output mean to the float layer's on "
        "calibration feeds, stage by depth, through its bias (the mean shifts the activation roundings and the "
        "nonlinearities after them leave; kept where the evaluation feeds' score improves; no latency cost). Held "
        "out: PP-OCRv4 det 14.8 -> 17.4 dB (map IoU 0.954 -> 0.970), ddddocr_det 25.2 -> 26.9 dB (box F1 0.993 -> "
        "1.000), PP-OCRv4 rec hard lines 0.27 -> 0.38 agreement, logits 13.3 -> 14.4 dB; nudenet, EfficientNet-Lite2 "
        "reverted (same outputs, +110 / +440 s tool time); not the default: det's lowest per-feed cosine (a near-empty "
        "map) 0.23 -> 0.02 and one of rec's 64 easy lines flips",
    )
    empirical_gain: bool = option(
        False,
        "with empirical_bias: also a per-channel gain, the least-squares fit of the float layer's output on the int8 "
        "one (one paired float/int8 run per stage), folded into the weights' per-channel scales and the bias. Held "
        "out: PP-OCRv4 det 14.8 -> 19.2 dB, ddddocr_det 25.2 -> 27.3 dB, nudenet 36.2 -> 37.7 dB (every metric "
        "better on the three detectors), EfficientNet-Lite2 24.7 -> 25.3 dB (top-5 overlap 0.966 -> 0.953), "
        "PP-OCRv4 rec hard lines 0.27 -> 0.36 (2 of 64 easy lines flip): not the default",
    )
    empirical_bias_samples: int = option(
        32, "calibration feeds empirical_bias measures the channel means on (0: all)")
    matmul_bias: bool = option(
        False,
        "bias correction also for a MatMul read by one Add of a constant bias (transformer exports): the Add's "
        "bias absorbs the weight error's mean shift (MiniLM-L6 at alpha 0.8, all-int8: embedding 25.3 -> 26.0 dB; "
        "weight_rounding=matmul needs it: its own rounding's shift goes there too). Alone, held out: MiniLM-L6 25.5 "
        "/ 26.0 -> 26.1 / 26.5 dB, but MiniLM-L3 31.0 / 30.2 -> 28.4 / 29.7 (smooth=auto then picks another "
        "strength): off by default",
    )
    explain: int = option(
        0,
        "report the N activation tensors whose int8 rounding costs the outputs most, and the SQNR with only the "
        "weights int8 (leave-one-out on 8 evaluation feeds: one model run per quantized tensor; 0: off)",
    )
    depthwise_equalization: bool = option(
        False,
        "Conv -> (Relu) -> depthwise Conv: scale the first Conv's output channels towards the widest one's range and "
        "the depthwise weights back (exact in float, same integer weights) where the calibration ranges say the "
        "depthwise output's rounding noise drops >= 3 dB; PP-OCRv4 rec hard lines +2.8 dB, easy lines' agreement "
        "-0.03 (off by default: not better on every set)",
    )
    stream_equalization: bool = option(
        False,
        "linear streams (a Conv's output read only by group-1 Convs and residual Adds: inverted-residual "
        "bottlenecks): scale their channels towards one range, folded exactly into the Convs writing and reading "
        "them, where the predicted rounding noise at the readers drops >= 1 dB",
    )
    equalize: bool = option(False, "cross-layer equalization of Conv->Relu->Conv pairs before quantizing")
    smooth: Literal["auto", "all", "per_input", "none"] | None = option(
        "auto",
        "SmoothQuant: move MatMul inputs' channel outliers into the weights (exact in float): all | none | auto "
        "(measured: the model quantized without smoothing, each of smooth_alphas screened by its all-int8 model, "
        "the best through the float-layer search too when it beats the unsmoothed all-int8 model, the better "
        "worst-output SQNR on the evaluation feeds kept; held out MiniLM-L3 embedding 23.5 -> 31.0 dB, MiniLM-L6 "
        "18.4 -> 25.5 dB at the same latency, 1.6-4x the tool time; inputs with positions only: nothing on CNNs). "
        "mode=dynamic given calibration data: the same choice measured on the dynamic models "
        "(passes.quantize.dynamic_smoothing); without data, dynamic mode does not smooth",
    )
    smooth_alpha: float = option(0.5, "smooth=all's strength: s_j = rms_j^alpha / max|W_j|^(1-alpha)")
    smooth_alphas: tuple[float, ...] = option(
        (0.5, 0.65, 0.8),
        "smooth=auto: the strengths tried, one full quantization each (MiniLM-L6's embedding 20.4 / 24.7 / 25.5 "
        "dB at 0.5 / 0.65 / 0.8, MiniLM-L3's 30.2 / 31.0 / 30.3)",
    )
    smooth_per_input: bool = option(
        False,
        "smooth=auto also screens a strength per input (each input's alpha, or none, with the least predicted "
        "joint weight + activation rounding error at its layers' outputs; smoothing_strength); smooth=per_input "
        "smooths every input that way. Off: its all-int8 model lost the screen on MiniLM-L3 (30.6 against 31.1 "
        "dB at alpha 0.8) and L6 (26.6 against 27.0 dB), one more trial of tool time",
    )
    fold_affine: bool = option(
        True,
        "fold constant per-channel Mul/Add/Sub/Div/BatchNorm into the Conv before them",
    )
    mixed_range_ratio: float = option(16.0, "a Concat whose inputs' ranges differ more than this stays float")
    auto_float_db: float = option(
        1.0,
        "keep float a layer whose float version alone lifts the SQNR of the last layers' inputs by this "
        "many dB (leave-one-out; at most 5% of the layers; 0: off)",
    )
    auto_float_units: bool = option(
        True,
        "the automatic float-layer search also tries the layers around one activation rounding together (ORT "
        "needs integer input and output for an integer Conv, so a rounding goes only when all its layers run "
        "float; EfficientNet-Lite2's stem output: +6 dB at the logits for ~+0.02x latency)",
    )
    auto_float_score: Literal["pooled", "worst_feed", "mean_feed_db", "mean_feed_nsr", "least_sure_half"] = option(
        "pooled",
        "how the automatic float-layer search (and its output checks) combines its evaluation feeds: pooled (one "
        "SQNR of all feeds' signal over all their error) | worst_feed (the lowest per-feed SQNR) | mean_feed_db "
        "(the mean of per-feed SQNRs, dB) | mean_feed_nsr (the mean of per-feed noise-to-signal ratios, dB) | "
        "least_sure_half (pooled over the half of the feeds where the float model's top-1 margin is smallest). "
        "Measured on 6 models, none better everywhere: worst_feed lowers PP-OCRv4 rec's hard-line agreement "
        "0.27 -> 0.19, ddddocr_det 21.6 -> 15.1 dB, nudenet box F1 0.97 -> 0.91; least_sure_half with "
        "auto_float_feeds=16 lifts rec (hard 0.27 -> 0.30, CER 0.24 -> 0.21) at +0.08x latency, the others "
        "unchanged (benchmarks/results/int8_margins)",
    )
    auto_float_feeds: int = option(
        4,
        "calibration feeds the automatic float-layer search ranks and scores its candidates on (the first ones)",
    )
    auto_float_cost_per_db: float = option(
        0.05,
        "a layer kept float automatically may cost this share of the float model's measured latency and of its "
        "size per dB it lifts the features (capped at 0.25); its outputs must improve too (inf: the gain alone "
        "decides)",
    )
    latency_guard: bool = option(
        True,
        "measure the result under ORT; never return a model slower than the float one",
    )
    latency_cache: Literal["use", "refresh", "off"] = option(
        "use",
        "latency guard timings: use (measured once per machine, cached under ~/.cache/onnxcompress/latency: runs "
        "are byte-identical) | refresh (measure again; a value moves only beyond the hysteresis) | off (this run "
        "only)",
    )
    already_quantized: Literal["refuse", "ignore"] = option(
        "refuse",
        "refuse | ignore (quantize only what is still float)",
    )
    dynamic_ops: tuple[str, ...] = option(
        ("MatMul", "Gemm", "Gather"),
        "op types quantized by mode=dynamic / weight_only (Gather: embedding tables, all modes)",
    )
    binary_join: Literal["all", "any"] = option(
        "all",
        "static placement: an element-wise Add/Mul becomes integer when all its activation inputs are integer (all) "
        "or any of them (any: the float inputs get their own Q/DQ; an unseen PP-OCRv6 detector 0.65-0.68x -> "
        "0.55-0.57x of FP32 at -0.8 dB, fewer DequantizeLinear at float/integer borders)",
    )
    two_pass: tuple[str, ...] = option(
        (),
        "mode=dynamic: MatMul/Gemm node names whose input is quantized twice (8 bits, then the rounding error in "
        "8 more: ~16-bit activations, two integer products; passes.quantize.two_pass)",
    )
    row_ranges: tuple[str, ...] = option(
        (),
        "mode=dynamic: MatMul/Gemm node names whose input gets one range per row (token) instead of one per tensor "
        "(passes.quantize.row_ranges)",
    )
    activation_ranges: Literal["tensor", "row"] = option(
        "tensor",
        "mode=dynamic: tensor (one run-time range per input, DynamicQuantizeLinear) | row (every layer's input one "
        "range per row; MiniLM-L6 24.4 -> 30.5 dB held out, 0.40x -> 0.50x of FP32, smoothing chosen for it)",
    )
    lift_to: Literal["auto", "float", "two_pass", "row"] = option(
        "auto",
        "mode=dynamic with a target (min_sqnr_db, ...): what a layer the mixed-precision search lifts above int8 "
        "becomes: float | two_pass | row (row ranges, the smoothing strength chosen with every layer in rows; then "
        "float) | auto (the float search, the two-pass one where a two-pass layer measured faster than a float one "
        "on this machine, and the row one; the fastest model that meets the target kept, timed in one call)",
    )
    unfuse_skip_layernorm: bool = option(
        True,
        "mode=dynamic: residual Add -> LayerNormalization pairs written Add as Sum where onnxruntime's fused "
        "SkipLayerNormalization kernel measured slower on this machine (onnxcompress.ort_layernorm; MiniLM-L6 "
        "dynamic 0.48x -> 0.41x of FP32 on an AVX-512 EPYC, ORT 1.32)",
    )
    weight_type: Literal["auto", "int8", "uint8"] = option(
        "auto",
        "integer weight codes of dynamic and static int8 layers: int8 | uint8 (code + 128, zero point 128: the "
        "same values, onnxruntime's uint8 x uint8 kernels) | auto (uint8 where this machine's onnxruntime "
        "saturates uint8 x int8 products, probed once: AVX2 without VNNI clamps pairs of products to 16 bits; "
        "held out on such a machine at the same speed, MiniLM-L6 dynamic 22.6 -> 25.9 dB; else int8)",
    )

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic", "weight_only"):
            raise ValueError(f"mode must be static, dynamic or weight_only, got {self.mode!r}")
        if self.weight_type not in ("auto", "int8", "uint8"):
            raise ValueError(f"weight_type must be auto, int8 or uint8, got {self.weight_type!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type must be uint8 or int8, got {self.activation_type!r}")
        if self.calibration not in ("auto", *METHODS):
            raise ValueError(f"calibration must be auto or one of {METHODS}, got {self.calibration!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 8 or 4, got {self.weight_bits}")
        if self.weight_bits == 4 and self.mode != "weight_only":
            raise ValueError("weight_bits=4 is only supported with mode=weight_only")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.weight_format not in ("qdq", "matmulnbits"):
            raise ValueError(f"weight_format must be qdq or matmulnbits, got {self.weight_format!r}")
        if self.weight_format == "matmulnbits" and self.mode != "weight_only":
            raise ValueError("weight_format=matmulnbits needs mode=weight_only")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.max_agreement_drop is not None and not 0.0 <= self.max_agreement_drop < 1.0:
            raise ValueError(f"max_agreement_drop must be in [0, 1), got {self.max_agreement_drop}")
        if self.calibration_samples < 0 or self.eval_samples < 1:
            raise ValueError("calibration_samples must be >= 0 and eval_samples >= 1")
        if self.auto_float_db < 0:
            raise ValueError(f"auto_float_db must be >= 0, got {self.auto_float_db}")
        if self.smooth is None:  # the pipeline parser reads an unquoted ``smooth=none`` as None
            object.__setattr__(self, "smooth", "none")
        if self.smooth not in ("auto", "all", "per_input", "none"):
            raise ValueError(f"smooth must be auto, all, per_input or none, got {self.smooth!r}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if isinstance(self.smooth_alphas, (str, float, int)) or not all(
                0.0 <= float(a) <= 1.0 for a in self.smooth_alphas):
            raise ValueError(f"smooth_alphas must be a list of strengths in [0, 1], got {self.smooth_alphas!r}")
        if self.weight_rounding not in ("matmul", "auto", "output", "refit", "nearest"):
            raise ValueError(
                f"weight_rounding must be matmul, auto, output, refit or nearest, got {self.weight_rounding!r}")
        if self.rounding_samples < 1:
            raise ValueError(f"rounding_samples must be >= 1, got {self.rounding_samples}")
        if self.empirical_gain and not self.empirical_bias:
            raise ValueError("empirical_gain needs empirical_bias=true (the gain is fitted with the means)")
        if self.empirical_bias_samples < 0:
            raise ValueError(f"empirical_bias_samples must be >= 0, got {self.empirical_bias_samples}")
        if self.refit_samples < 0:
            raise ValueError(f"refit_samples must be >= 0, got {self.refit_samples}")
        if self.explain < 0:
            raise ValueError(f"explain must be >= 0, got {self.explain}")
        if self.auto_float_score not in FEED_SCORES:
            raise ValueError(f"auto_float_score must be one of {', '.join(FEED_SCORES)}, got {self.auto_float_score!r}")
        if self.auto_float_feeds < 1:
            raise ValueError(f"auto_float_feeds must be >= 1, got {self.auto_float_feeds}")
        if self.auto_float_cost_per_db < 0:
            raise ValueError(f"auto_float_cost_per_db must be >= 0, got {self.auto_float_cost_per_db}")
        if self.mixed_range_ratio <= 1.0:
            raise ValueError(f"mixed_range_ratio must be > 1, got {self.mixed_range_ratio}")
        if self.sensitivity not in ("leave_one_out", "one_at_a_time", "greedy_cost"):
            raise ValueError(
                f"sensitivity must be leave_one_out, one_at_a_time or greedy_cost, got {self.sensitivity!r}"
            )
        if self.max_latency is not None and not 0.0 < self.max_latency:
            raise ValueError(f"max_latency must be > 0, got {self.max_latency}")
        if self.max_latency is not None and self.sensitivity != "greedy_cost":
            raise ValueError("max_latency needs sensitivity=greedy_cost (the search that measures latency)")
        targets = (self.min_cosine, self.max_agreement_drop, self.min_sqnr_db, self.max_latency)
        if self.sensitivity != "leave_one_out" and all(t is None for t in targets):
            raise ValueError(
                f"sensitivity={self.sensitivity} chooses float layers only for a target: give max_latency "
                "(greedy_cost) and/or min_sqnr_db, min_cosine or max_agreement_drop"
            )
        if self.latency_cache not in ("use", "refresh", "off"):
            raise ValueError(f"latency_cache must be use, refresh or off, got {self.latency_cache!r}")
        if self.already_quantized not in ("refuse", "ignore"):
            raise ValueError(f"already_quantized must be refuse or ignore, got {self.already_quantized!r}")
        if isinstance(self.exclude, str) or isinstance(self.dynamic_ops, str) or isinstance(self.two_pass, str):
            raise ValueError("exclude, dynamic_ops and two_pass must be lists of names")
        if self.binary_join not in ("all", "any"):
            raise ValueError(f"binary_join must be all or any, got {self.binary_join!r}")
        if self.lift_to not in ("auto", "float", "two_pass", "row"):
            raise ValueError(f"lift_to must be auto, float, two_pass or row, got {self.lift_to!r}")
        if self.activation_ranges not in ("tensor", "row"):
            raise ValueError(f"activation_ranges must be tensor or row, got {self.activation_ranges!r}")
        if isinstance(self.row_ranges, str):
            raise ValueError("row_ranges must be a list of names")
        if set(self.row_ranges) & set(self.two_pass):
            raise ValueError(f"a layer cannot be both two_pass and in row_ranges: "
                             f"{', '.join(sorted(set(self.row_ranges) & set(self.two_pass)))}")
        if (self.row_ranges or self.activation_ranges == "row") and self.mode != "dynamic":
            raise ValueError("row ranges need mode=dynamic (run-time activation ranges)")
        if set(self.two_pass) & set(self.exclude):
            raise ValueError(f"a layer cannot be both excluded (float) and two_pass: "
                             f"{', '.join(sorted(set(self.two_pass) & set(self.exclude)))}")
        if self.two_pass and self.mode != "dynamic":
            raise ValueError("two_pass layers need mode=dynamic (run-time activation ranges)")


__all__ = ["QuantizeOptions"]
