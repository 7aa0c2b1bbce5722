"""Calibration data as users have it: image folders, sentence files, arrays in memory.

Every function returns a ``data.FeedSet`` built like ``data.load_feeds`` builds one: a lazy factory that produces one
feed at a time, checked against the model's inputs, with a ``source`` string saying where the feeds came from.

**Images** (``image_feeds.image_folder_feeds``): see that module for the preprocessing rules.

**Sentences** (``text_feeds``). One sentence per non-empty line of a UTF-8 file, tokenized with a HuggingFace
``tokenizer.json`` (``tokenizers`` package, special tokens added, truncated at ``max_length``, never padded), fed as
``[1, seq]`` with seq the sentence's own token count. Model inputs are mapped by name: ``input_ids`` <- token ids,
``attention_mask``/``input_mask`` <- ones, ``token_type_ids``/``segment_ids`` <- type ids, ``position_ids`` <- 0..seq-1
(a ``:0`` suffix of TF exports ignored), in the model input's dtype. A static seq dim S pads (pad id, mask 0) and
truncates to S.

**Arrays in memory** (``feeds_from_any``). A dict ``name -> array`` (or an ``np.load`` result) follows the ``.npz``
rule: the first axis is samples; an array with one more dimension than the model input is fed as ``x[i]``, one of
the same rank as ``x[i:i+1]`` (a batch of one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.data import Feed, FeedSet, load_feeds, model_inputs
from onnxcompress.errors import BadInputError
from onnxcompress.image_feeds import IMAGE_SUFFIXES, Preprocess, image_files, image_folder_feeds

log = logging.getLogger(__name__)


#: model input name (lower case, ``:0`` stripped) -> which part of a tokenizer encoding it takes
TEXT_INPUT_FIELDS = {
    "input_ids": "ids", "attention_mask": "mask", "input_mask": "mask",
    "token_type_ids": "type_ids", "segment_ids": "type_ids", "position_ids": "positions",
}


# ---------------------------------------------------------------------------------------------------- text
def _load_tokenizer(tokenizer: Any):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise BadInputError("reading sentences needs the tokenizers package: pip install onnxcompress[text]") from None
    if isinstance(tokenizer, Tokenizer):
        return Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation/padding are set below
    path = Path(tokenizer)
    if not path.is_file():
        raise BadInputError(f"tokenizer {path}: no such file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a plain Exception
        raise BadInputError(f"tokenizer {path}: not a readable tokenizer.json ({exc})") from None


def _pad_id(tok) -> int:
    if tok.padding and tok.padding.get("pad_id") is not None:
        return int(tok.padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<PAD>"):
        if (tid := tok.token_to_id(token)) is not None:
            return int(tid)
    return 0


def text_feeds(path_txt: str | Path, model: onnx.ModelProto, tokenizer_json: Any, max_length: int = 128) -> FeedSet:
    """One feed per non-empty line of ``path_txt``, tokenized with ``tokenizer_json`` (path or ``Tokenizer``)."""
    path = Path(path_txt)
    if max_length <= 0:
        raise BadInputError(f"max_length must be > 0 (got {max_length})")
    inputs = model_inputs(model)
    fields: dict[str, str] = {}
    for spec in inputs:
        key = spec.name.lower().removesuffix(":0")
        if key not in TEXT_INPUT_FIELDS:
            raise BadInputError(
                f"{path}: model input {spec.name!r} cannot be fed from sentences (model inputs: "
                f"{', '.join(s.name for s in inputs)}; mapped by name: {', '.join(TEXT_INPUT_FIELDS)})")
        if len(spec.shape) != 2:
            raise BadInputError(f"{path}: model input {spec.name!r} has rank {len(spec.shape)}; sentences feed "
                                "[batch, seq] inputs")
        if isinstance(spec.shape[0], int) and spec.shape[0] != 1:
            raise BadInputError(f"{path}: model input {spec.name!r} has a static batch of {spec.shape[0]}; "
                                "sentences are fed one per run")
        integer = np.issubdtype(spec.dtype, np.integer)
        if not integer and not (TEXT_INPUT_FIELDS[key] == "mask" and np.issubdtype(spec.dtype, np.floating)):
            raise BadInputError(f"{path}: model input {spec.name!r} is {spec.dtype}; token inputs are integers")
        fields[spec.name] = TEXT_INPUT_FIELDS[key]
    if "ids" not in fields.values():
        raise BadInputError(f"{path}: the model has no input_ids input (model inputs: "
                            f"{', '.join(s.name for s in inputs)})")
    static = {s.shape[1] for s in inputs if isinstance(s.shape[1], int)}
    if len(static) > 1:
        raise BadInputError(f"{path}: model inputs disagree on the sequence length {sorted(static)}")
    pad_to = static.pop() if static else None
    tok = _load_tokenizer(tokenizer_json)
    tok.no_padding()
    tok.enable_truncation(max_length=pad_to or max_length)
    if pad_to is not None and "mask" not in fields.values():
        log.warning("%s: the model's sequence length is fixed at %d and it has no attention mask: padded "
                    "sentences are fed as they are", path, pad_to)
    pad_id = _pad_id(tok)
    if not path.is_file():
        raise BadInputError(f"sentences {path}: no such file")
    try:
        n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text ({exc})") from None
    if n_lines == 0:
        raise BadInputError(f"{path}: contains no sentences (one per non-empty line)")

    def feed_of(enc, where: str) -> Feed:
        seq = len(enc.ids)
        if seq == 0:
            raise BadInputError(f"{where}: tokenizes to no tokens")
        parts = {"ids": np.asarray(enc.ids), "mask": np.asarray(enc.attention_mask),
                 "type_ids": np.asarray(enc.type_ids), "positions": np.arange(seq)}
        if pad_to is not None and seq < pad_to:
            fill = {"ids": pad_id, "mask": 0, "type_ids": 0}
            parts = {k: np.concatenate([v, np.full(pad_to - seq, fill[k], v.dtype)]) if k in fill else v
                     for k, v in parts.items()}
            parts["positions"] = np.arange(pad_to)
        dtypes = {s.name: s.dtype for s in inputs}
        return {name: parts[field][None].astype(dtypes[name]) for name, field in fields.items()}

    def gen() -> Iterator[Feed]:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield feed_of(tok.encode(line.strip()), f"{path} line {number}")

    log.info("%s: %d sentences -> %s (max_length %d)", path, n_lines, ", ".join(fields), pad_to or max_length)
    return FeedSet(gen, inputs, f"{path} ({n_lines} sentences)", n_lines)


# ---------------------------------------------------------------------------------------------------- dispatch
def array_feeds(arrays: Mapping[str, Any], model: onnx.ModelProto, source: str = "calibration arrays") -> FeedSet:
    """``name -> array`` with a leading samples axis, fed by the ``.npz`` rule (see the module docstring)."""
    inputs = model_inputs(model)
    names = list(arrays)
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise BadInputError(f"{source}: no array for model input {missing[0]!r} (has: {', '.join(names) or 'nothing'})")
    held = {s.name: np.asarray(arrays[s.name]) for s in inputs}
    counts = {k: a.shape[0] if a.ndim else 0 for k, a in held.items()}
    if len(set(counts.values())) > 1:
        raise BadInputError(f"{source}: arrays have different sample counts {counts}")
    n = min(counts.values()) if counts else 0
    if n == 0:
        raise BadInputError(f"{source}: contains no samples")
    extra = [k for k in names if k not in held]
    if extra:
        log.info("%s: ignoring arrays that are not model inputs: %s", source, ", ".join(extra))
    per_sample = {s.name: held[s.name].ndim == len(s.shape) + 1 for s in inputs}

    def gen() -> Iterator[Feed]:
        for i in range(n):
            yield {k: (a[i] if per_sample[k] else a[i : i + 1]) for k, a in held.items()}

    return FeedSet(gen, inputs, source, n)


def _folder_kind(folder: Path) -> str:
    if any(folder.glob("*.npz")) or any(folder.glob("*.npy")):
        return "arrays"
    return "images" if image_files(folder) else "none"


def feeds_from_any(source: Any, model: onnx.ModelProto, preprocess: Preprocess | str | None = None,
                   tokenizer: Any = None, max_length: int = 128) -> FeedSet | None:
    """Any form calibration data comes in -> a FeedSet for ``model`` (None stays None).

    A path: ``.npz`` / ``.npy`` / folder of ``.npz``/``.npy`` (``data.load_feeds``), folder of images
    (``image_folder_feeds``, with ``preprocess`` or the model's static H/W), ``.txt`` of sentences (``text_feeds``,
    needs ``tokenizer``). In memory: a dict of arrays or an ``np.load`` result (the ``.npz`` rule), a list or
    iterable of feed dicts, a callable returning a fresh iterator of them, or a FeedSet.
    """
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise BadInputError(f"calibration data {path}: no such file or folder")
        kind = _folder_kind(path) if path.is_dir() else ("text" if path.suffix.lower() == ".txt" else "arrays")
        if preprocess is not None and kind != "images":
            log.warning("%s is not an image folder: --preprocess is not used for it", path)
        if tokenizer is not None and kind != "text":
            log.warning("%s is not a .txt of sentences: --tokenizer is not used for it", path)
        if kind == "images":
            return image_folder_feeds(path, model, preprocess)
        if kind == "text":
            if tokenizer is None:
                raise BadInputError(f"{path}: sentences need a tokenizer (--tokenizer tokenizer.json)")
            return text_feeds(path, model, tokenizer, max_length)
        if kind == "none":
            raise BadInputError(f"{path}: folder has no .npz, .npy or image ({', '.join(IMAGE_SUFFIXES)}) files")
        if path.is_file() and path.suffix.lower() not in (".npz", ".npy"):
            raise BadInputError(f"calibration data {path}: expected a .npz or .npy file, a .txt of sentences, or a "
                                "folder of .npz/.npy/image files")
        return load_feeds(path, model)
    if isinstance(source, np.lib.npyio.NpzFile):
        if source.zip is None:
            raise BadInputError("calibration data: the np.load result is closed (pass the path, or use it inside "
                                "its with block)")
        filename = getattr(source.zip, "filename", None)
        if isinstance(filename, str) and Path(filename).is_file():
            return load_feeds(Path(filename), model)  # re-opened lazily, like a path
        return array_feeds({k: source[k] for k in source.files}, model, "np.load result")
    if isinstance(source, Mapping):
        return array_feeds(source, model)
    if isinstance(source, FeedSet) or callable(source) or (isinstance(source, Iterable)
                                                           and not isinstance(source, (bytes, np.ndarray))):
        return load_feeds(source, model)
    raise BadInputError(f"calibration data: cannot read a {type(source).__name__} (give a path, a dict of "
                        "arrays, an iterable of feed dicts or a FeedSet)")
