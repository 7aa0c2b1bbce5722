"""Entry point of ``distill{mode=train}``: torch is imported here, inside the call, never at module import.

``train_student(graph, ctx, opts)`` reads the feeds into memory, builds the ``Trainer`` (``train``) over the current
graph and the original model, runs end-to-end or block-wise training and leaves the trained values written back
into ``graph``. Without torch: ``PassError`` with one line naming the extra.

Where the feeds come from:

- without ``train_data``: ``opts.train_samples`` (or ``opts.samples``) calibration feeds; every 4th is held out for
  early stopping (at most 32, ``Trainer.split``), the rest are trained on;
- with ``train_data`` (an .npz or a folder, read like ``--calib``): the user's unlabeled pool — the teacher labels
  it. Training draws from its first ``train_samples`` feeds (0: all) plus the calibration feeds that are not held
  out; the held-out feeds are calibration feeds only (every 4th of the first ``samples``, at most
  ``MAX_HELDOUT_SOURCED`` evenly), so early stopping watches the data the model is meant for, not the pool.

Token feeds (an attention mask input) are then packed ``batch`` at a time by length (``train_losses.pack_tokens``)
and the trainer takes one pack per step: one batched forward per step instead of one per sentence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxcompress import io
from onnxcompress.data import load_feeds
from onnxcompress.errors import BadInputError, PassError

from .train_losses import pack_tokens, require_torch

MAX_HELDOUT = 32  # = train.MAX_HELDOUT (train imports torch-free modules only, but stays unimported until needed)

#: held-out calibration feeds when the training draws from ``train_data`` (the calibration feeds are not the
#: training set then, so more of them can watch the training; an evaluation of 128 packed sentences takes ~1 s)
MAX_HELDOUT_SOURCED = 128


def held_out(feeds: list[dict], cap: int) -> tuple[list[dict], list[dict]]:
    """Every 4th feed held out, at most ``cap`` of them evenly over the list -> (rest, held)."""
    import numpy as np

    if len(feeds) < 8:
        return feeds, feeds[: max(1, len(feeds) // 2)]
    every4 = list(range(3, len(feeds), 4))
    pick = {every4[i] for i in np.unique(np.round(np.linspace(0, len(every4) - 1, min(cap, len(every4))))
                                         .astype(int))}
    return [f for i, f in enumerate(feeds) if i not in pick], [f for i, f in enumerate(feeds) if i in pick]


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

    teacher = ctx.original_model()
    io.lift_constant_nodes(teacher)
    source = getattr(opts, "train_data", "")
    if source:
        calib = [dict(f) for f in ctx.calibration.take(opts.samples)]
        try:
            pool = load_feeds(source, teacher)
        except BadInputError as exc:
            raise PassError(f"distill train_data: {exc}") from None
        extra = [dict(f) for f in (pool.take(opts.train_samples) if opts.train_samples else pool)]
        train, held = held_out(calib, MAX_HELDOUT_SOURCED)
        train = extra + train
    else:
        feeds = [dict(f) for f in ctx.calibration.take(opts.train_samples or opts.samples)]
        if not feeds:
            raise PassError("distill{mode=train} needs at least one calibration feed")
        train, held = held_out(feeds, MAX_HELDOUT)  # what ``Trainer.split`` does
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
    stats["train_source"] = {"train_data": str(source) if source else None, "train_feeds": (
        packed["feeds"] if packed else len(train)), "heldout_feeds": sum(_rows(f) for f in held)}
    if packed:
        stats["packed"] = packed
    return stats


def _rows(feed: dict) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0
