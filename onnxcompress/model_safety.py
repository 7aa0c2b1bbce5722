"""Safety checks on a parsed ModelProto, run before anything else reads it (linear in the model's size).

- External data must live inside the model's folder: an absolute ``location``, a NUL byte, or one that resolves
  outside the folder (``../x``, symlinks out) is refused before anything is read; so is an offset/length that
  lies past the end of the file or disagrees with the tensor's shape.
- Every weight must be well formed: a known dtype, non-negative and non-absurd dims (at most ``MAX_ELEMENTS``),
  and exactly ``prod(dims) * itemsize`` bytes of raw data (``ceil(prod(dims) * bits / 8)`` for sub-byte types) or
  ``prod(dims)`` typed values (twice that for complex).
- The main graph's inputs have a known element type; the product of the declared input/output dims is at most
  ``MAX_ELEMENTS`` (an absurd declared input would be allocated by the first random feed). Negative declared dims
  are dynamic dims as some exporters write them (paddle2onnx: -1), not errors.
- In each graph no value name is defined twice (graph inputs, initializers, node outputs; an initializer also
  listed as a graph input is the one allowed overlap).

Every failure is a ``BadInputError`` with one line naming the tensor or value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxcompress.errors import BadInputError


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph below it (If/Loop/Scan bodies), depth first."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant-node values, subgraphs included."""
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def external_location(t: onnx.TensorProto) -> str | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in t.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _external_entries(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _external_int(t: onnx.TensorProto, entries: dict[str, str], key: str) -> int | None:
    raw = entries.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadInputError(f"tensor {t.name!r}: external data {key} {raw!r} is not a number") from None
    if value < 0:
        raise BadInputError(f"tensor {t.name!r}: external data {key} {value} is negative")
    return value


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Refuse external data that escapes ``base_dir`` or lies past the end of its file; return the distinct files.

    Every location must be relative and resolve (symlinks followed) to a regular file inside the folder; offset and
    length must be non-negative integers, length equal to the tensor's byte size and ``offset + length`` inside the
    file; without a length (the loader then reads to the end of the file) the bytes after the offset must be
    exactly the tensor's. Nothing is read here."""
    base = base_dir.resolve()
    files: dict[Path, None] = {}
    sizes: dict[Path, int] = {}
    for t in iter_tensors(model):
        loc = external_location(t)
        if loc is None:
            continue
        if not loc:
            raise BadInputError(f"tensor {t.name!r} has external data without a location")
        if "\0" in loc:
            raise BadInputError(f"tensor {t.name!r}: external data location {loc!r} contains a NUL byte")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(loc):
            raise BadInputError(
                f"tensor {t.name!r}: external data location {loc!r} is an absolute path; only files inside the "
                "model's folder are allowed"
            )
        target = (base / loc).resolve()
        if target != base and base not in target.parents:
            raise BadInputError(
                f"tensor {t.name!r}: external data location {loc!r} points outside the model's folder {base}"
            )
        if not target.is_file():
            what = "is not a regular file" if target.exists() else "not found next to the model"
            raise BadInputError(f"tensor {t.name!r}: external data file {loc!r} {what}")
        entries = _external_entries(t)
        offset = _external_int(t, entries, "offset") or 0
        length = _external_int(t, entries, "length")
        expected = tensor_nbytes(t)
        if length is not None and expected is not None and length != expected:
            raise BadInputError(f"tensor {t.name!r}: external data length {length} does not match its shape "
                                f"{list(t.dims)} ({expected} bytes)")
        size = sizes.setdefault(target, target.stat().st_size)
        if length is None:  # the loader then reads from offset to the end of the file
            if offset > size or (expected is not None and size - offset != expected):
                raise BadInputError(f"tensor {t.name!r}: external data {loc!r} holds {max(size - offset, 0)} bytes "
                                    f"after offset {offset} and gives no length; its shape {list(t.dims)} needs "
                                    f"{expected}")
        elif offset + length > size:
            raise BadInputError(f"tensor {t.name!r}: external data offset {offset} + length {length} lies past the "
                                f"end of {loc!r} ({size} bytes)")
        files[target] = None
    return list(files)


# ------------------------------------------------------------------------------------------- tensor sanity
#: a declared tensor (weight, graph input or output) with more elements than this is refused as absurd
MAX_ELEMENTS = 1 << 34
#: bits per element of the packed sub-byte types
_SUB_BYTE_BITS = {"UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
_TYPED_FIELD_FACTOR = {"COMPLEX64": 2, "COMPLEX128": 2}


def _dtype_name(data_type: int) -> str | None:
    try:
        name = onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return None
    return None if name == "UNDEFINED" else name


def tensor_nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data must hold by its dtype and shape (None for strings or an unknown dtype)."""
    name = _dtype_name(t.data_type)
    if name is None or name == "STRING" or any(d < 0 for d in t.dims):
        return None
    n = int(np.prod(np.asarray(t.dims, dtype=np.float64))) if len(t.dims) else 1
    if name in _SUB_BYTE_BITS:
        return (n * _SUB_BYTE_BITS[name] + 7) // 8
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return None
    return n * itemsize


def check_tensor(t: onnx.TensorProto, where: str = "") -> None:
    """Refuse a weight whose dtype is unknown, whose dims are negative or absurd, or whose stored data does not
    hold exactly the elements its shape declares (raw bytes or typed values)."""
    label = f"tensor {t.name!r}{where}"
    name = _dtype_name(t.data_type)
    if name is None:
        raise BadInputError(f"{label} has an unknown data type ({t.data_type})")
    if any(d < 0 for d in t.dims):
        raise BadInputError(f"{label} has a negative dimension {list(t.dims)}")
    n = float(np.prod(np.asarray(t.dims, dtype=np.float64))) if len(t.dims) else 1.0
    if n > MAX_ELEMENTS:
        raise BadInputError(f"{label} declares {n:.3g} elements {list(t.dims)}: more than onnxcompress handles "
                            f"({MAX_ELEMENTS:.3g})")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return  # checked against its file by check_external_data
    n = int(n)
    if t.HasField("raw_data"):
        if name == "STRING":
            raise BadInputError(f"{label}: a string tensor cannot hold raw_data")
        expected = tensor_nbytes(t)
        if expected is not None and len(t.raw_data) != expected:
            raise BadInputError(f"{label}: raw_data holds {len(t.raw_data)} bytes, its shape {list(t.dims)} and "
                                f"type {name} need {expected}")
        return
    if name in _SUB_BYTE_BITS:
        return
    field = onnx.helper.tensor_dtype_to_field(t.data_type)
    count = len(getattr(t, field))
    expected_count = n * _TYPED_FIELD_FACTOR.get(name, 1)
    if count != expected_count:
        raise BadInputError(f"{label}: holds {count} values in {field}, its shape {list(t.dims)} needs "
                            f"{expected_count}")


def _check_value_info(vi: onnx.ValueInfoProto, what: str) -> None:
    """A graph input needs a known element type; a declared shape must not be absurd. A negative dim is how some
    exporters (paddle2onnx: -1) write a dynamic dim, so it counts as unknown, like a missing one."""
    if not vi.type.HasField("tensor_type"):
        return
    tt = vi.type.tensor_type
    if what == "input" and _dtype_name(tt.elem_type) is None:
        raise BadInputError(f"graph input {vi.name!r} has no valid element type ({tt.elem_type})")
    dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value") and d.dim_value > 0]
    n = float(np.prod(np.asarray(dims, dtype=np.float64))) if dims else 1.0
    if n > MAX_ELEMENTS:
        raise BadInputError(f"graph {what} {vi.name!r} declares a shape of {n:.3g} elements {dims}: more than "
                            f"onnxcompress handles ({MAX_ELEMENTS:.3g})")


def check_model_sanity(model: onnx.ModelProto) -> None:
    """Structural facts every command relies on, checked before anything else looks at the model (linear time):

    - every weight is well formed (``check_tensor``);
    - the main graph's inputs have a known element type; declared input/output shapes are not absurd (a
      10^12-element input would be allocated by the first random feed);
    - in each graph, no value name is defined twice (initializers, graph inputs, node outputs; an initializer that
      is also listed as a graph input is the one allowed overlap).
    """
    for vi in model.graph.input:
        _check_value_info(vi, "input")
    for vi in model.graph.output:
        _check_value_info(vi, "output")
    for g in iter_graphs(model.graph):
        where = "" if g is model.graph else f" (in subgraph {g.name!r})"
        seen: set[str] = set()
        inputs = {vi.name for vi in g.input}
        for vi in g.input:
            if vi.name in seen:
                raise BadInputError(f"graph input {vi.name!r}{where} is listed twice")
            seen.add(vi.name)
        for t in g.initializer:
            check_tensor(t, where)
            if t.name in seen and t.name not in inputs:
                raise BadInputError(f"initializer {t.name!r}{where} is defined twice")
            if t.name in seen and t.name in inputs:
                inputs.discard(t.name)  # the allowed input/initializer overlap, once
                continue
            seen.add(t.name)
        for sp in g.sparse_initializer:
            check_tensor(sp.values, where)
            check_tensor(sp.indices, where)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    check_tensor(attr.t, f" (attribute of node {node.name or node.op_type!r}){where}")
            for out in node.output:
                if not out:
                    continue
                if out in seen:
                    raise BadInputError(f"value {out!r}{where} is produced twice (node {node.name or node.op_type!r} "
                                        "redefines it)")
                seen.add(out)
