"""SIGINT / SIGTERM during ``compress``: no partial output, no temp file, a non-zero exit and one line.

Each case runs the CLI in a child process that sends the signal to itself at a chosen point, so the interrupt
lands exactly there (not wherever a timer happens to fire):

- ``calibration``: on the third pass over the calibration feeds (inside quantize's calibration);
- ``pass``: at the start of the pass's ``run``;
- ``write-report``: after the first report file was staged, before the model is written;
- ``write-model``: after the model's temp file was written and fsync'd, before the rename.

Afterwards: exit code 128 + signal, stderr exactly one ``onnxcompress: interrupted`` line, the output folder never
created, the temp folder empty, the input files byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"

CHILD = r"""
import os, signal, sys, pathlib
sig, where, passes = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3]
argv = sys.argv[4:]

def fire():
    os.kill(os.getpid(), sig)

if where == "calibration":
    import onnxcompress.data as data
    original_iter = data.FeedSet.__iter__
    calls = [0]
    def counted(self):
        calls[0] += 1
        if calls[0] == 3:
            fire()
        yield from original_iter(self)
    data.FeedSet.__iter__ = counted
elif where == "pass":
    import onnxcompress
    from onnxcompress.pass_base import registered_passes
    cls = registered_passes()[passes.split("{")[0]]
    original_run = cls.run
    def run(self, graph, ctx):
        fire()
        return original_run(self, graph, ctx)
    cls.run = run
elif where == "write-model":
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        fire()
    os.fsync = fsync
elif where == "write-report":
    real_write_text = pathlib.Path.write_text
    def write_text(self, *a, **k):
        n = real_write_text(self, *a, **k)
        if self.name.endswith(".tmp"):
            fire()
        return n
    pathlib.Path.write_text = write_text
from onnxcompress.cli import main
sys.exit(main(argv))
"""


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt(tmp_path: Path, sig: str, where: str, passes: str) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "m.onnx").write_bytes(MODEL.read_bytes())
    (inp / "calib.npz").write_bytes(CALIB.read_bytes())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    before = _snapshot(inp)
    out = tmp_path / "out" / "sub" / "small.onnx"
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, sig, where, passes, "compress", str(inp / "m.onnx"), "-o",
                           str(out), "--passes", passes, "--calib", str(inp / "calib.npz"), "--no-latency",
                           "--max-val", "16", "-q"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 128 + getattr(signal, sig), (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("onnxcompress: interrupted"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    # onnxruntime writes a session id file ``.ses`` into the temp folder when it is imported (plain
    # ``import onnxruntime`` does it too): not ours, not a partial output
    assert [p.name for p in tmp.iterdir() if p.name != ".ses"] == []
    assert _snapshot(inp) == before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["write-model"])
def test_interrupt_during_write_leaves_nothing(tmp_path, sig, where):
    interrupt(tmp_path, sig, where, "cleanup")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where,passes", [("calibration", "quantize"), ("pass", "cleanup"), ("pass", "quantize"),
                                          ("write-report", "cleanup")])
def test_interrupt_anywhere_leaves_nothing(tmp_path, sig, where, passes):
    interrupt(tmp_path, sig, where, passes)
