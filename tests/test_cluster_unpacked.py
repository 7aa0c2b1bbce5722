"""cluster{storage=unpacked}: the trainable decode (codebook + int32 indices) and its exact packing later."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.context import PassContext
from onnxcompress.errors import BadInputError
from onnxcompress.manager import PassManager
from onnxcompress.pipeline import parse_pipeline
from tests.conftest import ort_run
from tests.test_cluster import _feeds, _model


def _run(model, pipeline):
    res = PassManager(parse_pipeline(pipeline)).run(model, PassContext())
    return res.model, res.ledger[-1].pass_stats


NAMES = ("conv_w", "mm_w", "emb")


def _expose(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in NAMES:
        out.graph.output.append(onnx.ValueInfoProto(name=f"{n}_clustered"))
    return out


def _gathers(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(n, inits.get(n.input[0]), inits.get(n.input[1])) for n in model.graph.node if n.op_type == "Gather"]


@pytest.mark.parametrize("opts", ["channel_scales=false", "channel_scales=true"])
def test_unpacked_equals_snapped_and_packs_exactly(rng, opts):
    model = _model(rng)
    pipe = f"cluster{{bits=3 {opts} min_size=500"
    unpacked, st_u = _run(model, pipe + " storage=unpacked}")
    snapped, _ = _run(model, pipe + " storage=snap}")
    assert st_u["storage"] == {"unpacked": 3}
    books = [(b, i) for _, b, i in _gathers(unpacked) if b is not None and b.ndim == 1 and i is not None]
    assert len(books) == 3 and all(b.size <= 8 and i.dtype == np.int32 for b, i in books)
    feed = _feeds(rng)
    snap_w = {t.name: numpy_helper.to_array(t) for t in snapped.graph.initializer}
    got = ort_run(_expose(unpacked), feed)
    for i, n in enumerate(NAMES):  # the decoded tensors are bit-identical to the snapped constants
        np.testing.assert_array_equal(got[2 + i], snap_w[n])
    # "training" moves the shared values (the indices stay): packing afterwards is exact and shrinks the file
    for t in unpacked.graph.initializer:
        v = numpy_helper.to_array(t)
        if v.ndim == 1 and v.size <= 8 and v.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array((v * 1.1 + 0.01).astype(np.float32), t.name))
    packed, st_p = _run(unpacked, "cluster{pack_only=true half_codebooks=false}")
    assert st_p["decodes_packed"] == 3 and st_p["tensors_clustered"] == 0
    assert len(packed.SerializeToString()) + st_p["bytes_saved_packing"] // 2 < len(unpacked.SerializeToString())
    assert not any(i is not None and i.dtype == np.int32 and i.size >= 500 for _, _, i in _gathers(packed))
    for a, b in zip(ort_run(_expose(packed), feed), ort_run(_expose(unpacked), feed), strict=True):
        np.testing.assert_array_equal(a, b)
    onnx.checker.check_model(packed)
    # by default trained codebooks and scales are rounded to float16 when packed (each value moves by <= 2^-11 of
    # itself) where that pays for the Cast: not 8 codebook values, channel scales of 32+ channels
    half, _ = _run(unpacked, "cluster{pack_only=true}")
    for a, b in zip(ort_run(_expose(half), feed)[2:], ort_run(_expose(unpacked), feed)[2:], strict=True):
        np.testing.assert_allclose(a, b, rtol=2.0 ** -10, atol=0)
    casts = sum(n.op_type == "Cast" and n.attribute[0].i == 1 for n in half.graph.node)
    assert (casts > 0) == ("true" in opts)
    assert len(half.SerializeToString()) <= len(packed.SerializeToString())


def test_unpacked_is_one_codebook_per_tensor():
    with pytest.raises(BadInputError):
        parse_pipeline("cluster{storage=unpacked per_channel=true}")
