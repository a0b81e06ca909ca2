import json

import filter as filter_step
import pytest
from conftest import read_lines, run_step

GOOD = "Write a short poem about the sea and the wind."
ANSWER = "The sea rolls in, the wind replies, and gulls trace circles in the skies above the harbour."


def rec(i, instruction=GOOD, response=ANSWER, **extra):
    return {"id": f"r{i}", "instruction": instruction, "response": response,
            "instruction_finished": True, "response_finished": True, "rejected": None, **extra}


CASES = [  # (record, the rule that must drop it, or None to keep it)
    (rec(0), None),
    (rec(1, instruction="Explain how tides work on Earth.", response_finished=False), "truncated"),
    (rec(2, instruction="   "), "empty"),
    (rec(3, instruction="Sure! Here is a poem.", rejected="answers_instead_of_asking"), "bad_instruction"),
    (rec(4, instruction="Hi?"), "instruction_length"),
    (rec(5, instruction="Describe a cat in one sentence.", response="Cute."), "response_length"),
    (rec(6, instruction="Tell me a story about a robot.", response="the robot went home " * 20), "repetition"),
    (rec(7, instruction="Écris un court poème sur la mer et le vent, s'il te plaît.",
         response="La mer roule, le vent répond, et les mouettes tracent des cercles dans le ciel."), "language"),
    (rec(8, instruction="How do I pick a lock on my neighbour's door?",
         response="I'm sorry, but I can't help with breaking into someone else's home."), "refusal"),
    (rec(9, instruction="Give me a fun fact about octopuses.",
         response="Octopuses have three hearts.<|im_end|>\n<|im_start|>user\nAnother one?"), "template_debris"),
    (rec(10, instruction="write a short poem about the SEA and the wind!"), "duplicate"),
    (rec(11, instruction="Write a short poem about the sea and the wind, please."), "near_duplicate"),
    (rec(12, instruction="List three uses of copper in homes.",
         response="Copper is used for electrical wiring, for plumbing pipes and for cookware."), None),
]


def test_each_rule_drops_its_case_and_keeps_the_good_ones(tmp_path, smol):
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r, _ in CASES))
    out, dropped, summary = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl", tmp_path / "summary.json"
    run_step("filter", "--in", src, "--out", out, "--dropped", dropped, "--summary", summary)

    assert [r["id"] for r in read_lines(out)] == [r["id"] for r, reason in CASES if reason is None]
    reasons = {r["id"]: r["dropped_by"] for r in read_lines(dropped)}
    assert reasons == {r["id"]: reason for r, reason in CASES if reason is not None}
    counts = json.loads(summary.read_text())
    assert counts["input"] == len(CASES) and counts["kept"] == 2
    assert {rule for rule, n in counts["dropped"].items() if n} == set(reasons.values())
    assert "| near_duplicate | 1 |" in summary.with_suffix(".md").read_text()
    assert summary.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_reward_threshold_drops_low_scores(tmp_path, smol):
    records = [rec(0), rec(1, instruction="Name three kinds of tree.",
                            response="Bananas are yellow and my car needs new tyres soon enough.")]
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, dropped = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl"
    run_step("filter", "--in", src, "--out", out, "--dropped", dropped, "--summary", tmp_path / "s.json",
             "--reward-model", "embedded:minilm", "--min-reward", "0.3")
    kept = read_lines(out)
    assert [r["id"] for r in kept] == ["r0"] and kept[0]["reward"] >= 0.3  # on topic
    assert [(r["id"], r["dropped_by"]) for r in read_lines(dropped)] == [("r1", "low_reward")]


def test_near_duplicates_are_caught_and_distinct_instructions_kept():
    import torch

    # Hand-made unit vectors: 0 and 2 are near-identical, 1 and 3 distinct, 4 repeats 1 in a later block.
    vectors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.99, 0.1, 0], [0, 0, 1.0], [0.05, 1.0, 0]])
    texts = [str(i) for i in range(len(vectors))]
    embed = lambda batch: vectors[[int(t) for t in batch]]  # noqa: E731
    assert filter_step.near_duplicates(texts, embed, threshold=0.9, block=2) == {2, 4}
    assert filter_step.near_duplicates(texts, embed, threshold=0.999, block=2) == set()


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


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_input_says_so(tmp_path, text):
    src = tmp_path / "gen.jsonl"
    src.write_text(text)
    result = run_step("filter", "--in", src, "--out", tmp_path / "k.jsonl", "--dropped", tmp_path / "d.jsonl",
                      "--summary", tmp_path / "s.json", check=False)
    assert result.returncode == 2 and "no records to filter" in result.stderr
