"""Issue 11: ``distill{mode=train}`` quality per minute of CPU — where a step's time goes, and what pays.

    python -m benchmarks.train_speed profile --model minilm_l6 --student /tmp/lead/l6pw/cache/minilm_l6_0e8eba4786
    python -m benchmarks.train_speed compare --model minilm_l6 --student ... --minutes 5 \
        --variants "base;precision=bf16;ema=0.999"
    python -m benchmarks.train_speed layout --models efficientnet_lite2,nudenet_320n --batch 8 --rounds 4

Both start from a cached student (``benchmarks.distill_train --cache``: ``<key>.refit.onnx`` + ``<key>.cmap.pkl``)
and train it the way ``benchmarks.distill_train`` does (MiniLM: the 26k stdlib sentences as ``train_data``, packs of
``batch``; CNNs: the calibration feeds). ``profile`` runs ``steps`` training steps under ``torch.profiler`` and
prints where the time goes (top ops by self CPU time, and the split teacher / forward / backward / optimizer);
``compare`` trains one student per variant from the same start, same seed, same minutes, one after the other in
this process, and scores each on the evaluation inputs against FP32 (``benchmarks.distill_train.score``). Variants
are distill option strings (``key=value`` space-separated; ``base`` = none), plus ``threads=N`` (torch threads).
Rows go to ``benchmarks/results/train_speed.json`` / ``.md`` (merged by model, student and variant), with the
1-minute load average at the end of each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from benchmarks.run import RESULTS, _json_default, load_specs, versions

log = logging.getLogger("benchmarks.train_speed")

TEXT_CACHE = Path("/tmp/dtc")


def _value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_variant(text: str) -> tuple[dict[str, Any], int]:
    """``"lr=4e-4 precision=bf16 threads=2"`` -> (distill options, torch threads); ``base`` is no option."""
    opts: dict[str, Any] = {}
    threads = 1
    for item in text.split():
        if item == "base" or "=" not in item:
            continue
        key, raw = item.split("=", 1)
        if key == "threads":
            threads = int(raw)
        else:
            opts[key] = _value(raw)
    return opts, threads


class Setup:
    """The FP32 teacher, a cached student, the calibration / evaluation feeds and the pool of one model."""

    def __init__(self, model: str, student: Path, n_calib: int, n_eval: int, text: str) -> None:
        from benchmarks.distill_train import text_feeds_file
        from benchmarks.fetch import cache_dir
        from onnxcompress.runtime import Session

        self.spec = load_specs()[model]
        self.fp32 = onnx.load(str(self.spec.fetch(cache_dir())))
        self.calib = self.spec.make_inputs(n_calib, "calib")
        self.evals = self.spec.make_inputs(n_eval, "eval")
        with Session(self.fp32, threads=2) as s:
            self.ref = [s.run(f) for f in self.evals]
        self.student = onnx.load(str(student.with_suffix(".refit.onnx")))
        cmap = student.with_suffix(".cmap.pkl")
        self.positions = pickle.loads(cmap.read_bytes()) if cmap.exists() else {}
        self.train_data = str(text_feeds_file(self.spec, text, TEXT_CACHE)) if text else ""

    def context(self) -> tuple[Any, Any]:
        from onnxcompress import io
        from onnxcompress.context import PassContext
        from onnxcompress.data import load_feeds

        working = onnx.ModelProto()
        working.CopyFrom(self.fp32)
        io.prepare_for_import(working)
        ctx = PassContext(calibration=load_feeds(self.calib, self.fp32), original_bytes=self.fp32.SerializeToString(),
                          model_template=working)
        ctx.channel_map.positions.update(self.positions)
        model = onnx.ModelProto()
        model.CopyFrom(self.student)
        io.prepare_for_import(model)
        return ctx, io.to_graph(model)

    def options(self, minutes: float, base: str, extra: dict[str, Any]) -> Any:
        from onnxcompress.pipeline import parse_pipeline

        text = f"mode=train max_minutes={minutes:g} {base}".strip()
        step = parse_pipeline("distill{" + text + "}")[0]
        if self.train_data:
            step = dataclasses.replace(step, train_data=self.train_data)
        known = {f.name for f in dataclasses.fields(step)}
        fresh = {k: v for k, v in extra.items() if k not in known}
        if fresh:  # options the pass does not declare (yet): measured through a subclass that carries them
            cls = dataclasses.make_dataclass("DistillTrial", [(k, type(v), v) for k, v in fresh.items()],
                                             bases=(type(step),), frozen=True)
            step = cls(**{f.name: getattr(step, f.name) for f in dataclasses.fields(step)})
        return dataclasses.replace(step, **extra)


def train(setup: Setup, opts: Any, threads: int) -> tuple[dict, Any, Any]:
    import torch

    from passes.distill.train_entry import train_student

    torch.set_num_threads(threads)
    ctx, graph = setup.context()
    stats = train_student(graph, ctx, opts)
    return stats, ctx, graph


def profile(setup: Setup, opts: Any, threads: int, top: int) -> dict:
    """``opts.steps`` steps under torch.profiler: the top ops by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(threads)
    ctx, graph = setup.context()
    from passes.distill.train_entry import train_student

    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0 = time.perf_counter()
        stats = train_student(graph, ctx, opts)
        wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print(table)
    return {"wall": wall, "steps": stats.get("steps"), "table": table}


def compare(setup: Setup, minutes: float, base: str, variants: list[str]) -> list[dict]:
    from benchmarks.distill_train import score

    rows = []
    for v in variants:
        extra, threads = parse_variant(v)
        opts = setup.options(minutes, base, extra)
        load0 = os.getloadavg()[0]
        c0 = time.process_time()
        stats, ctx, graph = train(setup, opts, threads)
        cpu = time.process_time() - c0
        model = ctx.export(graph)
        sc = score(setup.spec, model, setup.evals, setup.ref)
        row = {"model": setup.spec.name, "variant": v, "base": base, "minutes": minutes, "threads": threads,
               "steps": stats.get("steps"), "stopped_by": stats.get("stopped_by"), "seconds": stats.get("seconds"),
               "train_cpu_seconds": stats.get("cpu_seconds"), "cpu_seconds": round(cpu, 1),
               "s_per_step": round(stats["seconds"] / max(1, stats["steps"]), 4),
               "heldout_start": stats.get("heldout_loss_start"), "heldout_best": stats.get("heldout_loss_best"),
               "metric": sc["metric"], "metric_name": setup.spec.primary_metric, "cosine": sc["cosine"],
               "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
               "history": stats.get("loss_history"), "speed": stats.get("speed")}
        log.info("%s [%s]: %d steps (%.3f s/step), held-out %.5f -> %.5f, %s %.4f, load %.1f-%.1f", row["model"],
                 v, row["steps"], row["s_per_step"], row["heldout_start"], row["heldout_best"], row["metric_name"],
                 row["metric"], row["load_start"], row["load_end"])
        rows.append(row)
    return rows


def _step(torch: Any, tg: Any, feed: dict) -> None:
    """One forward + backward of the interpreter (loss: mean square of the float outputs)."""
    outs = tg.forward(feed)
    loss = sum(v.float().pow(2).mean() for v in outs.values() if torch.is_tensor(v) and v.is_floating_point())
    loss.backward()


def conv_layout(models: list[str], batch: int, rounds: int) -> list[dict]:
    """Seconds per forward + backward step (1 torch thread, the first calibration input repeated ``batch`` times, loss = mean square
    of the float outputs) of each FP32 model in the training interpreter, its 2-D Conv inputs NCHW and channels-last
    (``torch_ops.CHANNELS_LAST``), the two interleaved ``rounds`` times after a warm-up step each; medians."""
    import numpy as np
    import torch
    from onnxcompress.passes.distill import torch_ops
    from onnxcompress.passes.distill.torch_interpreter import TorchGraph

    from benchmarks.fetch import cache_dir
    from onnxcompress import io

    torch.set_num_threads(1)
    specs, out = load_specs(), []
    for name in models:
        spec = specs[name]
        graph = io.to_graph(onnx.load(str(spec.fetch(cache_dir()))))
        tg = TorchGraph(graph, torch)
        first = spec.make_inputs(1, "calib")[0]  # repeated: some models' inputs differ in size
        feed = {k: np.concatenate([v] * batch) for k, v in first.items()}

        times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
        try:
            for _ in range(rounds):
                for layout in times:
                    torch_ops.CHANNELS_LAST = layout == "channels_last"
                    _step(torch, tg, feed)  # warm-up: oneDNN picks and caches its kernels per layout
                    t = time.perf_counter()
                    _step(torch, tg, feed)
                    times[layout].append(time.perf_counter() - t)
        finally:
            torch_ops.CHANNELS_LAST = True
        nchw, last = (float(np.median(times[k])) for k in ("nchw", "channels_last"))
        out.append({"model": name, "batch": batch, "rounds": rounds, "nchw_s": round(nchw, 3),
                    "channels_last_s": round(last, 3), "speedup": round(nchw / last, 2),
                    "load": round(os.getloadavg()[0], 1)})
        log.info("%s: NCHW %.3f s, channels-last %.3f s per step (%.2fx)", name, nchw, last, nchw / last)
    return out


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# distill{mode=train}: throughput and quality per minute (`benchmarks.train_speed`)", "",
             "Each row trains the same cached student from the same start with the same seed for the same minutes "
             "(one process, variants one after another, `nice -n 10`, OMP_NUM_THREADS=1 unless `threads=2`); "
             "metric against FP32 on the evaluation inputs. Load: 1-minute load average at the start / end.", "",
             "| model | student | base options | variant | min | steps | wall s/step | train cpu s/step | held-out loss | "
             "metric | cos | cpu s | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('student', '')} | {r['base']} | {r['variant']} | {r['minutes']:g} | "
                     f"{r['steps']} ({r['stopped_by']}) | {r['s_per_step']:.3f} | "
                     f"{r['train_cpu_seconds'] / max(1, r['steps']):.3f} | "
                     f"{r['heldout_start']:.4g} -> {r['heldout_best']:.4g} | {r['metric_name']} {r['metric']:.4f} | "
                     f"{r['cosine']:.4f} | {r['cpu_seconds']:.0f} | {r['load_start']}-{r['load_end']} |")
    if meta.get("layout"):
        lines += ["", "## Conv layout of the training interpreter (`python -m benchmarks.train_speed layout`)", "",
                  "One forward + backward step of the FP32 model (1 torch thread, the first calibration input x batch), "
                  "NCHW and channels-last interleaved, medians; the interpreter makes 2-D Conv inputs channels-last.",
                  "", "| model | batch | rounds | NCHW s/step | channels-last s/step | speed-up | load |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['rounds']} | {r['nchw_s']:.3f} | {r['channels_last_s']:.3f} | "
                  f"{r['speedup']:.2f}x | {r['load']} |" for r in meta["layout"]]
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", f"Versions: {meta.get('versions')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("profile", "compare", "render", "layout"))
    ap.add_argument("--model", default="minilm_l6")
    ap.add_argument("--student", type=Path, help="cached student key (path without .refit.onnx)")
    ap.add_argument("--tag", default="", help="a short name of the student for the table")
    ap.add_argument("--n-calib", type=int, default=550)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--text", default="stdlib", help="MiniLM training pool (benchmarks.text_corpus source; '' none)")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--base", default="train_samples=26000 batch=16 lr=4e-4 steps=40000 eval_every=100 patience=12")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--steps", type=int, default=20, help="profile: steps")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--models", default="efficientnet_lite2,ddddocr_det,ppocrv4_det,nudenet_320n,ppocrv4_rec",
                    help="layout: the models timed")
    ap.add_argument("--batch", type=int, default=8, help="layout: inputs per step")
    ap.add_argument("--rounds", type=int, default=4, help="layout: interleaved rounds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    logging.getLogger("passes.distill.train").setLevel(logging.INFO)
    path = args.out / "train_speed.json"
    saved = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}
    if args.what == "render":
        (args.out / "train_speed.md").write_text(render(saved["rows"], saved.get("meta", {})))
        return 0
    if args.what == "layout":
        rows = conv_layout([m.strip() for m in args.models.split(",") if m.strip()], args.batch, args.rounds)
        done = {r["model"] for r in rows}
        meta = {**saved.get("meta", {}), "versions": versions()}
        meta["layout"] = [r for r in meta.get("layout", []) if r["model"] not in done] + rows
        saved["meta"] = meta
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1, default=_json_default))
        (args.out / "train_speed.md").write_text(render(saved["rows"], meta))
        return 0
    setup = Setup(args.model, args.student, args.n_calib, args.n_eval, args.text)
    if args.what == "profile":
        extra, threads = parse_variant(args.variants.split(";")[0])
        opts = setup.options(60.0, args.base, {**extra, "steps": args.steps, "eval_every": 10 ** 6})
        profile(setup, opts, threads, args.top)
        return 0
    rows = compare(setup, args.minutes, args.base, [v.strip() for v in args.variants.split(";") if v.strip()])
    for r in rows:
        r["student"] = args.tag or args.student.name
    key = {(r["model"], r["student"], r["base"], r["variant"], r["minutes"]) for r in rows}
    keep = [r for r in saved["rows"]
            if (r["model"], r.get("student"), r["base"], r["variant"], r["minutes"]) not in key]
    meta = {**saved.get("meta", {}), "versions": versions()}
    saved = {"meta": meta, "rows": keep + rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1, default=_json_default))
    (args.out / "train_speed.md").write_text(render(saved["rows"], meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
