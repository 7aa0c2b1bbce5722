"""The fuzz corpus (tests/fuzz/generate.py) through compress (every registered pass), inspect and validate.

The default test runs every case in-process (each case's compress through one registered pass, rotating over the
registry; the slow variant runs every pass on every case) and prints the tally; it fails on any miss (a traceback, an internal error, a
bad input not refused with exit 2, more or less than one error line, a modified input, a leftover file). Runs that
hit a known bug in a file this suite does not own are counted apart; each such bug has its own strict xfail test
on one representative case, so fixing the bug turns that test red until its entry is removed here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from onnxcompress.pass_base import registered_passes
from tests.fuzz import runner
from tests.fuzz.generate import generate_cases

SEED = 0


@dataclass(frozen=True)
class KnownBug:
    key: str
    owner: str
    reason: str
    matches: Callable[[runner.Run], bool]
    example: str  # a case id that shows it


def _cases(*ids: str) -> Callable[[runner.Run], bool]:
    return lambda r: r.case in ids and bool(r.problems)


KNOWN_BUGS = [
]


def known_bug(run: runner.Run) -> KnownBug | None:
    return next((b for b in KNOWN_BUGS if b.matches(run)), None)


def _pass_names() -> list[str]:
    """Product passes only (test-only passes such as test-fail register when their test module loads first)."""
    return [n for n in registered_passes() if not n.startswith("test-")]


def _run_corpus(tmp_path, capsys, every_pass: bool) -> None:
    cases = generate_cases(SEED)
    assert len(cases) >= 300
    names = _pass_names()
    tally = runner.Tally()
    known: dict[str, int] = {}
    t0 = time.perf_counter()
    with runner.fuzz_environment(tmp_path / "tmp"):
        for i, case in enumerate(cases):
            # default run: each case through one pass, rotating over the registry (every pass meets ~1/P of the
            # corpus, a new pass included); the slow run: every case through every pass
            passes = names if every_pass else [names[i % len(names)]]
            runs = runner.run_case(case, tmp_path / "cases" / f"{i:04d}", passes, tmp_path / "tmp")
            kept = []
            for r in runs:
                bug = known_bug(r)
                if bug is not None:
                    known[bug.key] = known.get(bug.key, 0) + 1
                    r.problems = []  # counted apart, below
                kept.append(r)
            runner.add(tally, kept)
    with capsys.disabled():  # the tally is printed in every run, not only with -s
        print(f"\nfuzz ({'every pass' if every_pass else 'passes rotated'} over {len(names)} registered, "
              f"{time.perf_counter() - t0:.0f} s): " + tally.line())
        print(f"fuzz: {sum(known.values())} runs hit known bugs (strict xfail tests): {known}")
        for r in tally.misses[:40]:
            print("  MISS " + runner.describe(r))
    assert tally.cases == len(cases)
    assert not tally.misses, f"{len(tally.misses)} misses; first: {runner.describe(tally.misses[0])}"
    assert tally.tracebacks == tally.internal_errors == tally.modified_inputs == tally.leftovers == 0


def test_fuzz_corpus_every_command(tmp_path, capsys):
    _run_corpus(tmp_path, capsys, every_pass=False)


@pytest.mark.slow
def test_fuzz_corpus_every_command_every_pass(tmp_path, capsys):
    _run_corpus(tmp_path, capsys, every_pass=True)


@pytest.mark.parametrize("bug", [pytest.param(b, id=b.key, marks=pytest.mark.xfail(strict=True, reason=
                                                                                    f"{b.owner}: {b.reason}"))
                                 for b in KNOWN_BUGS])
def test_fuzz_known_bug_still_present(bug, tmp_path):
    case = next(c for c in generate_cases(SEED) if c.id == bug.example)
    with runner.fuzz_environment(tmp_path / "tmp"):
        runs = runner.run_case(case, tmp_path / "case", _pass_names()[:1], tmp_path / "tmp")
    bad = [runner.describe(r) for r in runs if r.problems]
    assert not bad, "\n".join(bad)


def test_fuzz_corpus_is_deterministic():
    a = [c.id for c in generate_cases(SEED)]
    b = [c.id for c in generate_cases(SEED)]
    assert a == b
    kinds = {c.kind for c in generate_cases(SEED)}
    assert kinds == {"model", "data", "pipeline"}


def test_every_registered_pass_has_wrong_type_cases():
    ids = [c.id for c in generate_cases(SEED)]
    for name in _pass_names():
        assert f"pipeline-{name}-unknown-option" in ids
