"""Named compression recipes: the TOML files in this folder, loaded by ``--recipe NAME`` as well as by a path.

A recipe file holds ``description = "..."`` (one line, listed by ``onnxcompress recipes``) and either
``passes = "pipeline text"`` or ``[[pass]]`` tables (``onnxcompress.pipeline.load_recipe``); its leading comment
states what it was measured to do on the benchmark models (``benchmarks/results/cluster.md``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def _names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def list_recipes() -> dict[str, str]:
    """Every shipped recipe: name -> its one-line description."""
    out = {}
    for name in _names():
        try:
            data = tomllib.loads((RECIPES_DIR / f"{name}.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):  # pragma: no cover - the shipped files are tested
            continue
        out[name] = str(data.get("description", ""))
    return out


def is_recipe_name(text: str) -> bool:
    """Whether ``text`` looks like a bare recipe name (no path separator, no .toml suffix)."""
    return bool(text) and "/" not in text and "\\" not in text and not text.endswith(".toml")


def recipe_path(name_or_path: str | Path) -> Path:
    """The file of a recipe: a shipped recipe by NAME (``recipes/NAME.toml``) or a path to a TOML file.

    An unknown name raises ``BadInputError`` listing the shipped recipes."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or not is_recipe_name(text) or Path(text).is_file():
        return Path(text)
    path = RECIPES_DIR / f"{text}.toml"
    if path.is_file():
        return path
    from onnxcompress.errors import BadInputError

    raise BadInputError(f"unknown recipe {text!r}; shipped recipes: {', '.join(_names()) or '(none)'} "
                        "(or give a path to a .toml file)")
