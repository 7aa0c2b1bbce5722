"""Model I/O: ModelProto <-> onnx-graphsurgeon Graph, external data, safety checks, atomic writes.

Rules this module enforces:

- Reading never modifies the input file. A file that is not a parseable ONNX model, or is an empty protobuf, is a
  ``BadInputError`` with one clear line.
- Before anything else reads a parsed model, ``model_safety`` checks it: external data inside the model's folder
  and within its file (absolute paths, ``..``, symlinks out, offsets past the end refused), well-formed weights
  (data length == shape x dtype, sane dims), sane declared input/output shapes, no value defined twice.
- ``Constant`` nodes that carry a tensor are weights, exactly like initializers: ``lift_constant_nodes`` turns them
  into initializers of the graph they live in (subgraphs included), so every pass sees one kind of weight.
- Writes are atomic: the model (and its external data file) are written to a temporary folder next to the target
  and renamed into place; a failure leaves nothing behind.
- A model whose weights exceed ``PROTO_LIMIT`` is saved with external data: a > 2 GB protobuf is never serialised,
  and the weights are streamed to the data file one tensor at a time (no second in-memory copy of the model).
- ``read_model(path, mapped=True)`` leaves large external weights in their file, memory-mapped on use
  (``mmap_weights``): import maps them, export references them, writers stream them from the file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcompress import mmap_weights
from onnxcompress.errors import BadInputError
from onnxcompress.model_safety import (  # noqa: F401  (re-exported: io is where callers look for them)
    MAX_ELEMENTS,
    check_external_data,
    check_model_sanity,
    check_tensor,
    external_location,
    iter_graphs,
    iter_tensors,
    tensor_nbytes,
)

log = logging.getLogger(__name__)

# graphsurgeon prints its own warnings to stderr ("[W] ..."); what matters of them is handled here
# (typed attributes, non-tensor values), so only its errors are let through.
try:
    from onnx_graphsurgeon.logger import G_LOGGER as _GS_LOGGER

    _GS_LOGGER.severity = _GS_LOGGER.ERROR
except Exception:  # pragma: no cover - logger API differs across versions
    pass

#: Protobuf refuses messages >= 2 GiB; keep a margin for the graph structure itself.
PROTO_LIMIT = 1_800_000_000
#: tensors at least this big go to the external data file when a model is saved with external data
EXTERNAL_TENSOR_MIN_BYTES = 1024

_SUBGRAPH_ATTR_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


# --------------------------------------------------------------------------------------------------- traversal
def iter_gs_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graphsurgeon graph and all its subgraphs."""
    yield graph
    yield from graph.subgraphs(recursive=True)


# ---------------------------------------------------------------------------------------------------- reading
def read_model(path: str | os.PathLike, *, load_weights: bool = True, mapped: bool = False) -> onnx.ModelProto:
    """Parse an ONNX file with safety checks; external data (if any) is checked and loaded into memory, or with
    ``mapped`` its large initializers stay in the file as checked references (``mmap_weights``)."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file")
    if p.is_dir():
        raise BadInputError(f"{p}: is a folder, not an ONNX file")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, or RuntimeWarning-like errors on garbage
        raise BadInputError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or (len(model.graph.node) == 0 and not model.graph.output):
        raise BadInputError(f"{p}: not an ONNX model (no graph, or no IR version)")
    mmap_weights.strip_private_entries(model)
    files = check_external_data(model, p.parent)
    check_model_sanity(model)
    if files and load_weights:
        try:
            if mapped:
                mmap_weights.map_initializers(model, p.parent)
            else:
                onnx.load_external_data_for_model(model, str(p.parent))
            # also load Constant-node attribute tensors stored externally (onnx only loads initializers for some
            # versions), and with ``mapped`` the tensors left unmapped
            for t in iter_tensors(model):
                if t.data_location == onnx.TensorProto.EXTERNAL and not mmap_weights.is_mapped(t):
                    onnx.external_data_helper.load_external_data_for_tensor(t, str(p.parent))
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
        except Exception as exc:
            raise BadInputError(f"{p}: cannot load external data ({first_line(exc)})") from exc
    return model


def model_from_bytes(data: bytes, what: str = "model") -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise BadInputError(f"{what}: not a readable ONNX model ({first_line(exc)})") from exc
    return model


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------- Constant lifting
def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The tensor a ``Constant`` node produces, or None for sparse/string forms we leave as nodes."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def lift_constant_nodes(model: onnx.ModelProto) -> int:
    """Turn tensor-valued ``Constant`` nodes into initializers of their own (sub)graph. Returns how many.

    The produced value keeps its name, so consumers are untouched. IR < 4 requires initializers to be graph inputs,
    so lifting is skipped for such old models.
    """
    if model.ir_version < 4:
        return 0
    lifted = 0
    for g in iter_graphs(model.graph):
        keep = []
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                value_attr = next((a for a in node.attribute if a.name == "value"), None)
                if value_attr is not None:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(value_attr.t)
                    tensor.name = node.output[0]
                    g.initializer.append(tensor)
                    lifted += 1
                    continue
                arr = constant_node_value(node)
                if arr is not None:
                    g.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                    lifted += 1
                    continue
            keep.append(node)
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return lifted


# ------------------------------------------------------------------------ what graphsurgeon cannot represent
_TYPE_ATTRS = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)


def name_typed_attribute_nodes(model: onnx.ModelProto) -> int:
    """Give a unique name to every node carrying a TYPE_PROTO attribute (Optional, SequenceEmpty-like ops).

    graphsurgeon drops such attributes on import; ``to_model`` re-attaches them by node name from the template.
    """
    taken = {n.name for g in iter_graphs(model.graph) for n in g.node if n.name}
    named = 0
    for g in iter_graphs(model.graph):
        for node in g.node:
            if not node.name and any(a.type in _TYPE_ATTRS for a in node.attribute):
                i = len(taken)
                while f"onnxcompress_typed_{i}" in taken:
                    i += 1
                node.name = f"onnxcompress_typed_{i}"
                taken.add(node.name)
                named += 1
    return named


def _template_extras(template: onnx.ModelProto) -> tuple[dict[str, list], dict[str, onnx.TypeProto]]:
    """Typed attributes by node name, and non-tensor value types (sequence/optional/map) by value name."""
    attrs: dict[str, list] = {}
    types: dict[str, onnx.TypeProto] = {}
    for g in iter_graphs(template.graph):
        for node in g.node:
            typed = [a for a in node.attribute if a.type in _TYPE_ATTRS]
            if typed and node.name:
                attrs[node.name] = typed
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") not in (None, "tensor_type"):
                types[vi.name] = vi.type
    return attrs, types


def _mark_non_tensor_values(graph: gs.Graph) -> None:
    """graphsurgeon's exporter only handles tensor/sequence/sparse values: export others as untyped tensors
    (``to_model`` restores their real types from the template)."""
    for g in iter_gs_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Variable) and getattr(t, "type", "tensor_type") not in (
                    "tensor_type", "sequence_type", "sparse_tensor_type"):
                t.type = "tensor_type"
                t.dtype = None
                t.shape = None


def _restore_extras(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    attrs, types = _template_extras(template)
    if not attrs and not types:
        return
    for g in iter_graphs(model.graph):
        for node in g.node:
            if node.name in attrs and not any(a.type in _TYPE_ATTRS for a in node.attribute):
                node.attribute.extend(attrs[node.name])
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name in types:
                vi.type.CopyFrom(types[vi.name])


# ----------------------------------------------------------------------------------------- graph conversions
def drop_redundant_value_info(model: onnx.ModelProto) -> int:
    """Remove value_info entries that repeat a graph input/output name (they can shadow the output's shape)."""
    dropped = 0
    for g in iter_graphs(model.graph):
        io_names = {v.name for v in g.input} | {v.name for v in g.output}
        keep = [vi for vi in g.value_info if vi.name not in io_names]
        if len(keep) != len(g.value_info):
            dropped += len(g.value_info) - len(keep)
            del g.value_info[:]
            g.value_info.extend(keep)
    return dropped


def prepare_for_import(model: onnx.ModelProto) -> int:
    """In place: Constant nodes -> initializers, names for nodes whose attributes graphsurgeon drops, no
    value_info shadowing graph inputs/outputs. Returns the number of Constant nodes lifted."""
    name_typed_attribute_nodes(model)
    drop_redundant_value_info(model)
    return lift_constant_nodes(model)


def hoist_shared_initializers(model: onnx.ModelProto, template: onnx.ModelProto | None = None) -> int:
    """Undo graphsurgeon's copying of outer weights into every subgraph that reads them.

    An initializer that stands in more than one graph, or that the template held outside subgraphs, is kept once
    in the main graph. ONNX names are unique across all scopes, so the main graph's copy is what every subgraph
    sees. Returns the number of copies removed.
    """
    subgraphs = [g for g in iter_graphs(model.graph) if g is not model.graph]
    if not subgraphs:
        return 0
    template_sub_names: set[str] = set()
    if template is not None:
        for g in iter_graphs(template.graph):
            if g is not template.graph:
                template_sub_names.update(t.name for t in g.initializer)
    main_names = {t.name for t in model.graph.initializer}
    where: dict[str, int] = {}
    for g in subgraphs:
        for t in g.initializer:
            where[t.name] = where.get(t.name, 0) + 1
    hoist = {n for n, count in where.items()
             if n in main_names or count > 1 or (template is not None and n not in template_sub_names)}
    removed = 0
    for g in subgraphs:
        keep = []
        for t in g.initializer:
            if t.name in hoist:
                if t.name not in main_names:
                    model.graph.initializer.append(t)
                    main_names.add(t.name)
                else:
                    removed += 1
            else:
                keep.append(t)
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
    return removed


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into graphsurgeon (weights as ``gs.Constant``; subgraphs as Graph attributes). A subgraph initializer
    that reuses an outer name is renamed first (``scopes``): graphsurgeon keeps one tensor per name."""
    from onnxcompress.scopes import unshadow_initializers

    model, _ = unshadow_initializers(model)
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise BadInputError(f"cannot import the model graph ({first_line(exc)})") from exc
    mmap_weights.attach(graph)
    return graph


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None, opset: int | None = None) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the template's opset imports, IR version and metadata.

    ``opset`` overrides the default-domain opset (a pass upgraded it); other domains keep the template's versions.
    """
    _mark_non_tensor_values(graph)
    mmap_weights.relazify(graph)
    if template is None:
        model = gs.export_onnx(graph, do_type_check=False)
        hoist_shared_initializers(model)
        return model
    imports = [onnx.helper.make_opsetid(i.domain, i.version) for i in template.opset_import]
    # domains a pass introduced (e.g. com.microsoft) must be imported too
    have = {i.domain for i in imports}
    for dom in _used_domains(graph) - have:
        imports.append(onnx.helper.make_opsetid(dom, 1))
    if opset is not None:
        imports = [onnx.helper.make_opsetid(i.domain, opset) if i.domain in ("", "ai.onnx") else i for i in imports]
        if not any(i.domain in ("", "ai.onnx") for i in imports):
            imports.append(onnx.helper.make_opsetid("", opset))
    model = gs.export_onnx(graph, do_type_check=False, opset_imports=imports)
    model.ir_version = max(template.ir_version, _min_ir_for_opset(opset)) if opset else template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    _restore_extras(model, template)
    hoist_shared_initializers(model, template)
    return model


def _used_domains(graph: gs.Graph) -> set[str]:
    domains = set()
    for g in iter_gs_graphs(graph):
        for node in g.nodes:
            if node.domain not in (None, "", "ai.onnx"):
                domains.add(node.domain)
    return domains


def _min_ir_for_opset(opset: int) -> int:
    # IR versions that introduced each opset range (onnx/helper.py VERSION_TABLE)
    if opset >= 23:
        return 11
    if opset >= 21:
        return 10
    if opset >= 19:
        return 9
    if opset >= 15:
        return 8
    return 7


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


# ---------------------------------------------------------------------------------------------------- writing
def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by tensors (initializers, Constant values) of the model, subgraphs included."""
    total = 0
    for t in iter_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0) or 0)
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += t.ByteSize()
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    return weight_bytes(model) >= PROTO_LIMIT


def serialize(model: onnx.ModelProto) -> bytes:
    """Serialise a < 2 GB model (callers check ``needs_external_data`` first)."""
    return model.SerializeToString()


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write atomically. External data (``<name>.data`` beside the model) when asked or when the model is too big.

    The target folder must exist. Nothing half-written is left behind on failure.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} does not exist")
    use_external = needs_external_data(model) if external_data is None else external_data
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=folder))
    try:
        tmp_model = tmpdir / out.name
        data_name = out.name + ".data"
        if use_external:
            write_with_external_data(model, tmp_model, data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(serialize(mmap_weights.materialized(model) if mmap_weights.has_mapped(model) else model))
                f.flush()
                os.fsync(f.fileno())
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, folder / data_name)
        elif (folder / data_name).exists() and not use_external:
            log.debug("leaving unrelated %s in place", folder / data_name)
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def write_with_external_data(model: onnx.ModelProto, model_path: Path, data_name: str) -> None:
    """Write ``model_path`` + ``data_name`` beside it, streaming: each initializer's bytes go to the data file one
    tensor at a time (64-byte aligned; a memory-mapped tensor is copied from its file in chunks) and the model file
    is a shell copy holding external references (``mmap_weights.shell``: the large tensors are never copied).
    ``model`` is not touched (clearing and restoring its raw_data would grow the protobuf arena by the weights);
    extra memory: one tensor."""
    out = mmap_weights.shell(model)
    offset = 0

    def place(f, t: onnx.TensorProto, dst: onnx.TensorProto | None) -> None:
        """Write ``t``'s bytes and make ``dst`` (a new shell tensor, or ``t`` itself if None) reference them."""
        nonlocal offset
        is_mapped = mmap_weights.is_mapped(t)
        raw = b"" if is_mapped or not t.HasField("raw_data") else t.raw_data
        length = mmap_weights.source(t)[2] if is_mapped else len(raw)
        skip = not is_mapped and (t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data")
                                  or length < EXTERNAL_TENSOR_MIN_BYTES)
        if skip:
            if dst is not None:
                dst.CopyFrom(t)
            return
        pad = (-offset) % 64
        f.write(b"\0" * pad)
        offset += pad
        if is_mapped:
            mmap_weights.copy_region(t, f)
        else:
            f.write(raw)
        del raw
        if dst is None:
            dst = t
            dst.ClearField("raw_data")
        else:
            mmap_weights.copy_fields(dst, t, ("raw_data", "external_data"))
        dst.data_location = onnx.TensorProto.EXTERNAL
        del dst.external_data[:]
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            dst.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
        offset += length

    with open(model_path.parent / data_name, "wb") as f:
        for t in model.graph.initializer:
            place(f, t, out.graph.initializer.add())
        for g in iter_graphs(out.graph):  # subgraph initializers: the shell's own copies, rewritten in place
            if g is not out.graph:
                for t in g.initializer:
                    place(f, t, None)
        f.flush()
        os.fsync(f.fileno())
    with open(model_path, "wb") as f:
        f.write(out.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def file_size_on_disk(path: str | os.PathLike) -> int:
    """The model file plus the external data files it references."""
    p = Path(path)
    total = p.stat().st_size
    model = onnx.load_model(str(p), load_external_data=False)
    for f in check_external_data(model, p.parent):
        total += f.stat().st_size
    return total
