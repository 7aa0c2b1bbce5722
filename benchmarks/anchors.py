"""Methods that turn an FP32 model into a candidate model: the tools users pick today (the anchors) and ours.

A *method* is a callable ``(fp32_path, calib_feeds, out_path) -> MethodResult``. ``METHODS`` maps a method name to
its callable, so adding a method (e.g. ``"ours_int8": _ours("cleanup,quantize{mode=static}")``) is one line. Any
``"ours:<pipeline text>"`` name is also understood (``resolve_method``), which lets a run try a pipeline without
editing this file.

Failures are results, not hidden: ``run_method`` turns any exception into ``MethodResult(error=...)`` with the
exception type and the first line of its message. Workarounds the harness applied are recorded in ``notes``
(e.g. the opset upgrade that per-channel QDQ needs, or ``quant_pre_process`` failing and the retry without it).

Anchors (all onnxruntime.quantization settings as in ../shared/anchors.md):

- ``ort_static_{minmax,percentile,entropy}``: ``quantize_static``, QDQ format, per-channel weights, QUInt8 activations,
  QInt8 weights, ``n_calib`` (64) calibration feeds through a ``CalibrationDataReader``, after ``quant_pre_process``
  (on failure: recorded, retried with ``skip_symbolic_shape=True``, then without it). Per-channel QDQ needs
  opset >= 13: an older model is first upgraded with ``onnx.version_converter`` (recorded).
- ``ort_dynamic``: ``quantize_dynamic`` with QInt8 weights, after the same pre-processing.
- ``onnxslim``: ``onnxslim.slim`` with its defaults.
- ``ours_*``: ``onnxcompress.api.compress(path, pipeline, calibration=feeds, validate=False, measure=False)``.
  ``MATCHED_METHODS`` (``ours_int8_{minmax,percentile,entropy}``, not in the default run): the same range rule as
  each ORT anchor with our float-layer search off, for ``benchmarks.calib_time``.

Run as a worker (what ``benchmarks.run`` does, one subprocess per method, so a crash or an out-of-memory kill stays a
row in the table and the tool's peak memory is its own)::

    python -m benchmarks.anchors --method NAME --model FP32.onnx --calib calib.npz --out cand.onnx --result res.json

The worker writes ``res.json``: the MethodResult plus ``seconds`` (the tool call's wall time), ``peak_rss_mb``
(the process's RSS high-water mark while the tool ran) and ``base_rss_mb`` (its RSS just before: interpreter,
onnx/onnxruntime and the feeds; the high-water mark is reset there, see ``benchmarks.measure.reset_peak_rss``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.feeds_file import load_feeds, save_feeds  # noqa: F401  (the worker's feed files)

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: per-channel QDQ (axis attribute on QuantizeLinear/DequantizeLinear) exists from this opset on
PER_CHANNEL_MIN_OPSET = 13


@dataclass
class MethodResult:
    method: str
    path: str | None = None  # the candidate model (None on error)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    info: dict = field(
        default_factory=dict
    )  # method-specific facts (opset upgrade, pre-processing outcome, ...)

    def to_dict(self) -> dict:
        return asdict(self)


Method = Callable[[Path, list[Feed], Path], MethodResult]


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``; a message-less exception (a bare ``assert``) names where it was raised."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if lines:
        return f"{type(exc).__name__}: {lines[0].strip()}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(exc).__name__}{where}"


# ------------------------------------------------------------------------------------------------------ helpers
def _model_opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _save(model, out: Path) -> None:
    from onnxcompress import io

    io.save_model(model, out)


class _FeedReader:
    """An onnxruntime.quantization CalibrationDataReader over a list of feeds (re-windable)."""

    def __init__(self, feeds: list[Feed], input_names: list[str]):
        self.feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
        self._it = iter(self.feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def _ensure_opset(fp32: Path, work: Path, result: MethodResult, min_opset: int) -> Path:
    """Upgrade the model to ``min_opset`` when it is older (recorded in the result); returns the path to use."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(fp32))
    opset = _model_opset(model)
    result.info["opset"] = opset
    if opset >= min_opset:
        result.info["opset_upgraded"] = False
        return fp32
    try:
        upgraded = version_converter.convert_version(model, min_opset)
    except Exception as exc:
        raise RuntimeError(f"opset {opset} -> {min_opset} upgrade failed: {first_line(exc)}") from exc
    result.info["opset_upgraded"] = True
    result.notes.append(f"opset {opset} -> {min_opset} upgrade needed (per-channel QDQ needs >= {min_opset})")
    path = work / "upgraded.onnx"
    _save(upgraded, path)
    return path


def _pre_process(src: Path, work: Path, result: MethodResult) -> Path:
    """``quant_pre_process`` (symbolic shape inference, ONNX shape inference, ORT basic optimisation), as ORT's
    docs ask before quantizing. When it fails, that is recorded and it is retried with
    ``skip_symbolic_shape=True`` (what its error message points a user to; this step also turns ``Constant``-node
    weights into initializers, without which ORT quantizes no weight at all), then without pre-processing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "preprocessed.onnx"
    try:
        quant_pre_process(str(src), str(out))
    except Exception as exc:
        result.info["pre_process_error"] = first_line(exc)
        result.notes.append(f"quant_pre_process failed ({first_line(exc)})")
    else:
        result.info["pre_process"] = "ok"
        return out
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    except Exception as exc:
        result.info["pre_process"] = "failed"
        result.info["pre_process_retry_error"] = first_line(exc)
        result.notes.append(
            f"retry with skip_symbolic_shape failed too ({first_line(exc)}); quantized without it"
        )
        return src
    result.info["pre_process"] = "ok_without_symbolic_shape"
    result.notes.append("retried with skip_symbolic_shape=True: ok")
    return out


def ort_static(calibrate_method: str) -> Method:
    def run(fp32: Path, calib: list[Feed], out: Path) -> MethodResult:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        result = MethodResult(f"ort_static_{calibrate_method.lower()}")
        work = out.parent / (out.stem + ".work")
        work.mkdir(parents=True, exist_ok=True)
        try:
            src = _ensure_opset(fp32, work, result, PER_CHANNEL_MIN_OPSET)
            src = _pre_process(src, work, result)
            names = [
                i.name
                for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()
            ]
            result.info["n_calib"] = len(calib)
            quantize_static(
                str(src),
                str(out),
                _FeedReader(calib, names),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, calibrate_method),
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.path = str(out)
        return result

    return run


def ort_dynamic(fp32: Path, calib: list[Feed], out: Path) -> MethodResult:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    result = MethodResult("ort_dynamic")
    work = out.parent / (out.stem + ".work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = _pre_process(fp32, work, result)
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.path = str(out)
    return result


def onnxslim_method(fp32: Path, calib: list[Feed], out: Path) -> MethodResult:
    import onnxslim

    result = MethodResult("onnxslim", info={"version": getattr(onnxslim, "__version__", "?")})
    model = onnxslim.slim(str(fp32))
    if model is None:
        raise RuntimeError("onnxslim.slim returned no model")
    _save(model, out)
    result.path = str(out)
    return result


def ours(pipeline: str) -> Method:
    def run(fp32: Path, calib: list[Feed], out: Path) -> MethodResult:
        from onnxcompress import io
        from onnxcompress.api import compress

        # measure=False: the per-stage model statistics of the CLI report (MACs, zipped size) are not the tool's
        # work; the harness measures the candidate itself
        res = compress(fp32, pipeline, calibration=calib, validate=False, measure=False)
        io.save_model(res.model, out)
        info: dict = {"pipeline": res.pipeline, "ledger_stages": [r.stage for r in res.ledger]}
        for r in res.ledger:  # the quantize pass's own timings and choices (benchmarks.calib_time reads them)
            st = r.pass_stats or {}
            if st.get("mode") == "static":
                info["quantize"] = {k: st[k] for k in _QUANT_STAT_KEYS if k in st}
            if "bytes_after" in st and "bits" in st:  # cluster's choices: bits per tensor, tables' levels, storage
                info["cluster"] = {k: st[k] for k in _CLUSTER_STAT_KEYS if k in st}
            if isinstance(st.get("train"), dict):  # distill's training: steps, stop reason, back-offs, lr
                info["distill_train"] = {k: v for k, v in st["train"].items()
                                         if isinstance(v, (int, float, str, bool)) or k == "augment_probe"}
        return MethodResult(f"ours:{pipeline}", str(out), info=info)

    run.pipeline = pipeline  # type: ignore[attr-defined]
    return run


#: stats of cluster copied into an ours_* result's info
_CLUSTER_STAT_KEYS = ("bits", "tables", "hot_rows", "token_counts_held_out", "storage", "output_error",
                      "size_ratio_budget_bits", "floats_kept", "bytes_before", "bytes_after")

#: stats of quantize{mode=static} copied into an ours_* result's info
_QUANT_STAT_KEYS = (
    "calibration",
    "seconds_calibration",
    "seconds_total",
    "auto_float",
    "latency_ratio_measured",
    "skipped",
    "score_on_calibration",
)


def fp32_method(fp32: Path, calib: list[Feed], out: Path) -> MethodResult:
    """The reference itself (no tool run): its row shows the harness's noise floor (latency ratio ~1)."""
    return MethodResult("fp32", str(fp32))


#: name -> method. Order is the order of rows in the tables.
METHODS: dict[str, Method] = {
    "fp32": fp32_method,
    "ours_cleanup": ours("cleanup"),
    "ours_int8": ours("cleanup,quantize{mode=static}"),
    "ort_static_minmax": ort_static("MinMax"),
    "ort_static_percentile": ort_static("Percentile"),
    "ort_static_entropy": ort_static("Entropy"),
    "ort_dynamic": ort_dynamic,
    "onnxslim": onnxslim_method,
}

#: the same range rule as each ORT anchor, our automatic float-layer search off (benchmarks.calib_time); not in
#: the default run, resolvable by name
MATCHED_METHODS: dict[str, Method] = {
    f"ours_int8_{rule}": ours(f"cleanup,quantize{{mode=static,calibration={rule},auto_float_db=0}}")
    for rule in ("minmax", "percentile", "entropy")
}

QUICK_METHODS = [
    "fp32",
    "ours_cleanup",
    "ort_static_minmax",
    "ort_static_percentile",
    "ort_dynamic",
    "onnxslim",
]


def resolve_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    if name in MATCHED_METHODS:
        return MATCHED_METHODS[name]
    if name.startswith("ours:"):
        return ours(name[len("ours:") :])
    known = ", ".join([*METHODS, *MATCHED_METHODS])
    raise KeyError(f"unknown method {name!r}; known: {known} or ours:<pipeline>")


def run_method(name: str, method: Method, fp32: Path, calib: list[Feed], out: Path) -> MethodResult:
    """Run one method in this process; any exception becomes ``MethodResult(error=...)``."""
    try:
        result = method(Path(fp32), calib, Path(out))
    except BaseException as exc:  # noqa: B036 - a tool may raise SystemExit/KeyboardInterrupt-like errors too
        if isinstance(exc, KeyboardInterrupt):
            raise
        log.debug("method %s failed", name, exc_info=True)
        return MethodResult(name, error=first_line(exc), info={"traceback_tail": _tb_tail(exc)})
    result.method = name
    if result.path is None and result.error is None:
        result.error = "the method produced no model"
    return result


def _tb_tail(exc: BaseException, n: int = 3) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)[-n:]
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]


# ------------------------------------------------------------------------------------------------- feed files
# ------------------------------------------------------------------------------------------------------ worker
def worker(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.anchors")
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--calib", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--result", required=True, type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import onnx  # noqa: F401  - loaded before the baseline so library import cost is not billed to the tool
    import onnxruntime  # noqa: F401

    from benchmarks.measure import peak_rss_mb, reset_peak_rss, rss_mb

    feeds = load_feeds(args.calib)
    reset_peak_rss()
    base = rss_mb()
    t0 = time.perf_counter()
    try:
        method = resolve_method(args.method)
    except KeyError as exc:
        result = MethodResult(args.method, error=first_line(exc))
    else:
        result = run_method(args.method, method, args.model, feeds, args.out)
    seconds = time.perf_counter() - t0
    payload = result.to_dict() | {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}
    args.result.write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(worker())
