"""Fuzz corpus building blocks: the Case/Setup records, the seed models (bundled digits CNN, inline MLP and If
model) and the helpers that write a case's files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"

#: calibration samples written for a case (small: the fuzz run must stay fast)
CALIB_SAMPLES = 4


@dataclass
class Setup:
    """The files one case wrote, by role."""

    model: Path
    calib: Path | None = None
    #: bad data cases: the data under test (fed as --calib, --val and validate --data)
    bad_data: Path | None = None
    passes: str | None = None
    recipe: Path | None = None
    #: files outside the case folder the case must not touch (e.g. a symlink's target)
    watched: list[Path] = field(default_factory=list)


@dataclass
class Case:
    id: str
    kind: str  # "model" | "data" | "pipeline"
    build: Callable[[Path], Setup]
    #: True: compress/validate must refuse it with exit 2; False: may succeed; None: decided by the oracle
    must_fail: bool | None = None
    #: inspect must refuse it too (the file is not a parseable model); None: decided by the oracle
    inspect_must_fail: bool | None = None


# ------------------------------------------------------------------------------------------------ helpers
def digits() -> onnx.ModelProto:
    return onnx.load_model(str(DIGITS))


def copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def write_digits_calib(folder: Path, n: int = CALIB_SAMPLES) -> Path:
    with np.load(DIGITS_CALIB) as z:
        arrays = {k: z[k][:n] for k in z.files}
    p = folder / "calib.npz"
    np.savez(p, **arrays)
    return p


def calib_for(model: onnx.ModelProto, folder: Path, n: int = CALIB_SAMPLES) -> Path | None:
    """Calibration feeds matching the model's declared inputs (None if they cannot be made small and sane)."""
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    arrays = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type == 0:
            return None
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        if any(d <= 0 or d > 4096 for d in dims) or int(np.prod(dims)) > 1 << 16:
            return None
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:
            return None
        arrays[vi.name] = (rng.standard_normal((n, *dims)) if np.issubdtype(dtype, np.floating)
                           else rng.integers(0, 3, (n, *dims))).astype(dtype)
    if not arrays:
        return None
    p = folder / "calib.npz"
    np.savez(p, **arrays)
    return p


def model_case(case_id: str, make: Callable[[], onnx.ModelProto | bytes], *, digits_calib: bool = False,
               must_fail: bool | None = None) -> Case:
    def build(folder: Path) -> Setup:
        m = make()
        path = folder / "model.onnx"
        path.write_bytes(m if isinstance(m, bytes) else m.SerializeToString())
        calib = None
        if digits_calib:
            calib = write_digits_calib(folder)
        elif isinstance(m, onnx.ModelProto):
            calib = calib_for(m, folder)
        return Setup(path, calib=calib)

    return Case(case_id, "model", build, must_fail=must_fail)


def mlp(opset: int = 17) -> onnx.ModelProto:
    """x[2,4] -> Gemm(4->3) -> Relu -> MatMul(3->2) -> y[2,2]."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w2")
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w1, b1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def if_model() -> onnx.ModelProto:
    """An If whose branches read an outer weight; used for subgraph mutations."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")

    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x", "w"], [f"{name}_y"], name=f"{name}_op")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [4])])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then", "Add"),
                              else_branch=branch("else", "Mul"))]
    g = helper.make_graph(nodes, "ifg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w, zero])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _edit(base: Callable[[], onnx.ModelProto], fn: Callable[[onnx.ModelProto], None]) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        m = copy(base())
        fn(m)
        return m

    return make


def _weight_spans(blob: bytes, model: onnx.ModelProto) -> list[tuple[int, int]]:
    spans = []
    for t in model.graph.initializer:
        if len(t.raw_data) >= 16:
            at = blob.find(t.raw_data)
            if at >= 0:
                spans.append((at, at + len(t.raw_data)))
    return spans


