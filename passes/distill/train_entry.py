"""Entry point of ``distill{mode=train}``: torch is imported here, inside the call, never at module import.

``train_student(graph, ctx, opts)`` reads the calibration feeds into memory (``opts.train_samples`` of them, or
``opts.samples``), builds the ``Trainer`` (``train``) over the current graph and the original model, runs end-to-end
or block-wise training and leaves the trained values written back into ``graph``. Without torch: ``PassError`` with one line naming the extra.
"""

from __future__ import annotations

from typing import Any

from onnxcompress import io
from onnxcompress.errors import PassError

from .train_losses import require_torch


def train_student(graph: Any, ctx: Any, opts: Any) -> dict:
    require_torch()
    from .blocks import train_blockwise
    from .train import Trainer

    feeds = [dict(f) for f in ctx.calibration.take(opts.train_samples or opts.samples)]
    if not feeds:
        raise PassError("distill{mode=train} needs at least one calibration feed")
    teacher = ctx.original_model()
    io.lift_constant_nodes(teacher)
    trainer = Trainer(graph, ctx, ctx.export(graph), teacher, opts)
    if opts.blockwise:
        return train_blockwise(trainer, graph, feeds)
    return trainer.run(feeds)
