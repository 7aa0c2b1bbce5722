"""Output fingerprints of fixed pipelines on real models: proof that a refactoring changed no result.

    python -m benchmarks.identity --out before.json [--models ppocr_cls,mtcnn_onet]
    ... refactor ...
    python -m benchmarks.identity --out after.json --compare before.json

Each (model, pipeline) is compressed through the library API on the model's own calibration inputs (seed 0) and
the sha256 of the serialised result is recorded. Wall-clock-driven choices are pinned: quantize runs with
``latency_guard=false`` here (a replayed ``--latency-profile`` pins it otherwise; see the README). ``--compare``
exits 1 when any fingerprint differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

PIPELINES = (
    "cleanup",
    "cleanup,quantize{mode=static latency_guard=false}",
    "cleanup,prune-channels{target_macs=0.5},distill",
)
DEFAULT_MODELS = ("ppocr_cls", "mtcnn_onet", "mtcnn_rnet", "ppocrv4_det")
N_CALIB = 32


def fingerprints(models: list[str], pipelines: list[str], n_calib: int = N_CALIB) -> dict[str, dict[str, str]]:
    from benchmarks import models as corpus
    from onnxcompress import compress

    out: dict[str, dict[str, str]] = {}
    for name in models:
        spec = corpus.get(name)
        path = spec.fetch(corpus.cache_dir())
        calib = spec.make_inputs(n_calib, "calib")
        out[name] = {}
        for pipe in pipelines:
            t0 = time.perf_counter()
            res = compress(str(path), pipe, calibration=calib, validate=False, measure=False)
            digest = hashlib.sha256(res.model.SerializeToString()).hexdigest()
            out[name][pipe] = digest
            print(f"{name:16s} {pipe:55s} {digest[:16]}  {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.identity")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--compare")
    args = ap.parse_args(argv)
    got = fingerprints(args.models.split(","), list(PIPELINES))
    with open(args.out, "w") as f:
        json.dump(got, f, indent=1)
    if not args.compare:
        return 0
    with open(args.compare) as f:
        want = json.load(f)
    diff = [(m, p) for m in got for p in got[m] if want.get(m, {}).get(p) != got[m][p]]
    for m, p in diff:
        print(f"DIFFERENT: {m} {p}")
    print(f"{sum(len(v) for v in got.values()) - len(diff)} identical, {len(diff)} different")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
