"""A yardstick for fidelity numbers: how far the ORIGINAL model moves under input noise no one can see.

An SQNR of 24 dB or a box F1 of 0.977 against the original means little alone: some models' outputs move that much
when their input changes by less than the rounding of an 8-bit pixel (measured, ``benchmarks.metric_floor``:
nudenet's box F1 is 0.985 and PP-OCRv4 rec's hard-line agreement 0.78 under noise of half a pixel level). For
image inputs made from 8-bit pixels the report therefore adds the original model run on its validation inputs
plus Gaussian noise of sigma = ``SIGMA_LEVELS`` pixel levels, scored against its clean outputs exactly as the
compressed model is.

Pixel level: an input made from 8-bit (or coarser) pixels ((p / 255 - mean) / std per channel, any resize done on the pixels)
has its values on a grid per channel, x = x0 + k * step, k integer. ``pixel_level`` takes each channel's smallest
gap between neighbouring distinct values as its step and accepts it only when the tensor is a float image (rank 4)
whose values of every channel lie on that grid (k within 0.01 of an integer: float32 rounding of the mapping) with
at most 256 grid points; the level is the smallest channel step. Anything else (audio, features, images resized in
float) gets no reference. (An image whose pixels are all even would read a level of two pixel steps.) The grid is
read on the image, not its padding: PP-OCR pads a line with 0, which lies between two pixel values.

The noise goes on the image only: ``content_mask`` zeroes the runs of rows / columns at the edges that are exactly
the corner value in every channel (the constant padding a pipeline adds to a text line or a letterbox); real inputs
carry exact padding, and noise there shows the model a texture it never sees (PP-OCRv4 rec then adds spaces).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: the reference noise, in pixel levels: below the rounding of the 8-bit source
SIGMA_LEVELS = 0.5
#: the largest number of grid points per channel for an 8-bit image
MAX_GRID = 256


def pixel_level(x: np.ndarray) -> float | None:
    """The pixel step of a float image input made from 8-bit pixels (module docstring), else None."""
    x = np.asarray(x)
    if x.ndim != 4 or x.dtype.kind != "f" or x.size == 0:
        return None
    steps = []
    image = content_mask(x) > 0  # the padding value need not be a pixel value (PP-OCR pads with 0 = mid-gray)
    for c in range(x.shape[1]):
        v = np.unique(x[:, c][:, image].astype(np.float64))
        if v.size < 2:
            continue
        gaps = np.diff(v)
        step = float(gaps.min())
        k = (v - v[0]) / step
        if step <= 0 or k[-1] > MAX_GRID - 1 + 0.01 or np.max(np.abs(k - np.round(k))) > 0.01:
            return None
        steps.append(step)
    return min(steps) if steps else None


def content_mask(x: np.ndarray) -> np.ndarray:
    """[H, W] float32: 1 on the image, 0 on the constant edge padding of ``x`` [N, C, H, W] (first sample)."""
    img = np.asarray(x)[0]  # [C, H, W]
    mask = np.ones(img.shape[-2:], np.float32)
    for axis, other in ((1, 2), (2, 1)):  # rows, then columns
        n = img.shape[axis]
        for first in (0, n - 1):
            edge = np.take(img, first, axis=axis)  # [C, other]
            value = edge[:, :1]
            if not np.all(edge == value):
                continue
            same = np.all(img == value[:, :, None], axis=(0, other))  # [n]: the line is the edge's value
            run = same if first == 0 else same[::-1]
            k = run.size if run.all() else int(np.argmin(run))  # lines from the edge up to the first image line
            lines = slice(0, k) if first == 0 else slice(n - k, n)
            if axis == 1:
                mask[lines, :] = 0
            else:
                mask[:, lines] = 0
    return mask


def perturbation(feed: dict[str, np.ndarray], sigma_levels: float = SIGMA_LEVELS,
                 seed: int | np.random.Generator = 0) -> Callable[[dict], dict] | None:
    """A function adding sigma_levels pixel levels of Gaussian noise to the 8-bit image inputs of a feed (on the
    image, not its padding; a fixed seed: the same noise sequence every run; a Generator: drawn from it), or None
    when ``feed`` has no such input."""
    levels = {k: lv for k, v in feed.items() if (lv := pixel_level(v)) is not None}
    if not levels:
        return None
    rng = np.random.default_rng(seed)

    def add_noise(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(f)
        for k, level in levels.items():
            if k in f:
                x = np.asarray(f[k])
                noise = rng.normal(0.0, sigma_levels * level, x.shape) * content_mask(x)
                out[k] = (x + noise).astype(x.dtype)
        return out

    add_noise.levels = levels  # type: ignore[attr-defined]
    add_noise.sigma_levels = sigma_levels  # type: ignore[attr-defined]
    return add_noise
