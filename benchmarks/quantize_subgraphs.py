"""quantize on models whose layers sit inside If/Loop bodies (the silero VAD exports): what each mode does per body.

    python -m benchmarks.quantize_subgraphs [--models silero_vad,silero_vad_op18_ifless] [--calib 64] [--eval 96]

Per model and mode (dynamic, weight-only int8 with Conv included, static), through ``compress`` on the model's own
calibration chunks (``benchmarks.speech_text.SILERO``): bytes vs FP32, worst-output cosine vs FP32 under ORT on the
evaluation chunks, the VAD task agreement, the latency ratio at one intra-op thread (interleaved with FP32, medians),
and quantize's per-body stats line. Results -> benchmarks/results/quantize_subgraphs.md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.run import RESULTS
from benchmarks.speech_text import SILERO

FILES = Path.home() / ".cache" / "onnxcompress" / "files"
CONFIGS: dict[str, dict[str, Any]] = {
    "dynamic": {"mode": "dynamic"},
    "weight_only_int8": {"mode": "weight_only", "dynamic_ops": ("MatMul", "Gemm", "Conv", "Gather")},
    "static": {"mode": "static"},
}


def measure_one(name: str, cfg: str, calib, ev, out_dir: Path) -> dict[str, Any]:
    from onnxcompress.passes.quantize import Quantize

    from onnxcompress import io
    from onnxcompress.api import compress

    src = FILES / f"{name}.onnx"
    onames, ref = measure.run_outputs(src, ev)
    t0 = time.perf_counter()
    try:
        r = compress(str(src), [Quantize(**CONFIGS[cfg])], calibration=calib, validate=False, latency=False)
    except Exception as exc:  # a row, not a crash of the whole benchmark
        return {"model": name, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:240]}
    secs = time.perf_counter() - t0
    dst = out_dir / f"{name}.{cfg}.onnx"
    io.save_model(r.model, dst)
    _, cand = measure.run_outputs(dst, ev, onames)
    fid = measure.fidelity(onames, ref, cand)
    task = SILERO[name].evaluate(ev, ref, cand)
    lat = measure.latency_ratios({"fp32": src, "q": dst}, "fp32", ev[0], threads=1, budget_s=3.0)
    st = r.ledger[-1].pass_stats
    bodies = st.get("subgraphs") or {}
    return {"model": name, "config": cfg, "bytes_fp32": src.stat().st_size, "bytes_q": dst.stat().st_size,
            "cos_worst": fid["worst"].get("cosine"), "agreement": task.get("agreement"),
            "latency_ratio": lat["q"]["ratio"], "seconds": round(secs, 1), "skipped": st.get("skipped"),
            "bodies": len(bodies), "subgraphs": bodies, "load": os.getloadavg()[0]}


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# quantize inside If/Loop bodies (silero VAD exports)", "",
             f"`python -m benchmarks.quantize_subgraphs {meta['args']}`: {meta['calib']} calibration / "
             f"{meta['eval']} evaluation chunks per model; bytes and cosine vs FP32 under ORT; latency at 1 thread "
             "interleaved with FP32 (medians; load average in the last column: other jobs shared the 2 cores).", "",
             "| model | mode | bytes q / FP32 | worst cosine | VAD agreement | latency | bodies | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['config']} | {r['bytes_q'] / r['bytes_fp32']:.2f}x | "
                     f"{r['cos_worst']:.5f} | {r['agreement']:.3f} | {r['latency_ratio']:.2f} | {r['bodies']} | "
                     f"{r['load']:.1f} |")
    lines += ["", "## What quantize did in each body (first 6 per run)", ""]
    for r in rows:
        for body, what in list((r.get("subgraphs") or {}).items())[:6]:
            lines.append(f"- {r['model']} / {r['config']}: {body}: {what}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="silero_vad,silero_vad_op18_ifless,silero_vad_16k_op15")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=96)
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in SILERO]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(SILERO)}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec = SILERO[name]
            calib, ev = spec.make_inputs(args.calib, "calib"), spec.make_inputs(args.eval, "eval")
            for cfg in CONFIGS:
                rows.append(measure_one(name, cfg, calib, ev, Path(tmp)))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "subgraphs"}, default=str), flush=True)
    meta = {"args": " ".join(argv if argv is not None else sys.argv[1:]), "calib": args.calib, "eval": args.eval}
    (RESULTS / "quantize_subgraphs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (RESULTS / "quantize_subgraphs.md").write_text(to_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
