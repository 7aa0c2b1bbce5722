"""The real-model corpus: every model of ../shared/corpus.md with its inputs and task metric.

    python -m benchmarks.models fetch [NAME ...]     # fetch (all by default) into the cache, verify sha256
    python -m benchmarks.models list                 # names, families, cached or not

Importable: ``MODELS`` maps name -> ``ModelSpec``; ``get(name)``; ``fetch(name) -> Path``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks.fetch import cache_dir
from benchmarks.spec import ModelSpec


def _collect() -> dict[str, ModelSpec]:
    specs: list[ModelSpec] = []
    from benchmarks import imagenet, speech_text, vision

    specs += vision.SPECS
    specs += speech_text.SPECS
    specs += imagenet.SPECS
    return {s.name: s for s in specs}


MODELS: dict[str, ModelSpec] = _collect()


def get(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def fetch(name: str, root: Path | None = None) -> Path:
    return get(name).fetch(root or cache_dir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("names", nargs="*")
    sub.add_parser("list")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "list":
        for s in MODELS.values():
            print(f"{s.name:24s} {s.family:12s} quick={s.quick}  primary={s.primary_metric}")
        return 0
    failed = 0
    for name in args.names or list(MODELS):
        try:
            path = fetch(name)
            print(f"{name:24s} {path}  {path.stat().st_size / 1e6:.1f} MB")
        except Exception as exc:  # report every model, keep going
            failed += 1
            print(f"{name:24s} FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
