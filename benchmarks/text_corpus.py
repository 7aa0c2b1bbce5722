"""Unlabeled English sentences for distilling the sentence encoders: the Python standard library's own prose.

A user who distils a sentence encoder brings thousands of unlabeled sentences; the benchmark's only sentences are
the ~550 of ``pydoc_data.topics`` (``benchmarks.speech_text.english_sentences``: first half calibration, second half
evaluation). This module models the user's pool with text every machine with Python has, offline: the docstrings
(module, class, function; read with ``ast``, the modules are never imported) and the full-line ``#`` comments of
the standard library's ``.py`` files (``site-packages`` excluded).

Rules, the same as ``english_sentences`` so the two pools look alike to the tokenizer:
- a docstring is cleaned (``inspect.cleandoc``) and split into paragraphs at blank lines; consecutive full-line
  comments form one paragraph; a paragraph with an indented line, ``>>>`` or ``::=`` is code and is skipped;
- a paragraph's lines are joined and split into sentences after ``.``, ``!`` or ``?`` followed by a capital;
- a sentence is kept when it has 5-40 words, starts with a capital, ends with ``.``/``!``/``?`` and is >= 85 %
  letters and spaces;
- deduplicated (whitespace-normalised, case-folded) and DISJOINT from every ``pydoc_data.topics`` sentence (both
  halves: the evaluation sentences are never trained on, nor are the calibration ones duplicated);
- ordered by a hash of the sentence (blake2b): deterministic for a given Python, and every prefix (``n`` first
  sentences) is a spread over the whole library rather than the alphabetically first modules.

The count depends on the Python version (its stdlib): ``corpus_stats`` says how many; on CPython 3.11.7
26,577 sentences of 5-40 words (mean 13.2) from 1790 files, in ~13 s.
Comments inside multi-line strings are not comments: lines inside any multi-line string constant (from the
``ast`` positions) are skipped, so no tokenizer pass is needed (~6 s for the whole library instead of ~16 s).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import logging
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: sources ``sentences(source)`` knows
SOURCES = ("stdlib",)

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_COMMENT = re.compile(r"^\s*#+ ?(.*)$")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library (no ``site-packages``), in sorted path order."""
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def paragraph_sentences(lines: list[str]) -> list[str]:
    """The sentences of one paragraph (already split at blank lines) that pass the prose filter."""
    para = "\n".join(lines)
    if any(line.startswith((" ", "\t")) for line in lines) or "::=" in para or ">>>" in para:
        return []
    text = " ".join(line.strip() for line in lines).strip()
    out = []
    for sent in _SPLIT.split(text):
        if not (5 <= len(sent.split()) <= 40) or not sent[0].isupper() or sent[-1] not in ".!?":
            continue
        if sum(c.isalpha() or c == " " for c in sent) < 0.85 * len(sent):
            continue
        out.append(sent)
    return out


def text_paragraphs(text: str) -> Iterator[list[str]]:
    """Paragraphs (lists of lines) of a cleaned docstring or comment block, split at blank lines."""
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if lines:
            yield lines


def file_paragraphs(source: str) -> Iterator[list[str]]:
    """Docstring and comment paragraphs of one module's source (not imported: parsed with ``ast``)."""
    with warnings.catch_warnings():  # invalid escapes in old test modules: not ours to report
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    string_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno != node.lineno:
            string_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield from text_paragraphs(doc)
    block: list[str] = []
    for no, line in enumerate(source.splitlines(), 1):
        m = _COMMENT.match(line) if no not in string_lines else None
        if m and m.group(1).strip() and not m.group(1).startswith("!"):
            block.append(m.group(1).rstrip())
            continue
        if block:
            yield from text_paragraphs(inspect.cleandoc("\n".join(block)))
        block = []
    if block:
        yield from text_paragraphs(inspect.cleandoc("\n".join(block)))


def norm_key(sentence: str) -> str:
    return " ".join(sentence.split()).casefold()


def order_key(sentence: str) -> bytes:
    return hashlib.blake2b(sentence.encode("utf-8"), digest_size=8).digest()


def collect(files: Iterable[Path], exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """Filtered, deduplicated sentences of ``files`` without any of ``exclude`` (compared whitespace-normalised
    and case-folded), in hash order."""
    seen = {norm_key(s) for s in exclude}
    out: list[str] = []
    skipped = 0
    for path in files:
        try:
            source = path.read_bytes().decode("utf-8")
            paragraphs = list(file_paragraphs(source))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            skipped += 1  # test data in other encodings or Python 2 syntax (lib2to3 fixtures)
            continue
        for para in paragraphs:
            for sent in paragraph_sentences(para):
                k = norm_key(sent)
                if k not in seen:
                    seen.add(k)
                    out.append(sent)
    if skipped:
        log.info("text_corpus: %d files not parsed (encoding / syntax)", skipped)
    return tuple(sorted(out, key=order_key))


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """The standard library's prose sentences, disjoint from ``pydoc_data.topics`` (calibration and evaluation)."""
    from benchmarks.speech_text import english_sentences

    return collect(stdlib_files(), exclude=english_sentences())


def sentences(source: str, n: int | None = None) -> tuple[str, ...]:
    """The first ``n`` (all when None) sentences of ``source`` (one of ``SOURCES``)."""
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; known: {', '.join(SOURCES)}")
    pool = stdlib_sentences()
    if n is not None and n > len(pool):
        raise ValueError(f"text source {source!r} has {len(pool)} sentences, {n} asked for")
    return pool if n is None else pool[:n]


def corpus_stats() -> dict[str, float]:
    import sys

    pool = stdlib_sentences()
    words = [len(s.split()) for s in pool]
    return {"python": sys.version.split()[0], "files": len(stdlib_files()), "sentences": len(pool),
            "mean_words": round(sum(words) / max(1, len(words)), 1)}


if __name__ == "__main__":
    import json
    import time

    t0 = time.perf_counter()
    stats = corpus_stats()
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(stats))
    for s in sentences("stdlib", 8):
        print("-", s)
