"""``quantize``: 8-bit (and 4-bit weight-only) quantization as QDQ graphs that onnxruntime runs on integer kernels.

Modes:

* ``static`` — weights int8 symmetric per output channel (``per_channel=false``: per tensor), activations
  uint8/int8 (asymmetric by default) with ranges from calibration data (``ctx.calibration``, required); biases int32
  with ``s_b = s_x · s_w``. Q/DQ placement follows what ORT's CPU EP fuses (``placement``): integer regions around
  Conv/MatMul/Gemm grown through Add/Mul/Concat/pooling/data-movement ops, float kept for ops without integer
  kernels and for outputs, Concats that mix ranges stay float. Stage by stage in ``static_run``.
* ``dynamic`` — MatMul/Gemm weights int8 per channel; activations quantized at run time
  (DynamicQuantizeLinear -> MatMulInteger, fused by ORT into DynamicQuantizeMatMul). No calibration needed.
* ``weight_only`` — weights stored as int8 per channel (opset 13) or int4 in blocks of ``block_size`` along the
  reduction axis (blocked DequantizeLinear, opset 21; ORT turns DQ(int4) -> MatMul into MatMulNBits), or directly as
  ``com.microsoft.MatMulNBits`` (``weight_format=matmulnbits``). Activations stay float.

Embedding tables (large constant ``Gather`` data) are stored int8 per row in every mode.

**Subgraphs** (If/Loop/Scan bodies, ``subgraphs``): dynamic and weight-only modes quantize the bodies' layers like
the main graph's; a weight held in an outer scope and read inside bodies (silero VAD's op18 export) gets one integer
copy shared by all its readers. Static mode has no activation ranges for body tensors (the collector can expose only
main-graph tensors), so body layers keep float compute and store their weights int8 (the main graph's int8 copy
when it quantized the same weight); the whole result still goes through the latency guard. ``stats["subgraphs"]``
says per body what was done and why (``"If 'x' then_branch": "2 Gemm weight-int8; compute float: no activation
ranges inside subgraphs"``); bodies are never dropped.

**Determinism**: same model, options, data and seed -> the same bytes in every run on a machine. Static mode's
latency decisions (guard, float-layer costs, per-Conv kernel speeds) are measured once per machine and cached
(``onnxcompress.latency_profile.MachineCache``: ``~/.cache/onnxcompress/latency/<cpu+cores+os+ORT>.json``, keys =
model fingerprints / Conv op-shape-attribute signatures + thread count; the path is in the stats and on the console).
``latency_cache=refresh`` measures again, a cached value moving only beyond a 0.05 hysteresis; ``latency_cache=off``
keeps measurements to the run; ``--latency-profile`` replays a report's values over the cache. Generated names come
from ``Namer`` (base name, then the first free ``_k`` suffix, in graph order), never from set or id order.

Measured on real models (``benchmarks/int8_margins.py``, issue 12), off by default because they did not pay:
``weight_rounding=output`` (per-layer output error 6-9 dB lower, model outputs within ±0.2 dB on PP-OCRv4 rec,
nudenet, MiniLM-L3 and 4 dB worse on ddddocr_det's, at 2x the tool time: activation noise dominates) and
``weight_rounding=refit`` (held-out, same latency:
PP-OCRv4 rec hard-line agreement 0.27 -> 0.33, nudenet 30.4 -> 36.1 dB, ddddocr_det 21.6 -> 25.3 dB, EfficientNet-Lite2
24.7 -> 25.6 dB, MiniLM-L3 +-0.5 dB; box F1 / top-1 agreement 0.007 / 0.03 lower on ddddocr_det / EfficientNet; 3-13x
the tool time) and ``stream_equalization`` (EfficientNet-Lite2's bottleneck channels span < 2.3x: +0.0 dB). A uint16 QDQ Conv runs as DQ -> float Conv -> Q on
ORT's CPU EP (1.1-2.6x the float Conv), so 16-bit activations are no cheaper than a float layer there.

SmoothQuant (``smooth``) is decided by measurement (``smooth=auto``, the default; ``smoothing_choice``): a model with
MatMul/Gemm inputs that have positions is quantized without smoothing, each strength of ``smooth_alphas`` is screened
by its all-int8 model, the best goes through the float-layer search too when it beats the unsmoothed all-int8 model,
and the better worst-output SQNR on the evaluation feeds is kept. Held out: MiniLM-L3's embedding 23.5 -> 31.0 dB,
MiniLM-L6's 18.4 -> 25.5 dB at the same latency; PP-OCRv4 rec measured unsmoothed; CNNs have no candidate (a
classifier's pooled features hold one row per input: smoothed, EfficientNet-Lite2 lost 8 dB held out).

The weights of transformer layers (MiniLM-L6, issue 12; ``benchmarks/results/int8_margins.md``, thirteenth
session), opt-in: ``matmul_bias`` gives a MatMul read by one ``Add`` of a constant bias (how transformer exports
write a linear layer) bias correction through that Add; ``weight_rounding=matmul`` rounds the MatMul/Gemm layers
whose input has positions against their outputs (GPTQ-style error feedback across the input columns, H = XᵀX of the
int8 model's inputs on ``rounding_samples`` = 64 feeds from the shared statistics, the new weights' mean shift into
the bias), kept where the outputs improve on the evaluation feeds (else the MatMul bias corrections go too); a CNN
has no such layer and is quantized byte for byte as with ``nearest``. With smoothing at alpha 0.8 on MiniLM-L6 the
weights alone (every activation float) went 27.9 -> 30.7 dB at the embedding; held out, both together: MiniLM-L6
25.5 / 26.0 -> 25.9 / 26.6 dB (easy / long), MiniLM-L3 31.0 / 30.2 -> 31.7 / 32.2 dB, PP-OCRv4 rec the same outputs;
not the default because the lowest per-sentence cosine fell (L6 0.9975 -> 0.9959: the float-layer search no longer
keeps node_MatMul_229 float; L3 0.9991 -> 0.9989). What limits L6 is now the activations' 24 per-tensor roundings
(all-int8 26.8 dB against 30.7 weights-only), spread evenly. A strength per smoothed input (``smooth_per_input``,
``smoothing_strength``: the closed-form joint error predicts the NumPy rounding within 1-10%) lost the screen to one
global alpha on both MiniLMs: off.

The CNNs' activation noise (issue 12, fourteenth session), opt-in: ``empirical_bias`` matches each int8 Conv's
per-channel output mean to the float Conv's on calibration feeds, stage by depth, through its bias (rounding a
ReLU/SiLU output, clipping a range, a gate on a noisy input all move channel means, and later layers amplify them);
``empirical_gain`` also fits a per-channel gain into the weight scales. Same graph and latency; reverted where the
calibration score does not improve. Held out, means / means and gains: PP-OCRv4 det 14.8 -> 17.4 / 19.2 dB,
ddddocr_det 25.2 -> 26.9 / 27.3 dB, nudenet 36.2 -> reverted / 37.7 dB, EfficientNet-Lite2 24.7 -> reverted / 25.3
dB, PP-OCRv4 rec hard-line agreement 0.27 -> 0.38 / 0.36; not the default: with the gain every metric of the three
detectors improves, but 2 of rec's 64 easy lines flip and EfficientNet's top-5 overlap dips
(``benchmarks/results/int8_margins.md``, fourteenth session).

Mixed precision is chosen by activation rounding, not by layer (issue 12): ORT needs integer input and output for an
integer Conv, so a rounding goes away only when every layer around it runs float. On EfficientNet-Lite2 half of the
layers float (picked one by one) left the logits at 18.2 dB (all-int8 18.4), while the stem and block 0's depthwise
Conv together take out the stem output's rounding: 24.7 dB at the same latency (``float_layer_search`` groups, on by
default when a group costs <= 2% latency; ``sensitivity=greedy_cost`` walks the frontier further within
``max_latency``; ``benchmarks/int8_margins.py --frontier``).

Modules:

=======================  ================================================================================
``quantize_pass``        the ``Quantize`` pass class: options, needs/preserves, contract, mode dispatch
``static_run``           static mode: the stage sequence and the state the stages share; ``build``
``calibrate``            stage: activation statistics on the calibration feeds, the float reference
``range_choice``         stage: per-tensor ranges from the statistics; ``calibration=auto``
``rounding``             stage: weight scales and rounding chosen against each layer's output (closed form)
``refit``                stage (``weight_rounding=refit``): layers refit to the float layers' outputs on their
                         int8 inputs, by depth, from a paired float/int8 model's Gram matrices
``bias_correction``      stage: ``b' = b − (Ŵ − W)·E[x]``
``empirical_bias``       stage (``empirical_bias``): int8 layers' output means (and gains) matched to the float
                         layers' on calibration feeds, stage by depth, through their biases
``float_layer_search``   stage: automatic float layers and groups (leave-one-out on the last layers' feature SQNR)
``float_frontier``       greedy mixed precision by noise removed per latency cost; rounding groups; ``greedy_cost``
``float_cost``           what a float layer costs (measured latency, bytes) against what it buys (dB)
``mixed_precision``      stage: sensitivity ranking and the float-layer count that meets a user target
``latency_guard``        stage: never slower than float under ORT; measurements through ``ctx.latency``
``placement``            which tensors cross between the integer and the float domain (the ``Plan``)
``qdq_insert``           writing a ``Plan`` into the graph: Q/DQ pairs, integer weights, int32 biases
``qparams_math``         scales, zero points, (blocked) weight quantization, bias scales, int4 packing
``ort_int8_kernels``     what ORT's CPU EP runs on integers; weight/bias slots and per-channel axes
``fidelity``             scores of a candidate against the float reference
``float_patch``          cheap "this layer float" variants of an exported QDQ model, for ranking
``layer_speed``          int8 vs float speed of one Conv in isolation
``prepare``              exact folds before quantizing (affine into Conv, offsets into the next Conv)
``equalization``         cross-layer equalization
``stream_equalization``  per-channel scales of linear bottleneck streams folded into their Convs
``smoothing``            SmoothQuant: MatMul inputs' channel outliers moved into the weights
``smoothing_choice``     ``smooth=auto``: the model quantized with and without smoothing, the better kept
``smoothing_strength``   a smoothing strength per input by the predicted joint rounding error at its outputs
``tensor_types``         element type of every tensor (inference, then a probe run)
``opset_upgrade``        opsets the formats need, and upgrading a graph to them
``dynamic``              dynamic and weight-only modes, embedding tables, weights of float-only ops
``subgraphs``            If/Loop/Scan bodies: scopes, weight readers, one shared integer copy, per-body stats
=======================  ================================================================================

Stats: nodes quantized per op type, layers kept float with the reason (``layers_kept_float``: name -> reason;
``kept_float``: ``[{layer, reason, macs_share, fidelity_gain_db, latency_cost, size_cost}]``), calibration method and time, opset upgrade,
weight bytes before/after, the score on the calibration feeds, the measured latency ratios and how many latency
measurements were taken, replayed from the profile or read from the machine cache (``latency_cache``: its path),
per If/Loop/Scan body what was quantized and what stayed float (``subgraphs``).
"""

from .quantize_pass import QUANTIZED_OPS, Quantize

__all__ = ["Quantize", "QUANTIZED_OPS"]
