"""Quality per CPU minute for ``distill{mode=train}``: bf16 autocast and a weight average (torch imported by callers).

**Precision** (``precision``): the student's forward runs under ``torch.autocast("cpu", bfloat16)``: MatMul / Gemm /
Conv inputs are rounded to bfloat16 (8 mantissa bits) and multiplied with fp32 accumulation; everything else
(adds, norms, softmax, the loss) stays fp32, and the master weights and Adam's moments are fp32. The backward of
each bf16 product is a bf16 product too. On a CPU with native bf16 dot products (AVX512-BF16, AMX) a product costs
about half or less (measured on this machine, 1 thread: a [600 x 384] x [384 x 1536] product 13.0 -> 4.1 ms), and
products are ~70% of a MiniLM training step (``torch.profiler``). Without them bf16 is emulated and slower, so
``auto`` picks bf16 only when the CPU flags (``/proc/cpuinfo``) name ``avx512_bf16`` or ``amx_bf16``: a property of
the machine, not of timing, so the same seed still gives the same bytes on the same machine (and ``fp32`` for a
QDQ graph: fake quantization mirrors ORT's integer products). The held-out evaluations that choose the kept
weights run in fp32.

**Weight average** (``ema`` = d > 0): after every optimizer step the average A <- d_t A + (1 - d_t) W with
d_t = min(d, (1 + t) / (10 + t)) (the ramp keeps early averages from remembering the start), Polyak / EMA
averaging. The held-out evaluations score A, the best A is what is kept and written back; W keeps training.
Averaging cancels the step-to-step noise of the minibatch gradient (the iterate oscillates around the valley floor
with amplitude ~ lr x gradient noise; the average sits nearer the floor), which is what a short, time-bound run
with a still-large lr leaves on the table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")
#: CPU flags (``/proc/cpuinfo``) of native bfloat16 dot products
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has native bfloat16 dot products (a flag of ``BF16_FLAGS``); False where unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in BF16_FLAGS)
    return False


#: ``precision=auto`` keeps fp32 when Conv does more than this share of the student's multiply-accumulates (on the
#: first training feed; the share of the trained weights where MACs cannot be counted): measured at
#: 1 thread (fwd + bwd CPU s), PP-OCRv4 rec at 0.55x MACs 0.107 fp32 vs 0.175 bf16 per line, 0.354 vs 0.405 per
#: stack of 4; ddddocr_det at 0.65x 0.249 vs 0.336 per image (its batch is fixed at 1: feeds are not stacked)
CONV_SHARE_FP32 = 0.5


def resolve_precision(spec: str, fake_quant: bool = False, conv_share: float = 0.0) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bf16 dot products, else ``fp32``, and ``fp32`` for a QDQ graph
    (``fake_quant``: quantization-aware training mirrors ORT's integer products, which bf16 would round) and for a
    convolutional network (``conv_share``: Conv's share of the MACs above ``CONV_SHARE_FP32``:
    bf16 Conv kernels were slower than fp32 ones on the measured CNNs); the others as given."""
    if spec not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {spec!r}")
    if spec == "auto":
        return "bf16" if native_bf16() and not fake_quant and conv_share <= CONV_SHARE_FP32 else "fp32"
    return spec


def autocast(torch: Any, precision: str) -> Any:
    """A context manager: bf16 autocast on CPU for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class WeightAverage:
    """The exponential moving average of ``params`` (see the module docstring); inert when ``decay`` <= 0."""

    def __init__(self, torch: Any, params: list, decay: float) -> None:
        self.torch, self.params, self.decay = torch, params, float(decay)
        self.steps = 0
        self.avg = [p.detach().clone() for p in params] if self.decay > 0 else []

    @property
    def active(self) -> bool:
        return self.decay > 0

    def update(self) -> None:
        if not self.active:
            return
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        with self.torch.no_grad():
            self.torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - d)

    def reset(self) -> None:
        """The average restarts from the current weights (after a back-off restored them)."""
        if not self.active:
            return
        self.steps = 0
        with self.torch.no_grad():
            for a, p in zip(self.avg, self.params, strict=True):
                a.copy_(p)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the parameters hold the average (the trained weights are put back on exit)."""
        if not self.active:
            yield
            return
        torch = self.torch
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.avg, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)


#: ``step_scale`` choices: the Adam step relative to each tensor's RMS, or to each output channel's (Conv weights)
STEP_SCALES = ("tensor", "channel")


def channel_rms(torch: Any, param: Any, axis: int, floor: float = 1e-3) -> Any:
    """Per-channel RMS of a Conv weight along ``axis`` (broadcastable to ``param``), each at least ``floor`` x the
    tensor's RMS: the size of one output channel's weights. BatchNormalization folded into a Conv multiplies each
    output channel by gamma / sigma, so its channels' RMS spread over orders of magnitude, and one step size per
    tensor is far too large for its small channels."""
    with torch.no_grad():
        p = param.detach().float()
        dims = [d for d in range(p.dim()) if d != axis]
        rms = p.pow(2).mean(dim=dims, keepdim=True).sqrt()
        whole = float(p.pow(2).mean().sqrt())
        return rms.clamp_min(max(whole * floor, 1e-12))


class ChannelSteps:
    """Scales each optimizer step of the given parameters per channel: W <- W_old + (W_adam - W_old) * rms_c, with
    the optimizer's lr for these parameters set without their tensor RMS. Adam's step is about lr per element
    whatever the gradient's size, so this makes a channel's step lr x its own RMS (a relative step per channel)."""

    def __init__(self, torch: Any, scaled: list[tuple[Any, Any]]) -> None:
        self.torch, self.scaled = torch, scaled
        self.saved: list[Any] = []

    def before(self) -> None:
        self.saved = [p.detach().clone() for p, _ in self.scaled]

    def after(self) -> None:
        with self.torch.no_grad():
            for (p, rms), old in zip(self.scaled, self.saved, strict=True):
                p.sub_(old).mul_(rms).add_(old)
        self.saved = []
