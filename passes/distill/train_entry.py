"""Entry point of ``distill{mode=train}``: torch is imported here, inside the call, never at module import.

``train_student(graph, ctx, opts)`` reads the feeds into memory, builds the ``Trainer`` (``train``) over the current
graph and the original model, runs end-to-end or block-wise training and leaves the trained values written back
into ``graph``. Without torch: ``PassError`` with one line naming the extra.

Where the feeds come from:

- without ``train_data``: ``opts.train_samples`` (or ``opts.samples``) calibration feeds; every 4th is held out for
  early stopping (at most 32, ``Trainer.split``), the rest are trained on; when ``train_samples`` > ``samples``
  the held-out feeds come from after the first ``samples`` (the refit's: ``refit_aware_split``);
- with ``train_data`` (an .npz or a folder, read like ``--calib``): the user's unlabeled pool — the teacher labels
  it. Training draws from its first ``train_samples`` feeds (0: all) plus the first ``samples`` calibration feeds.
  Early stopping (``heldout``) watches, by default, up to ``MAX_HELDOUT_SOURCED`` pool feeds the training does not
  read (after the first ``train_samples``, evenly; else every 4th of them, not trained on). Not the calibration
  feeds: the refit fits every calibration feed it reads, so their loss is the refit's training loss and any move
  away from the refit raises it (measured, MiniLM-L3 30% heads+FFN, refit on all 550 calibration sentences, 20k
  stdlib sentences: the held-out loss on 128 of those sentences rose from the first evaluation, 0.02187 ->
  0.02239, the back-off halved the lr 13 times and training stopped with the refit's weights, cosine 0.979).
  ``heldout=calibration`` holds out every 4th calibration feed instead (<= ``MAX_HELDOUT_SOURCED``).

Token feeds (an attention mask input) are then packed ``batch`` at a time by length (``train_losses.pack_tokens``)
and the trainer takes one pack per step: one batched forward per step instead of one per sentence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx

from onnxcompress import io
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError, PassError

from .train_losses import pack_tokens, require_torch

MAX_HELDOUT = 32  # = train.MAX_HELDOUT (train imports torch-free modules only, but stays unimported until needed)

#: held-out calibration feeds when the training draws from ``train_data`` (the calibration feeds are not the
#: training set then, so more of them can watch the training; an evaluation of 128 packed sentences takes ~1 s)
MAX_HELDOUT_SOURCED = 128


def teacher_model(ctx: Any, path: str, outputs: list[str]) -> onnx.ModelProto:
    """The teacher: the pipeline's input, or the model file ``path`` (checked like any input model: a missing or
    corrupt file, external data outside its folder, is one clear error; so is a teacher without the student's
    ``outputs``)."""
    if not path:
        teacher = ctx.original_model()
    else:
        try:
            teacher = io.read_model(path)
        except BadInputError as exc:
            raise BadInputError(f"distill teacher: {exc}") from None
        missing = [o for o in outputs if o not in {t.name for t in teacher.graph.output}]
        if missing:
            raise BadInputError(f"distill teacher {path}: has no output {missing[0]!r} (the student's outputs: "
                                f"{', '.join(outputs)})")
    io.lift_constant_nodes(teacher)
    return teacher


def held_out(feeds: list[dict], cap: int) -> tuple[list[dict], list[dict]]:
    """Every 4th feed held out, at most ``cap`` of them evenly over the list -> (rest, held)."""
    if len(feeds) < 8:
        return feeds, feeds[: max(1, len(feeds) // 2)]
    every4 = list(range(3, len(feeds), 4))
    pick = {every4[i] for i in np.unique(np.round(np.linspace(0, len(every4) - 1, min(cap, len(every4))))
                                         .astype(int))}
    return [f for i, f in enumerate(feeds) if i not in pick], [f for i, f in enumerate(feeds) if i in pick]


def pool_split(items: list[dict], n: int, cap: int) -> tuple[list[dict], list[dict]]:
    """(the first ``n`` pool feeds to train on, up to ``cap`` pool feeds held out): the held-out ones come from
    after the first ``n`` (evenly) when there are >= 8 there, else every 4th of the first ``n`` is held out."""
    if len(items) - n >= 8:
        return items[:n], _evenly(items[n:], cap)
    return held_out(items[:n], cap)


def refit_aware_split(feeds: list[dict], fitted: int) -> tuple[list[dict], list[dict]]:
    """(train, held) for calibration feeds of which the first ``fitted`` are the refit's (``train_samples`` >
    ``samples``): up to ``MAX_HELDOUT`` held out evenly from the feeds after them, all others trained on; else
    ``held_out`` (every 4th). The refit fits its feeds, so their loss is its training loss and any move away from
    it raises them (measured, PP-OCRv4 rec at 0.55x MACs, refit on the first 256 of 1024 lines: the held-out loss of
    32 lines spread over all 1024 stayed at 0.184-0.189 while the minibatch loss on lines the training had not
    seen yet fell from ~0.20 to 0.14)."""
    if fitted <= 0 or len(feeds) - fitted < 8:
        return held_out(feeds, MAX_HELDOUT)
    held = _evenly(feeds[fitted:], MAX_HELDOUT)
    ids = {id(f) for f in held}
    return [f for f in feeds if id(f) not in ids], held


def _evenly(items: list[dict], cap: int) -> list[dict]:
    pick = np.unique(np.round(np.linspace(0, len(items) - 1, min(cap, len(items)))).astype(int))
    return [items[i] for i in pick]


def heldout_from(opts: Any) -> str:
    """Where the held-out feeds come from: ``opts.heldout``, ``auto`` = the pool when there is ``train_data``."""
    choice = getattr(opts, "heldout", "auto")
    if choice == "auto":
        return "pool" if getattr(opts, "train_data", "") else "calibration"
    return choice


def batched_input(model: Any) -> bool:
    """Every graph input's first dim is symbolic (the model takes a batch)."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def train_student(graph: Any, ctx: Any, opts: Any) -> dict:
    require_torch()
    from .blocks import train_blockwise
    from .train import Trainer

    class SourcedTrainer(Trainer):
        """A Trainer whose held-out feeds are chosen here (``held``) instead of split from the training feeds."""

        held: list[dict] | None = None

        def split(self, feeds: list[dict]) -> tuple[list[dict], list[dict]]:
            return (feeds, self.held) if self.held is not None else super().split(feeds)

    teacher = teacher_model(ctx, getattr(opts, "teacher", ""), [t.name for t in graph.outputs])
    source = getattr(opts, "train_data", "")
    if source:
        calib = [dict(f) for f in ctx.calibration.take(opts.samples)]
        try:
            pool = load_feeds(source, teacher)
        except BadInputError as exc:
            raise PassError(f"distill train_data: {exc}") from None
        n = opts.train_samples or len(pool)
        if heldout_from(opts) == "pool":
            extra, held = pool_split([dict(f) for f in pool], n, MAX_HELDOUT_SOURCED)
            train = extra + calib
        else:
            extra = [dict(f) for f in pool.take(n)]
            train, held = held_out(calib, MAX_HELDOUT_SOURCED)
            train = extra + train
    else:
        feeds = [dict(f) for f in ctx.calibration.take(opts.train_samples or opts.samples)]
        if not feeds:
            raise PassError("distill{mode=train} needs at least one calibration feed")
        train, held = refit_aware_split(feeds, opts.samples if opts.train_samples > opts.samples else 0)
    packed = None
    if getattr(opts, "pack", False) and batched_input(teacher):
        train, packed = pack_tokens(train, opts.batch)
        if packed is not None:
            held, _ = pack_tokens(held, opts.batch)
            opts = dataclasses.replace(opts, batch=1)  # one pack (``batch`` sentences) per step
    if not train or not held:
        raise PassError("distill{mode=train} needs at least one calibration feed")
    trainer = SourcedTrainer(graph, ctx, ctx.export(graph), teacher, opts)
    trainer.held = held
    stats = train_blockwise(trainer, graph, train) if opts.blockwise else trainer.run(train)
    stats["train_source"] = {"train_data": str(source) if source else None, "heldout": heldout_from(opts),
                             "train_feeds": (
        packed["feeds"] if packed else len(train)), "heldout_feeds": sum(_rows(f) for f in held)}
    if packed:
        stats["packed"] = packed
    return stats


def _rows(feed: dict) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0
