import json

import judge as judge_step
import pytest
from conftest import read_lines

from common import DataError
from common.reporting.tag_stats import COPIED_REASON, reason_status
from common.rubric import (COPIED, PREFILL, UNPARSED, AnswerConstraint, copied_reason, judge_message, parse_answer,
                           user_turns)

GOOD = ('{"category": "Creative writing", "reason": "Clear and specific.", "input_quality": "good", '
        '"difficulty": "easy", "safety": "safe"}')
BAD = {
    "malformed": '{"category": "Math", "reason": "ok" "input_quality": "good"}',
    "truncated": '{"category": "Math", "reason": "The query is clear and gives the numb',
    "other language": ('{"category": "Écriture créative", "reason": "Claire.", "input_quality": "bonne", '
                       '"difficulty": "facile", "safety": "sûr"}'),
    "unknown category": ('{"category": "Cooking", "reason": "Clear.", "input_quality": "good", "difficulty": "easy", '
                         '"safety": "safe"}'),
}


def test_a_good_answer_parses_into_every_tag():
    tags, faults = parse_answer(GOOD)
    assert faults == []
    assert tags == {"category": "Creative writing", "input_quality": "good", "quality_reason": "Clear and specific.",
                    "difficulty": "easy", "safety": "safe"}
    # Case, '_' and '-' are forgiven; values come back as Magpie spells them.
    tags, faults = parse_answer(GOOD.replace("Creative writing", "creative WRITING").replace('"easy"', '"Very_Easy"'))
    assert faults == [] and tags["category"] == "Creative writing" and tags["difficulty"] == "very easy"


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_answers_leave_unparsed_tags_never_a_default(kind):
    tags, faults = parse_answer(BAD[kind])
    assert faults and tags["category"] == UNPARSED
    if kind == "unknown category":  # the rest of the answer is fine and kept
        assert tags["input_quality"] == "good" and tags["difficulty"] == "easy"


COPIES = {  # reasons that only repeat the prompt (its description of the reason, a listed value) or the query
    "the reason's description": "one sentence on the query's clarity, specificity and coherence",
    "part of it, capitalised": "One sentence.",
    "the placeholder": "[...]",
    "a listed value": "Very easy",
    "a one-word value": "Math",
    "a rubric phrase": "clear, specific, mostly well-formed",
    "the query": "Write a poem about the sea",
}
OWN = ["Clear and specific.", "Clear.", "lack of clarity", "The query asks for a poem but gives no length or style.",
       "very clear query about the sea"]


@pytest.mark.parametrize("kind", list(COPIES))
def test_a_reason_that_only_repeats_the_prompt_is_unparsed(kind):
    answer = GOOD.replace("Clear and specific.", COPIES[kind])
    tags, faults = parse_answer(answer, "Write a poem about the sea.")
    assert faults == [COPIED] and tags["quality_reason"] == UNPARSED
    assert tags["category"] == "Creative writing" and tags["input_quality"] == "good"  # the rest is kept


@pytest.mark.parametrize("reason", OWN)
def test_a_reason_of_the_judges_own_parses(reason):
    tags, faults = parse_answer(GOOD.replace("Clear and specific.", reason), "Write a poem about the sea.")
    assert faults == [] and tags["quality_reason"] == reason


def test_the_copy_rule():
    """No word, a listed value, or two words or more in a row of the prompt's fixed wording or of the query."""
    assert copied_reason("...") and copied_reason("Others") and copied_reason("very EASY!")
    assert copied_reason("specificity and coherence") and copied_reason("answer again with only the json object")
    assert not copied_reason("coherence")  # a single word of the prompt may be the judge's own
    assert not copied_reason("coherence and specificity")  # not in a row in the prompt
    assert copied_reason("a poem about", "Write a poem about the sea.")
    assert not copied_reason("a poem about", None) and not copied_reason("poem sea", "Write a poem about the sea.")


class FakeEngine:
    """Answers from a script (by call), counting calls and prompts; no model."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls, self.prompts = tokenizer, script, 0, []

    def sample(self, prompts, sampling, seed, processors=()):
        self.processors = processors
        answers = self.script(self.calls, prompts)
        self.calls += 1
        self.prompts += prompts
        results = []
        for a in answers:  # as the engine returns them: prefill not included, cut at the '}' stop string
            body = a[len(PREFILL):] if a.startswith(PREFILL) else a
            cut = body.find("}")
            results.append({"text": body[:cut] if cut >= 0 else body, "finished": cut >= 0,
                            "stop_reason": "stop" if cut >= 0 else "length", "tokens": 10})
        return results


@pytest.fixture(scope="module")
def tokenizer(smol):
    from common.generation.chat import prepare_tokenizer
    from common.models import load_tokenizer

    return prepare_tokenizer(load_tokenizer("embedded:smollm2"))


def make_judge(tokenizer, script):
    args = judge_step.parse_args(["--in", "x", "--out", "y", "--model", "embedded:smollm2"])
    engine = FakeEngine(tokenizer, script)
    return judge_step.Judge(engine, tokenizer, judge_step.sampling_of(args, tokenizer, False), False, 64), engine


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_answer_is_retried_exactly_once_then_unparsed(tokenizer, kind):
    judge, engine = make_judge(tokenizer, lambda call, prompts: [BAD[kind]] * len(prompts))
    [(tags, failed)], _ = judge.tag([("Write a poem about the sea.", "The sea...", False)], seed=0)
    assert engine.calls == 2 and len(engine.prompts) == 2
    assert "could not be used" in engine.prompts[1] and "could not be used" not in engine.prompts[0]
    assert tags["category"] == UNPARSED
    assert failed["answers"][0].startswith(PREFILL) and len(failed["answers"]) == 2


def test_a_good_answer_is_not_retried_and_a_retry_can_fix_one(tokenizer):
    judge, engine = make_judge(tokenizer, lambda call, prompts: [GOOD] * len(prompts))
    [(tags, failed)], _ = judge.tag([("Write a poem about the sea.", "The sea...", False)], seed=0)
    assert engine.calls == 1 and failed is None and tags["category"] == "Creative writing"

    # Two turns in one call; only the bad one goes to the (single) retry call, whose good answer is taken.
    script = lambda call, prompts: ([GOOD, BAD["truncated"]] if call == 0 else [GOOD])  # noqa: E731
    judge, engine = make_judge(tokenizer, script)
    results, _ = judge.tag([("A?", "a", False), ("B?", "b", True)], seed=0)
    assert engine.calls == 2 and len(engine.prompts) == 3
    assert all(failed is None and tags["input_quality"] == "good" for tags, failed in results)
    assert "a follow-up turn" in engine.prompts[1] and "a follow-up turn" not in engine.prompts[0]


def test_a_copied_reason_is_retried_once_then_counted_unparsed(tokenizer):
    copy = GOOD.replace("Clear and specific.", COPIES["the reason's description"])
    judge, engine = make_judge(tokenizer, lambda call, prompts: [copy] * len(prompts))
    [(tags, failed)], _ = judge.tag([("Write a poem about the sea.", "The sea...", False)], seed=0)
    assert engine.calls == 2 and f"could not be used ({COPIED})" in engine.prompts[1]
    assert tags["quality_reason"] == UNPARSED and tags["category"] == "Creative writing"
    assert failed["faults"] == [[COPIED], [COPIED]]
    assert reason_status({"tags": tags, "judge_unparsed": [{"turn": 1, **failed}]}) == COPIED_REASON

    judge, engine = make_judge(tokenizer, lambda call, prompts: [copy if call == 0 else GOOD] * len(prompts))
    [(tags, failed)], _ = judge.tag([("Write a poem about the sea.", "The sea...", False)], seed=0)
    assert failed is None and tags["quality_reason"] == "Clear and specific."  # the retry's own reason is taken


def test_every_user_turn_is_judged():
    conversation = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert user_turns({"instruction": "Q1", "response": "A1", "conversation": conversation}) == [("Q1", "A1"),
                                                                                                 ("Q2", "A2")]
    assert user_turns({"instruction": "Q", "response": None}) == [("Q", None)]


# ---- The step: tags on every record, resume after a crash, settings guard ------------------------------------------

def records(n):
    out = []
    for i in range(n):
        r = {"id": f"s0-{i:07d}", "instruction": f"Question number {i}?", "response": f"Answer {i}.",
             "settings": {"model": "gen"}}
        if i % 3 == 2:  # some multi-turn records
            r["conversation"] = [{"role": "user", "content": r["instruction"]},
                                 {"role": "assistant", "content": r["response"]},
                                 {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then."}]
        out.append(r)
    return out


class Crash(Exception):
    pass


def run_judge(monkeypatch, tmp_path, crash_at=None, extra=(), answer=None):
    """steps/judge.py's main() with a fake engine (good answers, except 'Question number 4' gets a cut-off one, or
    `answer(prompt)`); the engine raises at call `crash_at`, as a killed run stops. Returns the instructions the
    engine was asked."""
    asked = []
    answer = answer or (lambda p: BAD["truncated"] if "Question number 4?" in p else GOOD)

    def script(call, prompts):
        if call == crash_at:
            raise Crash()
        asked.extend(p for p in prompts)
        return [answer(p) for p in prompts]

    monkeypatch.setattr(judge_step, "load_engine", lambda *a, **k: FakeEngine(k_tokenizer(), script))
    judge_step.main(["--in", str(tmp_path / "gen.jsonl"), "--out", str(tmp_path / "judged.jsonl"),
                     "--model", "embedded:smollm2", "--batch-size", "2", *extra])
    return asked


def k_tokenizer():
    from common.generation.chat import prepare_tokenizer
    from common.models import load_tokenizer

    return prepare_tokenizer(load_tokenizer("embedded:smollm2"))


def test_step_tags_every_record_and_resumes_without_redoing_batches(monkeypatch, tmp_path, smol):
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records(7)))
    out, partial = tmp_path / "judged.jsonl", tmp_path / "judged.jsonl.partial"

    with pytest.raises(Crash):  # the third engine call, batch 2's first: batches 0 and 1 are done
        run_judge(monkeypatch, tmp_path, crash_at=2)
    assert not out.exists() and len(read_lines(partial)) == 4
    with open(partial, "a") as f:
        f.write('{"id": "torn')  # as a kill in the middle of a write leaves it
    asked = run_judge(monkeypatch, tmp_path)
    assert not any(f"Question number {i}?" in p for p in asked for i in range(4))  # batches 0 and 1 not redone
    assert any("Question number 4?" in p for p in asked)
    judged = read_lines(out)
    assert [r["id"] for r in judged] == [r["id"] for r in records(7)]

    # the same as an uninterrupted run
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "gen.jsonl").write_text(src.read_text())
    run_judge(monkeypatch, tmp_path / "again")
    assert read_lines(tmp_path / "again" / "judged.jsonl") == judged

    for r in judged:
        assert r["settings"] == {"model": "gen"}  # generate's settings untouched
        assert r["judge"]["model"] == "embedded:smollm2" and r["judge"]["sampling"]["temperature"] == 0
        assert set(r["tags"]) == {"category", "input_quality", "quality_reason", "difficulty", "safety"}
        assert ("turn_tags" in r) == ("conversation" in r)
    assert [len(r["turn_tags"]) for r in judged if "turn_tags" in r] == [2, 2]
    assert judged[4]["tags"]["category"] == UNPARSED and judged[4]["judge_unparsed"][0]["turn"] == 1
    assert judged[0]["tags"]["input_quality"] == "good" and "judge_unparsed" not in judged[0]


def test_the_step_counts_copied_reasons_as_unparsed(monkeypatch, tmp_path, capsys, smol):
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(4)))
    copy = GOOD.replace("Clear and specific.", "Question number 1")  # the query, repeated
    run_judge(monkeypatch, tmp_path, answer=lambda p: copy if "Question number 1?" in p else GOOD)
    judged = read_lines(tmp_path / "judged.jsonl")
    assert [reason_status(r) for r in judged] == ["a reason", COPIED_REASON, "a reason", "a reason"]
    assert judged[1]["tags"]["quality_reason"] == UNPARSED
    assert ("judged 4 records; 1 with an \"unparsed\" tag, 1 of them an unparsed reason that only repeated the "
            "prompt's wording") in capsys.readouterr().err


def test_a_partial_file_from_another_judge_setting_is_refused(monkeypatch, tmp_path, smol):
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(4)))
    with pytest.raises(Crash):
        run_judge(monkeypatch, tmp_path, crash_at=1)
    with pytest.raises(DataError, match=r"judged.jsonl.partial: left by a run with other judge settings \(sampling"):
        run_judge(monkeypatch, tmp_path, extra=["--max-new-tokens", "50"])


def test_the_answer_constraint_holds_any_model_to_the_schema(tokenizer):
    """Whatever the scores (random here: a model that knows nothing), every answer is a whole JSON object with a
    value from each list, a reason, and ends with the stop token, within the cap."""
    import torch

    from common.generation.chat import prompt_text

    prompt = prompt_text(tokenizer, judge_message("What is 2+2?", "4")) + PREFILL
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stop, cap = tokenizer.convert_tokens_to_ids("<|im_end|>"), 40
    constraint = AnswerConstraint(tokenizer, prompt[: -len(PREFILL)], stop, cap)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(4):
        row = list(ids)
        for _ in range(cap):
            scores = constraint(torch.tensor([row]), torch.randn(1, len(tokenizer), generator=generator))
            row.append(int(scores[0].argmax()))
            if row[-1] == stop:
                break
        assert row[-1] == stop, tokenizer.decode(row[len(ids):])
        text = PREFILL + tokenizer.decode(row[len(ids):-1])
        tags, faults = parse_answer(text)
        assert faults == [] and UNPARSED not in tags.values(), text
        seen.add(tags["category"])
    assert len(seen) > 1  # the scores choose: nothing is forced to one value
    # control: without the constraint the same random scores write no answer at all
    row = list(ids)
    for _ in range(cap):
        row.append(int(torch.randn(len(tokenizer), generator=generator).argmax()))
    assert parse_answer(PREFILL + tokenizer.decode(row[len(ids):]))[1]


@pytest.mark.parametrize("fast", ["1", "0"])
def test_the_embedded_judge_answers_within_the_schema_on_both_engine_paths(monkeypatch, tmp_path, smol, fast):
    """The real 135M judge, whose free answers almost never parsed (0 of 64 on the cpu tier's run), through the fast
    path and plain generate: every tag of every turn parses."""
    monkeypatch.setenv("SIT_FAST_GENERATE", fast)
    src, out = tmp_path / "gen.jsonl", tmp_path / "judged.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records(3)))
    judge_step.main(["--in", str(src), "--out", str(out), "--model", "embedded:smollm2", "--max-new-tokens", "48",
                     "--max-response-tokens", "16", "--dtype", "float32", "--decode-rows", "4"])
    judged = read_lines(out)
    assert len(judged) == 3
    for r in judged:
        for tags in [r["tags"], *r.get("turn_tags", [])]:
            # every value from its list; the reason is free text, unparsed only where it copied the prompt
            assert UNPARSED not in {k: v for k, v in tags.items() if k != "quality_reason"}.values(), tags
            assert tags["quality_reason"], tags
        for failed in r.get("judge_unparsed", []):
            assert all(faults == [COPIED] for faults in failed["faults"]), failed
        assert r["judge"]["constrained"].startswith("logits processor")
