"""Property tests: the JSONL plumbing and the text rules on arbitrary unicode, empty strings and huge records."""

import string

import pytest
from filter import normalise, repeated_ngram_ratio
from hypothesis import given, settings
from hypothesis import strategies as st

from common.io.jsonl import ResumableWriter, read_jsonl, write_jsonl

text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200)  # any unicode but lone surrogates
records = st.lists(st.fixed_dictionaries({"id": text, "instruction": text, "n": st.integers(), "ok": st.booleans(),
                                          "tags": st.lists(text, max_size=3)}), max_size=8)


@settings(max_examples=60, deadline=None)
@given(records)
def test_jsonl_round_trip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rt") / "x.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows


@settings(max_examples=40, deadline=None)
@given(records, records, st.integers(min_value=0, max_value=60))
def test_resume_keeps_whole_records_and_drops_a_torn_one(tmp_path_factory, first, second, cut):
    path = tmp_path_factory.mktemp("rw") / "x.jsonl"
    writer = ResumableWriter(path)
    writer.write(first)
    writer.close()
    if second:  # a crash in the middle of writing the next record
        import json

        line = json.dumps(second[0], ensure_ascii=False)
        with open(writer.partial, "a", encoding="utf-8") as f:
            f.write(line[: min(cut, len(line) - 1)])
    resumed = ResumableWriter(path)
    assert resumed.done == first
    resumed.write(second)
    resumed.finish()
    assert read_jsonl(path) == first + second


def test_huge_record_round_trips(tmp_path):
    row = {"id": "big", "instruction": "x" * 5_000_000 + "\u2028\u00e9\U0001F600"}
    write_jsonl(tmp_path / "big.jsonl", [row])
    assert read_jsonl(tmp_path / "big.jsonl") == [row]


# Words: letters and digits of any script (no punctuation, no whitespace), so that each stays one word.
word = st.text(alphabet=st.characters(whitelist_categories=["Lu", "Ll", "Lo", "Nd"]), min_size=1, max_size=8)
space = st.text(alphabet=" \t\n\r\u00a0\u2003", min_size=1, max_size=3)  # any run of whitespace, unicode's too
punctuation = st.text(alphabet=string.punctuation, min_size=1, max_size=3)


def upper(w):
    """The word in upper case where lower-casing gives it back (not "ß", whose upper case is "SS")."""
    return w.upper() if w.upper().lower() == w.lower() else w


@settings(max_examples=200, deadline=None)
@given(text)
def test_text_rules_are_total_and_bounded(s):
    assert 0.0 <= repeated_ngram_ratio(s) <= 1.0
    clean = normalise(s)
    assert normalise(clean) == clean
    # what the exact-duplicate rule compares: lower case, no ASCII punctuation, words split by single spaces
    assert clean == clean.strip() and "  " not in clean and not set(clean) & set(string.punctuation)
    assert all(not c.isspace() or c == " " for c in clean)
    assert clean.replace(" ", "") == "".join(c for c in s.lower() if c not in string.punctuation and not c.isspace())


@settings(max_examples=100, deadline=None)
@given(st.lists(word, min_size=1, max_size=12), st.data())
def test_normalise_ignores_case_punctuation_and_spacing_but_not_words(words, data):
    """Two instructions that differ only in case, ASCII punctuation beside the words and the whitespace between
    them are duplicates; a different word is not."""
    spaced = data.draw(st.just("") | space) + "".join(w + data.draw(space) for w in words)
    marked = " ".join(data.draw(punctuation) + upper(w) + data.draw(punctuation) for w in words)
    assert normalise(spaced) == normalise(marked) == " ".join(w.lower() for w in words)
    other = data.draw(st.integers(0, len(words) - 1))
    assert normalise(" ".join(words[:other] + [words[other] + "x"] + words[other + 1 :])) != normalise(" ".join(words))


@settings(max_examples=100, deadline=None)
@given(st.lists(word, min_size=4, max_size=12, unique_by=str.lower), st.integers(2, 6), st.data())
def test_repeated_ngram_ratio_counts_repeated_four_grams(words, times, data):
    """No 4-gram repeats in distinct words: 0, whatever the spacing; a block of p distinct words said `times` times
    over has p distinct 4-grams of p*times - 3: the ratio is 1 - p / (p*times - 3), near 1 for a long loop."""
    assert repeated_ngram_ratio("".join(w + data.draw(space) for w in words)) == 0.0
    assert repeated_ngram_ratio(" ".join(words[:3])) == 0.0  # fewer than 4 words: no 4-gram
    p = len(words)
    loop = " ".join(words * times)
    assert repeated_ngram_ratio(loop) == pytest.approx(1 - p / (p * times - 3))
    shouted = " ".join([*map(upper, words), *words * (times - 1)])  # the first time in capitals: the same 4-grams
    assert repeated_ngram_ratio(shouted) == repeated_ngram_ratio(loop)
