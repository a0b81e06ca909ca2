"""Property tests: the JSONL plumbing and the text rules on arbitrary unicode, empty strings and huge records."""

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


@settings(max_examples=200, deadline=None)
@given(text)
def test_text_rules_are_total_and_bounded(s):
    assert 0.0 <= repeated_ngram_ratio(s) <= 1.0
    assert normalise(normalise(s)) == normalise(s)
