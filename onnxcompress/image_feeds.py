"""Calibration feeds from a folder of images, with a stated preprocessing.

Every ``.png/.jpg/.jpeg/.bmp/.webp`` file under the folder (sub-folders too, so a
class-per-folder layout works; hidden files and folders skipped), sorted by relative path, is one feed of batch one
for the model's single image input. Each file is decoded with PIL (first frame; EXIF orientation is not applied, as
in torchvision's loader), converted to RGB, or to L when the model input has one channel, then:

1. resize (PIL, antialiased, ``interp``, default bilinear):
   ``resize=N``: the short side becomes N, the long side ``int(N * long / short)`` (aspect kept, as torchvision's
   ``Resize(N)``), then a centre crop of N x N (or of ``crop=``);
   ``resize=HxW``: exactly H x W (aspect not kept), then ``crop=`` if given;
   no ``resize=``: exactly the model input's static H x W (symbolic H/W without ``resize=`` is an error).
   Centre crop offsets are ``int(round((size - crop) / 2))`` per axis, as torchvision's ``CenterCrop``.
2. channel order: RGB, or BGR with ``bgr=true`` (channel 0 is then blue). ``mean``/``std`` are listed in the channel
   order that is fed (so B:G:R with ``bgr=true``); one value applies to every channel.
3. values: for a float input, per channel c, ``x[c] = (pixel[c] / scale - mean[c]) / std[c]``, computed in float32
   (float64 for a float64 input) and cast to the input's type; pixel is 0..255, ``scale`` defaults to 255, ``mean``
   to 0 and ``std`` to 1, so mean/std are in 0-1 units (ImageNet: ``mean=0.485:0.456:0.406,std=0.229:0.224:0.225``;
   for mean/std in pixel units give ``scale=1``). A uint8 input gets the pixels as they are (mean/std/scale refused).
4. layout: ``NCHW`` -> ``x[None].transpose(0, 3, 1, 2)``, ``NHWC`` -> ``x[None]``; when not given, taken from the
   model input (the axis, 1 or 3, whose static size is 1 or 3; NCHW when both or neither).

Preprocess grammar (``parse_preprocess``): comma-separated ``key=value``, keys
``resize=N|HxW``, ``crop=N|HxW``, ``mean=m[:m:m]``, ``std=s[:s:s]``, ``scale=F``, ``layout=NCHW|NHWC``,
``bgr=true|false``, ``dtype=float32|float16|float64|uint8`` (must agree with the model input),
``interp=nearest|bilinear|bicubic|lanczos``. An empty text takes everything from the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.data import Feed, FeedSet, InputSpec, model_inputs
from onnxcompress.errors import BadInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "scale", "layout", "bgr", "dtype", "interp")
PREPROCESS_DTYPES = ("float32", "float16", "float64", "uint8")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
DEFAULT_SCALE = 255.0


# ---------------------------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class Preprocess:
    """An image preprocessing spec; None fields come from the model (see the module docstring for the maths)."""

    resize: int | tuple[int, int] | None = None  # int: short side (then centre crop); (h, w): exact
    crop: tuple[int, int] | None = None  # (h, w) centre crop after the resize
    mean: tuple[float, ...] | None = None  # per fed channel, in pixel/scale units; None: 0
    std: tuple[float, ...] | None = None  # per fed channel; None: 1
    scale: float | None = None  # pixel divisor; None: 255
    layout: str | None = None  # "NCHW" | "NHWC"; None: from the model input
    bgr: bool = False
    dtype: str | None = None  # one of PREPROCESS_DTYPES; None: the model input's
    interp: str = "bilinear"

    def text(self) -> str:
        """The spec back as ``parse_preprocess`` text (only what was set)."""
        def size(v: int | tuple[int, int]) -> str:
            return str(v) if isinstance(v, int) else f"{v[0]}x{v[1]}"

        def floats(v: tuple[float, ...]) -> str:
            return ":".join(f"{x:g}" for x in v)

        parts = []
        if self.resize is not None:
            parts.append(f"resize={size(self.resize)}")
        if self.crop is not None:
            parts.append(f"crop={size(self.crop)}")
        if self.mean is not None:
            parts.append(f"mean={floats(self.mean)}")
        if self.std is not None:
            parts.append(f"std={floats(self.std)}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        if self.layout is not None:
            parts.append(f"layout={self.layout}")
        if self.bgr:
            parts.append("bgr=true")
        if self.dtype is not None:
            parts.append(f"dtype={self.dtype}")
        if self.interp != "bilinear":
            parts.append(f"interp={self.interp}")
        return ",".join(parts)

    def output_size(self, model_hw: tuple[int | None, int | None]) -> tuple[int, int] | None:
        """(H, W) of the preprocessed image; None when neither the spec nor the model's static dims say it."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        if self.resize is not None:
            return self.resize
        h, w = model_hw
        return (h, w) if h is not None and w is not None else None


def _bad(key: str, value: str, why: str) -> BadInputError:
    return BadInputError(f"--preprocess {key}={value!r}: {why}")


def _parse_size(key: str, value: str, allow_int: bool) -> int | tuple[int, int]:
    parts = value.lower().replace("*", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise _bad(key, value, "expected N or HxW (positive integers)") from None
    if len(nums) not in (1, 2) or min(nums) <= 0:
        raise _bad(key, value, "expected N or HxW (positive integers)")
    if len(nums) == 1:
        return nums[0] if allow_int else (nums[0], nums[0])
    return (nums[0], nums[1])


def _parse_floats(key: str, value: str, positive: bool) -> tuple[float, ...]:
    try:
        vals = tuple(float(p) for p in value.split(":"))
    except ValueError:
        raise _bad(key, value, "expected numbers separated by ':' (one per channel)") from None
    if not all(math.isfinite(v) for v in vals):
        raise _bad(key, value, "values must be finite")
    if positive and min(vals) <= 0:
        raise _bad(key, value, "values must be > 0")
    return vals


def parse_preprocess(text: str) -> Preprocess:
    """``"resize=224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NCHW,bgr=false"`` -> ``Preprocess``.

    Bad text raises ``BadInputError`` naming the key; the grammar is in the module docstring.
    """
    fields: dict[str, Any] = {}
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise BadInputError(f"--preprocess: {piece!r} is not key=value (keys: {', '.join(PREPROCESS_KEYS)})")
        if key not in PREPROCESS_KEYS:
            raise BadInputError(f"--preprocess: unknown key {key!r} (keys: {', '.join(PREPROCESS_KEYS)})")
        if key in fields:
            raise BadInputError(f"--preprocess: key {key!r} given twice")
        if key in ("resize", "crop"):
            fields[key] = _parse_size(key, value, allow_int=key == "resize")
        elif key in ("mean", "std"):
            fields[key] = _parse_floats(key, value, positive=key == "std")
        elif key == "scale":
            fields[key] = _parse_floats(key, value, positive=True)
            if len(fields[key]) != 1:
                raise _bad(key, value, "expected one number")
            fields[key] = fields[key][0]
        elif key == "layout":
            if value.upper() not in ("NCHW", "NHWC"):
                raise _bad(key, value, "expected NCHW or NHWC")
            fields[key] = value.upper()
        elif key == "bgr":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise _bad(key, value, "expected true or false")
            fields[key] = value.lower() in ("true", "1", "yes")
        elif key == "dtype":
            if value.lower() not in PREPROCESS_DTYPES:
                raise _bad(key, value, f"expected one of {', '.join(PREPROCESS_DTYPES)}")
            fields[key] = value.lower()
        else:  # interp
            if value.lower() not in INTERPOLATIONS:
                raise _bad(key, value, f"expected one of {', '.join(INTERPOLATIONS)}")
            fields[key] = value.lower()
    spec = Preprocess(**fields)
    if spec.crop is not None:
        if spec.resize is None:
            raise BadInputError("--preprocess crop= needs resize= (without it images are resized to the model's H x W)")
        rh, rw = (spec.resize, spec.resize) if isinstance(spec.resize, int) else spec.resize
        if spec.crop[0] > rh or spec.crop[1] > rw:
            raise BadInputError(f"--preprocess crop={spec.crop[0]}x{spec.crop[1]} is larger than "
                                f"resize={rh}x{rw}")
    return spec


# ---------------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImagePlan:
    """What every image becomes: a Preprocess resolved against the model's image input (``plan_images``)."""

    name: str
    layout: str
    channels: int
    size: tuple[int, int]
    dtype: np.dtype
    mean: np.ndarray | None
    std: np.ndarray | None
    scale: float


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden ones skipped), sorted by relative path."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def plan_images(inputs: list[InputSpec], spec: Preprocess, where: str) -> ImagePlan:
    """Resolve ``spec`` against the model's single image input: layout, channels, size, dtype, mean/std; checks all."""
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise BadInputError(f"{where}: an image folder feeds a model with one image input; this model has "
                            f"{len(inputs)} ({names}): give a .npz with one array per input")
    inp = inputs[0]
    shape = inp.shape
    if len(shape) != 4:
        raise BadInputError(f"{where}: model input {inp.name!r} has rank {len(shape)}; an image input is "
                            "[N, C, H, W] or [N, H, W, C]")
    layout = spec.layout
    if layout is None:
        nchw, nhwc = shape[1] in (1, 3), shape[3] in (1, 3)
        layout = "NHWC" if nhwc and not nchw else "NCHW"
        log.info("%s: model input %s %s taken as %s (set layout= to change)", where, inp.name, list(shape), layout)
    c_axis = 1 if layout == "NCHW" else 3
    channels = shape[c_axis]
    if not isinstance(channels, int):
        channels = 3
    elif channels not in (1, 3):
        raise BadInputError(f"{where}: model input {inp.name!r} {list(shape)} has {channels} channels on axis "
                            f"{c_axis} ({layout}); images give 1 (grayscale) or 3 (RGB)")
    if isinstance(shape[0], int) and shape[0] != 1:
        raise BadInputError(f"{where}: model input {inp.name!r} has a static batch of {shape[0]}; image folders "
                            "feed one image per run")
    model_hw = tuple(d if isinstance(d, int) else None for d in (shape[2:4] if layout == "NCHW" else shape[1:3]))
    size = spec.output_size(model_hw)  # type: ignore[arg-type]
    if size is None:
        raise BadInputError(f"{where}: model input {inp.name!r} {list(shape)} has no static H/W: give the image "
                            "size with --preprocess resize=N (short side, centre crop) or resize=HxW")
    for axis, (want, have) in enumerate(zip(model_hw, size, strict=True)):
        if want is not None and want != have:
            raise BadInputError(f"{where}: preprocessing gives {size[0]}x{size[1]} images, model input "
                                f"{inp.name!r} {list(shape)} expects {'HW'[axis]}={want}")
    dtype = np.dtype(inp.dtype)
    if spec.dtype is not None and np.dtype(spec.dtype) != dtype:
        raise BadInputError(f"{where}: --preprocess dtype={spec.dtype} but model input {inp.name!r} is {dtype}")
    if dtype == np.uint8:
        given = [k for k in ("mean", "std", "scale") if getattr(spec, k) is not None]
        if given:
            raise BadInputError(f"{where}: model input {inp.name!r} is uint8 (raw pixels): "
                                f"--preprocess {', '.join(given)} does not apply")
        return ImagePlan(inp.name, layout, channels, size, dtype, None, None, 1.0)
    if not np.issubdtype(dtype, np.floating):
        raise BadInputError(f"{where}: model input {inp.name!r} is {dtype}; images feed float or uint8 inputs")
    work = np.float64 if dtype == np.float64 else np.float32
    per_channel = []
    for key, default in (("mean", 0.0), ("std", 1.0)):
        vals = getattr(spec, key) or (default,)
        if len(vals) not in (1, channels):
            raise BadInputError(f"--preprocess {key}= has {len(vals)} values; the model input {inp.name!r} has "
                                f"{channels} channel(s): give 1 or {channels}")
        per_channel.append(np.broadcast_to(np.asarray(vals, work), (channels,)).copy())
    scale = spec.scale if spec.scale is not None else DEFAULT_SCALE
    return ImagePlan(inp.name, layout, channels, size, dtype, per_channel[0], per_channel[1], scale)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise BadInputError("reading an image folder needs Pillow: pip install onnxcompress[images]") from None
    return Image


def _resized(img, spec: Preprocess, size: tuple[int, int], resample: int):
    """Resize and centre crop per the spec (torchvision's Resize / CenterCrop arithmetic); ``size`` is (H, W)."""
    w, h = img.size
    if isinstance(spec.resize, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.resize, int(spec.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    elif spec.resize is not None:
        new_h, new_w = spec.resize
    else:
        new_h, new_w = size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    ch, cw = size
    if (ch, cw) != (new_h, new_w):
        top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    return img


def preprocess_image(path: Path, spec: Preprocess, plan: ImagePlan) -> np.ndarray:
    """One image file -> the model input tensor (batch axis included)."""
    Image = _pil()
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}[spec.interp]
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if plan.channels == 1 else "RGB")
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise BadInputError(f"{path}: not a decodable image ({exc})") from None
    img = _resized(img, spec, plan.size, resample)
    pixels = np.asarray(img)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.bgr and plan.channels == 3:
        pixels = pixels[:, :, ::-1]
    if plan.mean is None:
        x = pixels.astype(np.uint8)
    else:
        work = plan.mean.dtype
        x = ((pixels.astype(work) / work.type(plan.scale) - plan.mean) / plan.std).astype(plan.dtype)
    x = x[None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if plan.layout == "NCHW" else x)


def image_folder_feeds(folder: str | Path, model: onnx.ModelProto, preprocess: Preprocess | str | None = None
                       ) -> FeedSet:
    """Every image under ``folder`` (sorted) preprocessed per ``preprocess`` -> one feed each for the image input."""
    folder = Path(folder)
    spec = parse_preprocess(preprocess) if isinstance(preprocess, str) else (preprocess or Preprocess())
    if not folder.is_dir():
        raise BadInputError(f"image folder {folder}: no such folder")
    inputs = model_inputs(model)
    plan = plan_images(inputs, spec, str(folder))
    _pil()
    files = image_files(folder)
    if not files:
        raise BadInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    log.info("%s: %d images -> %s %s %dx%d (%s)", folder, len(files), plan.name, plan.layout, *plan.size,
             spec.text() or "from the model")

    def gen() -> Iterator[Feed]:
        for f in files:
            yield {plan.name: preprocess_image(f, spec, plan)}

    source = f"{folder} ({len(files)} images, preprocess {spec.text() or 'from the model'})"
    return FeedSet(gen, inputs, source, len(files))
