"""Issue 11 on a shared machine: closed-form refit and training from the SAME pruned student, in one process.

    python -m benchmarks.distill_train --models efficientnet_lite2 --minutes 8
    python -m benchmarks.distill_train --models minilm_l3 --cut "prune-channels{ratio=0.3 head_ratio=0.3 allocation=sensitivity}"
    python -m benchmarks.distill_train --models efficientnet_lite2 --cache /tmp/dt --variants "lr=3e-5;lr=3e-5 features=1"

``benchmarks.prune --train`` runs every variant in its own subprocess, so the refit is computed twice (once for the
refit row, once under ``refit+train``) and each tool run must finish within the harness's 30-minute timeout; on
the 2 shared cores of this session (load average 12-17) a single EfficientNet-Lite2 refit exceeded it. This driver
runs the passes once, in order, on one graph and one context, and measures a snapshot after each stage:

    FP32 -> cleanup,<cut> (pruned) -> distill (refit) -> distill{mode=train} (refit+train)
                                   \\-> distill{mode=train} (train only, --train-only)

``--variants`` (';'-separated distill option strings) trains several students from the same refit, one row each
(stage ``refit+train[<options>]``); ``--cache DIR`` keeps the pruned and refit models (and the channel map) so
later runs start from them instead of recomputing the refit (keyed by model, cut and calibration count).

Every snapshot is scored on the model's evaluation inputs (disjoint from the calibration inputs) against FP32 with
the model's task metric (``ModelSpec.evaluate``) and the worst output's cosine. Training changes values only, so
MACs, size and latency of the refit and trained models are the pruned model's (``benchmarks.prune`` has their
latency rows). Per stage: wall seconds, CPU seconds of this process, and peak RSS so far.

Writes ``benchmarks/results/distill_train.json`` and ``.md`` (rows merged by model and stage).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.measure import run_passes_in_place
from benchmarks.run import RESULTS, _json_default, load_specs, versions

log = logging.getLogger("benchmarks.distill_train")

CNN_CUT = "prune-channels{target_macs=0.5}"
MINILM_CUT = "prune-channels{ratio=0.3 head_ratio=0.3 allocation=sensitivity}"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cosine(ref: list, cand: list) -> float:
    worst = 1.0
    for k in range(len(ref[0])):
        a = np.concatenate([np.asarray(r[k], np.float64).ravel() for r in ref])
        b = np.concatenate([np.asarray(c[k], np.float64).ravel() for c in cand])
        worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return worst


def score(spec: Any, model: onnx.ModelProto, feeds: list[dict], ref: list) -> dict[str, Any]:
    from onnxcompress.runtime import Session

    with Session(model, threads=2) as s:
        cand = [s.run(f) for f in feeds]
    metrics = spec.evaluate(feeds, ref, cand)
    return {"metric": metrics[spec.primary_metric], "metrics": metrics, "cosine": _cosine(ref, cand)}


#: photos on this machine in neither of ``benchmarks.imagenet``'s pools (skimage.data, its files, matplotlib's
#: sample data; not clock_motion.png nor color.png: the calibration pool's clock blurred and the evaluation pool's
#: colorwheel): extra unlabeled training images for ``--extra-photos`` (the teacher labels them)
EXTRA_PHOTOS = ("cell", "microaneurysms", "skfile:chessboard_RGB.png", "mpl:Minduka_Present_Blue_Pack.png", "lfw")


def extra_photo(name: str) -> np.ndarray:
    """uint8 H x W x 3 RGB of one ``EXTRA_PHOTOS`` entry (``lfw``: a 6 x 6 mosaic of the 100 LFW faces' first 36)."""
    from PIL import Image

    if name == "lfw":
        import skimage.data

        faces = (skimage.data.lfw_subset()[:36] * 255).round().astype(np.uint8)
        a = np.concatenate([np.concatenate(list(faces[r * 6:(r + 1) * 6]), axis=1) for r in range(6)], axis=0)
    elif name.startswith("skfile:"):
        import skimage

        a = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / name.split(":", 1)[1]).convert("RGB"))
    else:
        from benchmarks.imagenet import photo

        return photo(name)
    a = np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a[:, :, :3]
    return np.ascontiguousarray(a.astype(np.uint8))


def extra_photo_feeds(n: int, seed: int = 11) -> list[dict]:
    """``n`` crops of ``EXTRA_PHOTOS`` the way ``benchmarks.imagenet`` crops its pools: square, at its ``SCALES``
    cycling, a random position, mirrored for odd samples, resized to the model's side (bilinear)."""
    from PIL import Image

    from benchmarks.imagenet import SCALES, SIZE, normalize

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = extra_photo(EXTRA_PHOTOS[i % len(EXTRA_PHOTOS)])
        h, w = a.shape[:2]
        side = max(16, int(min(h, w) * SCALES[(i // len(EXTRA_PHOTOS)) % len(SCALES)]))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        a = a[y0:y0 + side, x0:x0 + side]
        a = a[:, ::-1] if i % 2 else a
        out.append({"image": normalize(np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize(
            (SIZE, SIZE), Image.BILINEAR)))})
    return out


def text_feeds_file(spec: Any, source: str, folder: Path) -> Path:
    """An .npz of every sentence of ``benchmarks.text_corpus`` ``source`` tokenized for ``spec`` (a MiniLM), padded
    to 128 ids with mask 0 (``distill`` trims and packs them), in the source's order; kept in ``folder``."""
    from benchmarks.speech_text import tokenizer
    from benchmarks.text_corpus import sentences

    pool = sentences(source)
    path = folder / f"text_{source}_{sys.version_info[0]}{sys.version_info[1]}_{len(pool)}_{spec.name}.npz"
    if path.exists():
        return path
    tok = tokenizer()
    ids = np.zeros((len(pool), 128), np.int64)
    for i, sent in enumerate(pool):
        row = tok.encode(sent, max_length=128)
        ids[i, :len(row)] = row
    arrays = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    if "token_type_ids" in spec.input_shapes:
        arrays["token_type_ids"] = np.zeros_like(ids)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").rename(path)
    log.info("%s: %d %s sentences tokenized -> %s", spec.name, len(pool), source, path)
    return path


def text_calibration_feeds(spec: Any, source: str, n: int, cache: Path | None) -> list[dict]:
    """The LAST ``n`` sentences of ``text_corpus`` ``source`` as calibration feeds (one sentence each, real length),
    appended after the spec's calibration sentences: a user's larger unlabeled pool for the Gram matrices of
    prune-weights / distill's refit. The last ones, so a ``train_samples`` prefix of the same pool for training
    overlaps them only when it is larger than the pool minus ``n``."""
    with np.load(text_feeds_file(spec, source, cache or Path("/tmp/distill_text"))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    lengths = arrays["attention_mask"].sum(axis=1)
    rows = range(max(0, len(lengths) - n), len(lengths))
    return [{k: v[i:i + 1, :lengths[i]].copy() for k, v in arrays.items()} for i in rows]


def run_model(spec: Any, cut: str, minutes: float, n_calib: int, n_eval: int, train_opts: str,
              train_only: bool, variants: list[str] | None = None, cache: Path | None = None,
              refit_pipe: str = "distill", train_feeds: int = 0, extra_photos: int = 0,
              train_text: str = "", calib_text: str = "", calib_text_n: int = 0,
              keep: Path | None = None) -> list[dict[str, Any]]:
    """One model's rows. ``train_feeds``: build that many calibration inputs (the cache key stays ``n_calib``: the
    refit reads a prefix, ``distill{samples=K}``, and ``make_inputs`` is prefix-stable); ``extra_photos``: append
    that many crops of ``EXTRA_PHOTOS`` (image models) after them. Variants pick how many the training reads
    (``train_samples=N``). ``train_text`` (MiniLM): the training draws from that ``text_corpus`` source instead
    (``distill{train_data=...}``: ``train_samples=N`` of its sentences plus the calibration sentences not held out;
    early stopping on calibration sentences; the evaluation stays the pydoc evaluation half)."""
    from benchmarks.fetch import cache_dir
    from onnxcompress import io
    from onnxcompress.analyses.macs import count_macs
    from onnxcompress.context import PassContext
    from onnxcompress.data import feed_shapes, load_feeds
    from onnxcompress.runtime import Session

    fp32 = onnx.load(str(spec.fetch(cache_dir())))
    calib, evals = spec.make_inputs(max(n_calib, train_feeds), "calib"), spec.make_inputs(n_eval, "eval")
    calib += extra_photo_feeds(extra_photos) if extra_photos else []
    calib += text_calibration_feeds(spec, calib_text, calib_text_n, cache) if calib_text_n else []
    with Session(fp32, threads=2) as s:
        ref = [s.run(f) for f in evals]
    shapes = feed_shapes(evals[0])
    fp32_macs = count_macs(fp32, shapes, evals[0]).total

    def context() -> tuple[PassContext, Any]:
        working = onnx.ModelProto()
        working.CopyFrom(fp32)
        io.prepare_for_import(working)
        ctx = PassContext(calibration=load_feeds(calib, fp32), original_bytes=fp32.SerializeToString(),
                          model_template=working)
        return ctx, io.to_graph(working)

    apply = run_passes_in_place

    rows: list[dict[str, Any]] = []

    def record(stage: str, pipeline: str, graph: Any, ctx: PassContext, t0: float, c0: float,
               stats: dict | None = None) -> onnx.ModelProto:
        model = ctx.export(graph)
        row = {"model": spec.name, "stage": stage, "pipeline": pipeline, "seconds": time.perf_counter() - t0,
               "cpu_seconds": time.process_time() - c0, "peak_mb": _peak_mb(),
               "macs_ratio": count_macs(model, shapes, evals[0]).total / fp32_macs,
               **score(spec, model, evals, ref), "metric_name": spec.primary_metric}
        train = (stats or {}).get("distill", {}).get("train")
        if train:
            row["train"] = {k: train.get(k) for k in ("steps", "stopped_by", "seconds", "cpu_seconds",
                                                      "heldout_loss_start", "heldout_loss_best", "losses",
                                                      "loss_history", "train_feeds", "features", "backoffs",
                                                      "augment_probe", "blocks", "blocks_trained",
                                                      "train_source", "packed", "lr_final", "teacher_cache")}
            row["load_average"] = round(__import__("os").getloadavg()[0], 1)
        rows.append(row)
        if keep is not None:
            import re

            keep.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(keep / f"{spec.name}_{re.sub(r'[^A-Za-z0-9=.+-]+', '_', stage)[:120]}.onnx"))
        log.info("%s %s: %s %.4f (cos %.4f), %.0f s wall, %.0f s cpu, peak %.0f MB", spec.name, stage,
                 spec.primary_metric, row["metric"], row["cosine"], row["seconds"], row["cpu_seconds"],
                 row["peak_mb"])
        return model

    text_opt, text_tag = "", ""
    if train_text:
        text_opt = f" train_data={text_feeds_file(spec, train_text, cache or Path('/tmp/distill_text'))}"
        text_tag = f" text={train_text}"
    train = f"distill{{mode=train max_minutes={minutes:g}{text_opt}{(' ' + train_opts) if train_opts else ''}}}"
    ctx, graph = context()
    key = None
    if cache is not None:
        import hashlib

        tag = f"{cut}|{n_calib}|{refit_pipe}" + (f"|{calib_text}:{calib_text_n}" if calib_text_n else "")
        key = cache / f"{spec.name}_{hashlib.sha256(tag.encode()).hexdigest()[:10]}"
    t0, c0 = time.perf_counter(), time.process_time()
    if key is not None and key.with_suffix(".refit.onnx").exists():
        import pickle

        ctx.channel_map.positions.update(pickle.loads(key.with_suffix(".cmap.pkl").read_bytes()))
        refit = onnx.load(str(key.with_suffix(".refit.onnx")))
        io.prepare_for_import(refit)
        graph = io.to_graph(refit)
        log.info("%s: pruned and refit students from the cache %s", spec.name, key)
    else:
        apply(f"cleanup,{cut}", graph, ctx)
        pruned = record("pruned", f"cleanup,{cut}", graph, ctx, t0, c0)
        pruned_map = ctx.channel_map
        if train_only:
            g2 = io.to_graph(pruned)
            t0, c0 = time.perf_counter(), time.process_time()
            record("train", f"cleanup,{cut},{train}", g2, ctx, t0, c0, apply(train, g2, ctx))
        t0, c0 = time.perf_counter(), time.process_time()
        ctx.channel_map = pruned_map
        apply(refit_pipe, graph, ctx)
        refit = record("refit", f"cleanup,{cut},{refit_pipe}", graph, ctx, t0, c0)
        if key is not None:
            import pickle

            key.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(refit, str(key.with_suffix(".refit.onnx")))
            key.with_suffix(".cmap.pkl").write_bytes(pickle.dumps(ctx.channel_map.positions))
    if not variants:
        t0, c0 = time.perf_counter(), time.process_time()
        record(f"refit+train{text_tag}", f"cleanup,{cut},{refit_pipe},{train}", graph, ctx, t0, c0,
               apply(train, graph, ctx))
        return rows
    start = ctx.export(graph)
    for v in variants:
        g = io.to_graph(start)
        pipe = f"distill{{mode=train max_minutes={minutes:g}{text_opt} {v}}}"
        t0, c0 = time.perf_counter(), time.process_time()
        record(f"refit+train[{v}{text_tag}]", f"cleanup,{cut},{refit_pipe},{pipe}", g, ctx, t0, c0, apply(pipe, g, ctx))
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Distillation by training vs the closed-form refit (`benchmarks.distill_train`)", "",
             f"`python -m benchmarks.distill_train {meta.get('args', '')}`", "",
             "One process per model: the pruned student is refit (closed form) and then trained from the refit "
             "(`refit+train`); `train` trains the pruned student directly. Same calibration and evaluation "
             "inputs for every stage (disjoint). Training changes values only: MACs / size / latency are the "
             "pruned model's. Times are this stage's own; on 2 cores shared with ~6 other jobs (load average "
             "12-17), so CPU seconds are the better measure of cost.", "",
             "| model | stage | MACs | metric | cos | train steps (stop) | held-out loss | wall s | cpu s | peak MB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = r.get("train") or {}
        steps = f"{tr.get('steps')} ({tr.get('stopped_by')})" if tr and tr.get("steps") is not None else ""
        src = tr.get("train_source") or {}
        if steps and src.get("train_data"):
            steps += f"; {src['train_feeds']} feeds"
        if tr.get("blocks_trained") is not None:
            steps = f"block-wise: {tr['blocks_trained']} of {tr['blocks']} blocks"
        held = (f"{tr['heldout_loss_start']:.4g} -> {tr['heldout_loss_best']:.4g}"
                if tr.get("heldout_loss_start") is not None else "")
        lines.append(f"| {r['model']} | {r['stage']} | {r['macs_ratio']:.2f} | {r['metric_name']} {r['metric']:.3f} "
                     f"| {r['cosine']:.4f} | {steps} | {held} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                     f"{r['peak_mb']:.0f} | {r.get('load_average', '')} |")
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", f"Versions: {meta.get('versions')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distill_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="")
    ap.add_argument("--render", action="store_true", help="only rewrite distill_train.md from the JSON")
    ap.add_argument("--cut", default=None, help=f"the pruning pass (default {CNN_CUT}; MiniLM {MINILM_CUT})")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time budget (max_minutes)")
    ap.add_argument("--train-opts", default="", help="extra distill options for the training stage")
    ap.add_argument("--train-only", action="store_true", help="also train the pruned student without refit")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--variants", default="", help="';'-separated distill option strings, each trained from "
                                                   "the same refit student (one row each)")
    ap.add_argument("--refit", default="distill", help="the closed-form stage (e.g. distill{samples=64} to "
                                                         "refit on the first 64 calibration feeds only)")
    ap.add_argument("--cache", type=Path, default=None, help="keep / reuse the pruned and refit students here")
    ap.add_argument("--train-feeds", type=int, default=0, help="build this many calibration inputs (>= --n-calib; "
                    "the refit should read a prefix: --refit 'distill{samples=K}')")
    ap.add_argument("--extra-photos", type=int, default=0, help="image models: append this many crops of photos "
                    "in neither pool (EXTRA_PHOTOS) to the calibration inputs")
    ap.add_argument("--train-text", default="", help="MiniLM: train on this benchmarks.text_corpus source "
                    "(stdlib: the standard library's docstring and comment sentences, disjoint from the pydoc "
                    "ones); variants pick how many with train_samples=N")
    ap.add_argument("--calib-text", default="", help="MiniLM: append --calib-text-n sentences of this "
                    "benchmarks.text_corpus source to the calibration inputs (for the Gram matrices of the cut and "
                    "the refit: give them samples=K)")
    ap.add_argument("--calib-text-n", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="save every stage's model in this folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    logging.getLogger("onnxcompress.passes.distill.train").setLevel(logging.INFO)
    logging.getLogger("passes.distill.train").setLevel(logging.INFO)
    specs = load_specs()
    path = args.out / "distill_train.json"
    saved = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if args.render:
        (args.out / "distill_train.md").write_text(render(saved["rows"], saved.get("meta", {})))
        return 0
    for name in [m for m in args.models.split(",") if m]:
        cut = args.cut or (MINILM_CUT if name.startswith("minilm") else CNN_CUT)
        n_calib = 550 if name.startswith("minilm") and args.n_calib == 64 else args.n_calib
        variants = [v.strip() for v in args.variants.split(";") if v.strip()]
        rows = run_model(specs[name], cut, args.minutes, n_calib, args.n_eval, args.train_opts, args.train_only,
                         variants, args.cache, args.refit, args.train_feeds, args.extra_photos, args.train_text,
                         args.calib_text, args.calib_text_n, args.keep)
        for r in rows:
            r["n_calib"], r["n_eval"] = n_calib, args.n_eval
            r["calib_feeds"] = max(n_calib, args.train_feeds) + args.extra_photos + args.calib_text_n
        keep = [r for r in saved["rows"] if (r["model"], r["stage"]) not in {(x["model"], x["stage"]) for x in rows}]
        meta = {**saved.get("meta", {}), "versions": versions()}
        meta["args"] = " ".join(argv if argv is not None else sys.argv[1:])
        saved = {"meta": meta, "rows": keep + rows}
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1, default=_json_default))
        (args.out / "distill_train.md").write_text(render(saved["rows"], saved["meta"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
