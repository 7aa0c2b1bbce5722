"""``distill{mode=train}``: the student graph learns the teacher's outputs by gradient descent (PyTorch, optional).

    min_W  sum_o w_o L_o(student_W(x), teacher(x)) + features * sum_f nmse(student_W(x)_f, teacher(x)_f)

over the calibration feeds x (augmented, ``train_losses``), with Adam at ``lr`` x each tensor's RMS (a relative
step; ``step_scale=channel``: x each output channel's RMS for Conv weights), a linear warmup over the first
``warmup`` fraction of the steps (or of the time budget) and never fewer than ``MIN_WARMUP_STEPS`` steps (again
after every back-off, which clears Adam's moments), then a cosine decay, a minibatch of ``batch`` feeds per step.
Without warmup Adam's first steps are sign steps: every weight moves by the full lr at once, and on EfficientNet-Lite2 (BN folded, depthwise) that raised the loss it was
descending (measured: the same batch's loss 1.554 -> 2.19 after one plain Adam step at lr 1e-4; at a relative
lr 1e-4 with a 5-step ramp it falls 1.554 -> 1.460 in 10 steps). The teacher runs in onnxruntime (the original model, with the matched
feature tensors exposed); the student is the current graph run by ``torch_interpreter.TorchGraph``, whose float
weights are the only parameters: the graph never changes, only the values of its constants, written back at the end.

Back-off (``backoff``, on by default): a held-out evaluation worse than the best so far by more than its noise
(``clear_rise``: 2 standard errors of its minibatch losses) puts the best weights (or the starting ones) back,
clears Adam's moments and halves the lr from then on; a rise within the noise only counts towards ``patience``. The lr that suits
a model is measured on it this way rather than guessed: PP-OCRv4 rec refit at 0.5x MACs, relative lr 1e-4 with the
warmup, had its held-out loss go 0.127 -> 1.19 in 17 steps (one fixed batch: 1e-4 oscillates 0.087 -> 0.152 ->
0.031 -> 0.052, 1e-5 falls 0.087 -> 0.049 in 6 steps), so the old rule (keep descending, keep the best) spent the
whole budget on weights worse than the start.

Early stop: every 4th calibration feed is held out (>= 8 feeds; at most 32, evenly over the list); the held-out loss is measured every
``eval_every`` steps, the best weights so far are kept, training stops after ``patience`` evaluations without a
better one or when ``max_minutes`` run out, and the best weights are written back only if they beat the untrained
student's held-out loss (otherwise the graph is left as it was).

Deterministic given the seed: the minibatches and augmentation come from ``ctx.rng``, torch is seeded from it, and
the ops run on CPU in a fixed order (same machine, same thread count -> the same bytes). The learning rate decays
with the larger of the step fraction and the time-budget fraction (rounded down to 1/64, so a run far from its
budget never reads the clock into its lr), and the held-out loss is also measured every sixth of the budget and
when it runs out: a run cut by ``max_minutes`` keeps what it reached, but then depends on the machine's speed. Runs
reproducible to the byte: ended by ``steps`` or early stop, at a pace that keeps the step fraction ahead of the
(rounded) time fraction, each ``eval_every`` steps within a sixth of the budget.

Precision and averaging (``train_speed``): ``precision=auto`` (default) runs the student's forward/backward under
bf16 autocast on a CPU with native bf16 dot products (master weights, Adam and the held-out evaluations stay
fp32; QDQ graphs stay fp32): MiniLM-L6 50% obs, 1 thread, 0.49 -> 0.38 CPU s per step of 16 sentences and a lower
held-out loss at equal minutes. Convolutional networks (Conv > half of the MACs on a training feed) stay fp32:
bf16 Conv kernels were slower there (``train_speed.CONV_SHARE_FP32``). ``ema=d`` scores and keeps an exponential
average of the weights instead of the last iterate (measured: no gain over the cosine decay to 0 in an 8-minute MiniLM-L6 run; off by default).

Quantization-aware (a QDQ graph from ``quantize``): the student runs with fake quantization and a straight-through
estimator (``fake_quant``); each quantized weight trains a float shadow of its integers, int32 biases likewise, and
(``learn_scales``, on by default) the activation scales, LSQ-style. The teacher is still the
float original. Written back: re-rounded integers (and scales), the same nodes, so the same integer kernels under ORT;
``stats["fake_quant"]`` counts what trained and how many integers changed. Graphs with integer-kernel ops
(QLinearConv, MatMulInteger, DynamicQuantizeLinear: dynamic mode) are refused.

Feature tensors (``features`` > 0): graph tensors that exist in the teacher under the same name and whose values
depend on trained weights, at the block boundaries ``blocks.partition`` finds (the residual stream / stage outputs
the pruning kept); a channel-pruned tensor is compared with the teacher's kept channels (``ctx.channel_map``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx

from onnxcompress.errors import PassError
from onnxcompress.runtime import Session

from .teacher_cache import TeacherCache
from .torch_interpreter import TorchGraph, Unsupported
from .train_losses import (
    augment_feed,
    batch_groups,
    loss_kinds,
    mix_feeds,
    normalized_mse,
    output_loss,
    parse_augment,
    prob_outputs,
    require_torch,
    teacher_view,
    token_pool,
)
from .train_speed import ChannelSteps, WeightAverage, autocast, channel_rms, resolve_precision

log = logging.getLogger(__name__)

#: held-out feeds for early stopping (every 4th calibration feed, capped: an evaluation runs them all)
MAX_HELDOUT = 32

#: ``augment=auto`` drops the augmentation when the student's loss on augmented copies exceeds this multiple of its
#: loss on the feeds themselves (``Trainer.check_augment``)
AUGMENT_TOLERANCE = 2.0

#: integer-kernel ops the interpreter cannot train through (a QDQ graph's QuantizeLinear / DequantizeLinear it can)
#: ``backoff`` acts on a held-out rise larger than this many standard errors of the evaluation (``clear_rise``)
NOISE_SIGMAS = 2.0

#: the warmup lasts at least this many optimizer steps, however fast the time budget runs: Adam's first steps are
#: sign steps (every weight moves by the full lr), and a time-based ramp on a slow model gave them the full lr at
#: once (ddddocr_det at 0.65x MACs, 3 s a step under load: the ramp reached 1 by step 3 and the held-out loss went
#: 0.0077 -> 0.0141; one Adam step of relative lr 1e-4 on a clean batch: 0.0077 -> 0.0107, with a 10-step ramp
#: it stays within 0.0078-0.0083 over 15 steps)
MIN_WARMUP_STEPS = 20
#: held-out evaluations during a warmup (with ``backoff``), every this many steps
WARMUP_EVAL_EVERY = 5

QUANTIZED_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def clear_rise(current: float, best: float, standard_error: float) -> bool:
    """A held-out loss above the best by more than ``NOISE_SIGMAS`` standard errors of its evaluation (the spread of
    its minibatch losses / sqrt(count)): the evidence ``backoff`` needs before it restores the best weights and
    halves the lr. A smaller rise is evaluation noise: on PP-OCRv4 rec (32 held-out lines) the held-out loss went
    0.216 -> 0.261 -> back between evaluations, and backing off on every such rise halved the lr to nothing and
    kept 0.844 where training without back-off reached 0.906 (lr 3e-5, 4 minutes)."""
    return current > best + NOISE_SIGMAS * standard_error


def take_channels(value: np.ndarray, mapping: dict[int, np.ndarray] | None) -> np.ndarray:
    """The teacher's value restricted to the channels the student kept (``channel_map`` positions)."""
    for axis, idx in (mapping or {}).items():
        value = np.take(value, idx, axis=axis)
    return value


#: the time-budget fraction is rounded down to this step before it enters the lr schedule
TIME_FRACTION_STEP = 1 / 64


def time_fraction(elapsed_s: float, budget_s: float) -> float:
    """The spent share of the time budget, rounded down to ``TIME_FRACTION_STEP``: a run far from its budget sees
    exactly 0, so its lr (and its bytes) never depend on the wall clock. Unrounded, step 1's lr carried the start
    evaluation's seconds / budget (~1e-4): two runs of one seed differed by an ulp in a few weights."""
    return float(np.floor(elapsed_s / budget_s / TIME_FRACTION_STEP) * TIME_FRACTION_STEP)


class Trainer:
    """One training run; ``run`` returns the stats and leaves the best weights in ``graph`` (written back)."""

    def __init__(self, graph: Any, ctx: Any, student_model: onnx.ModelProto, teacher: onnx.ModelProto,
                 opts: Any) -> None:
        self.torch = torch = require_torch()
        quantized = sorted({n.op for n in graph.nodes} & QUANTIZED_OPS)
        if quantized:
            raise PassError(f"distill{{mode=train}} trains float and QDQ graphs, not {', '.join(quantized)}: "
                            "put it before quantize in the pipeline, or quantize in static or weight_only mode")
        self.graph, self.ctx, self.opts = graph, ctx, opts
        torch.manual_seed(int(ctx.rng("distill-train-torch").integers(0, 2**31 - 1)))
        self.rng = ctx.rng("distill-train")
        learn_masks = bool(getattr(opts, "learn_masks", False))
        self.tg = TorchGraph(graph, torch, masks=opts.masks, codebooks=True,
                             learn_scales=bool(opts.learn_scales), learn_masks=learn_masks)
        self.mask_every = max(1, int(getattr(opts, "mask_every", 20)))
        self.mask_flips = 0  # entries that changed sides over the whole run (learned masks)
        self.kinds = loss_kinds(student_model, opts.loss)
        self.probs = prob_outputs(student_model)
        self.teacher = teacher
        self.student_model = student_model
        self.positions = ctx.channel_map.positions
        self.batchable = False
        self.feature_weight = opts.features

    # ------------------------------------------------------------------------------------------------ data
    def split(self, feeds: list[dict]) -> tuple[list[dict], list[dict]]:
        """Every 4th feed held out, at most ``MAX_HELDOUT`` of them (each evaluation runs them all) drawn evenly
        from the whole list, the rest trained on. Evenly, not the first ones: calibration lists are often ordered
        (sentences by topic, crops by photo), and a refit on the first ``samples`` feeds fits those far better
        than the rest (MiniLM-L6, refit on the first 128 of 550 sentences: held-out loss 0.020 on the first 32
        every-4th feeds, training loss 0.084 on the others), so early stopping watched the wrong feeds."""
        if len(feeds) >= 8:
            every4 = [f for i, f in enumerate(feeds) if i % 4 == 3]
            pick = np.unique(np.round(np.linspace(0, len(every4) - 1, min(MAX_HELDOUT, len(every4)))).astype(int))
            held = [every4[i] for i in pick]
            ids = {id(f) for f in held}
            return [f for f in feeds if id(f) not in ids], held
        return feeds, feeds[: max(1, len(feeds) // 2)]

    def stackable(self, sess: Session, feed: dict) -> bool:
        """Whether feeds can be stacked on axis 0: every input's first dim is dynamic in the teacher."""
        dims = {i.name: i.shape for i in sess.sess.get_inputs()}
        return all(name in dims and dims[name] and not isinstance(dims[name][0], int) for name in feed)

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, student: dict, targets: dict[str, np.ndarray], features: list[str]) -> Any:
        torch = self.torch
        total = 0.0
        for name, (kind, axis) in self.kinds.items():
            t = torch.from_numpy(np.asarray(targets[name], dtype=np.float32))
            s = student[name].float()
            if s.shape != t.shape:
                raise PassError(f"distill{{mode=train}}: output {name} has shape {tuple(s.shape)} in the student "
                                f"and {tuple(t.shape)} in the teacher")
            total = total + output_loss(torch, kind, s, t, axis, self.opts.temperature, name in self.probs)
        for name in features:
            t = torch.from_numpy(np.asarray(take_channels(targets[name], self.positions.get(name)),
                                            dtype=np.float32))
            total = total + self.feature_weight * normalized_mse(torch, student[name].float(), t)
        return total

    def feature_tensors(self) -> list[str]:
        if self.opts.features <= 0:
            return []
        from .blocks import last_boundary, partition

        teacher_names = {v for n in self.teacher.graph.node for v in n.output}
        if getattr(self.opts, "features_at", "blocks") == "last":
            return [t for t in last_boundary(self.tg, teacher_names) if t not in self.kinds]
        cuts = partition(self.tg, teacher_names, self.opts.blocks or 8)
        names = [t for c in cuts for t in c.targets if t not in self.kinds]
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------------------------------------ fit
    def batch_loss(self, feeds: list[dict], forward: Any, targets: Any, features: list[str]) -> Any:
        """Mean loss over ``feeds``: stacked along axis 0 where shapes agree and the graph takes a batch."""
        total, count = 0.0, len(feeds)
        groups = batch_groups(feeds, self.batchable)
        if self.batchable and len(groups) < len(feeds):
            try:
                return sum(self.loss(forward(g), targets(g), features) * (next(iter(g.values())).shape[0] / count)
                           for g in groups)
            except Unsupported:
                raise
            except Exception as exc:  # the graph fixes its batch size somewhere: one feed at a time from now on
                log.info("distill train: stacked feeds failed (%s); one feed at a time", str(exc)[:120])
                self.batchable = False
        for f in feeds:
            total = total + self.loss(forward(f), targets(f), features) / count
        return total

    def check_augment(self, aug: tuple[str, ...], train: list[dict], forward: Any, targets: Any,
                      features: list[str], desc: str) -> tuple[str, ...]:
        """``augment=auto``: keep the augmentation only if the student's loss on augmented copies of a few training
        feeds is within ``AUGMENT_TOLERANCE`` x its loss on the feeds themselves. Far above it the augmented inputs
        are off the data the model sees (PP-OCRv4 rec, refit at 0.5x: loss 0.1 on the text lines, ~1.0 on copies
        with 3% noise: training then fits the noise and the held-out loss never fell). At 2.1x it still hurt:
        ddddocr_det refit at 0.65x MACs, crop+noise 0.0184 vs 0.0086 clean: the held-out loss rose 0.0077 -> 0.0108
        within 7 warmup steps (lr <= 0.35e-4), where the same run without augmentation held 0.0077 through 16 steps
        and then fell to 0.0076 (kept by nudenet at 1.08x, EfficientNet-Lite2 at 1.2-1.6x)."""
        torch = self.torch
        rng = np.random.default_rng(0)  # a fixed probe: does not move the training's random stream
        picks = np.sort(rng.choice(len(train), size=min(self.opts.batch, len(train)), replace=False))
        probe = [train[i] for i in picks]
        with torch.no_grad():
            clean = float(self.batch_loss(probe, forward, targets, features))
            noisy = float(self.batch_loss([augment_feed(torch, f, aug, rng) for f in probe], forward, targets,
                                          features))
        self.augment_probe = {"clean": round(clean, 6), "augmented": round(noisy, 6)}
        if noisy > AUGMENT_TOLERANCE * max(clean, 1e-12):
            log.info("%s: augmentation %s dropped (student loss %.4g on augmented copies vs %.4g)", desc,
                     "+".join(aug), noisy, clean)
            self.augment_probe["dropped"] = True
            return ()
        return aug

    def fit(self, params: list, steps: int, budget_s: float, train: list[dict], held: list[dict],
            forward: Any, targets: Any, features: list[str], desc: str) -> dict:
        """Adam + cosine decay on ``params``; keeps (and restores) the best held-out weights. Returns stats."""
        torch, opts = self.torch, self.opts
        aug = parse_augment(opts.augment)
        if opts.augment == "auto" and aug:
            aug = self.check_augment(aug, train, forward, targets, features, desc)
        pool = token_pool(train) if "swap" in aug else None

        learned = bool(self.tg.learned_masks)

        def held_loss() -> tuple[float, float]:
            """The held-out loss and its standard error (spread of the minibatch losses / sqrt(count))."""
            if learned:  # the mask evaluated is M(P) of the P that may be kept as the best
                self.mask_flips += self.tg.refresh_masks()
            with torch.no_grad():
                parts = [float(self.batch_loss(held[i:i + opts.batch], forward, targets, features))
                         for i in range(0, len(held), opts.batch)]
            error = float(np.std(parts) / np.sqrt(len(parts))) if len(parts) > 1 else 0.0
            return float(np.mean(parts)), error

        # Adam moves every parameter by about lr per step whatever its scale: each tensor's step is made relative
        # to its own RMS (a 1e-3 relative change per step at lr=1e-3), so small biases and large kernels move alike
        scales = [max(float(p.detach().pow(2).mean().sqrt()), 1e-4) for p in params]
        axes = self.channel_axes() if getattr(opts, "step_scale", "tensor") == "channel" else {}
        scaled = [(p, channel_rms(torch, p, axes[id(p)])) for p in params if id(p) in axes]
        scales = [1.0 if id(p) in axes else s for p, s in zip(params, scales, strict=True)]
        channel_steps = ChannelSteps(torch, scaled)
        groups = [{"params": [p], "lr": opts.lr * s} for p, s in zip(params, scales, strict=True)]
        try:  # one fused kernel per group: 5.6x faster than the per-tensor loop on MiniLM-L6's weights (1 thread)
            opt = torch.optim.Adam(groups, fused=True)
        except (RuntimeError, TypeError):  # a torch without the fused CPU Adam
            opt = torch.optim.Adam(groups)
        precision = resolve_precision(getattr(opts, "precision", "fp32"), bool(self.tg.quant_stats),
                                      self.conv_share(train[0] if train else None))
        average = WeightAverage(torch, params, getattr(opts, "ema", 0.0))
        t0, c0 = time.perf_counter(), time.process_time()  # the budget counts the held-out evaluations too
        start, _ = held_loss()
        best, best_state, bad, stop = start, None, 0, "steps"
        backoff = getattr(opts, "backoff", False)
        start_state = [p.detach().clone() for p in params] if backoff else None
        lr_scale, backoffs, holds = 1.0, 0, 0
        restarted = 0  # the step Adam's moments were last cleared at (a back-off): its ramp starts again there
        history, train_losses, done = [(0, round(start, 6))], [], 0
        last_eval = t0
        eval_every = max(1, min(opts.eval_every, steps))
        warmup = getattr(opts, "warmup", 0.0)
        progress = getattr(self.ctx, "progress", None)
        for step in progress(range(1, steps + 1), total=steps, desc=desc) if progress else range(1, steps + 1):
            # linear warmup, then cosine decay over the steps, or over the time budget when that runs out first
            frac = max((step - 1) / steps, time_fraction(time.perf_counter() - t0, budget_s))
            ramp = 1.0 if warmup <= 0 else min(1.0, (step - restarted) / MIN_WARMUP_STEPS,
                                               max(step / (warmup * steps), frac / warmup))
            rate = opts.lr * lr_scale * ramp * 0.5 * (1 + float(np.cos(np.pi * min(frac, 1.0))))
            for group, scale in zip(opt.param_groups, scales, strict=True):
                group["lr"] = rate * scale
            picks = self.rng.choice(len(train), size=min(opts.batch, len(train)), replace=False)
            batch = [augment_feed(torch, train[i], aug, self.rng, pool) for i in np.sort(picks)]
            if "mix" in aug:
                batch = mix_feeds(batch, self.rng)
            opt.zero_grad(set_to_none=True)
            with autocast(torch, precision):
                value = self.batch_loss(batch, forward, targets, features)
            value.backward()
            channel_steps.before()
            opt.step()
            channel_steps.after()
            average.update()
            done = step
            if learned and step % self.mask_every == 0:
                self.mask_flips += self.tg.refresh_masks()
            train_losses.append(float(value.detach()))
            log.debug("%s: step %d train loss %.5f", desc, step, train_losses[-1])
            now = time.perf_counter()
            out_of_time = now - t0 > budget_s
            # during a warmup the held-out loss is also measured every WARMUP_EVAL_EVERY steps (with backoff): a
            # clear rise there caps the lr at half the ramped lr that caused it (the warmup doubles as an lr search)
            warming = warmup > 0 and step - restarted <= MIN_WARMUP_STEPS
            early = backoff and warming and (step - restarted) % WARMUP_EVAL_EVERY == 0
            if step % eval_every == 0 or step == steps or out_of_time or now - last_eval > budget_s / 6 or early:
                with average.applied():  # the weight average is what is scored and kept (ema > 0)
                    current, noise = held_loss()
                    if current < best:
                        best_state = [p.detach().clone() for p in params]
                last_eval = time.perf_counter()
                history.append((step, round(current, 6)))
                log.info("%s: step %d/%d, train loss %.5f, held-out %.5f (start %.5f)", desc, step, steps,
                         float(np.mean(train_losses[-eval_every:])), current, start)
                if current < best:
                    best, bad = current, 0
                else:
                    rose = clear_rise(current, best, noise)
                    bad += 0 if warming and not rose else 1  # a flat warmup is not a stall
                    if bad >= opts.patience:
                        stop = "early stop"
                        break
                    if backoff and not rose:
                        holds += 1  # within the evaluation's noise of the best: no evidence of a too-large step
                    elif backoff:  # too large a step for this model: back to the best weights, half the lr
                        with torch.no_grad():
                            for p, v in zip(params, best_state or start_state, strict=True):
                                p.copy_(v)
                        if learned:
                            self.tg.refresh_masks()
                        average.reset()
                        opt.state.clear()
                        lr_scale, backoffs, restarted = lr_scale * ramp * 0.5, backoffs + 1, step
                        log.info("%s: held-out loss rose: back to the best weights, lr x %.3g", desc, lr_scale)
            if out_of_time:
                stop = "time budget"
                break
        if best_state is not None:
            with torch.no_grad():
                for p, v in zip(params, best_state, strict=True):
                    p.copy_(v)
        if learned:  # the masks of the weights kept (the best, or the last state when nothing improved)
            self.tg.refresh_masks()
        return {"steps": done, "stopped_by": stop, "seconds": round(time.perf_counter() - t0, 1),
                "cpu_seconds": round(time.process_time() - c0, 1),
                "heldout_loss_start": round(start, 6), "heldout_loss_best": round(best, 6),
                "improved": best_state is not None, "loss_history": history, "backoffs": backoffs,
                "backoffs_held": holds, "precision": precision, "ema": average.decay,
                "lr_final": opts.lr * lr_scale}

    def conv_share(self, feed: dict | None = None) -> float:
        """Conv / ConvTranspose share of the student's multiply-accumulates on ``feed`` (``precision=auto``); without
        a feed, or where the MACs cannot be counted, their share of the trained weight elements."""
        if feed is not None:
            try:
                from onnxcompress.analyses.macs import count_macs
                from onnxcompress.data import feed_shapes

                macs = count_macs(self.student_model, feed_shapes(feed), feed)
                conv = sum(v for k, v in macs.by_op.items() if k in ("Conv", "ConvTranspose"))
                if macs.total > 0:
                    return conv / macs.total
            except Exception as exc:  # a graph the MAC counter does not follow: the weights decide
                log.debug("distill train: MACs not counted (%s)", str(exc)[:120])
        conv = {n.inputs[1].name for n in self.graph.nodes if n.op in ("Conv", "ConvTranspose") and len(n.inputs) > 1}
        sizes = {name: int(np.prod(w.shape)) for name, w in self.tg.weights.items()}
        return sum(v for k, v in sizes.items() if k in conv) / max(1, sum(sizes.values()))

    def channel_axes(self) -> dict[int, int]:
        """id(parameter) -> output-channel axis, for plain (not codebook, not fake-quantized) Conv and
        ConvTranspose weights of rank >= 3 (``step_scale=channel``)."""
        axes: dict[int, int] = {}
        for node in self.graph.nodes:
            if node.op not in ("Conv", "ConvTranspose") or len(node.inputs) < 2:
                continue
            w = self.tg.weights.get(node.inputs[1].name)
            if w is None or w.param is None or w.index is not None or w.param.dim() < 3:
                continue
            if tuple(w.param.shape) != tuple(w.shape):
                continue
            axes[id(w.param)] = 0 if node.op == "Conv" else 1
        return axes

    def integers(self) -> dict[str, np.ndarray]:
        """The integer constants of the trained quantized weights and biases (for the stats)."""
        tensors = self.graph.tensors()
        return {n: np.asarray(tensors[n].values) for n, w in self.tg.weights.items()
                if n in tensors and hasattr(w, "lo") and hasattr(tensors[n], "values")}

    # ------------------------------------------------------------------------------------------------ run
    def run(self, feeds: list[dict]) -> dict:
        """End-to-end: the whole student against the teacher's outputs (and features)."""
        if self.tg.unsupported:
            op, node = self.tg.unsupported[0]
            ops = sorted({o for o, _ in self.tg.unsupported})
            raise PassError(f"distill{{mode=train}}: op {op} (node {node!r}) is not supported by the training "
                            f"interpreter (unsupported: {', '.join(ops)}); blockwise=true trains the other "
                            "blocks, or use mode=refit")
        features = self.feature_tensors()
        train, held = self.split(feeds)
        want = list(self.kinds) + features
        masks0 = {n: w.mask.clone() for n, w in self.tg.weights.items() if getattr(w, "rule", None) is not None}
        with Session(teacher_view(self.teacher, features), what="teacher") as t_sess:
            self.batchable = self.stackable(t_sess, feeds[0])

            targets = TeacherCache(lambda feed: dict(zip(want, t_sess.run(feed, want), strict=True)))

            stats = self.fit(self.tg.parameters(), self.opts.steps, self.opts.max_minutes * 60.0, train, held,
                             lambda f: self.tg.forward(f, features), targets, features, "distill train")
        before = self.integers() if self.tg.quant_stats else {}
        written = self.tg.write_back() if stats["improved"] else 0
        stats["augment_probe"] = getattr(self, "augment_probe", None)
        stats["teacher_cache"] = targets.stats()
        if self.tg.quant_stats:
            after = self.integers()
            moved = sum(int(np.count_nonzero(after[k] != v)) for k, v in before.items())
            total = max(1, sum(v.size for v in before.values()))
            stats["fake_quant"] = {**self.tg.quant_stats, "integers_changed": moved,
                                   "integers_changed_share": round(moved / total, 5)}
        learned = self.tg.learned_masks
        if learned:
            patterns = dict(Counter(learned.values()))
            kept = self.tg.weights
            swapped = sum(int((kept[n].mask != m).sum()) // 2 for n, m in masks0.items()) if written else 0
            total = sum(int(m.sum()) for m in masks0.values())
            stats["learned_masks"] = {"weights": len(learned), "patterns": patterns, "every": self.mask_every,
                                      "swaps_during_training": self.mask_flips, "swapped": swapped,
                                      "swapped_share": round(swapped / max(total, 1), 5)}
        return {"mode": "train", **stats, "weights_trained": len(self.tg.weights), "weights_written": written,
                "features": len(features), "losses": {k: v[0] for k, v in self.kinds.items()},
                "batched": self.batchable, "train_feeds": len(train), "heldout_feeds": len(held)}
