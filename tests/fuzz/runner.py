"""Run fuzz cases through the CLI in-process (``onnxcompress.cli.main(argv)``) and judge every run.

A run is *clean* when it exits 0, or exits with the bad-input / pass / validation code (2 / 3 / 4) after printing
exactly one ``onnxcompress: error: ...`` line and no traceback. A case marked ``must_fail`` must exit 2. After every
run: the case's input files (and any watched file outside its folder) are byte-identical, no file appeared next to
them, the process temp folder is empty, and a failed compress left no output (not even the folder ``-o`` named).
Each run is guarded by an alarm (a hang is a miss) and the fuzz run by an address-space limit, so an absurd declared
shape surfaces as a clean error instead of swapping the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.generate import Case, Setup

ERROR_PREFIXES = ("onnxcompress: error:", "onnxcompress: internal error:")
CLEAN_CODES = {2, 3, 4}
RUN_TIMEOUT_S = 60


class RunTimeout(BaseException):
    """Raised by the alarm: a run took longer than RUN_TIMEOUT_S (BaseException: the CLI must not swallow it)."""


@dataclass
class Run:
    case: str
    command: str
    code: int | None
    stderr: str
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Tally:
    cases: int = 0
    runs: int = 0
    clean_errors: int = 0
    successes: int = 0
    tracebacks: int = 0
    internal_errors: int = 0
    modified_inputs: int = 0
    leftovers: int = 0
    misses: list[Run] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    #: wall seconds by "command outcome" ("compress ok", "inspect error", ...)
    seconds: Counter = field(default_factory=Counter)

    def line(self) -> str:
        return (f"{self.cases} cases, {self.runs} runs: {self.clean_errors} clean errors, {self.successes} successes, "
                f"{self.tracebacks} tracebacks, {self.internal_errors} internal errors, {self.modified_inputs} "
                f"modified inputs, {self.leftovers} leftovers, {len(self.misses)} misses "
                f"(exit codes {dict(sorted(self.codes.items(), key=lambda kv: str(kv[0])))}; seconds "
                f"{ {k: round(v) for k, v in self.seconds.most_common()} })")


# --------------------------------------------------------------------------------------------- file checks
def snapshot(paths: list[Path]) -> dict[str, str]:
    """Path -> content hash (regular files), link target (symlinks) or kind (folders, fifos)."""
    out: dict[str, str] = {}

    def visit(p: Path) -> None:
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[str(p)] = "dir"
            for child in sorted(p.iterdir()):
                visit(child)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.exists():
            out[str(p)] = "special"

    for p in paths:
        visit(p)
    return out


def files_under(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------- running
class _CurrentStderr(logging.StreamHandler):
    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextlib.contextmanager
def fuzz_environment(tmp_root: Path, address_space_gb: float = 6.0):
    """Logging to the current stderr, a private temp folder, an address-space cap and an alarm handler."""
    root = logging.getLogger()
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level, old_handlers = root.level, list(root.handlers)
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    tmp_root.mkdir(parents=True, exist_ok=True)
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp_root)
    old_env = {k: os.environ.get(k) for k in ("TMPDIR",)}
    os.environ["TMPDIR"] = str(tmp_root)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_bytes()
    cap = int(vm + address_space_gb * (1 << 30))
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    old_alarm = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        tempfile.tempdir = old_tempdir
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        root.handlers = old_handlers
        root.setLevel(old_level)


def _vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _on_alarm(signum, frame):
    raise RunTimeout()


def call_cli(argv: list[str]) -> tuple[int | None, str, float]:
    from onnxcompress.cli import main

    err, out = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    code: int | None
    signal.alarm(RUN_TIMEOUT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except RunTimeout:
        code = None
        err.write(f"\n[fuzz] timed out after {RUN_TIMEOUT_S} s\n")
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - anything escaping main() is a traceback for the user
        import traceback

        code = None
        err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
    finally:
        signal.alarm(0)
    return code, err.getvalue(), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- oracle
def parses(path: Path) -> bool:
    import onnx

    try:
        m = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return False
    return m.HasField("graph")


def ort_loads(path: Path) -> bool:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    signal.alarm(RUN_TIMEOUT_S)
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return True
    except RunTimeout:
        return False
    except Exception:
        return False
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------------------------------------- commands
def commands(case: Case, s: Setup, out: Path, pass_names: list[str]) -> list[tuple[str, list[str], str]]:
    """(label, argv, which expectation applies: 'model' | 'inspect' | 'data')."""
    common = ["--no-latency", "--max-val", "2", "-q"]
    val = ["--max-val", "2", "--latency-budget", "0.01"]
    cmds: list[tuple[str, list[str], str]] = []
    if case.kind == "model":
        calib = ["--calib", str(s.calib)] if s.calib else []
        for p in pass_names:
            cmds.append((f"compress {p}", ["compress", str(s.model), "-o", str(out / p / "m.onnx"), "--passes", p,
                                           *calib, *common], "model"))
        cmds.append(("inspect", ["inspect", str(s.model)], "inspect"))
        data = ["--data", str(s.calib)] if s.calib else []
        cmds.append(("validate", ["validate", str(s.model), str(s.model), *data, *val], "model"))
    elif case.kind == "data":
        assert s.bad_data is not None
        # data that must be accepted needs one successful run, not one per pass (each would be a full compress)
        for p in pass_names if case.must_fail else pass_names[:1]:
            cmds.append((f"compress {p} --calib", ["compress", str(s.model), "-o", str(out / p / "m.onnx"),
                                                   "--passes", p, "--calib", str(s.bad_data), *common], "data"))
        cmds.append(("compress --val", ["compress", str(s.model), "-o", str(out / "val" / "m.onnx"), "--passes",
                                        pass_names[0], "--calib", str(s.calib), "--val", str(s.bad_data), *common],
                     "data"))
        cmds.append(("validate --data", ["validate", str(s.model), str(s.model), "--data", str(s.bad_data), *val],
                     "data"))
    else:
        what = ["--recipe", str(s.recipe)] if s.recipe else ["--passes", s.passes or ""]
        cmds.append(("compress", ["compress", str(s.model), "-o", str(out / "p" / "m.onnx"), *what, "--calib",
                                  str(s.calib), *common], "data"))
    return cmds


def judge(run: Run, must_fail: bool) -> None:
    text = run.stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in text:
        run.problems.append("traceback")
    if run.code is None:
        run.problems.append("no exit code (escaped main or timed out)")
        return
    if run.code == 1:
        run.problems.append("internal error")
    if run.code == 0:
        if must_fail:
            run.problems.append("accepted bad input (exit 0)")
        return
    if run.code not in CLEAN_CODES and run.code != 1:
        run.problems.append(f"unexpected exit code {run.code}")
    if must_fail and run.code != 2:
        run.problems.append(f"bad input not exit 2 (got {run.code})")
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIXES)]
    if len(errors) != 1:
        run.problems.append(f"{len(errors)} error lines")
    elif lines[-1] != errors[0]:
        run.problems.append("error line is not the last line")
    elif len(errors[0]) > 2000:
        run.problems.append("error line longer than 2000 characters")


def run_case(case: Case, folder: Path, pass_names: list[str], tmp: Path) -> list[Run]:
    inp, out = folder / "in", folder / "out"
    inp.mkdir(parents=True)
    s = case.build(inp)
    must_fail = case.must_fail
    inspect_must_fail = case.inspect_must_fail
    if case.kind == "model":
        parse_ok = parses(s.model)
        if inspect_must_fail is None:
            inspect_must_fail = not parse_ok
        if must_fail is None:
            must_fail = not (parse_ok and ort_loads(s.model))
    before = snapshot([inp, *s.watched])
    runs = []
    for label, argv, kind in commands(case, s, out, pass_names):
        code, err, secs = call_cli(argv)
        run = Run(case.id, label, code, err, seconds=secs)
        judge(run, bool(inspect_must_fail if kind == "inspect" else must_fail))
        after = snapshot([inp, *s.watched])
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            run.problems.append(f"input changed: {changed[:3]}")
        left = files_under(tmp)
        if left:
            run.problems.append(f"temp files left: {left[:5]}")
            for p in sorted(tmp.rglob("*"), reverse=True):
                p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
        if argv[0] == "compress":
            target = Path(argv[argv.index("-o") + 1])
            produced = files_under(target.parent) if target.parent.exists() else []
            if code == 0:
                expected = {target.name, target.name + ".report.json", target.name + ".report.md",
                            target.name + ".report.html", target.name + ".data"}
                extra = [f for f in produced if f not in expected]
                if extra:
                    run.problems.append(f"stray files beside the output: {extra[:5]}")
                if target.name not in produced:
                    run.problems.append("exit 0 but no output written")
            elif target.parent.exists():
                run.problems.append(f"failed run left output: {produced[:5] or [target.parent.name + '/']}")
        runs.append(run)
    return runs


def add(tally: Tally, runs: list[Run]) -> None:
    tally.cases += 1
    for r in runs:
        tally.runs += 1
        tally.codes[r.code] += 1
        tally.seconds[f"{r.command.split()[0]} {'ok' if r.code == 0 else 'error'}"] += r.seconds
        if r.code == 0:
            tally.successes += 1
        elif r.code in CLEAN_CODES and not r.problems:
            tally.clean_errors += 1
        if any(p == "traceback" for p in r.problems):
            tally.tracebacks += 1
        if "internal error" in r.problems:
            tally.internal_errors += 1
        if any(p.startswith("input changed") for p in r.problems):
            tally.modified_inputs += 1
        if any(p.startswith(("temp files left", "failed run left", "stray files")) for p in r.problems):
            tally.leftovers += 1
        if r.problems:
            tally.misses.append(r)


def describe(run: Run) -> str:
    last = [ln for ln in run.stderr.splitlines() if ln.strip()][-1:] or [""]
    return f"{run.case} | {run.command} | exit {run.code} | {'; '.join(run.problems)} | {last[0][:300]}"
