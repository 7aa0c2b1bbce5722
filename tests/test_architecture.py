"""The house rules that keep the layout honest: explicit registration, documented options, core free of passes."""

from __future__ import annotations

import ast
from pathlib import Path

import onnxcompress  # noqa: F401  (registers the built-in passes)
from onnxcompress.pass_base import option_fields, option_help, registered_passes

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_pass_documents_every_option():
    passes = registered_passes()
    assert {"cleanup", "quantize", "prune-channels", "distill"} <= set(passes)
    missing = [f"{name}.{f}" for name, cls in passes.items() for f, h in option_help(cls).items() if not h.strip()]
    assert not missing, f"options without help (use option(default, help)): {missing}"
    for name, cls in passes.items():
        assert cls.description, f"{name} has no description"
        assert not cls.__dict__.get("option_help_legacy"), f"{name} still has a legacy option dict"
        assert [f.name for f in option_fields(cls)] == list(option_help(cls))


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_core_imports_no_pass_and_loads_nothing_by_name():
    core = [p for p in (ROOT / "onnxcompress").rglob("*.py") if p.name != "__init__.py" or p.parent.name != "onnxcompress"]
    for path in core:
        if path.name == "cli.py":
            continue  # the CLI is the face: it may list the passes
        mods = _imports(path)
        assert not [m for m in mods if m.startswith("onnxcompress.passes")], f"{path} imports a pass"
        assert "importlib" not in mods, f"{path} loads modules by name"


def test_passes_import_no_other_pass_package():
    packages = {p.name for p in (ROOT / "passes").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "passes").glob("*.py") if p.stem != "__init__"}
    for path in (ROOT / "passes").rglob("*.py"):
        if path.parent == ROOT / "passes" and path.stem == "__init__":
            continue
        own = path.parent.name if path.parent != ROOT / "passes" else path.stem
        for m in _imports(path):
            if m.startswith("onnxcompress.passes."):
                other = m.split(".")[2]
                assert other == own or other not in packages | modules, f"{path} imports pass {other}"


def test_no_private_name_imported_across_modules():
    offenders = []
    for base in ("onnxcompress", "passes"):
        for path in (ROOT / base).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                                  if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


def test_no_module_over_500_lines_outside_benchmarks():
    long = [f"{p.relative_to(ROOT)} ({n})" for base in ("onnxcompress", "passes") for p in (ROOT / base).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long
