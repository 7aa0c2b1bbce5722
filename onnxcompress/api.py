"""The library entry point: ``compress(model, passes, calibration=..., validation=...)``.

``model`` is a path or a ModelProto (never modified); ``passes`` a pipeline text, a list of passes, or a TOML recipe
path ending in ``.toml``. Calibration feeds go to the passes; validation feeds (default: the calibration feeds) are
what the result's fidelity is measured on. Without either, random feeds the original model accepts are used and the
result's notes say so (and which input shapes were guessed).

Data comes in any form ``data_sources.feeds_from_any`` reads: a ``.npz``/``.npy`` path or a folder of them, a folder
of images (``preprocess=`` says how they become tensors), a ``.txt`` of sentences (``tokenizer=`` a tokenizer.json),
a dict of arrays or an ``np.load`` result (first axis = samples), a list / iterable of feed dicts, a callable
returning a fresh iterator of them, or a ``FeedSet``.

Everything a run reports comes from here, not from the CLI: the ledger, fidelity, the latency of the original and
the compressed model (measured interleaved on one validation feed), the notes, the latency profile the passes'
decisions used, and where the model and data came from. ``result.save(path)`` writes model + reports atomically.
Feeds are loaded once and the passes resolved once.

A model file's large external-data weights are memory-mapped, not loaded (``mmap_weights``): a model over 2 GB is
compressed without holding its weights twice, and its output is written with external data too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx

from onnxcompress import io, mmap_weights
from onnxcompress.context import PassContext
from onnxcompress.data import Feed, FeedSet, check_dim_names, feed_shapes, model_inputs
from onnxcompress.data_sources import feeds_from_any
from onnxcompress.image_feeds import Preprocess
from onnxcompress.latency_profile import LatencyProfile
from onnxcompress.manager import PassManager
from onnxcompress.pass_base import Pass
from onnxcompress.pipeline import load_recipe, parse_pipeline
from onnxcompress.result import CompressResult
from onnxcompress.synthetic_feeds import accepted_random_feeds

log = logging.getLogger(__name__)

FeedSource = str | Path | Mapping[str, Any] | Iterable[Feed] | Callable | FeedSet | None


def check_loads(model: onnx.ModelProto | str | Path, what: str = "input model") -> None:
    """The input must itself run in ORT (unknown ops, broken graphs): say so before any work (BadInputError).

    A path is loaded as it is (ORT maps its external data; no weight pre-packing: nothing is copied)."""
    from onnxcompress.errors import BadInputError, ValidationError
    from onnxcompress.runtime import Session

    try:
        with Session(model, optimize=False, what=what, light=not isinstance(model, onnx.ModelProto)):
            pass
    except ValidationError as exc:
        raise BadInputError(str(exc)) from None


def resolve_passes(passes: str | Path | list[Pass]) -> list[Pass]:
    """A pipeline text, a ``.toml`` recipe path, or a list of passes -> the list of passes."""
    if isinstance(passes, list):
        return passes
    text = str(passes)
    if text.endswith(".toml"):
        return load_recipe(text)
    return parse_pipeline(text)


def versions() -> dict[str, str]:
    """The versions that decide a run's result: onnxcompress and the libraries it computes with."""
    import numpy
    import onnxruntime

    from onnxcompress import __version__

    return {"onnxcompress": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe_feeds(feeds: FeedSet | None) -> dict[str, Any] | None:
    if feeds is None:
        return None
    return {"source": feeds.source, "samples": len(feeds), "synthetic": bool(feeds.synthetic)}


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
    latency: bool = False,
    latency_budget: float = 3.0,
    latency_profile: LatencyProfile | str | Path | None = None,
    progress: Callable | None = None,
    preprocess: Preprocess | str | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    task: str = "auto",
) -> CompressResult:
    """Run ``passes`` over ``model`` and measure the result against it under onnxruntime.

    ``latency=True`` also times the original and the compressed model (1 thread, interleaved, ``latency_budget``
    seconds). ``latency_profile`` (a ``LatencyProfile`` or a path to a run report / profile JSON) replays the
    latency measurements of an earlier run so the passes make the same decisions.

    ``calibration`` / ``validation``: any data form of the module docstring; ``preprocess`` (a ``Preprocess`` or
    its text, e.g. ``"resize=224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225"``) applies to image folders,
    ``tokenizer`` (a tokenizer.json path or a ``tokenizers.Tokenizer``) and ``max_length`` to sentence files.
    ``dims`` binds symbolic input dims by name, ``shapes`` gives whole input shapes; both shape made-up feeds.
    ``task``: the metric each output is scored with against the original (``onnxcompress.validate.TASKS``):
    "auto" detects it from the graph (CTC sequences, YOLO-style boxes, class scores, else embeddings), "classify"
    (top-1/top-5 agreement for every float output), "ctc", "detect", "embed", or "none". ``progress`` wraps long loops (``progress.heartbeat()`` or ``progress.terminal_bars()``).

    Raises ``BadInputError`` (unreadable model or data, a pass that needs calibration data without it),
    ``PassError`` (a pass failed; names it and the passes before), ``ValidationError`` (the result is invalid, an
    exact pipeline changed the outputs, or a fidelity metric is not a number). Nothing is written: call
    ``result.save(path)``."""
    from onnxcompress.feed_ranges import check_index_ranges
    from onnxcompress.validate import TASKS

    if task not in TASKS:
        from onnxcompress.errors import BadInputError

        raise BadInputError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = model if isinstance(model, onnx.ModelProto) else io.read_model(model, mapped=True)
    mapped = mmap_weights.has_mapped(proto)  # large external weights stay in their file (memory-mapped)
    pass_list = resolve_passes(passes)
    check_loads(source if mapped else proto)
    check_dim_names(model_inputs(proto, tensors_only=True), dims)
    calib = feeds_from_any(calibration, proto, preprocess, tokenizer, max_length)
    valid = feeds_from_any(validation, proto, preprocess, tokenizer, max_length) if validation is not None else calib
    check_index_ranges(proto, calib, valid)
    made_up_notes: list[str] = []
    if valid is None and (validate or latency):
        valid, made_up_notes = accepted_random_feeds(proto, dims, shapes, n=4, seed=seed)
        shapes = feed_shapes(valid.first())  # the passes see the shapes the model accepted, not a fresh guess
    if valid is not None and max_validation is not None:
        valid = valid.take(max_validation)
    if isinstance(latency_profile, (str, Path)):
        latency_profile = LatencyProfile.load(latency_profile)
    ctx = PassContext(calibration=calib, seed=seed, dims=dict(dims or {}), input_shapes=dict(shapes or {}),
                      progress=progress, latency=latency_profile or LatencyProfile())
    manager = PassManager(pass_list, validation=valid if validate else None, validate_each=validate_each,
                          measure=measure, progress=progress, task=task)
    result = manager.run(proto, ctx)
    result.provenance = {
        "input": str(source) if source else None,
        "input_sha256": _sha256(source) if source and source.is_file() else None,
        "versions": versions(),
        "seed": seed,
        "calibration": _describe_feeds(calib),
        "validation": _describe_feeds(valid if validate else None),
    }
    result.notes[:0] = made_up_notes
    if mapped:
        result.external_data = True  # the input kept its weights in a data file: so does the output
    if latency and valid is not None:
        from onnxcompress.latency import measure_latency

        lat = measure_latency({"original": proto, "compressed": result.model}, valid.first(), threads=1,
                              budget_s=latency_budget)
        result.latency_ms = {**lat, "threads": 1}
    return result
