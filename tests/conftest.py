"""Shared test helpers: build tiny models, run them under ORT, apply passes."""

from __future__ import annotations

import os

# The tests solve many small linear systems (distill's ridge fits, OBS updates): one BLAS thread per process is
# faster than OpenBLAS's pool and never oversubscribes a busy 2-core machine (measured: 16x on the distill tests
# under load). Set before numpy loads its BLAS; the library itself leaves the thread count to the user.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# quantize's latency guard caches its measurements per machine (~/.cache/onnxcompress/latency): a test session gets
# its own empty cache, so no test's decision depends on what an earlier run (or the user) measured on this machine.
if "ONNXCOMPRESS_LATENCY_CACHE" not in os.environ:
    import tempfile

    os.environ["ONNXCOMPRESS_LATENCY_CACHE"] = tempfile.mkdtemp(prefix="onnxcompress-test-latency-")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a ModelProto on the CPU EP with graph optimizations disabled (so ORT does not hide our mistakes)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Random float/int feeds for a model with static (or small symbolic) input shapes."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim for d in tt.shape.dim]
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(np_dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(np_dtype)
        elif np_dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 5, shape).astype(np_dtype)
    return feeds


def loss_around_one_step(tr, ctx, groups: list[dict], n_feeds: int = 16) -> tuple[float, float]:
    """A distill ``Trainer``'s batch loss on ``n_feeds`` calibration feeds (teacher targets from ORT) before and
    after one Adam step over the parameter ``groups`` (torch imported by the caller's test module)."""
    import torch

    from onnxcompress.runtime import Session

    feeds = [dict(f) for f in ctx.calibration.take(n_feeds)]
    with Session(ctx.original_model()) as t:
        want = list(tr.kinds)

        def targets(f):
            return dict(zip(want, t.run(f, want), strict=True))

        tr.batchable = True
        before = tr.batch_loss(feeds, tr.tg.forward, targets, [])
        opt = torch.optim.Adam(groups)
        before.backward()
        opt.step()
        with torch.no_grad():
            after = tr.batch_loss(feeds, tr.tg.forward, targets, [])
    return float(before.detach()), float(after)


def apply_passes(model: onnx.ModelProto, *passes, ctx=None) -> onnx.ModelProto:
    """Import -> run the passes through a PassManager -> export; returns the new ModelProto."""
    from onnxcompress.context import PassContext
    from onnxcompress.manager import PassManager

    ctx = ctx or PassContext()
    result = PassManager(list(passes)).run(model, ctx)
    return result.model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
