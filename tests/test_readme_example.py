"""The README's "Library use" example runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_library_use_example_runs(tmp_path, monkeypatch, capsys):
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Library use"):]
    section = section[: section.index("\n## ", 3)]
    blocks = python_blocks(section)
    assert len(blocks) == 1
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__example__"})
    out = capsys.readouterr().out
    assert re.search(r"top-1 agreement 0\.9\d\d|top-1 agreement 1\.000", out)
    assert "refused:" in out and "needs calibration data" in out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["digits_small.onnx", "digits_small.onnx.report.html", "digits_small.onnx.report.json",
                       "digits_small.onnx.report.md"]
    rows = [line for line in out.splitlines() if " bytes " in line and " MACs" in line]
    assert len(rows) == 5  # original + 4 passes
    assert int(rows[-1].split()[-4]) < int(rows[0].split()[-4]) / 2  # int8 + pruning: less than half the bytes
