"""Feedback on long runs: plain lines outside a terminal (pass start/end, heartbeats), --quiet, -v."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from onnxcompress import progress
from onnxcompress.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"


def test_outside_a_terminal_one_line_per_pass_and_heartbeats(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)  # every step of every long loop reports
    with np.load(CALIB) as z:
        np.savez(tmp_path / "small.npz", image=z["image"][:24])
    code = main(["compress", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--passes",
                 "cleanup,prune-channels{ratio=0.3}", "--calib", str(tmp_path / "small.npz"), "--max-val", "8", "--no-latency"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = err.splitlines()
    starts = [x for x in lines if re.fullmatch(r"onnxcompress: \[\s*[\d.]+s\] pass \d/2 \S+: start", x)]
    ends = [x for x in lines if re.fullmatch(r"onnxcompress: \[\s*[\d.]+s\] pass \d/2 \S+: (modified|unchanged) "
                                               r"in [\d.]+s", x)]
    assert len(starts) == 2 and len(ends) == 2
    assert any(re.fullmatch(r"onnxcompress: channel importance: 12/24 \(50%\), [\d.]+s", x) for x in lines)
    assert any(re.fullmatch(r"onnxcompress: validate: 8/8 \(100%\), [\d.]+s", x) for x in lines)
    assert "\r" not in err  # no bar redraws in a log


def test_quiet_prints_nothing_on_success(tmp_path, capsys):
    code = main(["compress", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--passes", "cleanup", "-q",
                 "--no-latency"])  # no data: the random-feed warning is not printed either
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and err == ""
    assert (tmp_path / "o.onnx").exists()


def test_quiet_still_prints_the_error(tmp_path, capsys):
    code = main(["compress", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--passes", "quantize{mode=static}", "-q"])
    assert code == 2 and "needs calibration data" in capsys.readouterr().err


def test_verbose_logs_what_the_passes_do(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    args = ["compress", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--passes", "cleanup", "--calib", str(CALIB),
            "--max-val", "4", "--no-latency"]
    assert main(args) == 0
    quiet_records = [r for r in caplog.records if r.levelno == logging.INFO and r.name != "onnxcompress.progress"]
    caplog.clear()
    assert main([*args, "-v"]) == 0
    info = [r for r in caplog.records if r.levelno == logging.INFO and r.name != "onnxcompress.progress"]
    assert not quiet_records and info  # -v adds the library's INFO lines
    assert logging.getLogger("onnxcompress").level == logging.NOTSET  # main() puts the levels back


def test_heartbeat_wrapper_yields_everything(caplog):
    caplog.set_level(logging.INFO, logger="onnxcompress.progress")
    wrap = progress.heartbeat(interval_s=0.0)
    assert list(wrap(range(5), total=5, desc="refit")) == list(range(5))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("refit: 1/5 (20%)") and msgs[-1].startswith("refit: done, 5 in")


@pytest.mark.parametrize("tty", [False, True])
def test_progress_choice_follows_the_terminal(monkeypatch, tty):
    from onnxcompress import cli

    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: tty, raising=False)
    wrap = cli._progress(None)
    items = list(wrap(range(3), total=3, desc="x"))
    assert items == [0, 1, 2]
    assert (type(wrap(range(1))).__name__ == "tqdm") is tty
