"""Memory-mapped external data (``mmap_weights``): the >2 GB path, exercised on small models in a tmp folder.

The mapping threshold is lowered so a few-KB weight is mapped; every result is compared with today's path (the
same model read with its weights loaded into the proto).
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcompress import io, mmap_weights
from onnxcompress.analyses.model_stats import model_stats
from onnxcompress.api import compress
from onnxcompress.errors import BadInputError
from onnxcompress.validate import structural_problems

H = 32


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    monkeypatch.setattr(mmap_weights, "MAP_MIN_BYTES", 1024)
    monkeypatch.setattr(mmap_weights, "CHECK_STRIP_BYTES", 1024)


def _mlp(folder, layers: int = 3, seed: int = 0) -> str:
    """``layers`` x (MatMul W[H,H] + Add b + Relu); W in ``m.onnx.data`` (unaligned offsets), b inline."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    inits, nodes, offset, prev = [], [], 3, "x"
    with open(folder / "m.onnx.data", "wb") as f:
        f.write(b"abc")  # the first tensor does not start at 0
        for i in range(layers):
            w = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[H, H])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", "m.onnx.data"), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
            f.write(w.tobytes())
            offset += w.nbytes
            inits += [t, onnx.numpy_helper.from_array(rng.standard_normal(H).astype(np.float32) * 0.1, f"b{i}")]
            nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                      helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}")]
            prev = f"h{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return str(folder / "m.onnx")


def _run(path: str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_mapped_read_keeps_big_weights_in_the_file(tmp_path):
    path = _mlp(tmp_path)
    model = io.read_model(path, mapped=True)
    w = {t.name: t for t in model.graph.initializer}
    assert mmap_weights.is_mapped(w["w0"]) and not w["w0"].raw_data
    assert not mmap_weights.is_mapped(w["b0"])  # 128 bytes: below the threshold, stays inline
    assert model.ByteSize() < 2000  # references only
    eager = io.read_model(path)
    assert io.weight_bytes(model) == io.weight_bytes(eager)


def test_constants_are_memory_maps_without_a_copy(tmp_path):
    path = _mlp(tmp_path)
    graph = io.to_graph(io.read_model(path, mapped=True))
    eager = io.to_graph(io.read_model(path))
    const = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    ref = {t.name: t for t in eager.tensors().values() if isinstance(t, gs.Constant)}
    values = const["w1"].values
    assert isinstance(values, np.memmap) and not values.flags.owndata and not values.flags.writeable
    np.testing.assert_array_equal(values, ref["w1"].values)
    with pytest.raises(ValueError):  # passes assign new arrays; writing in place is refused
        values[0, 0] = 1.0
    # untouched after reading: exported as a file reference again, and the mapping is dropped
    model = io.to_model(graph)
    assert mmap_weights.is_mapped(next(t for t in model.graph.initializer if t.name == "w1"))
    assert not isinstance(const["w1"]._values, np.ndarray)
    # replaced: the pass's new array is spilled to a scratch file and exported as a reference to it (the proto
    # never holds a large weight, the in-memory copy is freed); its bytes are exactly the eager path's
    const["w1"].values = np.asarray(values) * 2
    ref["w1"].values = ref["w1"].values * 2
    got = next(t for t in io.to_model(graph).graph.initializer if t.name == "w1")
    want = next(t for t in io.to_model(eager).graph.initializer if t.name == "w1")
    assert mmap_weights.is_mapped(got) and isinstance(const["w1"]._values, mmap_weights.MappedValues)
    assert mmap_weights.read_region(got) == want.raw_data
    np.testing.assert_array_equal(const["w1"].values, ref["w1"].values)  # read back through a mapping


@pytest.mark.parametrize("passes", [
    "cleanup", "quantize{mode=weight_only}",
    "quantize{mode=weight_only weight_bits=4 block_size=16 weight_format=matmulnbits}",
    "quantize{mode=weight_only weight_bits=4 block_size=16}",
    "prune-weights{score=magnitude}", "cluster"])
def test_mapped_compress_is_byte_identical_to_the_eager_path(tmp_path, passes):
    path = _mlp(tmp_path / "in")
    x = np.random.default_rng(1).standard_normal((2, H)).astype(np.float32)
    mapped = compress(path, passes, validation={"x": x[None]}, seed=0)
    eager = compress(io.read_model(path), passes, validation={"x": x[None]}, seed=0)
    assert mapped.external_data and eager.external_data is None
    for ext in (False, True):
        a, b = tmp_path / f"a{ext}" / "o.onnx", tmp_path / f"b{ext}" / "o.onnx"
        a.parent.mkdir()
        b.parent.mkdir()
        io.save_model(mapped.model, a, external_data=ext)
        io.save_model(eager.model, b, external_data=ext)
        assert a.read_bytes() == b.read_bytes()
        if ext:
            assert (a.parent / "o.onnx.data").read_bytes() == (b.parent / "o.onnx.data").read_bytes()
        np.testing.assert_array_equal(_run(str(a), x), _run(str(b), x))
    assert mapped.fidelity.to_dict() == eager.fidelity.to_dict()
    # the default save keeps the input's layout: external data, loadable by ORT, no mapped entry leaks out
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    mapped.save(out)
    raw = onnx.load_model(str(out), load_external_data=False)
    keys = {e.key for t in raw.graph.initializer for e in t.external_data}
    assert mmap_weights.FILE_KEY not in keys
    assert (out.parent / "m.onnx.data").exists()
    np.testing.assert_allclose(_run(str(out), x), _run(str(tmp_path / "bFalse" / "o.onnx"), x), rtol=0, atol=0)


def test_stats_and_checker_on_mapped_models(tmp_path):
    path = _mlp(tmp_path)
    mapped, eager = io.read_model(path, mapped=True), io.read_model(path)
    a, b = model_stats(mapped, {"x": (1, H)}), model_stats(eager, {"x": (1, H)})
    assert (a.params, a.macs, a.ops) == (b.params, b.macs, b.ops)
    assert abs(a.bytes_raw - b.bytes_raw) <= 0.02 * b.bytes_raw
    assert abs(a.bytes_zip - b.bytes_zip) <= 0.05 * b.bytes_zip
    c = model_stats(eager, {"x": (1, H)}, streamed=True)  # never serialises the whole model
    assert (c.params, c.macs, c.bytes_raw) == (b.params, b.macs, b.bytes_raw)
    assert structural_problems(mmap_weights.checkable(mapped)) == []
    assert structural_problems(mmap_weights.checkable(eager)) == []
    broken = mmap_weights.checkable(mapped)
    broken.graph.node[0].input[1] = "nowhere"
    assert structural_problems(broken)


def test_safety_rules_hold_and_the_private_entry_is_ignored(tmp_path):
    path = _mlp(tmp_path / "m")
    m = onnx.load_model(path, load_external_data=False)
    t = m.graph.initializer[0]
    t.external_data.append(onnx.StringStringEntryProto(key=mmap_weights.FILE_KEY, value="/etc/passwd"))
    onnx.save_model(m, path)
    model = io.read_model(path, mapped=True)  # the planted entry is replaced by the checked file
    assert mmap_weights.source(model.graph.initializer[0])[0] == str((tmp_path / "m" / "m.onnx.data").resolve())
    for entry in t.external_data:
        if entry.key == "location":
            entry.value = "../outside.data"
    (tmp_path / "outside.data").write_bytes(b"\0" * 8192)
    onnx.save_model(m, path)
    with pytest.raises(BadInputError, match="outside the model's folder"):
        io.read_model(path, mapped=True)


def test_a_failed_write_leaves_nothing_and_the_model_unchanged(tmp_path, monkeypatch):
    path = _mlp(tmp_path / "in")
    result = compress(path, "cleanup", validate=False, measure=False)
    before = result.model.SerializeToString()
    calls = []

    def boom(t, out):
        calls.append(t.name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(t, out)

    real = mmap_weights.copy_region
    monkeypatch.setattr(mmap_weights, "copy_region", boom)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        result.save(out / "m.onnx")
    assert list(out.iterdir()) == []
    assert result.model.SerializeToString() == before


def test_sensitivity_allocation_on_a_mapped_model_builds_one_layer_at_a_time(tmp_path, monkeypatch):
    """allocation=sensitivity on mapped weights: each layer's state is built while it is measured and dropped
    after (never all layers at once), the trial sessions override one initializer of a once-staged model, and the
    zero counts equal the eager path's (same curves up to ORT's optimisation) and meet the budget exactly."""
    from onnxcompress.passes.prune_weights import prune_weights_pass as pw

    layers, peak = weakref.WeakSet(), [0]
    init = pw._Layer.__init__

    def counting_init(self, *a, **k):  # layers holding their float64 state when one more is built
        init(self, *a, **k)
        layers.add(self)
        peak[0] = max(peak[0], sum(L.v is not None for L in layers))

    monkeypatch.setattr(pw._Layer, "__init__", counting_init)
    path = _mlp(tmp_path / "in", layers=5)  # the first and last layers stay dense: 3 targets
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((4, H)).astype(np.float32)} for _ in range(4)]
    passes = "prune-weights{score=magnitude allocation=sensitivity sparsity=0.5}"
    mapped = compress(path, passes, calibration=calib, seed=0, measure=False)
    assert peak[0] == 1
    peak[0] = 0
    eager = compress(io.read_model(path), passes, calibration=calib, seed=0, measure=False)
    assert peak[0] == 3  # the eager path holds every layer (its curves and the global allocations need them)
    rows = mapped.ledger[-1].pass_stats["tensors"]
    eager_rows = eager.ledger[-1].pass_stats["tensors"]
    assert {k: v["zeros"] for k, v in rows.items()} == {k: v["zeros"] for k, v in eager_rows.items()}
    assert len(rows) == 3 and sum(v["zeros"] for v in rows.values()) == round(0.5 * 3 * H * H)
    assert len({v["zeros"] for v in rows.values()}) > 1  # the curves made the counts differ per layer


@pytest.mark.parametrize("allocation", ["sensitivity", "uniform", "global"])
def test_obs_in_gram_groups_when_the_grams_outgrow_the_budget(tmp_path, monkeypatch, allocation):
    """Grams over GRAM_BUDGET_BYTES: the layers go in groups, each group's statistics measured when it is reached
    (one streaming run per group, never every Gram at once); the zeros still meet the budget exactly and the
    OBS update still lowers each layer's calibration error against plain masking."""
    from onnxcompress.passes.prune_weights import prune_weights_pass as pw

    from onnxcompress.analyses.activation_stats import ActivationStatistics

    monkeypatch.setattr(pw, "GRAM_BUDGET_BYTES", 8 * H * H)  # one layer's Gram per group
    runs = [0]
    compute = ActivationStatistics.compute.__func__

    def counting(cls, *a, **k):
        runs[0] += 1
        return compute(cls, *a, **k)

    monkeypatch.setattr(ActivationStatistics, "compute", classmethod(counting))
    path = _mlp(tmp_path / "in", layers=5)  # 3 targets
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((8, H)).astype(np.float32)} for _ in range(8)]
    res = compress(path, f"prune-weights{{score=obs allocation={allocation} sparsity=0.5}}", calibration=calib,
                   seed=0, measure=False)
    stats = res.ledger[-1].pass_stats
    assert stats["gram_groups"] == 3
    rows = stats["tensors"]
    assert len(rows) == 3 and sum(r["zeros"] for r in rows.values()) == round(0.5 * 3 * H * H)
    assert all(r["err_after"] < r["err_before"] for r in rows.values())
    # pruning: one run per group; the allocations that score every layer first measure each group once more
    assert runs[0] == (3 if allocation == "uniform" else 6)
