"""Pipelines: text and TOML parsing through the registry, printing back, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tests.passes_for_tests  # noqa: F401  (registers test-* passes)
from onnxcompress.errors import BadInputError
from onnxcompress.pipeline import format_pipeline, load_recipe, parse_pipeline
from tests.passes_for_tests import OptionsPass


def test_parse_types_options_by_field_type():
    (p,) = parse_pipeline('test-options{count=7 ratio=0.25 flag=true label="x y" mode=slow exclude=[a,b] limit=3}')
    assert p == OptionsPass(count=7, ratio=0.25, flag=True, label="x y", mode="slow", exclude=("a", "b"), limit=3)


def test_commas_separate_options_inside_braces_and_passes_outside():
    ps = parse_pipeline("test-options{count=1, flag=true},test-options")
    assert ps == [OptionsPass(count=1, flag=True), OptionsPass()]


def test_format_prints_only_non_default_options():
    assert format_pipeline([OptionsPass(), OptionsPass(count=2, exclude=("n1",))]) == \
        "test-options,test-options{count=2 exclude=[n1]}"


@given(count=st.integers(-5, 10**6), ratio=st.floats(0, 1, allow_nan=False), flag=st.booleans(),
       label=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='"\''),
                     min_size=0, max_size=8),
       mode=st.sampled_from(["fast", "slow"]),
       exclude=st.lists(st.from_regex(r"[a-z][a-z0-9_/.]{0,6}", fullmatch=True), max_size=3).map(tuple),
       limit=st.none() | st.integers(0, 100))
def test_text_roundtrip(count, ratio, flag, label, mode, exclude, limit):
    p = OptionsPass(count=count, ratio=ratio, flag=flag, label=label, mode=mode, exclude=exclude, limit=limit)
    assert parse_pipeline(format_pipeline([p])) == [p]


@pytest.mark.parametrize("text,match", [
    ("no-such-pass", "unknown pass"),
    ("test-options{nope=1}", "has no option"),
    ("test-options{count=abc}", "expected an integer"),
    ("test-options{flag=3}", "expected true/false"),
    ("test-options{mode=medium}", "not one of"),
    ("test-options{ratio=2}", "ratio must be in"),
    ("test-options{count=1", "unbalanced"),
    ("test-options count=1", "options go in braces"),
    ("", "empty pipeline"),
])
def test_bad_pipelines_are_bad_input(text, match):
    with pytest.raises(BadInputError, match=match):
        parse_pipeline(text)


def test_toml_recipe_tables_and_line_form(tmp_path):
    tables = tmp_path / "r.toml"
    tables.write_text('[[pass]]\nname = "test-options"\ncount = 4\nexclude = ["a"]\n\n[[pass]]\nname = "test-options"\n')
    assert load_recipe(tables) == [OptionsPass(count=4, exclude=("a",)), OptionsPass()]
    line = tmp_path / "l.toml"
    line.write_text('passes = "test-options{count=4 exclude=[a]},test-options"\n')
    assert load_recipe(line) == load_recipe(tables)
    assert format_pipeline(load_recipe(tables)) == "test-options{count=4 exclude=[a]},test-options"


def test_bad_recipes(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[pass]\n")
    with pytest.raises(BadInputError, match="invalid TOML"):
        load_recipe(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'x'\n")
    with pytest.raises(BadInputError, match="expected passes"):
        load_recipe(empty)
