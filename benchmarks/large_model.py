"""Models over 2 GB: generate one streaming to disk, then compress it with onnxcompress and the anchors, each run in
its own subprocess with its peak RSS measured.

    python -m benchmarks.large_model [--folder /tmp/onnxcompress_large] [--hidden 4096] [--layers 33]
                                     [--methods ours:cleanup,ort:quantize_dynamic,...] [--keep]

The model is a wide MLP (``layers`` x [MatMul W(h x h) + Add b + Relu], random weights scaled 1/sqrt(h)), written
tensor by tensor into one external-data file, so the generator itself never holds more than one weight matrix.
Each method runs as ``python -m ...`` in a child process; the parent polls the child's VmHWM in /proc and takes
``ru_maxrss`` from ``wait4`` (the larger of the two is reported), and kills the child if it would take the machine
down (``--kill-gb``). Every output is then loaded in onnxruntime in a second child and run on one feed (its RSS
reported apart). Results -> benchmarks/results/large_model.md / .json. Run it alone: never two >2 GB processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

METHODS = {
    "ours:cleanup": ["cleanup"],
    "ours:quantize{mode=weight_only}": ["quantize{mode=weight_only}"],
    "ours:quantize{mode=weight_only weight_bits=4}": ["quantize{mode=weight_only weight_bits=4}"],
    "ours:quantize{mode=weight_only weight_bits=4 weight_format=matmulnbits}": [
        "quantize{mode=weight_only weight_bits=4 weight_format=matmulnbits}"],
    "ours:prune-weights": ["prune-weights"],  # the default with --calib: obs scores, sensitivity allocation
    "ours:prune-weights{score=magnitude}": ["prune-weights{score=magnitude}"],
    # one sparsity for every tensor (allocation=uniform): no sensitivity trials, each layer pruned and spilled alone
    "ours:prune-weights{score=magnitude allocation=uniform}": ["prune-weights{score=magnitude allocation=uniform}"],
    "ours:cluster": ["cluster"],
    # the library with the ledger's per-stage model statistics off (api.compress(measure=False)): the CLI rows
    # above stop in model_stats on > 2 GB protos; these show what the rest of the pipeline needs
    "ours-api:cleanup": ["cleanup"],
    "ours-api:quantize{mode=weight_only}": ["quantize{mode=weight_only}"],
    "ours-api:quantize{mode=weight_only weight_bits=4}": ["quantize{mode=weight_only weight_bits=4}"],
    "ours-api:prune-weights{score=magnitude}": ["prune-weights{score=magnitude}"],
    "ours-api:cluster": ["cluster"],
    "onnxslim": [],
    "ort:quantize_dynamic": [],
    "ort:matmulnbits4": [],
}


# ------------------------------------------------------------------------------------------------ generator
def generate(folder: Path, hidden: int = 4096, layers: int = 33, seed: int = 0) -> Path:
    """Write ``folder/large.onnx`` + ``large.onnx.data``; returns the model path. Memory: one h x h matrix."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    model_path, data_name = folder / "large.onnx", "large.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    offset = 0
    scale = np.float32(1.0 / np.sqrt(hidden))

    def external(name: str, dims: list[int], length: int, at: int) -> TensorProto:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(at)), ("length", str(length))):
            t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
        return t

    with open(folder / data_name, "wb") as f:
        prev = "x"
        for i in range(layers):
            w = (rng.standard_normal((hidden, hidden), dtype=np.float32) * scale).astype(np.float32)
            b = (rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
            for name, arr in ((f"w{i}", w), (f"b{i}", b)):
                pad = (-offset) % 64  # 64-byte aligned tensors (mmap friendly)
                f.write(b"\0" * pad)
                offset += pad
                f.write(arr.tobytes())
                inits.append(external(name, list(arr.shape), arr.nbytes, offset))
                offset += arr.nbytes
            del w, b
            nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
                      helper.make_node("Relu", [f"add{i}"], [f"h{i}"], name=f"relu{i}")]
            prev = f"h{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "wide_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="benchmarks.large_model")
    model_path.write_bytes(model.SerializeToString())
    np.savez(folder / "calib.npz", x=rng.standard_normal((4, 1, hidden)).astype(np.float32))
    return model_path


def disk_size(model_path: Path) -> int:
    data = model_path.with_name(model_path.name + ".data")
    return model_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# --------------------------------------------------------------------------------------------- child processes
def child_argv(method: str, src: Path, out: Path) -> list[str]:
    if method.startswith("ours:"):
        calib = src.with_name("calib.npz")
        return [sys.executable, "-m", "onnxcompress.cli", "compress", str(src), "-o", str(out), "--passes",
                METHODS[method][0], "--calib", str(calib), "--no-validate", "--no-latency", "-q"]
    if method.startswith("ours-api:"):
        return [sys.executable, "-m", "benchmarks.large_model", "_ours_api", METHODS[method][0], str(src), str(out)]
    return [sys.executable, "-m", "benchmarks.large_model", "_anchor", method, str(src), str(out)]


def run_ours_api(passes: str, src: str, out: str) -> None:
    from onnxcompress.api import compress

    calib = str(Path(src).with_name("calib.npz"))
    result = compress(src, passes, calibration=calib, validate=False, measure=False, latency=False)
    result.save(out)


def run_anchor(method: str, src: str, out: str) -> None:
    """The anchors, as their users would call them on a > 2 GB model (external data in and out)."""
    if method == "onnxslim":
        import onnxslim

        onnxslim.slim(src, out, save_as_external_data=True)
    elif method == "ort:quantize_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, out, weight_type=QuantType.QInt8, use_external_data_format=True)
    elif method == "ort:matmulnbits4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load_model(src, load_external_data=True)
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(out, use_external_data_format=True)
    else:
        raise SystemExit(f"unknown anchor {method}")


def run_stages(passes: str, src: str, out: str) -> None:
    """Where the memory goes: ``api.compress`` + ``save`` with every stage wrapped; prints one JSON line per stage
    with the RSS after it and the peak inside it (VmHWM, reset before each stage), in GB."""
    from benchmarks.measure import peak_rss_mb, reset_peak_rss, rss_mb
    from onnxcompress import api, io, manager
    from onnxcompress.context import PassContext
    from onnxcompress.result import CompressResult

    rows: list[dict] = []

    def wrap(owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def staged(*a, **k):
            reset_peak_rss()
            try:
                return inner(*a, **k)
            finally:
                rows.append({"stage": label, "rss_after_gb": round(rss_mb() / 1024, 2),
                             "peak_in_stage_gb": round(peak_rss_mb() / 1024, 2)})
                print(json.dumps(rows[-1]), flush=True)

        setattr(owner, attr, staged)

    wrap(io, "read_model", "io.read_model(mapped=True) (large external weights stay in the file)")
    wrap(api, "check_loads", "api.check_loads (ORT session on the input file, no pre-packing)")
    wrap(manager, "structural_problems", "manager: structural_problems (checker on mmap_weights.checkable)")
    wrap(io, "prepare_for_import", "manager: working copy + io.prepare_for_import")
    wrap(io, "to_graph", "io.to_graph (graphsurgeon import, weights memory-mapped)")
    wrap(PassContext, "export", "ctx.export (graphsurgeon export after the pass, untouched weights as references)")
    wrap(manager, "_mapped_gate", "manager: structural gate (checker + ORT session on the written model)")
    wrap(CompressResult, "save", "CompressResult.save (atomic write, external data streamed)")
    calib = str(Path(src).with_name("calib.npz"))
    result = api.compress(src, passes, calibration=calib, validate=False, measure=False, latency=False)
    result.save(out)


def run_load_check(path: str, hidden: int, no_folding: bool = False) -> None:
    """Load ``path`` in ORT (default options, or ``no_folding``: constant folding off, as a clustered model over
    2 GB needs) and run one feed; prints finiteness, shape and the run time."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ConstantFolding"] if no_folding else None)
    t0 = time.perf_counter()
    y = sess.run(None, {"x": np.ones((1, hidden), np.float32)})[0]
    print(json.dumps({"finite": bool(np.isfinite(y).all()), "shape": list(y.shape),
                      "run_s": round(time.perf_counter() - t0, 2)}))


def measure_wait4(argv: list[str], kill_bytes: int, timeout_s: float) -> dict:
    """Run ``argv``: exit code, wall time, peak RSS (max of the polled VmHWM and wait4's ru_maxrss), stdout/stderr."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    peak = [0]
    killed: list[str | None] = [None]
    done = threading.Event()
    chunks: dict[str, bytes] = {}

    def drain(name: str, stream) -> None:
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()

    def poll() -> None:
        status_path = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status_path.read_text().splitlines():
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            if peak[0] > kill_bytes and killed[0] is None:
                killed[0] = f"killed at {peak[0] / 2**30:.1f} GiB RSS (limit {kill_bytes / 2**30:.1f} GiB)"
                proc.kill()
            elif time.perf_counter() - t0 > timeout_s and killed[0] is None:
                killed[0] = f"killed after {timeout_s:.0f} s"
                proc.kill()
            time.sleep(0.1)

    watcher = threading.Thread(target=poll)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"code": proc.returncode, "seconds": time.perf_counter() - t0,
            "peak_rss": max(peak[0], usage.ru_maxrss * 1024), "killed": killed[0],
            "stdout": chunks.get("out", b"").decode(errors="replace")[-2000:],
            "stderr": chunks.get("err", b"").decode(errors="replace")[-2000:]}


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_anchor"]:
        run_anchor(*argv[1:4])
        return 0
    if argv[:1] == ["_ours_api"]:
        run_ours_api(*argv[1:4])
        return 0
    if argv[:1] == ["_stages"]:
        run_stages(*argv[1:4])
        return 0
    if argv[:1] == ["_load"]:
        run_load_check(argv[1], int(argv[2]), no_folding=argv[3:4] == ["no-folding"])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/onnxcompress_large")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kill-gb", type=float, default=10.0, help="kill a child whose RSS passes this")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per child")
    ap.add_argument("--keep", action="store_true", help="keep the generated model and outputs")
    ap.add_argument("--name", default="large_model")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    ap.add_argument("--stages", type=int, default=0, metavar="LAYERS",
                    help="instead of the methods: the per-stage memory of ours:cleanup on a LAYERS-layer model")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if args.render:
        render(json.loads((RESULTS / f"{args.name}.json").read_text()))
        return 0
    if args.stages:
        return stages_section(folder / "stages", args)
    src = folder / "in" / "large.onnx"
    t0 = time.perf_counter()
    if not src.exists():
        generate(src.parent, args.hidden, args.layers)
    gen_s = time.perf_counter() - t0
    size = disk_size(src)
    print(f"model: {src} {size / 1e9:.3f} GB ({args.layers} x {args.hidden}^2 float32), generated in {gen_s:.0f} s",
          flush=True)
    rows = []
    kill = int(args.kill_gb * 2**30)
    try:
        for method in [m for m in args.methods.split(",") if m]:
            out_dir = folder / "out" / method.replace(":", "_").replace("{", "_").replace("}", "").replace(" ", "_")
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            out = out_dir / "model.onnx"
            load = os.getloadavg()[0]
            r = measure_wait4(child_argv(method, src, out), kill, args.timeout)
            row = {"method": method, "input_bytes": size, **{k: r[k] for k in ("code", "seconds", "peak_rss",
                                                                                 "killed")}, "load": round(load, 1)}
            row["rss_ratio"] = r["peak_rss"] / size
            if r["code"] == 0 and out.exists():
                out_size = sum(p.stat().st_size for p in out_dir.iterdir() if not p.name.startswith("model.onnx.report"))
                row["output_bytes"] = out_size
                row["external_data"] = any(p.suffix == ".data" or p.name.endswith(".data") for p in out_dir.iterdir())
                chk = measure_wait4([sys.executable, "-m", "benchmarks.large_model", "_load", str(out),
                                     str(args.hidden)], kill, args.timeout)
                row["ort_load"] = "ok" if chk["code"] == 0 and '"finite": true' in chk["stdout"] else (
                    f"failed: {chk['stderr'].strip().splitlines()[-1][:200] if chk['stderr'].strip() else chk['code']}")
                row["ort_load_rss"] = chk["peak_rss"]
                if row["ort_load"] != "ok":  # a clustered model over 2 GB: ORT's constant folding of the decode
                    nf = measure_wait4([sys.executable, "-m", "benchmarks.large_model", "_load", str(out),
                                        str(args.hidden), "no-folding"], kill, args.timeout)
                    row["ort_load_no_folding"] = "ok" if nf["code"] == 0 and '"finite": true' in nf["stdout"] \
                        else f"failed: {nf['code']}"
                    row["ort_load_no_folding_rss"] = nf["peak_rss"]
                row["pass_seconds"] = pass_seconds(out)
            else:
                tail = (r["stderr"].strip().splitlines() or [""])[-1]
                row["error"] = r["killed"] or tail[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    write_results(rows, size, args, gen_s)
    return 0


def pass_seconds(out: Path) -> dict[str, float]:
    """Wall time of every ledger stage from the run report beside the output (the CLI writes one), else {}."""
    report = out.with_name(out.name + ".report.json")
    if not report.exists():
        return {}
    ledger = json.loads(report.read_text()).get("ledger", [])
    return {r["stage"]: round(r["seconds"], 1) for r in ledger if r.get("stage") != "original"}


def stages_section(folder: Path, args) -> int:
    """Per-stage RSS of ``cleanup`` (library, measure=False) on a smaller model of the same family; stored in the
    results JSON under ``stages`` and rendered below the table."""
    src = generate(folder / "in", args.hidden, args.stages)
    (folder / "out").mkdir(exist_ok=True)
    r = measure_wait4([sys.executable, "-m", "benchmarks.large_model", "_stages", "cleanup", str(src),
                       str(folder / "out" / "m.onnx")], int(args.kill_gb * 2**30), args.timeout)
    stages = [json.loads(ln) for ln in r["stdout"].splitlines() if ln.startswith("{")]
    path = RESULTS / f"{args.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    data["stages"] = {"file_bytes": disk_size(src), "layers": args.stages, "rows": stages}
    path.write_text(json.dumps(data, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    render(data)
    return 0


def render(data: dict) -> None:
    size, rows = data.get("input_bytes", 0), data.get("rows", [])
    lines = [f"# Models over 2 GB: {size / 1e9:.2f} GB wide MLP ({data.get('layers')} x MatMul {data.get('hidden')}^2 "
             "float32 + Add + Relu, external data)", "",
             "Generated by `python -m benchmarks.large_model` (streamed to disk, one matrix in memory). Every "
             "method ran in its own child process, one at a time, on the same file (rows of consecutive harness "
             "invocations on that file merge by method; `load avg` says how busy the machine was). Peak RSS: "
             "the larger of the child's polled VmHWM and `ru_maxrss` from wait4; a child passing `--kill-gb` is "
             "killed. Target for onnxcompress: peak RSS <= 1.5x the file size. `ort load` = the output loaded "
             "in onnxruntime and run on one feed (finite output), in a separate child. `time per pass` is the "
             "pass's own wall time from the run report (the rest of `time` is reading, the ledger's statistics, "
             "the gate and the write); `load avg` is the 1-minute load when the child started (2 shared cores). "
             "`before` = the same method in the previous results (before memory-mapped external data).", "",
             "| method | exit | time (s) | time per pass (s) | load avg | peak RSS (GB) | RSS / file | before: RSS / "
             "file (exit) | output (GB) | external data | ort load | ort load RSS (GB) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    before = {r["method"]: r for r in data.get("rows_before", [])}
    row_notes = data.get("row_notes", {})
    for r in rows:
        if r["code"] == -9 and not r.get("killed") and not r.get("error"):
            r["error"] = "SIGKILL from the kernel's OOM killer (the machine's 24 GB are shared), not the harness"
        per_pass = ", ".join(f"{v:.0f}" for v in r.get("pass_seconds", {}).values()) or "-"
        b = before.get(r["method"])
        was = f"{b['rss_ratio']:.2f}x ({b['code']})" if b else "-"
        lines.append(
            f"| `{r['method']}` | {r['code']} | {r['seconds']:.0f} | {per_pass} | {r.get('load', '-')} | "
            f"{r['peak_rss'] / 1e9:.2f} | "
            f"{r['rss_ratio']:.2f}x | {was} | {r.get('output_bytes', 0) / 1e9:.2f} | {r.get('external_data', '-')} | "
            f"{r.get('ort_load', '-')} | {r.get('ort_load_rss', 0) / 1e9:.2f} | "
            f"{' '.join(x for x in (r.get('error', ''), row_notes.get(r['method'], '')) if x)} |")
    st = data.get("stages")
    if st:
        lines += ["", f"## Where the memory goes: `cleanup` on a {st['file_bytes'] / 1e9:.2f} GB model of the same "
                  f"family ({st['layers']} layers), stage by stage", "",
                  "RSS after each stage and the peak inside it (VmHWM reset before the stage), library call "
                  "`compress(..., measure=False)` + `save`. Python + onnxruntime + numpy + onnx-graphsurgeon alone "
                  "take ~0.07 GB. The second `structural_problems` row is the checker inside the final gate; the "
                  "peak inside `ctx.export` is the RSS the pass left (cleanup reads every weight to find duplicates; "
                  "the export releases those pages).", "",
                  "| stage | RSS after (GB) | peak inside (GB) | peak / file |", "|---|---|---|---|"]
        for r in st["rows"]:
            lines.append(f"| {r['stage']} | {r['rss_after_gb']:.2f} | {r['peak_in_stage_gb']:.2f} | "
                         f"{r['peak_in_stage_gb'] * 1e9 / st['file_bytes']:.1f}x |")
        old = data.get("stages_before")
        if old:
            lines += ["", "Before memory-mapped external data (same harness, earlier commit): peak inside each stage "
                      "(GB): " + "; ".join(f"{r['stage']} {r['peak_in_stage_gb']:.2f}" for r in old["rows"]) + "."]
    (RESULTS / "large_model.md").write_text("\n".join(lines) + "\n")


def write_results(rows: list[dict], size: int, args, gen_s: float) -> None:
    """Rows merge by method into the existing results of the same model size (methods run in separate runs keep
    their rows)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("input_bytes") == size:
            new = {r["method"] for r in rows}
            rows = [r for r in old["rows"] if r["method"] not in new] + rows
    order = list(METHODS)
    rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    old = json.loads(path.read_text()) if path.exists() else {}
    data = {"input_bytes": size, "hidden": args.hidden, "layers": args.layers, "rows": rows}
    for key in ("stages", "stages_before", "rows_before", "row_notes"):
        if key in old:
            data[key] = old[key]
    path.write_text(json.dumps(data, indent=2))
    render(data)


if __name__ == "__main__":
    sys.exit(main())
