"""The noise floor of each task metric: how far FP32 moves from itself under input noise no one can see.

A compressed model is scored by its task metric against FP32 (box F1, string agreement, top-1 agreement). Some of
those metrics move under perturbations far below what any compression does: a detector's boxes whose score sits
at the threshold flip in and out. This benchmark measures that floor so a metric difference can be read: the FP32
model itself is run on its evaluation inputs plus Gaussian noise of sigma = k input levels, and scored against its
own clean outputs exactly as a compressed candidate is.

One input level: the inputs are 8-bit images mapped to floats ((p / 255 - mean) / std), so the distinct values of an
input tensor lie on a grid (``onnxcompress.input_noise.pixel_level``, measured on the first evaluation feed). The
noise goes on the image only, not on the constant padding a pipeline adds (``content_mask``): real inputs have
exact padding. The compress report gives the same reference at sigma = 0.5 on the user's validation inputs. Noise of sigma = 0.5 level changes a pixel by less
than the rounding of its 8-bit source; a JPEG re-encode moves it by several levels.

Reported per model and sigma: the primary task metric vs clean FP32, the worst output's SQNR and cosine
(``benchmarks.measure.fidelity``: the ``onnxcompress.validate`` accumulators, the same numbers the other benchmarks
report). A compressed model whose
task metric is below the sigma = 0.5 row's loses more than sub-level noise; one above it is, on this metric,
indistinguishable from FP32 run on a re-quantized copy of its own input.

    python -m benchmarks.metric_floor --models nudenet_320n,ddddocr_det --n-eval 256
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import models
from benchmarks.fetch import cache_dir
from benchmarks.measure import fidelity, run_outputs
from onnxcompress.input_noise import perturbation, pixel_level

log = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = ["nudenet_320n", "ddddocr_det", "ppocrv4_det", "ppocrv4_rec", "ppocrv4_rec:hard",
                  "efficientnet_lite2", "ppocr_cls"]
SIGMAS = (0.25, 0.5, 1.0)


def eval_feeds(name: str, n_eval: int) -> tuple[str, list]:
    """(model name, evaluation feeds) of a row name: a model, or ``ppocrv4_rec:hard`` for the hard text lines of
    ``benchmarks.int8_margins`` (random characters, FP32's own exact match about one half)."""
    if name == "ppocrv4_rec:hard":
        from benchmarks.int8_margins import hard_lines

        return "ppocrv4_rec", hard_lines(n_eval, "eval")[0]
    return name, models.get(name).make_inputs(n_eval, "eval")


def floor_rows(name: str, n_eval: int, sigmas: tuple[float, ...], seed: int = 0) -> dict:
    model, feeds = eval_feeds(name, n_eval)
    spec = models.get(model)
    path = spec.fetch(cache_dir())
    images = [k for k, v in feeds[0].items() if np.asarray(v).dtype.kind == "f" and np.ndim(v) == 4]
    if not images:
        raise SystemExit(f"{name}: no float image input (the noise floor is measured on image models)")
    levels = {k: pixel_level(feeds[0][k]) for k in images}
    if any(v is None for v in levels.values()):
        raise SystemExit(f"{name}: an image input is not on an 8-bit grid: {levels}")
    names, ref = run_outputs(path, feeds)
    rng = np.random.default_rng(seed)  # one stream over the sigmas
    rows = []
    for sigma in sigmas:
        add_noise = perturbation(feeds[0], sigma, seed=rng)
        noisy = [add_noise(f) for f in feeds]
        t0 = time.perf_counter()
        _, cand = run_outputs(path, noisy)
        metrics = spec.evaluate(feeds, ref, cand)
        worst = fidelity(names, ref, cand)["worst"]
        sqnr, cos = worst["sqnr_db"], worst["cosine"]
        rows.append({"sigma_levels": sigma, "metric": spec.primary_metric,
                     "value": float(metrics[spec.primary_metric]), "sqnr_db": sqnr, "cosine": cos,
                     "all_metrics": {k: float(v) for k, v in metrics.items()},
                     "seconds": round(time.perf_counter() - t0, 1)})
        log.info("%s sigma %.2f levels: %s %.4f, SQNR %.1f dB", name, sigma, spec.primary_metric,
                 rows[-1]["value"], sqnr)
    return {"model": name, "n_eval": n_eval, "levels": levels, "rows": rows}


def render(results: list[dict], command: str) -> str:
    lines = ["# Task-metric noise floor (FP32 vs FP32 on sub-level input noise)", "",
             f"Written by `{command}` (module docstring: method). One level = the 8-bit grid step of the "
             "model's image input; sigma is in levels. Each row: FP32 on the noisy evaluation inputs, scored "
             "against FP32 on the clean ones like any candidate.", "",
             "| model | eval inputs | level | sigma (levels) | task metric vs FP32 | worst SQNR dB | worst cosine |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        level = ", ".join(f"{k} {v:.4g}" for k, v in r["levels"].items())
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {r['n_eval']} | {level} | {row['sigma_levels']:g} | "
                         f"{row['metric']} {row['value']:.3f} | {row['sqnr_db']:.1f} | {row['cosine']:.5f} |")
    lines += ["", "Reading it: a compressed model's task metric above the sigma = 0.5 row is, on that metric, closer "
              "to FP32 than FP32 is to itself when its input moves by less than the rounding of its 8-bit pixels; "
              "a goal above the sigma = 0.25 row asks for more fidelity than the metric can tell apart from "
              "invisible input noise on these evaluation inputs. `onnxcompress compress` prints the sigma = 0.5 "
              "reference for the user's own validation inputs (README, *What a run reports*)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--sigmas", default=",".join(str(s) for s in SIGMAS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sigmas = tuple(float(s) for s in args.sigmas.split(","))
    results = [floor_rows(m, args.n_eval, sigmas) for m in args.models.split(",") if m]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.metric_floor " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "metric_floor.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    (args.out / "metric_floor.md").write_text(render(results, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
