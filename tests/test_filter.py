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
         response="I'm sorry, but I can't help with breaking into someone else's home."), None),  # kept, as Magpie
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
    assert counts["input"] == len(CASES) and counts["kept"] == sum(reason is None for _, reason in CASES)
    assert {rule for rule, n in counts["dropped"].items() if n} == set(reasons.values())
    assert counts["dropped_by"] == {reason: 1 for reason in reasons.values()}
    assert counts["tags"] is None and counts["judge"] is None  # not judged: no tag counts, nothing invented
    assert len(counts["nn_distance"]) == counts["kept"] and all(0 <= d <= 2 for d in counts["nn_distance"])
    assert [r["nn_distance"] for r in read_lines(out)] == counts["nn_distance"]
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


def test_a_record_without_finish_flags_is_refused_not_kept(tmp_path):
    """Only generate's flags say whether a text ended on its own: a record without response_finished is refused,
    naming its line, unless the truncated rule is off; an instruction-only record (null) passes."""
    from common import DataError

    src, out = tmp_path / "gen.jsonl", tmp_path / "kept.jsonl"
    lacking = {k: v for k, v in rec(1).items() if k != "response_finished"}
    src.write_text(json.dumps(rec(0)) + "\n" + json.dumps(rec(2, response=None, response_finished=None)) + "\n"
                   + json.dumps(lacking) + "\n")
    flags = ["--in", str(src), "--out", str(out), "--dropped", str(tmp_path / "d.jsonl"),
             "--summary", str(tmp_path / "s.json"), "--embedder", "none"]
    with pytest.raises(DataError, match=r"gen\.jsonl:3: missing field 'response_finished': the truncated rule"):
        filter_step.main(flags)
    assert not out.exists()
    src.write_text(json.dumps(rec(0)) + "\n" + json.dumps({**rec(1), "response_finished": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"gen\.jsonl:2: field 'response_finished' should be bool or NoneType"):
        filter_step.main(flags)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_input_says_so(tmp_path, text):
    src = tmp_path / "gen.jsonl"
    src.write_text(text)
    result = run_step("filter", "--in", src, "--out", tmp_path / "k.jsonl", "--dropped", tmp_path / "d.jsonl",
                      "--summary", tmp_path / "s.json", check=False)
    assert result.returncode == 2 and "no records to filter" in result.stderr


# ---- The judge's tags, multi-turn records and diversity (in-process: no model, lengths in words) ------------------

def tags(category="Creative writing", quality="good", difficulty="medium", safety="safe"):
    return {"category": category, "input_quality": quality, "quality_reason": "Clear.", "difficulty": difficulty,
            "safety": safety}


def in_process(records, *flags, embed=None):
    args = filter_step.parse_args(["--in", "x", "--out", "y", "--dropped", "z", "--summary", "s", *flags])
    kept, dropped, _ = filter_step.filter_records(records, args, lambda text: len(text.split()), embed)
    return [r["id"] for r in kept], {r["id"]: r["dropped_by"] for r in dropped}


TOPICS = ["Write a haiku about the first snow of winter.", "Explain why the sky looks blue at noon.",
          "List three ways to save water in a garden.", "Describe how a bicycle gear system works.",
          "Suggest a name for a friendly bakery cat.", "Summarise the plot of a heist film in two lines."]


def tagged(i, **tag):
    return rec(i, instruction=TOPICS[i], tags=tags(**tag))


def test_refusals_are_kept_unless_asked_and_unsafe_is_the_judges_call():
    refusal = "I'm sorry, but I can't help with breaking into someone else's home, but a locksmith can."
    records = [rec(0, instruction="How do I get into my neighbour's locked house?", response=refusal,
                   tags=tags(safety="safe")),
               rec(1, instruction=TOPICS[1], tags=tags(safety="unsafe"))]
    assert in_process(records) == (["r0", "r1"], {})
    assert in_process(records, "--drop-unsafe") == (["r0"], {"r1": "safety=unsafe"})
    assert in_process(records, "--drop-refusals") == (["r1"], {"r0": "refusal"})


def test_tag_thresholds_drop_exactly_the_records_below_them():
    records = [tagged(0, quality="excellent", difficulty="hard"), tagged(1, quality="good", difficulty="easy"),
               tagged(2, quality="average", difficulty="medium"), tagged(3, quality="very poor"),
               tagged(4, quality="unparsed"), tagged(5, category="Others", difficulty="very hard")]
    assert in_process(records) == (["r0", "r1", "r2", "r3", "r4", "r5"], {})  # no flags: tags only recorded
    assert in_process(records, "--min-input-quality", "good") == (
        ["r0", "r1", "r5"], {"r2": "input_quality=average", "r3": "input_quality=very poor",
                             "r4": "input_quality=unparsed"})
    assert in_process(records, "--min-input-quality", "good", "--keep-unparsed")[0] == ["r0", "r1", "r4", "r5"]
    assert in_process(records, "--min-difficulty", "medium") == (
        ["r0", "r2", "r3", "r4", "r5"], {"r1": "difficulty=easy"})
    assert in_process(records, "--exclude-categories", "others") == (
        ["r0", "r1", "r2", "r3", "r4"], {"r5": "category=Others"})
    assert in_process(records, "--categories", "Others,Math")[1] == {
        f"r{i}": "category=Creative writing" for i in range(5)}


def test_unknown_category_flag_and_untagged_records_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        filter_step.parse_args(["--in", "x", "--out", "y", "--dropped", "z", "--summary", "s",
                                "--categories", "Cooking"])
    src = tmp_path / "gen.jsonl"
    src.write_text(json.dumps(rec(0)) + "\n")
    result = run_step("filter", "--in", src, "--out", tmp_path / "k.jsonl", "--dropped", tmp_path / "d.jsonl",
                      "--summary", tmp_path / "s.json", "--min-input-quality", "good", check=False)
    assert result.returncode == 2 and "gen.jsonl: 1 records have no 'tags' (first: r0)" in result.stderr
    assert "--min-input-quality" in result.stderr and "Traceback" not in result.stderr


def conversation_record(i, second_answer, second_tags=None):
    turns = [{"role": "user", "content": TOPICS[i]}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": "Now make it a little shorter, please."},
             {"role": "assistant", "content": second_answer}]
    record = rec(i, instruction=TOPICS[i], conversation=turns, tags=tags())
    record["turn_tags"] = [tags(), second_tags or tags()]
    return record


def test_multi_turn_records_are_filtered_turn_by_turn():
    records = [conversation_record(0, "Sea rolls in; wind replies; gulls circle above the harbour."),
               conversation_record(1, "the robot went home " * 20),  # only the second answer loops
               conversation_record(2, "Gulls circle, the wind answers and the tide comes in.", tags(quality="poor"))]
    assert in_process(records) == (["r0", "r2"], {"r1": "repetition (turn 2)"})
    assert in_process(records, "--min-input-quality", "good") == (
        ["r0"], {"r1": "repetition (turn 2)", "r2": "input_quality=poor (turn 2)"})


def test_nn_distance_is_the_cosine_distance_to_the_nearest_kept_instruction():
    import torch

    # 0 and 1 at 60 degrees (cosine 0.5), 2 orthogonal to both, 3 a near-duplicate of 0 (dropped, so not a neighbour).
    vectors = {TOPICS[0]: [1.0, 0, 0], TOPICS[1]: [0.5, 3 ** 0.5 / 2, 0], TOPICS[2]: [0, 0, 2.0],
               TOPICS[3]: [0.999, 0.01, 0]}
    embed = lambda batch: torch.tensor([vectors[t] for t in batch])  # noqa: E731
    records = [tagged(i) for i in range(4)]
    kept_ids, dropped = in_process(records, embed=embed)
    assert kept_ids == ["r0", "r1", "r2"] and dropped == {"r3": "near_duplicate"}
    args = filter_step.parse_args(["--in", "x", "--out", "y", "--dropped", "z", "--summary", "s"])
    kept, _, _ = filter_step.filter_records(records, args, lambda text: len(text.split()), embed)
    assert [r["nn_distance"] for r in kept] == [pytest.approx(0.5), pytest.approx(0.5), pytest.approx(1.0)]
    assert filter_step.nearest_neighbour_distances(torch.tensor([[1.0, 0]])) == [None]  # a lone record


def test_summary_counts_tags_generated_and_kept(tmp_path, smol):
    records = [tagged(0, quality="excellent"), tagged(1, quality="poor", category="Math"), tagged(2)]
    records[0]["judge"] = {"model": "embedded:smollm2"}
    src = tmp_path / "judged.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, summary = tmp_path / "kept.jsonl", tmp_path / "s.json"
    run_step("filter", "--in", src, "--out", out, "--dropped", tmp_path / "d.jsonl", "--summary", summary,
             "--min-input-quality", "good")
    counts = json.loads(summary.read_text())
    assert counts["kept"] == 2 and counts["dropped"]["input_quality"] == 1
    assert counts["dropped_by"] == {"input_quality=poor": 1}
    assert counts["tags"]["input_quality"] == {"generated": {"excellent": 1, "poor": 1, "good": 1},
                                               "kept": {"excellent": 1, "good": 1}}
    assert counts["tags"]["category"]["generated"] == {"Creative writing": 2, "Math": 1}
    assert counts["thresholds"]["min_input_quality"] == "good" and counts["judge"] == {"model": "embedded:smollm2"}
    assert counts["nn_distance"] == [r["nn_distance"] for r in read_lines(out)]
    assert sum(counts["nn_distance_histogram"]["counts"]) == 2
    assert "| input_quality | generated | kept |" in summary.with_suffix(".md").read_text()


def test_the_map_of_the_kept_instructions_is_their_two_main_directions():
    """filter_summary.json's "map" (the report draws it): points spread along two directions land on them, the
    share of variance is that of those two, and under 3 points there is no map."""
    import torch

    torch.manual_seed(0)
    directions = torch.linalg.qr(torch.randn(16, 3))[0].T  # three orthonormal directions
    weights = torch.randn(40, 3) * torch.tensor([3.0, 2.0, 0.1])
    result = filter_step.map_2d(weights @ directions)
    assert len(result["xy"]) == 40 and all(len(p) == 2 for p in result["xy"])
    spread = weights - weights.mean(0)
    want = float((spread[:, :2] ** 2).sum() / (spread**2).sum())
    assert abs(result["explained"] - want) < 1e-3 and result["explained"] > 0.99
    xy = torch.tensor(result["xy"])
    assert abs(float((xy**2).sum() / (spread**2).sum()) - want) < 1e-3  # the points keep that share of spread
    assert filter_step.map_2d(torch.randn(2, 16)) is None and filter_step.map_2d(None) is None
