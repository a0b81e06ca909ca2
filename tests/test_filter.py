import json

import filter as filter_step
from conftest import read_lines, run_step

GOOD = "Write a short poem about the sea and the wind."
ANSWER = "The sea rolls in, the wind replies, and gulls trace circles in the skies."


def rec(i, instruction=GOOD, response=ANSWER, **extra):
    return {"id": f"r{i}", "instruction": instruction, "response": response,
            "instruction_finished": True, "response_finished": True, **extra}


def test_each_rule_drops_its_case_and_keeps_the_good_ones(tmp_path):
    records = [
        rec(0),
        rec(1, instruction="   "),                                            # empty
        rec(2, instruction="Explain how tides work on Earth.", response_finished=False),  # truncated
        rec(3, instruction="Hi?"),                                            # instruction too short
        rec(4, instruction="Describe a cat in one sentence.", response="Cute."),  # response too short
        rec(5, instruction="Tell me a story about a robot.",
            response="the robot went home " * 20),                            # repetition
        rec(6, instruction="write a short poem about the SEA and the wind!"),  # duplicate of 0 after normalising
        rec(7, instruction="List three uses of copper in homes.",
            response="Wiring, plumbing pipes and cookware are common uses of copper."),
    ]
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, dropped, summary = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl", tmp_path / "summary.json"
    run_step("filter", "--in", src, "--out", out, "--dropped", dropped, "--summary", summary)

    assert [r["id"] for r in read_lines(out)] == ["r0", "r7"]
    reasons = {r["id"]: r["dropped_by"] for r in read_lines(dropped)}
    assert reasons == {"r1": "empty", "r2": "truncated", "r3": "instruction_length", "r4": "response_length",
                       "r5": "repetition", "r6": "duplicate"}
    counts = json.loads(summary.read_text())
    assert counts["input"] == 8 and counts["kept"] == 2
    assert all(n == 1 for n in counts["dropped"].values()) and len(counts["dropped"]) == 6


def test_repetition_ratio():
    assert filter_step.repeated_ngram_ratio("a b c d " * 10) > 0.8
    assert filter_step.repeated_ngram_ratio(" ".join(f"w{i}" for i in range(40))) == 0.0
    assert filter_step.repeated_ngram_ratio("too short") == 0.0


def test_malformed_input_names_the_line_and_writes_nothing(tmp_path):
    src = tmp_path / "gen.jsonl"
    src.write_text(json.dumps(rec(0)) + "\n" + '{"id": "r1", "instruction": 3, "response": "x"}\n')
    out = tmp_path / "kept.jsonl"
    result = run_step("filter", "--in", src, "--out", out, "--dropped", tmp_path / "d.jsonl",
                      "--summary", tmp_path / "s.json", check=False)
    assert result.returncode == 2
    assert "gen.jsonl:2: field 'instruction' should be str, got int" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
