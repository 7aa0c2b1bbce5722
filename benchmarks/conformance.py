"""Third-party conformance: onnx's own backend node test cases, run under onnxruntime before and after a transform.

The onnx wheel no longer ships the node test data, but it ships the generators: every module under
``onnx.backend.test.case.node`` calls ``expect(node, inputs, outputs, name)`` when it is imported, which records a
one-node (or function-expanded) model together with reference inputs and outputs. ``generate_cases`` collects those
in-process and writes each as ``<root>/node/<name>/model.onnx`` plus ``test_data_set_0/input_<i>.pb`` and
``output_<i>.pb`` (the layout onnx's backend runner reads). The generators reseed NumPy's global RNG; its state is
saved and restored, so importing this module's results leaves the caller's process as it was.

The rule a case checks, per output ``a`` (actual) against ``e`` (expected):

- same structure (tensor / sequence of tensors / empty optional), same shape, same dtype;
- strings, bools and integers: exactly equal;
- floating point and complex: ``|a - e| <= atol + rtol * |e|`` elementwise with onnx's backend tolerance
  (rtol = 1e-3, atol = 1e-7), NaN equal to NaN and infinities equal when their signs agree; bfloat16 compares in
  float32 with rtol at least 2**-6 (two bfloat16 ulps), as onnx's runner does.

Only cases onnxruntime (CPU EP, graph optimizations off unless asked) passes as they are can say anything about a
transform: ``ort_passing_cases`` computes that list once per onnxruntime version and caches it as JSON next to the
cases. ``sweep`` then applies a transform to each passing case and checks it again: an exact transform must keep
every one of them passing.

Command line::

    python -m benchmarks.conformance [--transform roundtrip|cleanup] [--sample N --seed S] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import numpy_helper

log = logging.getLogger(__name__)

RTOL = 1e-3
ATOL = 1e-7
_BF16_RTOL = 2.0**-6

_MANIFEST = "cases.json"
_KIND = "node"


class UnsupportedCase(Exception):
    """The case uses a value kind this harness does not feed to onnxruntime (maps, sparse tensors)."""


# --------------------------------------------------------------------------------------------------- locations
def default_root() -> Path:
    """``$ONNXCOMPRESS_CACHE/conformance/<onnx version>`` (``~/.cache/onnxcompress`` when the variable is unset)."""
    base = Path(os.environ.get("ONNXCOMPRESS_CACHE", Path.home() / ".cache" / "onnxcompress"))
    return base / "conformance" / onnx.__version__


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else default_root()


# -------------------------------------------------------------------------------------------------- generation
def _collect_node_testcases() -> list[Any]:
    """onnx's node test cases, collected in-process; NumPy's global RNG and warning filters are left as found."""
    from onnx.backend.test.case import node as node_cases

    rng_state = np.random.get_state()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            cases = list(node_cases.collect_testcases())
    finally:
        np.random.set_state(rng_state)
    return [c for c in cases if c.kind == _KIND and c.model is not None and c.data_sets]


def _value_proto(value: Any, vtype: onnx.TypeProto, name: str) -> bytes:
    """Serialise one reference value the way the graph's declared type says it is stored."""
    if vtype.HasField("sequence_type"):
        return numpy_helper.from_list(value, name).SerializeToString()
    if vtype.HasField("optional_type"):
        return numpy_helper.from_optional(value, name).SerializeToString()
    if vtype.HasField("map_type"):
        return numpy_helper.from_dict(value, name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), name).SerializeToString()


def _write_case(case: Any, folder: Path) -> None:
    model: onnx.ModelProto = case.model
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    for k, (inputs, outputs) in enumerate(case.data_sets):
        data = folder / f"test_data_set_{k}"
        data.mkdir(parents=True)
        for i, value in enumerate(inputs):
            vi = model.graph.input[i]
            (data / f"input_{i}.pb").write_bytes(_value_proto(value, vi.type, vi.name))
        for i, value in enumerate(outputs):
            vi = model.graph.output[i]
            (data / f"output_{i}.pb").write_bytes(_value_proto(value, vi.type, vi.name))


def case_names(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the generated cases (from the manifest), generating them first if needed."""
    r = _root(root)
    manifest = r / _MANIFEST
    if not manifest.is_file():
        generate_cases(r)
    return list(json.loads(manifest.read_text())["cases"])


def generate_cases(root: str | os.PathLike | None = None, *, force: bool = False) -> list[Path]:
    """Write onnx's backend node cases under ``root/node/`` (once; a manifest marks a complete set). Returns folders.

    The set is written to a temporary folder and renamed into place, so an interrupted run leaves no half set.
    """
    r = _root(root)
    manifest = r / _MANIFEST
    cases_dir = r / _KIND
    if manifest.is_file() and cases_dir.is_dir() and not force:
        names = json.loads(manifest.read_text())["cases"]
        return [cases_dir / n for n in names]
    t0 = time.perf_counter()
    cases = _collect_node_testcases()
    if not cases:
        raise RuntimeError("onnx.backend.test.case.node produced no node test cases")
    r.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".node.", dir=r))
    names: list[str] = []
    try:
        for case in cases:
            folder = tmp / case.name
            folder.mkdir()
            _write_case(case, folder)
            names.append(case.name)
        if cases_dir.exists():
            shutil.rmtree(cases_dir)
        os.replace(tmp, cases_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"onnx": onnx.__version__, "count": len(names), "cases": sorted(names)}
    tmp_manifest = manifest.with_name(manifest.name + ".part")
    tmp_manifest.write_text(json.dumps(info, indent=0))
    os.replace(tmp_manifest, manifest)
    log.info("wrote %d node cases to %s in %.1f s", len(names), cases_dir, time.perf_counter() - t0)
    return [cases_dir / n for n in sorted(names)]


# ----------------------------------------------------------------------------------------------------- loading
def _read_value(path: Path, vtype: onnx.TypeProto) -> Any:
    data = path.read_bytes()
    if vtype.HasField("tensor_type"):
        t = onnx.TensorProto()
        t.ParseFromString(data)
        return numpy_helper.to_array(t)
    if vtype.HasField("sequence_type"):
        s = onnx.SequenceProto()
        s.ParseFromString(data)
        if s.elem_type != onnx.SequenceProto.TENSOR:
            raise UnsupportedCase(f"{path.name}: sequence of non-tensors")
        return numpy_helper.to_list(s)
    if vtype.HasField("optional_type"):
        o = onnx.OptionalProto()
        o.ParseFromString(data)
        if o.elem_type not in (
            onnx.OptionalProto.UNDEFINED,
            onnx.OptionalProto.TENSOR,
            onnx.OptionalProto.SEQUENCE,
        ):
            raise UnsupportedCase(f"{path.name}: optional of a map")
        return numpy_helper.to_optional(o)
    raise UnsupportedCase(f"{path.name}: value type {vtype.WhichOneof('value')} is not supported")


def load_case(path: str | os.PathLike) -> tuple[onnx.ModelProto, dict[str, Any], list[Any]]:
    """A case folder -> (model, inputs keyed by graph input name in order, expected outputs in graph order).

    Tensors are ``np.ndarray``; a sequence input/output is a list of arrays; an empty optional is ``None``.
    Raises ``UnsupportedCase`` for maps and sparse tensors.
    """
    p = Path(path)
    model = onnx.load_model(str(p / "model.onnx"))
    data = p / "test_data_set_0"
    n_in = len(list(data.glob("input_*.pb")))
    n_out = len(list(data.glob("output_*.pb")))
    graph_inputs = list(model.graph.input)
    if n_in > len(graph_inputs) or n_out > len(model.graph.output):
        raise UnsupportedCase(f"{p.name}: more data files than graph inputs/outputs")
    inputs = {
        graph_inputs[i].name: _read_value(data / f"input_{i}.pb", graph_inputs[i].type) for i in range(n_in)
    }
    expected = [_read_value(data / f"output_{i}.pb", model.graph.output[i].type) for i in range(n_out)]
    return model, inputs, expected


# ----------------------------------------------------------------------------------------------------- running
def _session(model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _is_ml_dtype(value: Any) -> bool:
    """bfloat16, float8, int4, ... arrays: NumPy user-defined dtypes (ml_dtypes), which onnxruntime's bridge refuses."""
    return isinstance(value, np.ndarray) and _is_user_dtype(value.dtype)


def _is_user_dtype(dtype: np.dtype) -> bool:
    return dtype.num >= 256  # NPY_USERDEF: dtypes registered by extension modules (ml_dtypes)


def _needs_ort_values(inputs: dict[str, Any], expected: list[Any]) -> bool:
    return any(_is_ml_dtype(v) for v in inputs.values()) or any(_is_ml_dtype(e) for e in expected)


def _ort_value(arr: np.ndarray) -> ort.OrtValue:
    """An OrtValue holding ``arr``; ml_dtypes tensors are copied in as their ONNX raw bytes (4/2-bit packed)."""
    if not _is_ml_dtype(arr):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
    t = numpy_helper.from_array(arr)
    raw = t.raw_data
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), t.data_type)
    if ov.tensor_size_in_bytes() != len(raw):
        raise ValueError(
            f"{arr.dtype} tensor of shape {arr.shape}: {len(raw)} raw bytes for an OrtValue of "
            f"{ov.tensor_size_in_bytes()}"
        )
    if raw:
        ctypes.memmove(ov.data_ptr(), raw, len(raw))
    return ov


def _from_ort_value(ov: ort.OrtValue) -> np.ndarray:
    """An output tensor as NumPy; types NumPy lacks are decoded from their raw bytes by onnx (ml_dtypes)."""
    type_name = ov.data_type()  # e.g. "tensor(float8e4m3fn)"
    onnx_type = onnx.TensorProto.DataType.Value(type_name[len("tensor(") : -1].upper())
    if not _is_user_dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type)):
        return ov.numpy()
    t = onnx.TensorProto(data_type=onnx_type, dims=ov.shape())
    n = ov.tensor_size_in_bytes()
    t.raw_data = ctypes.string_at(ov.data_ptr(), n) if n else b""
    return numpy_helper.to_array(t)


def _run_with_ort_values(
    sess: ort.InferenceSession, names: list[str], inputs: dict[str, Any]
) -> list[np.ndarray]:
    for k, v in inputs.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            raise UnsupportedCase(f"input {k!r}: non-tensor or string input alongside an ml_dtypes tensor")
    feeds = {k: _ort_value(v) for k, v in inputs.items()}
    outs = sess.run_with_ort_values(names, feeds)
    result = []
    for i in range(len(outs)):
        ov = outs[i]
        if not ov.is_tensor():
            raise UnsupportedCase(f"output {names[i]!r}: non-tensor output alongside an ml_dtypes tensor")
        result.append(_from_ort_value(ov))
    return result


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _as_text(a: np.ndarray) -> np.ndarray:
    """A string tensor with bytes decoded, so bytes and str forms of the same text compare equal."""
    return np.array(
        [v.decode() if isinstance(v, bytes) else v for v in a.reshape(-1).tolist()], dtype=object
    ).reshape(a.shape)


def compare(
    actual: Any, expected: Any, *, rtol: float = RTOL, atol: float = ATOL, where: str = "output"
) -> str | None:
    """None when ``actual`` matches ``expected`` under the module's rule; otherwise a one-line reason."""
    if expected is None:
        return None if actual is None else f"{where}: expected an empty optional, got {type(actual).__name__}"
    if isinstance(expected, list):
        if not isinstance(actual, (list, tuple)):
            return f"{where}: expected a sequence, got {type(actual).__name__}"
        if len(actual) != len(expected):
            return f"{where}: sequence length {len(actual)} != {len(expected)}"
        for j, (a, e) in enumerate(zip(actual, expected, strict=True)):
            reason = compare(a, e, rtol=rtol, atol=atol, where=f"{where}[{j}]")
            if reason:
                return reason
        return None
    if actual is None or isinstance(actual, (list, tuple)):
        return f"{where}: expected a tensor, got {type(actual).__name__}"
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.shape != e.shape:
        return f"{where}: shape {a.shape} != expected {e.shape}"
    if e.dtype == object or e.dtype.kind in "SU":
        av, ev = _as_text(a), _as_text(e)
        if av.dtype != ev.dtype or not np.array_equal(av, ev):
            return f"{where}: strings differ"
        return None
    if a.dtype != e.dtype:
        return f"{where}: dtype {a.dtype} != expected {e.dtype}"
    exact = e.dtype.kind in "biu"
    r = rtol
    if _is_user_dtype(e.dtype):  # ml_dtypes (bfloat16, float8, int4, ...): compare their float32 values
        exact = e.dtype.name.startswith(("int", "uint"))
        if e.dtype.name == "bfloat16":
            r = max(rtol, _BF16_RTOL)
        a = a.astype(np.float32)
        e = e.astype(np.float32)
    if exact:
        bad = np.flatnonzero(a.reshape(-1) != e.reshape(-1))
        if bad.size == 0:
            return None
        return f"{where}: {bad.size} of {e.size} {expected.dtype} elements differ (first at flat index {int(bad[0])})"
    ok = np.isclose(a, e, rtol=r, atol=atol, equal_nan=True)
    if ok.all():
        return None
    bad = np.flatnonzero(~ok.reshape(-1))
    av, ev = a.reshape(-1)[bad], e.reshape(-1)[bad]
    finite = np.isfinite(av) & np.isfinite(ev)
    detail = []
    if finite.any():
        detail.append(f"max abs diff {np.max(np.abs(av[finite] - ev[finite])):.3g}")
    if (~finite).any():
        detail.append(f"{int((~finite).sum())} with NaN/inf on one side only")
    return f"{where}: {bad.size} of {e.size} elements outside rtol={r:g} atol={atol:g} ({', '.join(detail)})"


def check_case(
    model: onnx.ModelProto,
    inputs: dict[str, Any],
    expected: list[Any],
    *,
    output_names: list[str] | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    optimize: bool = False,
) -> str | None:
    """Run ``model`` on ``inputs`` with the CPU EP and compare with ``expected``: None if it passes, else why not.

    ``output_names`` are the outputs to fetch, in the order of ``expected`` (default: the model's graph outputs).
    """
    names = list(output_names) if output_names is not None else [o.name for o in model.graph.output]
    if len(names) != len(expected):
        return f"model has {len(names)} outputs, {len(expected)} expected"
    try:
        sess = _session(model, optimize)
    except Exception as exc:
        return f"session: {_first_line(exc)}"
    try:
        if _needs_ort_values(inputs, expected):
            actual = _run_with_ort_values(sess, names, inputs)
        else:
            actual = sess.run(names, inputs)
    except Exception as exc:
        return f"run: {_first_line(exc)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        reason = compare(a, e, rtol=rtol, atol=atol, where=f"output {i} ({names[i]!r})")
        if reason:
            return reason
    return None


def run_case(model: onnx.ModelProto, inputs: dict[str, Any], expected: list[Any], **kw: Any) -> bool:
    """True when onnxruntime (CPU EP) reproduces ``expected`` within onnx's backend tolerance."""
    return check_case(model, inputs, expected, **kw) is None


# ------------------------------------------------------------------------------------------ ORT-passing cases
def _passing_file(root: Path, optimize: bool) -> Path:
    return root / f"ort_passing-{ort.__version__}{'-opt' if optimize else ''}.json"


def _baseline(root: Path, name: str, optimize: bool) -> str | None:
    try:
        model, inputs, expected = load_case(root / _KIND / name)
    except UnsupportedCase as exc:
        return f"unsupported: {exc}"
    except Exception as exc:
        return f"load: {_first_line(exc)}"
    return check_case(model, inputs, expected, optimize=optimize)


def ort_baseline(
    root: str | os.PathLike | None = None, *, optimize: bool = False, refresh: bool = False
) -> dict[str, str | None]:
    """Every case -> None when onnxruntime passes it as-is, else the reason. Cached per onnxruntime version."""
    r = _root(root)
    names = case_names(r)
    cache = _passing_file(r, optimize)
    if cache.is_file() and not refresh:
        data = json.loads(cache.read_text())
        if data.get("onnxruntime") == ort.__version__ and data.get("count") == len(names):
            result: dict[str, str | None] = {n: None for n in data["passing"]}
            result.update(data["failing"])
            return result
    t0 = time.perf_counter()
    result = {n: _baseline(r, n, optimize) for n in names}
    passing = [n for n, why in result.items() if why is None]
    info = {
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "optimize": optimize,
        "count": len(names),
        "passing": passing,
        "failing": {n: why for n, why in result.items() if why is not None},
    }
    tmp = cache.with_name(cache.name + ".part")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, cache)
    log.info("onnxruntime passes %d of %d cases (%.1f s)", len(passing), len(names), time.perf_counter() - t0)
    return result


def ort_passing_cases(root: str | os.PathLike | None = None, *, optimize: bool = False) -> list[str]:
    """Names of the cases onnxruntime passes as they are (sorted)."""
    return sorted(n for n, why in ort_baseline(root, optimize=optimize).items() if why is None)


def sample_passing(
    root: str | os.PathLike | None = None, n: int = 150, seed: int = 0, *, optimize: bool = False
) -> list[str]:
    """A seeded sample of ``n`` ORT-passing cases, without computing the full baseline when it is not cached.

    All case names are shuffled with ``seed``; the first ``n`` that onnxruntime passes are taken. With the baseline
    cached this equals filtering the shuffled list through it, so the sample is the same either way.
    """
    r = _root(root)
    names = sorted(case_names(r))
    random.Random(seed).shuffle(names)
    cache = _passing_file(r, optimize)
    known: dict[str, str | None] | None = None
    if cache.is_file():
        known = ort_baseline(r, optimize=optimize)
    picked: list[str] = []
    for name in names:
        if len(picked) >= n:
            break
        why = known[name] if known is not None and name in known else _baseline(r, name, optimize)
        if why is None:
            picked.append(name)
    return sorted(picked)


# ------------------------------------------------------------------------------------------------------ sweeps
def sweep(
    transform: Callable[[onnx.ModelProto], onnx.ModelProto],
    names: Iterable[str] | None = None,
    *,
    root: str | os.PathLike | None = None,
    optimize: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Apply ``transform`` to each case (default: every ORT-passing case) and check the outputs again.

    Returns ``{total, passed, failed, errors, failures: {name: reason}, error_cases: {name: reason}, seconds}``:
    ``failed`` counts cases whose transformed model no longer reproduces the reference outputs (or no longer loads in
    onnxruntime); ``errors`` counts cases where the transform itself raised.
    """
    r = _root(root)
    todo = sorted(names) if names is not None else ort_passing_cases(r, optimize=optimize)
    failures: dict[str, str] = {}
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    for k, name in enumerate(todo):
        model, inputs, expected = load_case(r / _KIND / name)
        output_names = [o.name for o in model.graph.output][: len(expected)]
        try:
            new = transform(model)
        except Exception as exc:
            errors[name] = _first_line(exc)
        else:
            if not isinstance(new, onnx.ModelProto):
                errors[name] = f"transform returned {type(new).__name__}, not a ModelProto"
            else:
                why = check_case(new, inputs, expected, output_names=output_names, optimize=optimize)
                if why is not None:
                    failures[name] = why
        if progress is not None:
            progress(k + 1, len(todo))
    total = len(todo)
    return {
        "total": total,
        "passed": total - len(failures) - len(errors),
        "failed": len(failures),
        "errors": len(errors),
        "failures": failures,
        "error_cases": errors,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# -------------------------------------------------------------------------------------------------- transforms
def roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bytes -> temp file -> ``onnxcompress.io.read_model`` -> ``save_model`` -> ``read_model``."""
    from onnxcompress.io import read_model, save_model

    with tempfile.TemporaryDirectory(prefix="onnxcompress-conf-") as d:
        src = Path(d) / "in.onnx"
        src.write_bytes(model.SerializeToString())
        loaded = read_model(src)
        out = save_model(loaded, Path(d) / "out.onnx")
        return read_model(out)


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnxcompress.api.compress(model, "cleanup").model``.

    The API's own fidelity check (random feeds) and size/latency measurement are switched off when it offers the
    options: this harness checks the outputs itself, against onnx's reference outputs.
    """
    from onnxcompress.api import compress

    params = inspect.signature(compress).parameters
    kw = {k: False for k in ("validate", "measure") if k in params}
    return compress(model, "cleanup", **kw).model


def transform_unavailable(name: str) -> str | None:
    """None when the named transform can run here; otherwise why not (e.g. the cleanup pass is not written yet)."""
    if name == "roundtrip":
        return None
    if name == "cleanup":
        try:
            cleanup(onnx.parser.parse_model(_PROBE_MODEL))
        except ImportError as exc:
            return f"onnxcompress cleanup is not importable: {_first_line(exc)}"
        except Exception as exc:  # the API exists but has no "cleanup" pass (yet)
            return f"onnxcompress cleanup does not run: {_first_line(exc)}"
        return None
    return f"unknown transform {name!r}"


_PROBE_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
probe (float[2] x) => (float[2] y) {
    t = Identity(x)
    y = Relu(t)
}
"""


TRANSFORMS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "roundtrip": roundtrip,
    "cleanup": cleanup,
}


# --------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.conformance", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--transform", choices=sorted(TRANSFORMS), default="roundtrip")
    ap.add_argument("--root", type=Path, default=None, help=f"case cache (default {default_root()})")
    ap.add_argument("--sample", type=int, default=None, help="run a seeded sample of N ORT-passing cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimize", action="store_true", help="run onnxruntime with its graph optimizations on")
    ap.add_argument("--json", type=Path, default=None, help="write counts, failing names and reasons here")
    ap.add_argument("--regenerate", action="store_true", help="rewrite the cases and the ORT baseline")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    root = args.root or default_root()
    why = transform_unavailable(args.transform)
    if why:
        print(f"cannot run {args.transform}: {why}", file=sys.stderr)
        return 2
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        cases = generate_cases(root, force=args.regenerate)
    except Exception as exc:  # the generators are not in this onnx build
        print(f"cannot generate onnx backend node cases: {_first_line(exc)}", file=sys.stderr)
        return 2
    timings["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    baseline = ort_baseline(root, optimize=args.optimize, refresh=args.regenerate)
    passing = sorted(n for n, why in baseline.items() if why is None)
    timings["ort_baseline"] = time.perf_counter() - t
    names = passing
    if args.sample is not None and args.sample < len(passing):
        names = sorted(random.Random(args.seed).sample(passing, args.sample))
    t = time.perf_counter()
    res = sweep(TRANSFORMS[args.transform], names, root=root, optimize=args.optimize)
    timings["sweep"] = time.perf_counter() - t

    print(f"{len(cases)} generated cases, {len(passing)} pass onnxruntime {ort.__version__} as-is")
    for name, why in sorted({**res["failures"], **res["error_cases"]}.items()):
        tag = "ERROR" if name in res["error_cases"] else "FAIL"
        print(f"  {tag} {name}: {why}")
    print(f"{res['passed']} of {res['total']} ORT-passing backend cases unchanged after {args.transform}")
    if args.json:
        out = {
            "transform": args.transform,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "generated": len(cases),
            "ort_passing": len(passing),
            "sample": args.sample,
            "seed": args.seed,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            **res,
        }
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if res["passed"] == res["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
