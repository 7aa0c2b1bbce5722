"""Calibration and validation feeds.

A *feed* is ``dict[input_name, np.ndarray]``: one ``InferenceSession.run`` call. A ``FeedSet`` is a re-iterable,
lazily loaded sequence of feeds, checked against the model's inputs:

- ``.npz`` file: arrays named like the model inputs, first axis = samples. If an array has one more dimension than
  the model input, each sample is fed as ``x[i]``; if it has the same rank, the sample is fed as ``x[i:i+1]``
  (a batch of one).
- folder: every ``.npz`` in it is one feed (arrays named like the inputs, full input shapes); for a single-input
  model, every ``.npy`` is one feed.
- any Python iterable of dicts (re-iterable: a list, or a callable returning a fresh iterator).

Symbolic input dims are bound by the data; ``dims`` (``--dim name=value``) bind them for random feeds. Random feeds
are the last resort and always log a warning: fidelity measured on noise says little about real inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxcompress.errors import BadInputError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: size used for an unbound symbolic dim that is not the first (batch) axis
DEFAULT_FREE_DIM = 32


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, NumPy dtype and shape (int static, str symbolic, None unknown)."""
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # int: static; str: symbolic name; None: unknown


def model_inputs(model: onnx.ModelProto, tensors_only: bool = False) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers).

    Sequence/optional/map inputs cannot be fed from arrays: an error, or skipped with ``tensors_only``.
    """
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            if tensors_only:
                continue
            raise BadInputError(f"input {vi.name!r} is not a tensor (sequence/map inputs are not supported)")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs


def count_nonfinite(a: np.ndarray) -> int:
    """How many elements of ``a`` are NaN or +-inf."""
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def check_feed(feed: Feed, inputs: list[InputSpec], where: str = "feed") -> Feed:
    """Check names, dtypes, static dims and that every axis named by the same symbolic dim has one size in the feed
    (ONNX: a dim_param denotes one value throughout the graph; ``input_ids`` [batch, seq] with 8 tokens beside an
    ``attention_mask`` of 16 is data the original model cannot run on); cast float64->float32 style widenings.
    Returns the checked feed."""
    out: Feed = {}
    bound: dict[str, tuple[int, str, int]] = {}  # symbolic dim -> (size, input, axis) of its first binding
    for spec in inputs:
        if spec.name not in feed:
            have = ", ".join(sorted(feed)) or "nothing"
            raise BadInputError(f"{where}: no array for model input {spec.name!r} (has: {have})")
        arr = np.asarray(feed[spec.name])
        if arr.dtype != spec.dtype:
            if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                arr = arr.astype(spec.dtype)
            else:
                raise BadInputError(
                    f"{where}: input {spec.name!r} has dtype {arr.dtype}, the model expects {spec.dtype}"
                )
        if spec.shape and arr.ndim != len(spec.shape):
            raise BadInputError(
                f"{where}: input {spec.name!r} has shape {list(arr.shape)}, the model expects rank {len(spec.shape)} "
                f"{_fmt_shape(spec.shape)}"
            )
        for axis, (have_dim, want) in enumerate(zip(arr.shape, spec.shape, strict=False)):
            if isinstance(want, int) and have_dim != want:
                raise BadInputError(
                    f"{where}: input {spec.name!r} has shape {list(arr.shape)}, the model expects "
                    f"{_fmt_shape(spec.shape)} (axis {axis})"
                )
        for axis, (have_dim, want) in enumerate(zip(arr.shape, spec.shape, strict=False)):
            if not isinstance(want, str) or not any(c.isalpha() for c in want):
                continue  # "?" / "-1" (Paddle, some converters): a placeholder for "unknown", not a name
            size, first, first_axis = bound.setdefault(want, (int(have_dim), spec.name, axis))
            if size != have_dim:
                raise BadInputError(
                    f"{where}: input {spec.name!r} has {want}={have_dim} (axis {axis}), input {first!r} has "
                    f"{want}={size} (axis {first_axis}): axes named by one symbolic dim must have one size"
                )
        if arr.ndim and 0 in arr.shape:
            raise BadInputError(f"{where}: input {spec.name!r} has a zero-size axis {list(arr.shape)}: a sample "
                                "must hold data")
        if np.issubdtype(arr.dtype, np.floating) and arr.size:
            bad = count_nonfinite(arr)
            if bad:
                raise BadInputError(f"{where}: input {spec.name!r} holds {bad} non-finite value(s) (NaN/inf) of "
                                    f"{arr.size}: calibration and validation data must be finite")
        out[spec.name] = arr
    return out


def _fmt_shape(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class FeedSet:
    """A re-iterable, lazily produced sequence of checked feeds."""

    def __init__(self, factory: Callable[[], Iterator[Feed]], inputs: list[InputSpec], source: str,
                 length: int | None = None, synthetic: bool = False):
        self._factory = factory
        self.inputs = inputs
        self.source = source
        self._length = length
        self.synthetic = synthetic

    def __iter__(self) -> Iterator[Feed]:
        for i, feed in enumerate(self._factory()):
            yield check_feed(feed, self.inputs, where=f"{self.source} sample {i}")

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self._factory())
        return self._length

    def take(self, n: int) -> FeedSet:
        """The first n feeds as a new FeedSet."""
        factory = self._factory

        def gen() -> Iterator[Feed]:
            for i, feed in enumerate(factory()):
                if i >= n:
                    return
                yield feed

        return FeedSet(gen, self.inputs, self.source, min(n, len(self)), self.synthetic)

    def first(self) -> Feed:
        for feed in self:
            return feed
        raise BadInputError(f"{self.source}: contains no samples")


# ---------------------------------------------------------------------------------------------------- sources
def _npz_feeds(path: Path, inputs: list[InputSpec]) -> FeedSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            shapes = {k: z[k].shape for k in names}
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [s.name for s in inputs if s.name not in names]
    if missing:
        raise BadInputError(
            f"{path}: no array for model input {missing[0]!r} (the file has: {', '.join(names) or 'nothing'})"
        )
    counts = {s.name: shapes[s.name][0] if shapes[s.name] else 0 for s in inputs}
    n = min(counts.values()) if counts else 0
    if len(set(counts.values())) > 1:
        raise BadInputError(f"{path}: arrays have different sample counts {counts}")
    if n == 0:
        raise BadInputError(f"{path}: contains no samples")
    extra = [k for k in names if k not in {s.name for s in inputs}]
    if extra:
        log.info("%s: ignoring arrays that are not model inputs: %s", path, ", ".join(extra))
    per_sample = {s.name: (len(shapes[s.name]) == len(s.shape) + 1) for s in inputs}

    def gen() -> Iterator[Feed]:
        with np.load(path, allow_pickle=False) as z:
            arrays = {s.name: z[s.name] for s in inputs}
        for i in range(n):
            yield {k: (a[i] if per_sample[k] else a[i : i + 1]) for k, a in arrays.items()}

    return FeedSet(gen, inputs, str(path), n)


def _np_load(f: Path, what: str = "calibration data"):
    """``np.load`` without pickles; a file numpy cannot read (garbage, a pickled object array) is bad input."""
    try:
        return np.load(f, allow_pickle=False)
    except Exception as exc:  # ValueError (pickled objects), OSError / BadZipFile / EOFError (garbage)
        raise BadInputError(f"{what} {f}: not a readable .npz/.npy file without pickles "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _npz_items(f: Path) -> Feed:
    z = _np_load(f)
    try:
        return {k: z[k] for k in z.files}
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"calibration data {f}: an array cannot be read without pickles "
                            f"({type(exc).__name__})") from None
    finally:
        z.close()


def _folder_feeds(path: Path, inputs: list[InputSpec]) -> FeedSet:
    npz = sorted(path.glob("*.npz"))
    npy = sorted(path.glob("*.npy"))
    if npz:
        files = npz

        def gen() -> Iterator[Feed]:
            for f in files:
                yield _npz_items(f)

        return FeedSet(gen, inputs, str(path), len(files))
    if npy:
        if len(inputs) != 1:
            raise BadInputError(f"{path}: .npy files only work for single-input models; use .npz named by input")
        name = inputs[0].name

        def gen_npy() -> Iterator[Feed]:
            for f in npy:
                yield {name: _np_load(f)}

        return FeedSet(gen_npy, inputs, str(path), len(npy))
    raise BadInputError(f"{path}: folder has no .npz or .npy files")


def load_feeds(source: str | Path | Iterable[Feed] | FeedSet | None, model: onnx.ModelProto) -> FeedSet | None:
    """Build a FeedSet for ``model`` from a path (.npz / folder) or an iterable of dicts. None stays None."""
    if source is None:
        return None
    inputs = model_inputs(model)
    if isinstance(source, FeedSet):
        return FeedSet(source._factory, inputs, source.source, source._length, source.synthetic)
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise BadInputError(f"calibration data {p}: no such file or folder")
        if p.is_dir():
            return _folder_feeds(p, inputs)
        if p.suffix == ".npz":
            return _npz_feeds(p, inputs)
        if p.suffix == ".npy" and len(inputs) == 1:
            arr = _np_load(p)
            return load_feeds([{inputs[0].name: a[None] if arr.ndim == len(inputs[0].shape) else a} for a in arr], model)
        raise BadInputError(f"calibration data {p}: expected a .npz file or a folder of .npz/.npy files")
    if callable(source):
        return FeedSet(source, inputs, "calibration iterable")
    items = source if isinstance(source, (list, tuple)) else list(source)
    return FeedSet(lambda: iter(items), inputs, "calibration data", len(items))


def check_dim_names(inputs: list[InputSpec], dims: dict[str, int] | None) -> None:
    """A ``--dim`` name that no input's shape uses is a typo, not a no-op: one clear error naming the real ones."""
    symbolic = {d for spec in inputs for d in spec.shape if isinstance(d, str) and d}
    unknown = sorted(set(dims or {}) - symbolic)
    if unknown:
        raise BadInputError(f"--dim names no symbolic input dim: {', '.join(unknown)} (the model's symbolic dims: "
                            f"{', '.join(sorted(symbolic)) or 'none'})")


def bind_dims(inputs: list[InputSpec], dims: dict[str, int],
              shapes: dict[str, tuple[int, ...]] | None = None, *, free_dim: int | dict[str, int] = DEFAULT_FREE_DIM,
              guesses: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes.

    An explicit shape per input (``--shape x=1x3x48x192``) wins; else static dims stay, symbolic dims come from
    ``dims`` by name (``--dim batch=1``), and what is still unknown becomes 1 on the first axis (batch) and
    ``DEFAULT_FREE_DIM`` elsewhere, with a log line saying so.
    """
    explicit = shapes or {}
    known = {spec.name for spec in inputs}
    unknown = sorted(set(explicit) - known)
    if unknown:
        raise BadInputError(f"--shape names no model input: {', '.join(unknown)} (the inputs: "
                            f"{', '.join(sorted(known)) or 'none'})")
    out = {}
    for spec in inputs:
        if spec.name in explicit:
            given = tuple(int(d) for d in explicit[spec.name])
            if len(given) != len(spec.shape) or any(
                isinstance(d, int) and d != g for d, g in zip(spec.shape, given, strict=True)
            ):
                raise BadInputError(f"--shape {spec.name}={list(given)} does not fit the model input "
                                    f"{_fmt_shape(spec.shape)}")
            out[spec.name] = given
            continue
        shape = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            else:
                free = free_dim.get(spec.name, DEFAULT_FREE_DIM) if isinstance(free_dim, dict) else free_dim
                guess = 1 if axis == 0 else free
                if guesses is not None:
                    guesses.append(f"{spec.name} axis {axis} ({d or '?'}) = {guess}")
                log.info("input %s axis %d (%s) is not bound: using %d (set --dim or --shape)", spec.name, axis,
                         d or "?", guess)
                shape.append(guess)
        out[spec.name] = tuple(shape)
    return out


def random_feeds(model: onnx.ModelProto, dims: dict[str, int] | None = None, n: int = 8, seed: int = 0,
                 shapes: dict[str, tuple[int, ...]] | None = None, *, free_dim: int | dict[str, int] = DEFAULT_FREE_DIM,
                 int_values: dict[str, int] | None = None, guesses: list[str] | None = None,
                 quiet: bool = False) -> FeedSet:
    """Standard-normal floats / small non-negative ints (``int_values`` pins an integer input to one value).
    Logs a warning: use real data when you have it."""
    inputs = model_inputs(model)
    shapes = bind_dims(inputs, dims or {}, shapes, free_dim=free_dim, guesses=guesses)
    pinned = int_values or {}
    if not quiet:
        log.warning(
            "no calibration/validation data given: using %d random feeds; fidelity numbers on random inputs say "
            "little about real inputs", n
        )

    def gen() -> Iterator[Feed]:
        rng = np.random.default_rng(seed)
        for _ in range(n):
            feed = {}
            for spec in inputs:
                shape = shapes[spec.name]
                if np.issubdtype(spec.dtype, np.floating):
                    feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype == np.bool_:
                    feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
                elif spec.name in pinned:
                    feed[spec.name] = np.full(shape, pinned[spec.name], dtype=spec.dtype)
                else:
                    feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
            yield feed

    return FeedSet(gen, inputs, "random feeds", n, synthetic=True)


def feed_shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    """The shape of every array of one feed."""
    return {k: tuple(v.shape) for k, v in feed.items()}
