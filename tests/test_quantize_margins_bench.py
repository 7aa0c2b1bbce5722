"""benchmarks.int8_margins: the hard inputs are deterministic, split-disjoint and shaped for the models."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")


def test_hard_lines_are_deterministic_disjoint_and_rec_shaped():
    from benchmarks.int8_margins import HARD_CHARS, hard_lines

    try:
        a, ta = hard_lines(3, "calib")
    except OSError as exc:  # no DejaVu fonts on this machine
        pytest.skip(f"fonts missing: {exc}")
    b, tb = hard_lines(3, "calib")
    c, tc = hard_lines(3, "eval")
    assert ta == tb and all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b, strict=True))
    assert not set(ta) & set(tc)
    assert all(f["x"].shape == (1, 3, 48, 320) and f["x"].dtype == np.float32 for f in a + c)
    assert all(-1.0 <= f["x"].min() and f["x"].max() <= 1.0 for f in a)
    assert all(8 <= len(t) <= 18 and set(t) <= set(HARD_CHARS) for t in ta + tc)


def test_hard_line_metrics_compare_strings_with_fp32_and_truth():
    from benchmarks.int8_margins import cer

    assert cer(["abcd", "xy"], ["abcd", "xz"]) == pytest.approx(1 / 6)
