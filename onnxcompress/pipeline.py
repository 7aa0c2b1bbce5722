"""Pipelines: text and TOML recipes -> [Pass], and back to text.

Text grammar::

    pipeline := item ("," item)*
    item     := NAME [ "{" option (("," | " ") option)* "}" ]
    option   := KEY "=" VALUE          VALUE: true/false, int, float, bare word, "quoted", or [a, b, c]

Option values are converted by the pass dataclass's field types (bool, int, float, str, tuples/lists, Optional).
``format_pipeline`` prints only non-default options, so ``parse(format(p)) == p`` and the report's pipeline text
reproduces the run.

TOML recipe (a path, or the NAME of a shipped recipe in ``onnxcompress.recipes``)::

    description = "one line shown by `onnxcompress recipes`"
    # either one line
    passes = "cleanup,quantize{mode=static}"
    # or tables, in order
    [[pass]]
    name = "quantize"
    mode = "static"
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from onnxcompress.errors import BadInputError
from onnxcompress.pass_base import Pass, get_pass_class, option_fields, registered_passes

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


# --------------------------------------------------------------------------------------------------- parsing
def _split_top(text: str, seps: str) -> list[str]:
    """Split on separators not nested in {}, [] or quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise BadInputError(f"pipeline {text!r}: unbalanced '{ch}'")
        if ch in seps and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth or quote:
        raise BadInputError(f"pipeline {text!r}: unbalanced brackets or quotes")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _parse_scalar(raw: str) -> Any:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        return [_parse_scalar(x) for x in _split_top(raw[1:-1], ",;")]
    return _parse_scalar(raw)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a parsed value to the dataclass field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = typing.get_args(tp)
        inner_tp = inner[0] if inner else Any
        return tuple(_coerce(v, inner_tp, where) for v in items) if origin is tuple else [
            _coerce(v, inner_tp, where) for v in items]
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        return str(value)
    return value


def build_pass(name: str, options: dict[str, Any]) -> Pass:
    cls = get_pass_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in option_fields(cls)}
    kwargs = {}
    for key, value in options.items():
        key_norm = key.replace("-", "_")
        if key_norm not in fields:
            raise BadInputError(f"pass {name!r} has no option {key!r}; options: {', '.join(fields) or '(none)'}")
        try:
            kwargs[key_norm] = _coerce(value, hints.get(key_norm, Any), f"{name}.{key}")
        except ValueError as exc:
            raise BadInputError(str(exc)) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"pass {name!r}: {exc}") from None


def parse_pipeline(text: str) -> list[Pass]:
    """Pipeline text -> passes. A text that is only the NAME of a shipped recipe (and no pass of that name) is that
    recipe, so ``--recipe NAME`` works wherever a pipeline text is accepted."""
    name = text.strip()
    if _NAME.fullmatch(name) and name not in registered_passes():
        from onnxcompress.recipes import list_recipes

        if name in list_recipes():
            return load_recipe(name)
    passes = []
    for item in _split_top(text, ","):
        m = _NAME.match(item)
        if not m:
            raise BadInputError(f"pipeline item {item!r}: expected a pass name")
        name, rest = m.group(0), item[m.end():].strip()
        options: dict[str, Any] = {}
        if rest:
            if not (rest.startswith("{") and rest.endswith("}")):
                raise BadInputError(f"pipeline item {item!r}: options go in braces, e.g. {name}{{key=value}}")
            for opt in _split_top(rest[1:-1], ", "):
                if "=" not in opt:
                    raise BadInputError(f"pipeline item {item!r}: option {opt!r} is not key=value")
                key, raw = opt.split("=", 1)
                options[key.strip()] = _parse_value(raw)
        passes.append(build_pass(name, options))
    if not passes:
        raise BadInputError("empty pipeline")
    return passes


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The TOML document at ``path``; a missing file or invalid TOML is bad input naming ``what`` and the path."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{what} {p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{what} {p}: invalid TOML ({exc})") from None


def load_recipe(path: str | Path) -> list[Pass]:
    """A recipe by path, or a shipped recipe by bare NAME (``recipes/NAME.toml``; an unknown name lists the shipped
    ones). Keys besides ``passes`` / ``[[pass]]``: ``description`` (listed by ``onnxcompress recipes``)."""
    from onnxcompress.recipes import recipe_path

    p = recipe_path(path)
    data = read_toml(p, "recipe")
    if "passes" in data and isinstance(data["passes"], str):
        return parse_pipeline(data["passes"])
    tables = data.get("pass")
    if not isinstance(tables, list) or not tables:
        raise BadInputError(f"recipe {p}: expected passes = \"...\" or [[pass]] tables")
    passes = []
    for t in tables:
        t = dict(t)
        name = t.pop("name", None)
        if not name:
            raise BadInputError(f"recipe {p}: a [[pass]] table has no name")
        passes.append(build_pass(name, t))
    return passes


# ------------------------------------------------------------------------------------------------ formatting
def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    if isinstance(v, str):
        if v == "" or re.search(r"[\s,{}\[\]=\"']", v) or _parse_scalar(v) != v:
            return '"' + v + '"'
        return v
    return repr(v)


def format_pass(p: Pass) -> str:
    opts = []
    for f in option_fields(type(p)):
        value = getattr(p, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = object()
        if value != default:
            opts.append(f"{f.name}={_format_value(value)}")
    return p.name + ("{" + " ".join(opts) + "}" if opts else "")


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(format_pass(p) for p in passes)
