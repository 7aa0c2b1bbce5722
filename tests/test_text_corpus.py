"""benchmarks.text_corpus: stdlib prose sentences, filtered like the pydoc ones, disjoint from the evaluation split."""

from __future__ import annotations

import textwrap

import pytest

from benchmarks import text_corpus
from benchmarks.speech_text import english_sentences, split_sentences

MODULE = textwrap.dedent('''
    """The parser reads one record at a time from the stream. It returns None at the end of input.

    >>> parse("x")
    Record(x)

    Short one.
    """

    # Each worker keeps its own cache of compiled patterns,
    # so no lock is needed around the lookup table.
    X = """
    # This line is inside a string and is not a comment at all.
    """


    def f():
        """EVAL_SENTENCE"""
        #   indented code in a comment block stays out
        #       of the corpus when it is indented.
''')


def test_docstrings_and_comments_are_split_filtered_and_disjoint(tmp_path):
    evaluation = split_sentences("eval")
    sent = evaluation[0]
    path = tmp_path / "mod.py"
    path.write_text(MODULE.replace("EVAL_SENTENCE", sent))
    got = text_corpus.collect([path], exclude=english_sentences())
    assert set(got) == {
        "The parser reads one record at a time from the stream.",
        "It returns None at the end of input.",
        "Each worker keeps its own cache of compiled patterns, so no lock is needed around the lookup table.",
    }
    # the same file without the exclusion list: the evaluation sentence comes in (the exclusion is what drops it)
    assert sent in text_corpus.collect([path])


def test_whitespace_and_case_variants_of_an_excluded_sentence_are_dropped(tmp_path):
    sent = split_sentences("eval")[3]
    path = tmp_path / "m.py"
    path.write_text(f'"""{sent.upper()}\n\nA second sentence that should stay in the corpus."""\n')
    assert text_corpus.collect([path], exclude=[sent]) == ("A second sentence that should stay in the corpus.",)


def test_a_sample_of_the_stdlib_is_deterministic_hash_ordered_and_disjoint():
    files = text_corpus.stdlib_files()[::30]
    a = text_corpus.collect(files, exclude=english_sentences())
    b = text_corpus.collect(list(reversed(files)), exclude=english_sentences())
    assert len(a) > 200
    assert set(a) == set(b)
    assert a == tuple(sorted(a, key=text_corpus.order_key))  # order does not depend on the file order
    assert not set(a) & set(english_sentences())
    for s in a:
        assert 5 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?"


def test_unknown_source_and_too_many_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown text source"):
        text_corpus.sentences("wikipedia")
    monkeypatch.setattr(text_corpus, "stdlib_sentences", lambda: ("A b c d e.",))
    with pytest.raises(ValueError, match="has 1 sentences"):
        text_corpus.sentences("stdlib", 2)


@pytest.mark.slow
def test_the_whole_stdlib_gives_thousands_of_sentences_none_from_pydoc_topics():
    pool = text_corpus.sentences("stdlib")
    assert len(pool) >= 15000
    assert len(set(pool)) == len(pool)
    keys = {text_corpus.norm_key(s) for s in english_sentences()}
    assert not any(text_corpus.norm_key(s) in keys for s in pool)
    assert text_corpus.sentences("stdlib", 100) == pool[:100]
