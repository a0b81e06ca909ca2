import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import kill_midway, read_lines, run_here, run_step
from preference import main as preference_main
from preference import pair

from common.generation.reward import ClassifierReward, load_reward

INSTRUCTIONS = ["Give me a tip for sleeping better.", "Name two primary colours.", "What is a noun?"]


@pytest.fixture(scope="module")
def tiny_deberta(tmp_path_factory, smol):
    """A randomly initialised DebertaV2ForSequenceClassification, the class of the seed's reward model."""
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(smol)
    config = DebertaV2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "tiny-deberta-rm"
    DebertaV2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ALL = [True] * 4


def test_pair_takes_highest_as_chosen_and_lowest_as_rejected():
    record = {"id": "x", "instruction": "Say hi."}
    p = pair(record, ["a", "b", "c", "d"], [0.1, 2.5, -1.0, 0.3], ALL)
    assert p["chosen"] == [{"role": "assistant", "content": "b"}]
    assert p["rejected"] == [{"role": "assistant", "content": "c"}]
    assert p["prompt"] == [{"role": "user", "content": "Say hi."}]
    assert p["margin"] == pytest.approx(3.5)
    # A response cut off at the token limit is never chosen, however high its score ...
    p = pair(record, ["a", "b", "c", "d"], [0.1, 2.5, -1.0, 0.3], finished=[True, False, True, True])
    assert p["chosen"][0]["content"] == "d" and p["rejected"][0]["content"] == "c"
    # ... nor rejected, however low: the lowest finished one is (the template would end the cut one as finished)
    p = pair(record, ["a", "b", "c", "d"], [0.1, 2.5, -1.0, 0.3], finished=[True, True, False, True])
    assert p["chosen"][0]["content"] == "b" and p["rejected"][0]["content"] == "a"
    assert p["margin"] == pytest.approx(2.4)
    assert pair(record, ["a", "b"], [1.0, 2.0], finished=[False, False]) is None
    assert pair(record, ["a", "b", "c"], [1.0, 2.0, 0.0], finished=[False, True, False]) is None  # one finished


def test_pair_breaks_ties_by_the_earliest_eligible_response():
    """Ties, constructed (bf16 reward scores tie often): the highest score shared by a cut-off response and a finished
    one goes to the finished one, whichever comes first; among finished ones, and for the lowest, the earliest."""
    record = {"id": "x", "instruction": "Say hi."}
    p = pair(record, ["cut", "done", "low"], [0.5, 0.5, 0.1], finished=[False, True, True])
    assert p["chosen"][0]["content"] == "done" and p["rejected"][0]["content"] == "low"
    p = pair(record, ["done", "cut", "low"], [0.5, 0.5, 0.1], finished=[True, False, True])
    assert p["chosen"][0]["content"] == "done"
    p = pair(record, ["first", "second", "low1", "low2"], [0.5, 0.5, 0.1, 0.1], finished=[True, True, True, True])
    assert p["chosen"][0]["content"] == "first" and p["rejected"][0]["content"] == "low1"
    assert p["margin"] == pytest.approx(0.4)
    p = pair(record, ["a", "cut", "c"], [0.5, 0.1, 0.1], finished=[True, False, True])
    assert p["rejected"][0]["content"] == "c"  # the tied cut-off one comes first, and is passed over


def test_ties_are_dropped_unless_kept(tmp_path):
    """A scored file whose instructions tie (all responses score the same) or not: --ties decides."""
    import preference

    scored = tmp_path / "scored.jsonl"
    src = tmp_path / "filtered.jsonl"
    common = ["--in", src, "--policy", "embedded:smollm2", "--reward-model", "unused", "--scored", scored,
              "--batch-size", "2"]
    # A finished scored file, as a run with these settings writes it (a file of other settings is refused)
    args = preference.parse_args(list(map(str, common)) + ["--out", "x"])
    settings = preference.settings_of(args, preference.sampling_of(args)[1])
    rows = [{"id": "tie", "instruction": "Say hi.", "responses": ["hi", "hello"], "finished": [True, True],
             "scores": [0.5, 0.5], "settings": settings},
            {"id": "gap", "instruction": "Say bye.", "responses": ["bye", "no"], "finished": [True, True],
             "scores": [0.9, 0.1], "settings": settings}]
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src.write_text("".join(json.dumps({"id": r["id"], "instruction": r["instruction"]}) + "\n" for r in rows))
    run_here("preference", *common, "--out", tmp_path / "dropped.jsonl")
    assert [p["id"] for p in read_lines(tmp_path / "dropped.jsonl")] == ["gap"]
    run_here("preference", *common, "--out", tmp_path / "kept.jsonl", "--ties", "keep")
    assert [p["id"] for p in read_lines(tmp_path / "kept.jsonl")] == ["tie", "gap"]
    # The same scored file under other sampling settings is refused, naming what differs
    other = run_step("preference", *common, "--out", tmp_path / "other.jsonl", "--temperature", "0.7", check=False)
    assert other.returncode == 2 and "other settings (sampling differ" in other.stderr


def test_instructions_without_a_pair_are_counted_by_cause(tmp_path, capsys):
    """preference_summary.json beside the pairs says why each instruction without a pair has none."""
    import preference

    def scored(id, scores, finished):
        return {"id": id, "instruction": f"Say {id}.", "responses": [f"r{i}" for i in range(len(scores))],
                "scores": scores, "finished": finished}

    rows = [scored("cut", [0.9, 0.1], [False, False]),  # every response cut at the token cap
            scored("tie", [0.5, 0.5], [True, True]),
            scored("best-cut", [0.9, 0.2], [False, True]),  # one finished response: no pair
            scored("small", [0.5, 0.45], [True, True]),  # margin 0.05 < --min-margin 0.1
            scored("one", [0.9], [True]),
            scored("gap", [0.9, 0.1], [True, True]),
            scored("worst-cut", [0.9, 0.1, 0.4], [True, False, True])]  # 0.9 vs 0.4, not the cut 0.1
    out = tmp_path / "preference.jsonl"
    args = preference.parse_args(["--in", "x", "--policy", "p", "--reward-model", "r", "--scored", "s",
                                  "--out", str(out), "--min-margin", "0.1"])
    preference.write_pairs(args, rows)
    pairs = read_lines(out)
    assert [p["id"] for p in pairs] == ["gap", "worst-cut"] and pairs[1]["rejected"][0]["content"] == "r2"
    summary = json.loads((tmp_path / "preference_summary.json").read_text())
    unfinished = "fewer than 2 finished responses (one cut at the token cap is neither chosen nor rejected)"
    assert summary == {"instructions": 7, "pairs": 2, "min_margin": 0.1, "ties": "drop",
                       "rejected_instead_of_a_cut_response": 1,
                       "no_pair": {"fewer than 2 responses": 1, unfinished: 2,
                                   "tie: the best finished response scores no higher than the worst": 1,
                                   "margin under --min-margin": 1}}
    assert (f"2 pairs of 7 instructions (1 rejecting the lowest finished response where a lower one was cut at the "
            f"cap); no pair: 1 fewer than 2 responses, 2 {unfinished}, 1 tie: the best finished response scores no "
            "higher than the worst, 1 margin under --min-margin") in capsys.readouterr().err
    # --ties keep pairs the ties; a tie under --min-margin then counts as under the margin
    args.ties, args.min_margin = "keep", 0.0
    preference.write_pairs(args, rows)
    assert [p["id"] for p in read_lines(out)] == ["tie", "small", "gap", "worst-cut"]
    assert json.loads((tmp_path / "preference_summary.json").read_text())["no_pair"] == {
        "fewer than 2 responses": 1, unfinished: 2,
        "tie: the best finished response scores no higher than the worst": 0, "margin under --min-margin": 0}


def test_classifier_reward_scores_text_pairs_with_the_head_logit(tiny_deberta):
    reward = load_reward(str(tiny_deberta), dtype="float32")
    assert isinstance(reward, ClassifierReward)
    scores = reward(["What is 2+2?", "What is 2+2?"], ["4", "I like trains and I will not answer."])
    batch = reward.tokenizer("What is 2+2?", "4", return_tensors="pt")
    with torch.inference_mode():
        expected = reward.model(**batch).logits[0, 0].item()
    assert scores[0] == pytest.approx(expected, abs=1e-4)
    assert scores[0] != scores[1]


def test_preference_step_with_a_classifier_reward_model(tmp_path, tiny_deberta):
    src = tmp_path / "filtered.jsonl"
    src.write_text("".join(json.dumps({"id": f"i{k}", "instruction": t}) + "\n" for k, t in enumerate(INSTRUCTIONS)))
    scored, out = tmp_path / "scored.jsonl", tmp_path / "pref.jsonl"
    args = ["--in", src, "--policy", "embedded:smollm2", "--reward-model", tiny_deberta, "--scored", scored,
            "--num-responses", "3", "--max-response-tokens", "96", "--batch-size", "2", "--dtype", "auto",
            "--temperature", "0.3", "--repetition-penalty", "1.2"]  # the cpu tier's response sampling: answers end
    run_step("preference", *args, "--out", out)

    rows = read_lines(scored)
    assert [r["id"] for r in rows] == ["i0", "i1", "i2"]
    assert all(len(r["responses"]) == 3 and len(r["scores"]) == 3 for r in rows)
    pairs = {p["id"]: p for p in read_lines(out)}
    assert pairs  # at least one instruction got a finished response to choose
    for r in rows:
        finished = [s for s, f in zip(r["scores"], r["finished"]) if f]
        if r["id"] not in pairs:  # dropped: fewer than two finished responses, or no margin at min-margin 0
            assert len(finished) < 2 or max(finished) <= min(finished)
            continue
        p = pairs[r["id"]]
        assert p["score_chosen"] == max(finished) and p["score_rejected"] == min(finished)
        # Which of tied responses is taken is test_pair_breaks_ties_by_the_earliest_eligible_response's business (bf16
        # scores tie on some CPUs): here the chosen is a finished response of the top finished score, the rejected
        # one of the lowest finished score.
        best = [t for t, s, f in zip(r["responses"], r["scores"], r["finished"]) if f and s == max(finished)]
        worst = [t for t, s, f in zip(r["responses"], r["scores"], r["finished"]) if f and s == min(finished)]
        assert p["chosen"][0]["content"] in best and p["rejected"][0]["content"] in worst
        assert p["margin"] == p["score_chosen"] - p["score_rejected"] > 0

    # A margin no pair reaches drops them all; the scored file is reused, nothing is sampled again.
    strict = tmp_path / "strict.jsonl"
    result = run_here("preference", *args, "--out", strict, "--min-margin", "1e9")
    assert read_lines(strict) == [] and "0 pairs of 3" in result.stderr


def assert_datasets_reads_as_is(path):
    """`datasets` (as the DPO step and a user of the published data load it) gives back every record of `path`
    unchanged: the same records in the same order, every field and value (no None filled in for a key another record
    has, no number cast, no nested field flattened), and each is a conversational preference pair as TRL takes it (a
    prompt ending on a user turn, one assistant turn chosen and one rejected)."""
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    records = read_lines(path)
    data = load_dataset("json", data_files=str(path), split="train")
    assert records and data.column_names == list(records[0])
    assert data.to_list() == records
    assert json.dumps(data.to_list()) == json.dumps(records)  # and of the same types (1 is not 1.0), keys in order
    for r in records:
        assert is_conversational(r), r["id"]
        for side, roles in (("prompt", None), ("chosen", ["assistant"]), ("rejected", ["assistant"])):
            turns = r[side]
            assert isinstance(turns, list) and turns and all(isinstance(m, dict) and set(m) == {"role", "content"}
                                                             and isinstance(m["content"], str) for m in turns), side
            assert [m["role"] for m in turns] == roles if roles else turns[-1]["role"] == "user", (r["id"], side)


def test_datasets_reads_the_pairs_as_is(chain_run):
    assert_datasets_reads_as_is(chain_run / "preference.jsonl")


def preference_args(src, out_dir, name):
    return ["--in", src, "--policy", "embedded:smollm2", "--reward-model", "embedded:minilm", "--num-responses",
            "2", "--max-response-tokens", "16", "--batch-size", "2", "--dtype", "auto",
            "--scored", out_dir / f"{name}-scored.jsonl", "--out", out_dir / f"{name}.jsonl"]


@pytest.fixture(scope="module")
def whole_preference(tmp_path_factory, smol):
    """Six instructions scored in one uninterrupted run of one process: what the kill and two-process tests match."""
    folder = tmp_path_factory.mktemp("preference")
    src = folder / "filtered.jsonl"
    src.write_text("".join(json.dumps({"id": f"i{k}", "instruction": f"Tell me one fact about the number {k}."}) + "\n"
                           for k in range(6)))
    run_here("preference", *preference_args(src, folder, "whole"))
    return src, folder


def test_preference_resumes_after_a_kill(tmp_path, whole_preference):
    src, whole = whole_preference

    def args(name):
        return preference_args(src, tmp_path, name)

    written = kill_midway("preference", args("killed"), tmp_path / "killed-scored.jsonl.partial", lines=2)
    assert 2 <= written < 6 and not (tmp_path / "killed.jsonl").exists()
    again = kill_midway("preference", args("killed"), tmp_path / "killed-scored.jsonl.partial", lines=4)
    assert 4 <= again < 6 and not (tmp_path / "killed.jsonl").exists()  # killed again while resuming
    result = run_step("preference", *args("killed"))
    assert "already written" in result.stderr
    assert read_lines(tmp_path / "killed-scored.jsonl") == read_lines(whole / "whole-scored.jsonl")
    assert read_lines(tmp_path / "killed.jsonl") == read_lines(whole / "whole.jsonl")


def test_two_processes_score_the_same_pairs_as_one(tmp_path, whole_preference):
    """NPROC=2 (torchrun): each process samples and scores every other batch into a shard; process 0 merges them in
    input order. Same seeds per batch, so the same scored records and pairs as one process."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    src, whole = whole_preference
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as the one-process run
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "steps" / "preference.py"), *map(str, preference_args(src, tmp_path, "two"))],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["id"] for r in read_lines(tmp_path / "two-scored.jsonl")] == [f"i{k}" for k in range(6)]
    assert read_lines(tmp_path / "two-scored.jsonl") == read_lines(whole / "whole-scored.jsonl")
    assert read_lines(tmp_path / "two.jsonl") == read_lines(whole / "whole.jsonl")
    assert not list(tmp_path.glob("*shard*"))  # merged and removed


def test_on_policy_responses_from_the_sft_adapter(tmp_path, chain_run):
    """--policy-adapter (PREF_POLICY=sft) samples from the base model with the adapter merged. The chain's adapter,
    trained for two steps, moves the weights too little to show; the same adapter with its LoRA B matrices scaled
    up must change the responses of the same instructions and seed, so the adapter is really what samples."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "filtered.jsonl"
    src.write_text("".join(json.dumps({"id": f"i{k}", "instruction": t}) + "\n" for k, t in enumerate(
        ["Name a planet.", *INSTRUCTIONS])))

    def responses(name, *policy):  # the step in this process: three runs, loading the models is most of each
        scored = tmp_path / f"{name}-scored.jsonl"
        preference_main(["--in", str(src), "--policy", "embedded:smollm2", *map(str, policy), "--reward-model",
                         "embedded:minilm", "--num-responses", "2", "--max-response-tokens", "12", "--dtype",
                         "float32", "--seed", "5", "--scored", str(scored), "--out", str(tmp_path / f"{name}.jsonl")])
        rows = read_lines(scored)
        assert [r["id"] for r in rows] == [f"i{k}" for k in range(4)]
        assert all(len(r["responses"]) == 2 and len(r["scores"]) == 2 for r in rows)
        return [r["responses"] for r in rows]

    sft = responses("sft", "--policy-adapter", chain_run / "sft")
    assert any(text.strip() for pair in sft for text in pair)

    scaled = tmp_path / "scaled-sft"
    shutil.copytree(chain_run / "sft", scaled, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = load_file(scaled / "adapter_model.safetensors")
    lora_b = [k for k in weights if "lora_B" in k]
    assert lora_b and any(weights[k].abs().max() > 0 for k in lora_b)  # trained: B starts at zero
    save_file({k: v * 50 if k in lora_b else v for k, v in weights.items()}, scaled / "adapter_model.safetensors",
              metadata={"format": "pt"})

    bare = responses("bare")
    print("unscaled adapter == bare:", sft == bare)
    assert responses("scaled", "--policy-adapter", scaled) != bare


def test_responses_are_sampled_as_the_policys_recipe_says_unless_a_flag_says_otherwise():
    """One source: the recipe's response settings with its preference section on top (a greedy recipe samples),
    then each flag; the cpu tier passes none."""
    import preference

    def sampling(*flags):
        args = preference.parse_args(["--in", "x", "--policy", "embedded:smollm2", "--reward-model", "x", "--scored",
                                      "x", "--out", "x", *flags])
        s = preference.sampling_of(args)[1]
        return s.temperature, s.top_p, s.repetition_penalty, s.loop_window, s.max_new_tokens

    assert sampling() == (0.3, 0.9, 1.2, 64, 512)  # env/generators/smollm2.yaml, response
    assert sampling("--temperature", "0.7", "--max-response-tokens", "64") == (0.7, 0.9, 1.2, 64, 64)
    # the generic recipe's responses are greedy (Magpie's, as llama-3's); its preference section samples
    assert sampling("--recipe", "generic")[:2] == (0.8, 0.95)
    assert "PREFERENCE_ARGS" not in (Path(__file__).parents[1] / "env" / "cpu" / "tier.mk").read_text()
