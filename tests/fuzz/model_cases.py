"""Fuzz cases on the model file: protobuf corruption, header fields, graph and tensor mutations, external data."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.fuzz.base import (
    Case,
    Setup,
    _edit,
    _weight_spans,
    calib_for,
    digits,
    if_model,
    mlp,
    model_case,
)


# ----------------------------------------------------------------------------------------------- protobufs
def protobuf_cases(rng: random.Random) -> list[Case]:
    base = digits()
    blob = base.SerializeToString()
    spans = _weight_spans(blob, base)
    structure = [i for i in range(len(blob)) if not any(a <= i < b for a, b in spans)]
    cases = []
    for k, frac in enumerate(sorted(rng.random() for _ in range(24))):
        cut = max(1, int(frac * len(blob)))
        cases.append(model_case(f"truncated-{k:02d}-at-{cut}", lambda c=cut: blob[:c], digits_calib=True))
    for cut in (1, 2, 3, 8, 16, 64, len(blob) - 1, len(blob) - 2):
        cases.append(model_case(f"truncated-at-{cut}", lambda c=cut: blob[:c], digits_calib=True))
    for k in range(48):
        positions = [rng.choice(structure) for _ in range(rng.choice((1, 1, 2, 4)))]
        bits = [rng.randrange(8) for _ in positions]

        def flip(pos=positions, bit=bits) -> bytes:
            b = bytearray(blob)
            for p, q in zip(pos, bit, strict=True):
                b[p] ^= 1 << q
            return bytes(b)

        cases.append(model_case(f"bitflip-structure-{k:02d}", flip, digits_calib=True))
    for k in range(3):
        pos = rng.randrange(len(blob))

        def flip_any(p=pos) -> bytes:
            b = bytearray(blob)
            b[p] ^= 0xFF
            return bytes(b)

        cases.append(model_case(f"byteflip-anywhere-{k}", flip_any, digits_calib=True))
    junk = bytes(rng.randrange(256) for _ in range(4096))
    for cid, data in [("empty-file", b""), ("zeros", b"\0" * 1024), ("random-bytes", junk),
                      ("text-file", b"ir_version: 8\ngraph { }\n"), ("json-file", b'{"graph": {"node": []}}'),
                      ("zip-file", b"PK\x03\x04" + junk[:200]), ("junk-appended", blob + junk[:64]),
                      ("model-twice", blob + blob), ("varint-overflow", b"\x08" + b"\xff" * 12),
                      ("huge-length-field", b"\x3a\xff\xff\xff\xff\x0f" + junk[:32])]:
        cases.append(model_case(cid, lambda d=data: d, digits_calib=True))
    return cases


# ------------------------------------------------------------------------------------------- model header
def header_cases() -> list[Case]:
    cases = []
    for ir in (0, 1, 2, 3, 99, 2**40):
        cases.append(model_case(f"ir-version-{ir}", _edit(digits, lambda m, v=ir: setattr(m, "ir_version", v)),
                                digits_calib=True))
    for opset in (0, 1, 6, 7, 30, 999, -5):
        def set_opset(m, v=opset):
            m.opset_import[0].version = v
        cases.append(model_case(f"opset-{opset}", _edit(digits, set_opset), digits_calib=True))

    def no_opset(m):
        del m.opset_import[:]

    def dup_opset(m):
        m.opset_import.append(helper.make_opsetid("", 11))

    def custom_only(m):
        del m.opset_import[:]
        m.opset_import.append(helper.make_opsetid("com.example", 1))

    def no_graph(m):
        m.ClearField("graph")

    for cid, fn in [("no-opset-import", no_opset), ("duplicate-opset-import", dup_opset),
                    ("custom-domain-opset-only", custom_only), ("no-graph", no_graph)]:
        cases.append(model_case(cid, _edit(digits, fn), digits_calib=True))
    for opset in (1, 7, 30):
        cases.append(model_case(f"mlp-opset-{opset}", lambda v=opset: mlp(v)))
    return cases


# ---------------------------------------------------------------------------------------- graph mutations
def _set(seq, items) -> None:
    del seq[:]
    seq.extend(items)


def digits_node_cases() -> list[Case]:
    """Per node of the bundled model: a missing input, an unknown op, a custom domain, the node removed, the node
    duplicated (two producers of one name)."""
    base = digits()
    cases = []
    for i, node in enumerate(base.graph.node):
        tag = f"{i:02d}-{node.op_type.lower()}"

        def missing(m, i=i):
            m.graph.node[i].input[0] = "no_such_tensor"

        def unknown(m, i=i):
            m.graph.node[i].op_type = "FrobnicateV2"

        def custom(m, i=i):
            m.graph.node[i].domain = "com.example.fuzz"

        def drop(m, i=i):
            _set(m.graph.node, [n for j, n in enumerate(m.graph.node) if j != i])

        def dup(m, i=i):
            m.graph.node.insert(i + 1, copy_node(m.graph.node[i]))

        for what, fn in (("missing-input", missing), ("unknown-op", unknown), ("custom-domain", custom),
                         ("dropped", drop), ("duplicated", dup)):
            cases.append(model_case(f"node-{tag}-{what}", _edit(digits, fn), digits_calib=True))
    return cases


def copy_node(n: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(n)
    return out


def digits_tensor_cases(rng: random.Random) -> list[Case]:
    """Per initializer (10 drawn from the seed, the scalar one always among them): raw data one element short /
    one extra, dims grown, a negative dim, a bogus dtype."""
    base = digits()
    cases = []
    picked = set(rng.sample(range(len(base.graph.initializer)), 10))
    picked |= {i for i, t in enumerate(base.graph.initializer) if not t.dims}
    for i, t in enumerate(base.graph.initializer):
        if i not in picked:
            continue
        tag = f"{i:02d}-{t.name}"

        def short(m, i=i):
            t = m.graph.initializer[i]
            t.raw_data = t.raw_data[:-4]

        def extra(m, i=i):
            t = m.graph.initializer[i]
            t.raw_data = t.raw_data + b"\0\0\x80\x7f"

        def grow(m, i=i):
            t = m.graph.initializer[i]
            t.dims.append(1000) if not t.dims else t.dims.__setitem__(0, t.dims[0] * 1000)

        def negative(m, i=i):
            t = m.graph.initializer[i]
            t.dims.append(-1) if not t.dims else t.dims.__setitem__(0, -t.dims[0])

        def dtype(m, i=i):
            m.graph.initializer[i].data_type = 77

        for what, fn in (("raw-data-short", short), ("raw-data-long", extra), ("dims-grown", grow),
                         ("negative-dim", negative), ("bogus-dtype", dtype)):
            cases.append(model_case(f"init-{tag}-{what}", _edit(digits, fn), digits_calib=True))
    return cases


def structure_cases() -> list[Case]:
    cases = []

    def cycle(m):  # relu reads its own consumer's output: gemm -> relu -> matmul -> relu
        m.graph.node[1].input[0] = "y"

    def self_loop(m):
        m.graph.node[1].input[0] = "r"

    def dup_output(m):
        m.graph.node[2].output[0] = "h"

    def dup_init(m):
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((3, 2), np.float32), "w2"))

    def dup_input(m):
        m.graph.input.append(copy_vi(m.graph.input[0]))

    def init_shadows_output(m):
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((2, 3), np.float32), "h"))

    def empty_graph(m):
        del m.graph.node[:]
        del m.graph.output[:]

    def no_nodes(m):
        del m.graph.node[:]

    def passthrough(m):  # valid: the output is the input
        del m.graph.node[:]
        del m.graph.initializer[:]
        m.graph.output[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]))

    def output_not_produced(m):
        m.graph.output[0].name = "nowhere"

    def empty_op(m):
        m.graph.node[1].op_type = ""

    def empty_names(m):
        m.graph.node[1].output[0] = ""

    def absurd_input(m):
        m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1_000_000, 1_000_000]))

    def absurd_output(m):
        m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [10**6, 10**6]))

    def negative_input(m):
        m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [-2, 4]))

    def zero_input(m):
        m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 4]))

    def absurd_init(m):
        t = m.graph.initializer[0]
        del t.dims[:]
        t.dims.extend([1_000_000, 1_000_000])

    def absurd_init_no_data(m):
        t = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[10**6, 10**6])
        m.graph.initializer.append(t)
        m.graph.node.append(helper.make_node("Identity", ["huge"], ["huge_out"]))

    def float_data_mismatch(m):
        t = m.graph.initializer[1]
        t.ClearField("raw_data")
        t.float_data.extend([1.0, 2.0])

    def both_data(m):
        m.graph.initializer[1].float_data.extend([1.0, 2.0, 3.0])

    def string_weight(m):
        m.graph.initializer[1].CopyFrom(helper.make_tensor("b1", TensorProto.STRING, [3], [b"a", b"b", b"c"]))

    def wrong_attr_type(m):
        del m.graph.node[0].attribute[:]
        m.graph.node[0].attribute.append(helper.make_attribute("transB", "yes"))

    def unknown_attr(m):
        m.graph.node[1].attribute.append(helper.make_attribute("frobnicate", 3))

    def weight_shape_mismatch(m):
        m.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros((5, 2), np.float32), "w2"))

    def input_is_weight(m):  # a weight fed as a graph input too (valid: the initializer is its default)
        m.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [3, 2]))

    def no_dtype_input(m):
        m.graph.input[0].type.tensor_type.elem_type = 0

    def sequence_input(m):
        m.graph.input[0].CopyFrom(helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [2, 4]))

    def nan_weights(m):
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((3, 4), np.nan, np.float32), "w1"))

    def inf_weights(m):
        m.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.full((3, 2), np.inf, np.float32), "w2"))

    def unused_unknown_op(m):
        m.graph.node.append(helper.make_node("NoSuchOp", ["x"], ["dead"], domain="com.example"))

    def huge_attr(m):
        m.graph.node[1].attribute.append(helper.make_attribute("junk", list(range(50_000))))

    def long_names(m):
        m.graph.node[1].name = "n" * 100_000

    muts = [("cycle", cycle), ("self-loop", self_loop), ("duplicate-output-name", dup_output),
            ("duplicate-initializer", dup_init), ("duplicate-input", dup_input),
            ("initializer-shadows-node-output", init_shadows_output), ("empty-graph", empty_graph),
            ("no-nodes", no_nodes), ("passthrough-graph", passthrough), ("output-not-produced", output_not_produced),
            ("empty-op-type", empty_op), ("empty-output-name", empty_names), ("absurd-input-shape", absurd_input),
            ("absurd-output-shape", absurd_output), ("negative-input-dim", negative_input),
            ("zero-input-dim", zero_input), ("absurd-initializer-dims", absurd_init),
            ("absurd-initializer-no-data", absurd_init_no_data), ("float-data-count-mismatch", float_data_mismatch),
            ("raw-and-float-data", both_data), ("string-weight", string_weight), ("wrong-attribute-type",
                                                                                   wrong_attr_type),
            ("unknown-attribute", unknown_attr), ("weight-shape-mismatch", weight_shape_mismatch),
            ("weight-also-input", input_is_weight), ("input-without-dtype", no_dtype_input),
            ("sequence-input", sequence_input), ("nan-weights", nan_weights), ("inf-weights", inf_weights),
            ("unused-custom-op", unused_unknown_op), ("huge-attribute", huge_attr), ("long-node-name", long_names)]
    for cid, fn in muts:
        cases.append(model_case(f"mlp-{cid}", _edit(mlp, fn)))

    def digits_absurd_input(m):
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 10**6
        m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 10**6

    def digits_negative_input(m):
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -1

    def digits_symbolic_all(m):
        for d in m.graph.input[0].type.tensor_type.shape.dim:
            d.dim_param = "free"

    def digits_cycle(m):
        m.graph.node[0].input[0] = "logits"

    def digits_residual_cycle(m):
        m.graph.node[6].input[0] = "residual_out"

    for cid, fn in [("absurd-input-shape", digits_absurd_input), ("negative-input-dim", digits_negative_input),
                    ("all-dims-symbolic", digits_symbolic_all), ("cycle-output-to-input", digits_cycle),
                    ("cycle-through-residual", digits_residual_cycle)]:
        cases.append(model_case(f"digits-{cid}", _edit(digits, fn), digits_calib=True))

    # subgraphs
    def branch(m, name):
        node = m.graph.node[2]
        return next(a.g for a in node.attribute if a.name == name)

    def if_missing_branch(m):
        node = m.graph.node[2]
        _set(node.attribute, [a for a in node.attribute if a.name != "else_branch"])

    def if_reads_missing(m):
        branch(m, "then_branch").node[0].input[1] = "not_in_any_scope"

    def if_branch_no_output(m):
        del branch(m, "then_branch").output[:]

    def if_branch_unknown_op(m):
        branch(m, "else_branch").node[0].op_type = "Bogus"

    def if_cond_float(m):
        m.graph.node[2].input[0] = "s"

    def if_branch_shadows(m):  # a branch output named like an outer value
        g = branch(m, "then_branch")
        g.node[0].output[0] = "s"
        g.output[0].name = "s"

    def if_branch_cycle(m):
        g = branch(m, "then_branch")
        g.node[0].input[0] = "then_y"

    def if_graph_attr_wrong(m):
        node = m.graph.node[2]
        _set(node.attribute, [a for a in node.attribute if a.name != "then_branch"])
        node.attribute.append(helper.make_attribute("then_branch", 3))

    for cid, fn in [("missing-else", if_missing_branch), ("branch-reads-missing", if_reads_missing),
                    ("branch-without-output", if_branch_no_output), ("branch-unknown-op", if_branch_unknown_op),
                    ("float-condition", if_cond_float), ("branch-shadows-outer-name", if_branch_shadows),
                    ("branch-cycle", if_branch_cycle), ("branch-attribute-not-a-graph", if_graph_attr_wrong)]:
        cases.append(model_case(f"if-{cid}", _edit(if_model, fn)))
    cases.append(model_case("if-valid", if_model, must_fail=False))
    cases.append(model_case("mlp-valid", mlp, must_fail=False))
    return cases


def copy_vi(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


# --------------------------------------------------------------------------------------------- external data
def _external(location: str | None, offset: int | None = None, length: int | None = None,
              data_len: int = 48, setup: Callable[[Path], list[Path]] | None = None, must_fail: bool | None = True,
              case_id: str = "") -> Case:
    """The mlp with w1 (48 bytes) stored externally at ``location`` (offset/length entries as given)."""

    def build(folder: Path) -> Setup:
        m = mlp()
        w1 = m.graph.initializer[0]
        raw = w1.raw_data
        watched = setup(folder) if setup else []
        if location == "w.bin":
            target = folder / location
            if not target.exists() and not target.is_symlink():
                target.write_bytes(raw[:data_len] + b"\0" * max(0, data_len - len(raw)))
        w1.ClearField("raw_data")
        w1.data_location = TensorProto.EXTERNAL
        if location is not None:
            w1.external_data.append(onnx.StringStringEntryProto(key="location", value=location))
        if offset is not None:
            w1.external_data.append(onnx.StringStringEntryProto(key="offset", value=str(offset)))
        if length is not None:
            w1.external_data.append(onnx.StringStringEntryProto(key="length", value=str(length)))
        path = folder / "model.onnx"
        path.write_bytes(m.SerializeToString())
        return Setup(path, calib=calib_for(m, folder), watched=watched)

    return Case(f"external-{case_id}", "model", build, must_fail=must_fail, inspect_must_fail=None)


def external_cases() -> list[Case]:
    def outside_file(folder: Path) -> list[Path]:
        out = folder.parent / f"{folder.name}-outside"
        out.mkdir(exist_ok=True)
        (out / "secret.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
        return [out / "secret.bin"]

    def symlink_out(folder: Path) -> list[Path]:
        watched = outside_file(folder)
        (folder / "link.bin").symlink_to(watched[0])
        return watched

    def symlink_dir_out(folder: Path) -> list[Path]:
        watched = outside_file(folder)
        (folder / "sub").symlink_to(watched[0].parent, target_is_directory=True)
        return watched

    def symlink_in(folder: Path) -> list[Path]:
        (folder / "real.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
        (folder / "link.bin").symlink_to("real.bin")
        return []

    def dir_as_data(folder: Path) -> list[Path]:
        (folder / "adir").mkdir()
        return []

    def fifo(folder: Path) -> list[Path]:
        os.mkfifo(folder / "pipe.bin")
        return []

    def outside(folder: Path) -> str:
        return str(folder.parent / f"{folder.name}-outside" / "secret.bin")

    cases = [
        _external("w.bin", must_fail=False, case_id="valid"),
        _external("w.bin", offset=0, length=48, must_fail=False, case_id="valid-offset-length"),
        _external("link.bin", setup=symlink_in, must_fail=False, case_id="symlink-inside-folder"),
        _external("/etc/passwd", case_id="absolute-path"),
        _external("/dev/zero", case_id="absolute-dev-zero"),
        _external("../outside/secret.bin", setup=outside_file, case_id="dotdot"),
        _external("sub/../../x.bin", case_id="dotdot-nested"),
        _external("link.bin", setup=symlink_out, case_id="symlink-file-out"),
        _external("sub/secret.bin", setup=symlink_dir_out, case_id="symlink-dir-out"),
        _external("w.bin", offset=4096, case_id="offset-past-end"),
        _external("w.bin", offset=0, length=4096, case_id="length-past-end"),
        _external("w.bin", offset=40, length=48, case_id="offset-plus-length-past-end"),
        _external("w.bin", offset=2**62, length=48, case_id="offset-2-62"),
        _external("w.bin", offset=-8, case_id="negative-offset"),
        _external("w.bin", offset=0, length=-48, case_id="negative-length"),
        _external("w.bin", offset=0, length=12, case_id="length-shorter-than-shape"),
        _external("w.bin", data_len=20, case_id="file-shorter-than-shape"),
        _external("w.bin", data_len=400, must_fail=None, case_id="file-longer-than-shape"),
        _external("w.bin", offset="abc", case_id="offset-not-a-number"),  # type: ignore[arg-type]
        _external("missing.bin", case_id="missing-file"),
        _external("", case_id="empty-location"),
        _external(None, case_id="no-location"),
        _external("adir", setup=dir_as_data, case_id="location-is-folder"),
        _external("model.onnx", must_fail=None, case_id="location-is-the-model"),
        _external("pipe.bin", setup=fifo, case_id="location-is-a-fifo"),
        _external("w\0.bin", case_id="nul-in-location"),
        _external("C:\\weights\\w.bin", case_id="windows-drive-path"),
        _external("\\\\server\\share\\w.bin", case_id="unc-path"),
    ]
    return cases


