"""Memory-mapped external-data weights: models over 2 GB without holding their weights twice.

A model read with ``io.read_model(path, mapped=True)`` keeps every large initializer that lives in an external data
file (at least ``MAP_MIN_BYTES``, a dtype whose raw bytes are its NumPy layout, IR >= 4) as an *external reference*
in the ModelProto: ``location``/``offset``/``length`` plus one private entry ``FILE_KEY`` holding the resolved path
of the data file, which ``model_safety.check_external_data`` has already confined to the model's folder (offsets and
lengths checked against the file). The entry is stripped from any input file before the checks and never written
out: every writer (``io.save_model``, ``runtime.Session``) turns a mapped tensor into bytes or into a reference to
the file it writes.

- Import (``attach``): the graphsurgeon ``Constant`` of a mapped tensor gets ``MappedValues``; reading ``.values``
  returns a read-only ``np.memmap`` of exactly that file region (``MappedArray``, no copy; the kernel pages it in
  and may drop it again). Writing into it raises: passes assign new arrays, they never write in place.
- Resident memory: mapped pages count in RSS while mapped; each ``load`` first releases the pages of the earlier
  mappings (``release_resident_pages``), so a pass walking every weight keeps about one tensor resident.
- Export (``relazify``, before every graphsurgeon export): a Constant whose values are still the very array it was
  mapped to (same object, shape, dtype) goes back to ``MappedValues``, so the exported proto references the file
  instead of copying the bytes, and the mapping is released (its pages leave the resident set).
- ``checkable``: a stand-in for ``onnx.checker`` (which resolves external files against the working directory):
  large weights become typed graph inputs, everything else is the model.
- ``materialized``: a copy with every mapped tensor loaded, exactly as ``onnx.load_external_data_for_model`` loads
  it (raw_data, data_location DEFAULT, no external entries), for models small enough to serialise.

Byte sizes of a mapped model are the proto's plus the mapped lengths; nothing here serialises a > 2 GB proto.
"""

from __future__ import annotations

import atexit
import mmap
import os
import shutil
import sys
import tempfile
import weakref
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxcompress.errors import BadInputError
from onnxcompress.model_safety import iter_graphs, iter_tensors, tensor_nbytes

#: private external-data entry: the resolved path of the (checked) data file a mapped tensor reads
FILE_KEY = "onnxcompress.mapped_file"
#: external initializers at least this big are memory-mapped instead of loaded
MAP_MIN_BYTES = 1 << 20
#: weights at least this big become graph inputs in ``checkable``
CHECK_STRIP_BYTES = 1 << 20
_COPY_CHUNK = 16 << 20

#: dtypes whose raw bytes are exactly what ``numpy_helper.to_array`` returns (little-endian hosts)
_MAPPABLE = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
}


# -------------------------------------------------------------------------------------------------- protos
def is_mapped(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(e.key == FILE_KEY for e in t.external_data)


def source(t: onnx.TensorProto) -> tuple[str, int, int]:
    """(data file, offset, length) of a mapped tensor."""
    entries = {e.key: e.value for e in t.external_data}
    return entries[FILE_KEY], int(entries.get("offset") or 0), int(entries["length"])


def has_mapped(model: onnx.ModelProto) -> bool:
    return any(is_mapped(t) for g in iter_graphs(model.graph) for t in g.initializer)


def mapped_bytes(model: onnx.ModelProto) -> int:
    return sum(source(t)[2] for g in iter_graphs(model.graph) for t in g.initializer if is_mapped(t))


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def strip_private_entries(model: onnx.ModelProto) -> None:
    """Remove ``FILE_KEY`` entries an input file may carry (only the reader sets them, after its checks)."""
    for t in iter_tensors(model):
        if any(e.key == FILE_KEY for e in t.external_data):
            keep = [(e.key, e.value) for e in t.external_data if e.key != FILE_KEY]
            del t.external_data[:]
            for k, v in keep:
                t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))


def map_initializers(model: onnx.ModelProto, base_dir: Path) -> int:
    """Mark the mappable external initializers (module docstring); call after ``check_external_data``. Returns how
    many were marked; the other external tensors are left for the caller to load."""
    if model.ir_version < 4 or sys.byteorder != "little":
        return 0
    base = base_dir.resolve()
    marked = 0
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type not in _MAPPABLE:
                continue
            nbytes = tensor_nbytes(t)
            if nbytes is None or nbytes < MAP_MIN_BYTES:
                continue
            entries = {e.key: e.value for e in t.external_data}
            target = (base / entries["location"]).resolve()
            del t.external_data[:]
            for k, v in (("location", entries["location"]), ("offset", str(int(entries.get("offset") or 0))),
                         ("length", str(nbytes)), (FILE_KEY, str(target))):
                t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
            marked += 1
    return marked


def read_region(t: onnx.TensorProto) -> bytes:
    path, offset, length = source(t)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: {len(data)} bytes at offset {offset}, expected {length} (file changed?)")
    return data


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` that also reads a mapped tensor (onnx's own reader would look for its file in the
    working directory and fail); the array of a mapped tensor is read-only."""
    if not is_mapped(t):
        return onnx.numpy_helper.to_array(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(read_region(t), dtype=dtype).reshape(tuple(t.dims))


def load_into(t: onnx.TensorProto) -> None:
    """In place: the mapped tensor's bytes as raw_data, as onnx's external-data loader leaves a tensor."""
    t.raw_data = read_region(t)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every mapped tensor loaded (only for models under the protobuf limit)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in iter_graphs(out.graph):
        for t in g.initializer:
            if is_mapped(t):
                load_into(t)
    return out


def copy_region(t: onnx.TensorProto, out) -> int:
    """Append the mapped tensor's bytes to the open binary file ``out`` in chunks; returns the length."""
    path, offset, length = source(t)
    buf = bytearray(min(_COPY_CHUNK, max(length, 1)))
    left = length
    with open(path, "rb") as f:
        f.seek(offset)
        while left:
            view = memoryview(buf)[:min(left, len(buf))]
            n = f.readinto(view)
            if not n:
                raise OSError(f"{path}: ends before offset {offset} + length {length} (file changed?)")
            out.write(view[:n])
            left -= n
    return length


_ZIP_CACHE: dict[tuple, int] = {}
#: a mapped tensor above ZIP_SAMPLES x ZIP_SAMPLE_BYTES is zip-estimated from that many evenly spaced samples
ZIP_SAMPLES = 8
ZIP_SAMPLE_BYTES = 1 << 20


def zipped_size(t: onnx.TensorProto, level: int = 6) -> int:
    """zlib size of a mapped tensor's bytes, cached by (file, offset, length, mtime). Up to ``ZIP_SAMPLES`` x
    ``ZIP_SAMPLE_BYTES`` it is exact (streamed in chunks); above, it is estimated as length x the compression ratio
    of ``ZIP_SAMPLES`` evenly spaced samples of ``ZIP_SAMPLE_BYTES`` (zlib runs at ~30 MB/s on float weights: the
    exact figure of a 2 GB model would take over a minute per ledger row)."""
    path, offset, length = source(t)
    key = (path, offset, length, os.stat(path).st_mtime_ns, level)
    if key not in _ZIP_CACHE:
        sample = ZIP_SAMPLE_BYTES if length > ZIP_SAMPLES * ZIP_SAMPLE_BYTES else length
        starts = ([offset] if sample == length else
                  [offset + (length - sample) * i // (ZIP_SAMPLES - 1) for i in range(ZIP_SAMPLES)])
        raw = packed = 0
        with open(path, "rb") as f:
            for at in starts:
                f.seek(at)
                comp = zlib.compressobj(level)
                left = sample
                while left:
                    chunk = f.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        break
                    packed += len(comp.compress(chunk))
                    raw += len(chunk)
                    left -= len(chunk)
                packed += len(comp.flush())
        _ZIP_CACHE[key] = packed if sample == length else int(round(length * packed / max(raw, 1)))
    return _ZIP_CACHE[key]


def _heavy(t: onnx.TensorProto) -> bool:
    return is_mapped(t) or (t.HasField("raw_data") and (tensor_nbytes(t) or 0) >= CHECK_STRIP_BYTES)


def copy_fields(dst, src, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of message ``src`` into ``dst`` except ``skip`` (so a big one is never copied)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(value, "extend"):
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "ListFields"):
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no initializers yet (the caller adds them as it needs). Reading the
    fields decodes their strings: a string that is not UTF-8 (a corrupt file) is bad input."""
    out = onnx.ModelProto()
    try:
        copy_fields(out, model, ("graph",))
        copy_fields(out.graph, model.graph, ("initializer",))
    except UnicodeDecodeError as exc:
        raise BadInputError(f"the model holds a string that is not valid UTF-8 (a corrupt file?): {exc.reason} "
                            f"at byte {exc.start}") from exc
    return out


def serialized_size(model: onnx.ModelProto) -> int:
    """The size ``model`` would serialise to with every mapped tensor loaded, computed without serialising any
    large tensor (upb's ``ByteSize`` serialises the message): large weights are measured as stubs with empty data
    plus their length. Exact but for the length prefixes of subgraphs holding mapped tensors (a few bytes)."""
    out = shell(model)
    delta = 0
    for t in model.graph.initializer:
        if not _heavy(t):
            out.graph.initializer.add().CopyFrom(t)
            continue
        stub = out.graph.initializer.add()
        copy_fields(stub, t, ("raw_data", "external_data") if is_mapped(t) else ("raw_data",))
        if is_mapped(t):
            stub.data_location = onnx.TensorProto.DEFAULT
        stub.raw_data = b""
        length = source(t)[2] if is_mapped(t) else (tensor_nbytes(t) or 0)
        size = stub.ByteSize()
        real = size - 1 + _varint_len(length) + length
        delta += real + _varint_len(real) - size - _varint_len(size)
    for g in iter_graphs(out.graph):
        if g is out.graph:
            continue
        for t in g.initializer:
            if is_mapped(t):
                ref = t.ByteSize()
                stub = onnx.TensorProto()
                copy_fields(stub, t, ("external_data",))
                stub.data_location = onnx.TensorProto.DEFAULT
                stub.raw_data = b""
                length = source(t)[2]
                real = stub.ByteSize() - 1 + _varint_len(length) + length
                delta += real + _varint_len(real) - ref - _varint_len(ref)
    g_shell = out.graph.ByteSize()
    g_real = g_shell + delta
    return out.ByteSize() - _varint_len(g_shell) - g_shell + _varint_len(g_real) + g_real


def checkable(model: onnx.ModelProto, strip=None) -> onnx.ModelProto:
    """A weightless copy for ``onnx.checker`` and shape inference: every mapped initializer, and every other one of at
    least ``CHECK_STRIP_BYTES`` (or for which ``strip(tensor)`` is true), becomes a typed input of the main graph
    (names are unique across scopes, so subgraphs still see it). The main graph's large weights are never copied."""
    strip = _heavy if strip is None else (lambda t, rule=strip: is_mapped(t) or rule(t))
    out = shell(model)
    declared = {vi.name for vi in out.graph.input}

    def declare(t: onnx.TensorProto) -> None:
        if t.name not in declared:
            out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            declared.add(t.name)

    for t in model.graph.initializer:
        if strip(t):
            declare(t)
        else:
            out.graph.initializer.add().CopyFrom(t)
    for g in iter_graphs(out.graph):
        if g is out.graph:
            continue
        for i in reversed(range(len(g.initializer))):
            if strip(g.initializer[i]):
                declare(g.initializer[i])
                del g.initializer[i]
    return out


# ------------------------------------------------------------------------------------------- graphsurgeon
class MappedArray(np.memmap):
    """A read-only memory map of one tensor's file region; ``mapped_from`` is set only on the array ``load`` made
    (views and results of operations have None)."""
    mapped_from: MappedValues | None = None


#: the mappings ``MappedValues.load`` made that may still be alive
_LIVE_MAPS: list[weakref.ref] = []


def release_resident_pages() -> int:
    """Drop the resident pages of every live mapping (``MADV_DONTNEED``; read-only file mappings refault from the
    page cache on the next read, unchanged). Keeps the resident set at about one tensor while a pass walks the
    weights, even though a replaced Constant (and its mapping) lives on until the cycle collector frees it.
    Returns how many mappings are alive."""
    alive = []
    for ref in _LIVE_MAPS:
        mm = ref()
        if mm is None or mm.closed:
            continue
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):  # pragma: no cover - platform without madvise
            pass
        alive.append(ref)
    _LIVE_MAPS[:] = alive
    return len(alive)


class MappedValues(LazyValues):
    """Lazy values of a mapped tensor: ``load()`` maps the file region, nothing is copied (and the pages of the
    mappings made before are released: ``release_resident_pages``)."""

    def load(self) -> np.ndarray:
        path, offset, _ = source(self.tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        release_resident_pages()
        arr = MappedArray(path, dtype=dtype, mode="r", offset=offset, shape=tuple(int(d) for d in self.tensor.dims))
        arr.mapped_from = self
        mm = getattr(arr, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            _LIVE_MAPS.append(weakref.ref(mm))
        return arr

    def fresh(self) -> MappedValues:
        """A new instance over a copy of the (small, reference-only) tensor proto: never shared between Constants."""
        t = onnx.TensorProto()
        t.CopyFrom(self.tensor)
        return MappedValues(t)


def is_mapped_constant(c: gs.Constant) -> bool:
    """The Constant's values are (still) a memory-mapped file region, loaded or not: a model over 2 GB."""
    return isinstance(c._values, MappedValues | MappedArray)


def _constants(graph) -> list:
    graphs = [graph, *graph.subgraphs(recursive=True)]
    seen: dict[int, object] = {}
    for g in graphs:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                seen.setdefault(id(t), t)
    return list(seen.values())


def attach(graph) -> int:
    """After ``gs.import_onnx``: Constants of mapped tensors get ``MappedValues`` (and the data location an eagerly
    loaded tensor has, DEFAULT, so a replaced array exports exactly as it would have). Returns how many."""
    n = 0
    for c in _constants(graph):
        v = c._values
        if isinstance(v, LazyValues) and not isinstance(v, SparseValues) and is_mapped(v.tensor):
            c._values = MappedValues(v.tensor).fresh()
            c.data_location = onnx.TensorProto.DEFAULT
            n += 1
    return n


def relazify(graph) -> int:
    """Before an export: Constants still holding the untouched array they were mapped to go back to
    ``MappedValues`` (exported as file references; the mapping is released). In a graph of a mapped model, a large
    array a pass assigned is spilled to a scratch file and mapped too (``spill``): the exported proto never holds
    large weights, and the pass's in-memory copy is freed. Returns how many Constants export as references."""
    n = 0
    constants = _constants(graph)
    mapped_model = any(is_mapped_constant(c) for c in constants)
    for c in constants:
        v = c._values
        if getattr(c, "_export_dtype", None) not in (None, getattr(v, "dtype", None)):
            continue
        src = getattr(v, "mapped_from", None) if isinstance(v, MappedArray) else None
        if src is not None and tuple(v.shape) == tuple(src.shape) and v.dtype == np.dtype(src.dtype):
            c._values = src.fresh()
            n += 1
        elif mapped_model and type(v) is np.ndarray and v.nbytes >= MAP_MIN_BYTES and spill(c):
            n += 1
    return n


#: per-process scratch folder of spilled weights (removed at exit)
_SCRATCH: list[Path] = []


def _scratch_dir() -> Path:
    if not _SCRATCH:
        folder = Path(tempfile.mkdtemp(prefix="onnxcompress-spill-"))
        atexit.register(shutil.rmtree, folder, True)
        _SCRATCH.append(folder)
    return _SCRATCH[0]


def spill(c) -> bool:
    """Write Constant ``c``'s in-memory array to a scratch file and give it ``MappedValues`` of that file (the same
    bytes, read back lazily). False (nothing done) for a dtype whose raw bytes are not its NumPy layout."""
    arr = np.ascontiguousarray(c._values)
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    except (KeyError, TypeError, ValueError):
        return False
    if data_type not in _MAPPABLE or sys.byteorder != "little":
        return False
    fd, path = tempfile.mkstemp(dir=_scratch_dir(), suffix=".bin")
    with os.fdopen(fd, "wb") as f:
        arr.tofile(f)
    t = onnx.TensorProto(name=c.name, data_type=data_type, dims=list(arr.shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", os.path.basename(path)), ("offset", "0"), ("length", str(arr.nbytes)),
                 (FILE_KEY, path)):
        t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
    c._values = MappedValues(t)
    return True
