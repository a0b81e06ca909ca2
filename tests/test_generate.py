import os
import subprocess
import sys

import pytest
from conftest import REPO, kill_midway, read_lines, run_here, run_step
from generate import reject_reason, template_markers

from common.generation.chat import pre_query_template

ARGS = ["--model", "embedded:smollm2", "--num-samples", "6", "--batch-size", "2", "--max-instruction-tokens", "48",
        "--max-response-tokens", "24", "--dtype", "auto", "--seed", "3"]
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, smol):
    """One uninterrupted run with ARGS, which the tests below read and compare against."""
    out = tmp_path_factory.mktemp("whole") / "gen.jsonl"
    run_here("generate", *ARGS, "--out", out)
    return out


def test_records_are_instruction_response_pairs(whole, tmp_path):
    records = read_lines(whole)
    assert [r["id"] for r in records] == [f"s3-{i:07d}" for i in range(6)]
    for r in records:
        assert r["instruction"].strip()
        assert not any(t in r["instruction"] + r["response"] for t in TEMPLATE_TOKENS)  # cut at the end of turn
        if r["instruction_finished"] and not r["rejected"]:
            assert r["response"].strip()
        else:  # an instruction cut off at the token limit, or rejected, is not answered
            assert r["response"] == "" and r["response_finished"] is False
        assert r["settings"]["model"] == "embedded:smollm2" and r["settings"]["recipe"] == "smollm2"
        assert r["settings"]["response_sampling"]["max_new_tokens"] == 24  # the flag over the recipe's 512
    assert any(r["instruction_finished"] for r in records)
    assert len({r["instruction"] for r in records}) > 1  # sampled, not one instruction repeated
    assert not whole.with_name("gen.jsonl.partial").exists()


def test_killed_run_resumes_to_the_same_records(whole, tmp_path):
    out = tmp_path / "killed.jsonl"
    written = kill_midway("generate", [*ARGS, "--out", out], tmp_path / "killed.jsonl.partial", lines=2)
    assert 2 <= written < 6, "the kill should land mid-run"
    assert not out.exists()  # an unfinished output never takes the final name
    # The resumed run is killed too, further on: a crash can come at any point, also during a resume.
    again = kill_midway("generate", [*ARGS, "--out", out], tmp_path / "killed.jsonl.partial", lines=4)
    assert 4 <= again < 6 and not out.exists()

    result = run_here("generate", *ARGS, "--out", out)
    assert "already written" in result.stderr
    assert read_lines(out) == read_lines(whole)  # same ids and texts, nothing duplicated or lost

    again = run_here("generate", *ARGS, "--out", out)  # a finished output is not generated again
    assert "generate:" not in again.stderr and read_lines(out) == read_lines(whole)


def test_partial_file_from_other_settings_is_refused(whole, tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_bytes(whole.read_bytes())  # a finished output is resumed like a partial one
    result = run_step("generate", *ARGS[:-1], "4", "--out", out, check=False)  # another seed
    assert result.returncode == 2 and "other settings" in result.stderr and "Traceback" not in result.stderr


def test_missing_models_are_named_with_the_fix(tmp_path):
    out = tmp_path / "gen.jsonl"
    result = run_step("generate", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--out", out, check=False,
                      env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "meta-llama/Llama-3.1-8B-Instruct is not in the local cache" in result.stderr
    assert "embedded default" in result.stderr
    result = run_step("generate", "--model", str(tmp_path / "no-model"), "--out", out, check=False)
    assert result.returncode == 2 and "no-model: no such model directory" in result.stderr
    assert not out.exists()


def test_gated_error_names_the_license_page_and_token():
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    from common.models import explain_load_error

    response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/x"))
    message = explain_load_error("meta-llama/Llama-3.2-3B", GatedRepoError("403 gated repo", response=response))
    assert "https://huggingface.co/meta-llama/Llama-3.2-3B" in message and "HF_TOKEN" in message


class WholeTurns:
    """A logits processor for the real model in the real engine: every turn is the model's own first `length` tokens,
    then its end of turn; no special token among them, and a user turn opens with "What" (so the generate step never
    rejects it as empty, template tokens or an answer). Every turn then comes out whole, so conversations reach
    --turns whatever the model writes. A row's turn is what follows the last "<|im_start|>ROLE\\n" (pads ignored: the
    plain path pads on the left, the fast path's history on the right, and its idle slots hold only pads)."""

    def __init__(self, tokenizer, length):
        ids = tokenizer.convert_tokens_to_ids
        self.start, self.end, self.newline, self.user = ids("<|im_start|>"), ids("<|im_end|>"), ids("Ċ"), ids("user")
        self.pad, self.length = tokenizer.pad_token_id, length
        self.what = tokenizer("What", add_special_tokens=False)["input_ids"][0]
        self.special = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special]

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.clone()
        for r, row in enumerate(input_ids.tolist()):
            row = [t for t in row if t != self.pad]
            if self.start not in row:  # an idle slot of the fast path: nothing to steer
                continue
            head = len(row) - 1 - row[::-1].index(self.start)
            turn = row[row.index(self.newline, head) + 1 :]
            force = (self.what if not turn and row[head + 1] == self.user else
                     self.end if len(turn) >= self.length else None)
            if force is None:
                scores[r, self.special] = -torch.inf
            else:
                scores[r] = torch.where(torch.arange(scores.shape[1], device=scores.device) == force, 0.0, -torch.inf)
        return scores


def test_multi_turn_records_are_well_formed_conversations(tmp_path, smol, monkeypatch):
    """The real model in the step (in-process), each of its turns ended after a few tokens of its own (WholeTurns):
    every conversation reaches the 3 turns asked, alternating user and assistant, each record's first turn its
    instruction and response, later turns whole (test_multi_turn_conversations_have_the_turns_asked: the same on a
    stand-in engine; test_follow_up_turns_...: where a conversation ends early)."""
    import generate

    def load_engine(*args, **kwargs):
        engine = load(*args, **kwargs)
        sample, whole_turns = engine.sample, WholeTurns(engine.tokenizer, length=6)
        engine.sample = lambda prompts, sampling, seed: sample(prompts, sampling, seed, processors=[whole_turns])
        return engine

    load = generate.load_engine
    monkeypatch.setattr(generate, "load_engine", load_engine)
    out = tmp_path / "multi.jsonl"
    generate.main([*map(str, ARGS), "--turns", "3", "--max-instruction-tokens", "32", "--max-response-tokens", "32",
                   "--dtype", "float32", "--batch-size", "6", "--out", str(out)])
    records = read_lines(out)
    assert len(records) == 6
    for r in records:
        conversation = r["conversation"]
        assert r["instruction_finished"] and r["response_finished"] and not r["rejected"], r
        assert [m["role"] for m in conversation] == ["user", "assistant"] * 3, r["id"]
        assert conversation[:2] == [{"role": "user", "content": r["instruction"]},
                                    {"role": "assistant", "content": r["response"]}]
        assert all(m["content"].strip() for m in conversation)
        assert all(m["content"].startswith("What") for m in conversation[::2])
        assert not any(t in m["content"] for m in conversation for t in TEMPLATE_TOKENS)
    # the turns are the model's own: later turns differ from the first (the conversation so far is in the prompt)
    assert len({m["content"] for r in records for m in r["conversation"]}) > 6


class ScriptedEngine:
    """An engine whose samples the test chooses (what a model writes differs with the CPU's arithmetic): each call
    pops the next script entry, a list of (text, finished) per prompt; the prompts it got are kept."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.prompts = tokenizer, list(script), []

    stop_token_ids = ()

    def sample(self, prompts, sampling, seed):
        self.prompts.append(prompts)
        answers = self.script.pop(0)
        assert len(answers) == len(prompts)
        return [{"text": text, "finished": finished, "stop_reason": "stop" if finished else "length", "tokens": 3}
                for text, finished in answers]


class WholeTurnsEngine:
    """An engine whose every instruction and response comes out whole: a conversation then runs to --turns."""

    stop_token_ids = ()

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def sample(self, prompts, sampling, seed):
        self.calls += 1
        text = "Why is that?" if self.calls % 2 else "Because it is."  # instructions and responses alternate
        return [{"text": text, "finished": True, "stop_reason": "stop", "tokens": 4} for _ in prompts]


@pytest.mark.parametrize("turns", [2, 3])
def test_multi_turn_conversations_have_the_turns_asked(tmp_path, smol, monkeypatch, turns):
    """The step in-process with an engine whose turns all come out whole: every conversation holds --turns turns."""
    import generate

    from common.generation.chat import prepare_tokenizer
    from common.models import load_tokenizer

    monkeypatch.setattr(generate, "load_engine", lambda *a, **k: WholeTurnsEngine(
        prepare_tokenizer(load_tokenizer("embedded:smollm2"))))
    out = tmp_path / "multi.jsonl"
    generate.main(["--model", "embedded:smollm2", "--num-samples", "3", "--turns", str(turns), "--out", str(out)])
    records = read_lines(out)
    assert len(records) == 3 and all(r["settings"]["turns"] == turns for r in records)
    for r in records:
        assert [m["role"] for m in r["conversation"]] == ["user", "assistant"] * turns
        assert r["conversation"][:2] == [{"role": "user", "content": r["instruction"]},
                                         {"role": "assistant", "content": r["response"]}]


def test_follow_up_turns_continue_a_conversation_only_while_both_sides_come_out_whole(smol):
    from generate import generate_batch, parse_args

    from common.generation import recipes
    from common.models import load_tokenizer

    tokenizer = load_tokenizer("embedded:smollm2")
    args = parse_args(["--model", "m", "--out", "o", "--turns", "3"])
    recipe = recipes.resolve(recipes.find("embedded:smollm2", tokenizer), tokenizer)
    engine = ScriptedEngine(tokenizer, [
        [("Name a prime.", True), ("Name a colour.", True), ("Name a", False)],  # turn 1 instructions
        [("Seven.", True), ("Blue.", True)],  # its responses (the cut-off instruction is not answered)
        [("Why is it prime?", True), ("Sure! Here is one.", True)],  # turn 2: the second answers instead of asking
        [("It has no divisors but 1 and itself.", False)],  # the response is cut off: the turn is not kept
    ])
    conversations, status, tokens = generate_batch(engine, args, recipe, 3, seed=1,
                                                   markers=template_markers(tokenizer))
    assert [[m["content"] for m in c] for c in conversations] == [
        ["Name a prime.", "Seven."], ["Name a colour.", "Blue."], ["Name a"]]
    assert [s["instruction_finished"] for s in status] == [True, True, False]
    assert [s["response_finished"] for s in status] == [True, True, False]
    assert engine.script == []  # the conversation ended when no turn came out whole

    engine = ScriptedEngine(tokenizer, [
        [("Name a prime.", True)], [("Seven.", True)],
        [("Why is it prime?", True)], [("No divisors but 1 and 7.", True)],
        [("And 9?", True)], [("9 is 3 times 3.", True)],
    ])
    conversations, _, _ = generate_batch(engine, args, recipe, 1, seed=1, markers=template_markers(tokenizer))
    assert [m["content"] for m in conversations[0]] == [
        "Name a prime.", "Seven.", "Why is it prime?", "No divisors but 1 and 7.", "And 9?", "9 is 3 times 3."]
    # A follow-up instruction is sampled from the conversation so far, cut at the next user turn (Magpie).
    follow_up_query = engine.prompts[2][0]
    assert follow_up_query == pre_query_template(tokenizer, None, conversations[0][:2])
    assert "Seven." in follow_up_query and follow_up_query.endswith("<|im_start|>user\n")
    assert "Why is it prime?" in engine.prompts[3][0] and "Seven." in engine.prompts[3][0]


def test_instruction_only_mode_feeds_the_filter(tmp_path, smol):
    out = tmp_path / "instructions.jsonl"
    run_here("generate", *ARGS, "--instruction-only", "--out", out)
    records = read_lines(out)
    assert len(records) == 6 and all(r["response"] is None for r in records)
    kept = tmp_path / "kept.jsonl"
    run_here("filter", "--in", out, "--out", kept, "--dropped", tmp_path / "d.jsonl", "--summary", tmp_path / "s.json")
    kept_ids = {r["id"] for r in read_lines(kept)}
    assert kept_ids and all(r["instruction_finished"] and not r["rejected"] for r in records if r["id"] in kept_ids)
    # Nothing is dropped for lacking a response.
    reasons = {r["dropped_by"] for r in read_lines(tmp_path / "d.jsonl")}
    assert reasons <= {"truncated", "bad_instruction", "instruction_length", "language", "duplicate"}


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   ", "empty"),
    ("What is a prime number?<|im_start|>assistant", "template_tokens"),
    ("Sure! Here is a poem about autumn.", "answers_instead_of_asking"),
    ("Certainly, I'd be glad to help.", "answers_instead_of_asking"),
    ("Write a poem about autumn leaves.", None),
    ("Is it sure that the sun rises in the east?", None),
])
def test_instruction_cleaning(text, reason, smol):
    from common.models import load_tokenizer

    assert reject_reason(text, template_markers(load_tokenizer("embedded:smollm2"))) == reason


def test_two_processes_write_the_same_records_as_one(whole, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as the one-process run (`whole`)
    two = tmp_path / "two.jsonl"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "steps" / "generate.py"), *ARGS, "--out", str(two)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_lines(two) == read_lines(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.jsonl"]  # shards merged and removed
