"""Distillation losses per output, feeds and augmentation for ``distill{mode=train}`` (torch imported by callers).

Per graph output o with teacher value t and student value s (``loss_kinds`` picks the kind, overridable):

- ``kl`` (class scores: ``validate.class_score_outputs`` — Softmax/LogSoftmax outputs, and Gemm/MatMul(+bias)
  outputs at least ``WIDE_LOGITS`` wide; narrower ones get ``mse``): with
  temperature T, KL(softmax(z_t / T) || softmax(z_s / T)) * T^2 over the class axis, where z = log p for an output
  that already is a probability (a Softmax output) and z = the output for logits;
- ``cosine`` (other rank-2 outputs [batch, dim]: embeddings): mean over rows of 1 - cos(t, s);
- ``mse`` (everything else: maps, boxes, sequences): mean((s - t)^2) / (var(t) + eps), so outputs of any scale
  weigh alike;
- ``fields`` (on request: ``loss=fields``): the normalized MSE of each slice along the field axis, averaged over the
  slices, so fields of one output weigh alike whatever their scale. A YOLO-style output [N, 4+K, A] concatenates
  box coordinates (0..image size) and K class probabilities (0..1): its whole-tensor variance is the coordinates'
  (NudeNet 320n: the class scores are 4e-8 of its output energy), so ``mse`` hardly sees the scores the detections
  are thresholded on. The field axis is the box/score axis of a detection layout
  (``task_metrics.detection_layout``), else axis 1 (channels). ``detect`` (on request): Bernoulli KL on the score
  fields, confidence-weighted normalized MSE on the box (``detection_loss``).

Feature matching at intermediate tensors uses the normalized MSE too. Augmentation (images only: a float input of
rank 4 with 1 or 3 channels on axis 1 or 3): ``crop`` (a random box of 80-100% of each side, resized back
bilinearly), ``zoom`` (the same with 35-100% of each side: new scales of the same scenes), ``flip`` (mirror the
width axis), ``noise`` (Gaussian, 3% of the feed's std), ``mix`` (mixup of two feeds of a minibatch,
x = l a + (1 - l) b with l ~ U(0, 1): the teacher labels the mixed image too, so the student learns the teacher's
function between the calibration points, not only at them — "function matching", Beyer et al. 2022). ``auto`` is
crop + noise: a flip changes what orientation and text models see (the PP-OCR 0/180 classifier's task *is* the
flip), so it is opt-in.

Token ids (integer inputs of rank 2 [batch, length], all of one shape: ids, attention mask, token types) are
augmented only on request: ``span`` keeps the first and last position (BERT's [CLS] / [SEP]) and a random
contiguous run of 50-100% of the interior, in every such input alike; ``swap`` replaces each interior id of the
id input (the one with the most distinct values) with probability ``SWAP_RATE`` by an id drawn from the ids the
calibration feeds use (``token_pool``). The teacher labels the changed sentence, so these are new training points
of a nearby distribution, not label noise.

Token feeds with an attention mask (an integer input named ``*mask*`` holding only 0/1) are packed for training
(``pack_tokens``): each feed is trimmed of trailing padding (mask 0 columns), the feeds are sorted by real length
and cut into packs of ``size`` consecutive ones, each padded to its own longest (ids 0, mask 0) and stacked on axis
0. A step then runs one forward of [size, L] instead of ``size`` forwards of [1, l_i] (sentences of different
lengths never stack), and sorting keeps the padding small. Padding changes nothing the mask hides: the teacher
labels the padded pack and MiniLM's embedding of a padded row equals the unpadded one to 1e-7.
"""


from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxcompress.errors import PassError
from onnxcompress.task_metrics import detection_layout
from onnxcompress.validate import class_score_outputs

TRAIN_EXTRA = "distill{mode=train} needs PyTorch: pip install onnxcompress[train]  (torch==2.13.0, CPU)"
KINDS = ("mse", "kl", "cosine", "fields", "detect")
#: a Gemm/MatMul class-score output this wide gets KL; narrower ones are as often regressions (MTCNN's 4 box and
#: 10 landmark values) and get normalized MSE on the raw values (KL's high-temperature limit for real logits)
WIDE_LOGITS = 100
AUGMENTS = ("crop", "flip", "noise", "zoom", "mix", "span", "swap")
#: token augmentation: share of the interior tokens ``swap`` replaces
SWAP_RATE = 0.15


def parse_loss(spec: str) -> tuple[str | None, dict[str, str]]:
    """``auto`` | one kind for every output | ``name:kind;name:kind`` -> (default kind or None, per output)."""
    if spec in ("", "auto"):
        return None, {}
    if spec in KINDS:
        return spec, {}
    per: dict[str, str] = {}
    for item in spec.split(";"):
        name, _, kind = item.rpartition(":")
        if not name or kind not in KINDS:
            raise ValueError(f"loss must be auto, one of {KINDS} or 'output:kind;...', got {spec!r}")
        per[name] = kind
    return None, per


def parse_augment(spec: str) -> tuple[str, ...]:
    if spec == "auto":
        return ("crop", "noise")
    if spec.lower() in ("", "none"):  # a pipeline string's ``augment=none`` arrives as "None"
        return ()
    items = tuple(s.strip() for s in spec.split("+") if s.strip())
    bad = [s for s in items if s not in AUGMENTS]
    if bad:
        raise ValueError(f"augment must be auto, none or a '+'-joined subset of {AUGMENTS}, got {spec!r}")
    return items


def loss_kinds(model: onnx.ModelProto, spec: str) -> dict[str, tuple[str, int]]:
    """Output name -> (loss kind, class axis) for every graph output."""
    default, per = parse_loss(spec)
    classes = class_score_outputs(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for o in model.graph.output:
        node = producer.get(o.name)
        axis = -1
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        rank = len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else 0
        kind = per.get(o.name) or default
        width = o.type.tensor_type.shape.dim[-1].dim_value if rank else 0
        if kind is None and o.name in classes:
            probs = node is not None and node.op_type in ("Softmax", "LogSoftmax")
            kind = "kl" if probs or width >= WIDE_LOGITS else "mse"
        if kind is None:
            kind = "cosine" if rank == 2 else "mse"
        if kind in ("fields", "detect"):
            axis = field_axis(tuple(d.dim_value for d in o.type.tensor_type.shape.dim))
        out[o.name] = (kind, axis)
    return out


def prob_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs produced by Softmax: their log is the logits the KL divides by T."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {o.name for o in model.graph.output if o.name in producer and producer[o.name].op_type == "Softmax"}


def output_loss(torch: Any, kind: str, s: Any, t: Any, axis: int, temperature: float, probs: bool) -> Any:
    if kind == "kl":
        if probs:
            zs, zt = torch.log(s.clamp_min(1e-12)), torch.log(t.clamp_min(1e-12))
        else:
            zs, zt = s, t
        ls = torch.log_softmax(zs / temperature, axis)
        lt = torch.log_softmax(zt / temperature, axis)
        kl = (lt.exp() * (lt - ls)).sum(axis)
        return kl.mean() * temperature ** 2
    if kind == "cosine":
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        return (1 - torch.nn.functional.cosine_similarity(s2, t2, dim=-1, eps=1e-8)).mean()
    if kind == "fields" and s.dim() > axis:
        return fieldwise_mse(torch, s, t, axis)
    if kind == "detect" and s.dim() > axis and s.shape[axis] > 4:
        return detection_loss(torch, s, t, axis)
    return normalized_mse(torch, s, t)


def normalized_mse(torch: Any, s: Any, t: Any) -> Any:
    return ((s - t) ** 2).mean() / (t.var(unbiased=False) + 1e-8)


def field_axis(shape: tuple[int, ...]) -> int:
    """The axis ``fields`` normalizes along: a detection layout's box/score axis, else 1 (channels)."""
    if len(shape) == 3 and all(shape[1:]):
        first = detection_layout(shape)
        if first is not None:
            return 1 if first else 2
    return 1


def fieldwise_mse(torch: Any, s: Any, t: Any, axis: int) -> Any:
    """mean over slices f along ``axis`` of mean((s_f - t_f)^2) / (var(t_f) + eps)."""
    dims = [d for d in range(s.dim()) if d != axis]
    err = ((s - t) ** 2).mean(dim=dims)
    var = t.var(dim=dims, unbiased=False)
    return (err / (var + 1e-8)).mean()


def detection_loss(torch: Any, s: Any, t: Any, axis: int) -> Any:
    """``detect``: fields 0-3 are the box, the rest scores. Scores that are probabilities (the teacher's within
    [0, 1]) get the Bernoulli KL sum KL(t || s) / sum H(t) (an error relative to the teacher's own uncertainty, so
    classes that never fire weigh nothing); the box fields the normalized MSE weighted per anchor by the teacher's
    highest score (background boxes are never drawn). Other score fields: normalized MSE."""
    s, t = s.movedim(axis, 0).flatten(1), t.movedim(axis, 0).flatten(1)
    box_s, box_t, sc_s, sc_t = s[:4], t[:4], s[4:], t[4:]
    if float(sc_t.min()) < 0.0 or float(sc_t.max()) > 1.0:
        score = fieldwise_mse(torch, sc_s, sc_t, 0)
    else:
        q, p = sc_s.clamp(1e-6, 1 - 1e-6), sc_t.clamp(1e-6, 1 - 1e-6)
        entropy = -(p * p.log() + (1 - p) * (1 - p).log())
        kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
        score = kl.sum() / entropy.sum().clamp_min(1e-12)
    weight = sc_t.clamp(0.0, 1.0).amax(dim=0) + 1e-3
    err = ((box_s - box_t) ** 2 * weight).sum(dim=1) / weight.sum()
    return score + (err / (box_t.var(dim=1, unbiased=False) + 1e-8)).mean()


def image_layout(arr: np.ndarray) -> tuple[int, int] | None:
    """(height axis, width axis) of an image-like feed, or None."""
    if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
        return None
    if arr.shape[1] in (1, 3) and min(arr.shape[2:]) >= 8:
        return 2, 3
    if arr.shape[3] in (1, 3) and min(arr.shape[1:3]) >= 8:
        return 1, 2
    return None


def augment_feed(torch: Any, feed: dict[str, np.ndarray], kinds: tuple[str, ...],
                 rng: np.random.Generator, pool: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One augmented copy of ``feed`` (image inputs; token ids only for ``span`` / ``swap``)."""
    if not kinds:
        return feed
    if "span" in kinds or "swap" in kinds:
        feed = augment_tokens(feed, kinds, rng, pool if pool is not None else np.zeros(0, np.int64))
    out = dict(feed)
    for name, arr in feed.items():
        layout = image_layout(arr)
        if layout is None:
            continue
        x = arr
        h_ax, w_ax = layout
        if "crop" in kinds or "zoom" in kinds:
            h, w = x.shape[h_ax], x.shape[w_ax]
            low = 0.35 if "zoom" in kinds else 0.8
            ch, cw = (max(4, int(round(n * rng.uniform(low, 1.0)))) for n in (h, w))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            idx: list[Any] = [slice(None)] * 4
            idx[h_ax], idx[w_ax] = slice(y0, y0 + ch), slice(x0, x0 + cw)
            crop = torch.from_numpy(np.ascontiguousarray(x[tuple(idx)], dtype=np.float32))
            if layout == (1, 2):
                crop = crop.permute(0, 3, 1, 2)
            crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            if layout == (1, 2):
                crop = crop.permute(0, 2, 3, 1)
            x = crop.contiguous().numpy()
        if "flip" in kinds and rng.random() < 0.5:
            x = np.flip(x, axis=w_ax)
        if "noise" in kinds:
            x = x + rng.normal(0.0, 0.03 * float(x.std()) + 1e-12, size=x.shape)
        out[name] = np.ascontiguousarray(x, dtype=arr.dtype)
    return out


def token_inputs(feed: dict[str, np.ndarray]) -> tuple[list[str], str | None]:
    """(integer rank-2 inputs of the most common shape, the id input among them) or ([], None)."""
    ints = [k for k, v in feed.items() if v.ndim == 2 and np.issubdtype(v.dtype, np.integer)]
    if not ints:
        return [], None
    shape = max((feed[k].shape for k in ints), key=lambda s: sum(feed[k].shape == s for k in ints))
    names = [k for k in ints if feed[k].shape == shape]
    return names, max(names, key=lambda k: (len(np.unique(feed[k])), k))


def token_pool(feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The ids the feeds' id input uses (the vocabulary ``swap`` draws from)."""
    ids = [f[token_inputs(f)[1]].ravel() for f in feeds if token_inputs(f)[1] is not None]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def augment_tokens(feed: dict[str, np.ndarray], kinds: tuple[str, ...], rng: np.random.Generator,
                   pool: np.ndarray) -> dict[str, np.ndarray]:
    names, ids = token_inputs(feed)
    length = feed[names[0]].shape[1] if names else 0
    if length < 4:
        return feed
    out = dict(feed)
    if "span" in kinds:
        inner = length - 2
        n = int(rng.integers(max(1, inner // 2), inner + 1))
        s = int(rng.integers(1, inner - n + 2))
        keep = np.concatenate([[0], np.arange(s, s + n), [length - 1]])
        out.update({k: np.ascontiguousarray(feed[k][:, keep]) for k in names})
    if "swap" in kinds and pool.size:
        x = out[ids].copy()
        hit = rng.random(x.shape) < SWAP_RATE
        hit[:, 0] = hit[:, -1] = False
        x[hit] = pool[rng.integers(0, pool.size, int(hit.sum()))].astype(x.dtype)
        out[ids] = x
    return out


def mix_feeds(feeds: list[dict[str, np.ndarray]], rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Mixup within a minibatch: feed i's image inputs become l a_i + (1 - l) a_j for a random other feed j of the
    same shapes, l ~ U(0, 1) per feed (inputs that are not images are feed i's)."""
    if len(feeds) < 2:
        return feeds
    out = []
    for i, f in enumerate(feeds):
        j = int(rng.integers(0, len(feeds) - 1))
        j += j >= i
        other, lam = feeds[j], float(rng.uniform(0.0, 1.0))
        g = dict(f)
        for name, arr in f.items():
            if image_layout(arr) is not None and name in other and other[name].shape == arr.shape:
                g[name] = (lam * arr + (1.0 - lam) * other[name]).astype(arr.dtype)
        out.append(g)
    return out


def batch_groups(feeds: list[dict[str, np.ndarray]], batchable: bool) -> list[dict[str, np.ndarray]]:
    """Feeds with equal shapes concatenated along axis 0 (when the model takes a batch), else one by one."""
    if not batchable:
        return feeds
    groups: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for f in feeds:
        groups.setdefault(tuple((k, v.shape, str(v.dtype)) for k, v in sorted(f.items())), []).append(f)
    return [{k: np.concatenate([f[k] for f in g], axis=0) for k in g[0]} for g in groups.values()]


def mask_input(feed: dict[str, np.ndarray]) -> str | None:
    """The attention-mask input of a token feed (integer rank 2, named ``*mask*``, values 0/1), or None."""
    names, _ = token_inputs(feed)
    for k in names:
        if "mask" in k.lower() and np.isin(feed[k], (0, 1)).all():
            return k
    return None


def real_length(feed: dict[str, np.ndarray], mask: str) -> int:
    """Columns up to the last one any row's mask keeps."""
    cols = np.flatnonzero(feed[mask].any(axis=0))
    return int(cols[-1]) + 1 if cols.size else 1


def pack_tokens(feeds: list[dict[str, np.ndarray]], size: int) -> tuple[list[dict[str, np.ndarray]], dict | None]:
    """Token feeds trimmed, sorted by length and stacked ``size`` at a time, padded to each pack's longest (see the
    module docstring) -> (packs, stats). Feeds that are not all token feeds with one mask input, or have different
    inputs, come back unchanged with None."""
    if size < 2 or not feeds:
        return feeds, None
    keys = sorted(feeds[0])
    mask = mask_input(feeds[0])
    if mask is None or any(sorted(f) != keys or set(token_inputs(f)[0]) != set(keys) for f in feeds):
        return feeds, None
    lengths = np.array([real_length(f, mask) for f in feeds])
    order = np.argsort(lengths, kind="stable")
    packs, real, total = [], 0, 0
    for i in range(0, len(order), size):
        group = [feeds[j] for j in order[i:i + size]]
        width = int(lengths[order[i:i + size]].max())
        pack = {}
        for k in keys:
            rows = [f[k][:, :width] for f in group]
            pack[k] = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=0)
        packs.append(pack)
        real += int(pack[mask].sum())
        total += pack[mask].size
    return packs, {"feeds": len(feeds), "packs": len(packs), "pad_fraction": round(1 - real / max(total, 1), 4),
                   "mean_length": round(float(lengths.mean()), 1)}


def require_torch() -> Any:
    """torch, or a PassError whose one line names the extra to install."""
    try:
        import torch
    except ImportError:
        raise PassError(TRAIN_EXTRA) from None
    return torch


def teacher_view(teacher: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The teacher with ``names`` exposed as extra outputs."""
    from onnxcompress.analyses.activations import expose_outputs

    return expose_outputs(teacher, names) if names else teacher
