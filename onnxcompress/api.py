"""The library entry point: ``compress(model, passes, calibration=..., validation=...)``.

``model`` is a path or a ModelProto (never modified); ``passes`` a pipeline text, a list of passes, or a TOML recipe
path ending in ``.toml``. Calibration feeds go to the passes; validation feeds (default: the calibration feeds) are
what the result's fidelity is measured on. Without either, random feeds are used with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import onnx

from onnxcompress import io
from onnxcompress.context import PassContext
from onnxcompress.data import Feed, FeedSet, load_feeds, random_feeds
from onnxcompress.manager import CompressResult, PassManager
from onnxcompress.pass_base import Pass
from onnxcompress.pipeline import load_recipe, parse_pipeline

FeedSource = str | Path | Iterable[Feed] | FeedSet | None


def _check_loads(model: onnx.ModelProto) -> None:
    """The input must itself run in ORT (unknown ops, broken graphs): say so before any pass runs."""
    from onnxcompress.errors import BadInputError, ValidationError
    from onnxcompress.runtime import Session

    try:
        with Session(model, optimize=False, what="input model"):
            pass
    except ValidationError as exc:
        raise BadInputError(str(exc)) from None


def resolve_passes(passes: str | Path | list[Pass]) -> list[Pass]:
    if isinstance(passes, list):
        return passes
    text = str(passes)
    if text.endswith(".toml"):
        return load_recipe(text)
    return parse_pipeline(text)


def compress(
    model: onnx.ModelProto | str | Path,
    passes: str | Path | list[Pass],
    calibration: FeedSource = None,
    validation: FeedSource = None,
    *,
    dims: dict[str, int] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    validate: bool = True,
    validate_each: bool = False,
    measure: bool = True,
    max_validation: int | None = None,
    progress: Callable | None = None,
) -> CompressResult:
    proto = model if isinstance(model, onnx.ModelProto) else io.read_model(model)
    pass_list = resolve_passes(passes)
    _check_loads(proto)
    calib = load_feeds(calibration, proto)
    valid = load_feeds(validation, proto) if validation is not None else calib
    if valid is None and validate:
        valid = random_feeds(proto, dims, n=4, seed=seed, shapes=shapes)
    if valid is not None and max_validation is not None:
        valid = valid.take(max_validation)
    ctx = PassContext(calibration=calib, seed=seed, dims=dict(dims or {}), input_shapes=dict(shapes or {}),
                      progress=progress)
    manager = PassManager(pass_list, validation=valid if validate else None, validate_each=validate_each,
                          measure=measure, progress=progress)
    return manager.run(proto, ctx)
