"""What the harness measures about one candidate model, always next to the FP32 model of the same run.

- size: the serialised model (external data included), raw and zlib-compressed (level 6), as ratios to FP32;
  node count, parameters and MACs at the benchmark input shape (``onnxcompress.analyses.model_stats``).
- task metric: ``spec.evaluate(feeds, fp32_outputs, candidate_outputs)`` on the evaluation feeds; both models see
  the same feeds, FP32 outputs are computed once per model.
- fidelity: the ``onnxcompress.validate`` per-output accumulators (max-abs, cosine, SQNR, top-k agreement) over the
  same outputs, reduced to the worst output (``FidelityReport.worst``) — exactly what ``compare_models`` reports,
  without running both models a second time.
- latency: ``onnxcompress.latency.measure_latency`` with FP32 and every candidate of the model in the same call
  (interleaved rounds, medians), at 1 and 2 intra-op threads; reported as candidate / FP32. At 2 threads the
  thread pools do not spin (``onnxcompress.latency``): spinning pools of neighbouring sessions distort each other's times.
- session memory: peak RSS of a fresh subprocess that creates an ORT session for the model and runs it
  (``delta`` = peak minus the RSS after imports and loading the feed; the high-water mark is reset at that point,
  Linux ``/proc/self/clear_refs``, so import-time transients do not hide small sessions).

Run as a worker for the session-memory measurement::

    python -m benchmarks.measure rss MODEL.onnx FEED.npz [--threads 1] [--runs 3]
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.spec import Feed, Outputs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- size, MACs
def model_figures(path: Path, feed: Feed | None) -> dict[str, Any]:
    """Bytes raw/zip, nodes, params, MACs of the model at ``path`` (shapes from ``feed``)."""
    from onnxcompress import io
    from onnxcompress.analyses.model_stats import model_stats

    model = io.read_model(path)
    shapes = {k: tuple(v.shape) for k, v in feed.items()} if feed else None
    try:
        st = model_stats(model, shapes, feed)
    except Exception as exc:  # MAC counting on an unusual graph: keep the sizes
        log.warning("%s: MACs not counted (%s)", path.name, exc)
        st = model_stats(model, None, None)
    d = st.to_dict()
    d["bytes_on_disk"] = io.file_size_on_disk(path)
    return d


# ---------------------------------------------------------------------------------------------------- outputs
def run_outputs(
    path: Path, feeds: list[Feed], output_names: list[str] | None = None, threads: int = 1
) -> tuple[list[str], list[Outputs]]:
    """Run the model on every feed; outputs in ``output_names`` order (default: the model's own)."""
    from onnxcompress.runtime import Session

    with Session(str(path), threads=threads, what=Path(path).name) as s:
        names = output_names or s.output_names
        missing = [n for n in names if n not in s.output_names]
        if missing:
            raise RuntimeError(f"the model has no output {missing[0]!r}")
        return names, [[np.asarray(o) for o in s.run(f, names)] for f in feeds]


def fidelity(names: list[str], ref: list[Outputs], cand: list[Outputs]) -> dict[str, Any]:
    """The validate-module accumulators over already computed outputs -> {"worst": {...}, "outputs": {...}}."""
    from onnxcompress.validate import FidelityReport, OutputFidelity

    acc = {n: OutputFidelity(n) for n in names}
    for r_list, c_list in zip(ref, cand, strict=True):
        for n, r, c in zip(names, r_list, c_list, strict=True):
            acc[n].update(r, c)
    rep = FidelityReport({n: a.summary() for n, a in acc.items()}, len(ref), "eval feeds")
    return {"worst": rep.worst(), "outputs": rep.outputs}


# ---------------------------------------------------------------------------------------------------- latency
def latency_ratios(
    models: dict[str, Path], reference: str, feed: Feed, threads: int, budget_s: float, min_rounds: int = 5
) -> dict[str, dict[str, float]]:
    """{name: {"ms": median, "ratio": median / reference median}} from one interleaved ``measure_latency`` call.

    ``measure_latency`` switches intra-op pool spinning off (see onnxcompress.latency)."""
    from onnxcompress.latency import measure_latency

    ms = measure_latency(
        {k: str(v) for k, v in models.items()},
        feed,
        threads=threads,
        warmup=2,
        min_rounds=min_rounds,
        budget_s=budget_s,
    )
    ref = ms[reference]
    return {k: {"ms": v, "ratio": v / ref if ref > 0 else float("nan")} for k, v in ms.items()}


# ---------------------------------------------------------------------------------------------- session memory
def session_rss(model: Path, feed_file: Path, threads: int = 1, runs: int = 3, timeout: float = 600) -> dict:
    """Peak RSS (MB) of a subprocess that builds an ORT session for ``model`` and runs it ``runs`` times."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.measure",
        "rss",
        str(model),
        str(feed_file),
        "--threads",
        str(threads),
        "--runs",
        str(runs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_repo_root())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"session memory worker failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5), so the peak measured next is the tool's
    own and not the transient peak of importing libraries. False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    """Current RSS (falls back to the high-water mark where /proc is unavailable)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """RSS high-water mark since the process started or since ``reset_peak_rss``."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _rss_worker(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.measure rss")
    ap.add_argument("model")
    ap.add_argument("feed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from benchmarks.feeds_file import load_feeds

    feed = load_feeds(Path(args.feed))[0]
    reset_peak_rss()
    base = rss_mb()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    after_load = peak_rss_mb()
    for _ in range(args.runs):
        sess.run(None, {k: v for k, v in feed.items() if k in names})
    peak = peak_rss_mb()
    print(
        json.dumps(
            {"peak_mb": peak, "base_mb": base, "delta_mb": peak - base, "load_delta_mb": after_load - base}
        )
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rss":
        sys.exit(_rss_worker(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)


def run_passes_in_place(pipeline: str, graph: Any, ctx: Any) -> dict[str, Any]:
    """Run a pipeline's passes on ``graph`` in place with ``ctx`` (no export, no validation between passes: what a
    benchmark stage needs when it keeps one working graph through prune -> refit -> train); the stats per pass."""
    from onnxcompress.pipeline import parse_pipeline

    stats: dict[str, Any] = {}
    for p in parse_pipeline(pipeline):
        p.requires(graph, ctx)
        res = p.run(graph, ctx)
        graph.cleanup().toposort()
        ctx.invalidate(res.preserved)
        stats[p.name] = res.stats
    return stats
