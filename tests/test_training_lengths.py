"""No training row is cut: SFT and DPO drop (and count) the rows longer than max_length, and a response cut at the
preference step's cap is never a pair's rejected answer. Each check runs on the trainer's own collated batches, with
a control showing that the same check catches a cut row."""

import json

import pytest
from conftest import REPO

MAX_LENGTH = 80
SHORT = "An apple."
LONG = " ".join(["Apples, pears and plums grow in orchards across the valley."] * 8)  # ~100 tokens


def records():
    rows = [(f"s0-{i:07d}", f"Name fruit number {i}.", LONG if i % 3 == 0 else SHORT) for i in range(9)]
    return [{"id": i, "instruction": q, "response": a, "instruction_finished": True, "response_finished": True}
            for i, q, a in rows]


def every_row(trainer):
    """Every collated row the trainer would train on, over a whole epoch (of packed DPO pairs: each answer)."""
    for batch in trainer.get_train_dataloader():
        if "answer_of" in batch:  # one row of pairs: each answer's tokens apart
            for answer in batch["answer_of"].unique().tolist():
                if answer >= 0:
                    own = batch["answer_of"] == answer
                    yield {"input_ids": batch["input_ids"][0][own], "labels": batch["labels"][0][own]}
            continue
        for k in range(len(batch["input_ids"])):
            yield {key: batch[key][k] for key in ("input_ids", "labels", "completion_mask") if key in batch}


def trained_text(tokenizer, row):
    mask = row["labels"] != -100 if "labels" in row else row["completion_mask"].bool()
    return tokenizer.decode(row["input_ids"][mask])


def keep_every_row(monkeypatch):
    """The control: every row handed to the trainer, as before the fix."""
    from common.training import trainers

    monkeypatch.setattr(trainers, "drop_too_long", lambda dataset, lengths, *a: (dataset, list(range(len(lengths)))))


def build_sft(tmp_path, monkeypatch, drop):
    import sft

    if not drop:
        keep_every_row(monkeypatch)
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return sft.build_trainer(*sft.parse([
        "--config", str(REPO / "env/cpu/sft.yaml"), "--model_name_or_path", "embedded:smollm2", "--train_file",
        str(data), "--output_dir", str(tmp_path / "sft"), "--max_length", str(MAX_LENGTH), "--test_fraction", "0",
        "--dtype", "float32"]))


def test_sft_drops_the_rows_longer_than_max_length_and_counts_them(tmp_path, smol, monkeypatch):
    trainer = build_sft(tmp_path, monkeypatch, drop=True)
    tokenizer = trainer.processing_class
    trained = [trained_text(tokenizer, row) for row in every_row(trainer)]
    assert len(trained) == 6 and all(t == SHORT + "<|im_end|>\n" for t in trained)  # whole answers, each ended
    assert trainer.run_facts["dropped_too_long"] == {"train": 3, "eval": 0}
    assert trainer.run_facts["train_records"] == 6 and trainer.run_facts["max_length"] == MAX_LENGTH

    control = build_sft(tmp_path / "control", monkeypatch, drop=False)
    cut = [t for t in (trained_text(tokenizer, row) for row in every_row(control)) if not t.endswith("<|im_end|>\n")]
    assert len(cut) == 3 and all(LONG.startswith(t) for t in cut)  # what the trainer did with them: cut mid-answer


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, smol):
    """A LoRA adapter of the embedded model with the tokenizer SFT saves beside it: what the DPO step starts from."""
    from peft import LoraConfig, get_peft_model

    from common.generation.chat import prepare_tokenizer
    from common.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("adapter") / "sft"
    model = get_peft_model(load_causal_lm("embedded:smollm2", dtype="float32"),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    prepare_tokenizer(load_tokenizer("embedded:smollm2")).save_pretrained(out)
    return out


def build_dpo(tmp_path, sft_adapter, pairs, monkeypatch=None):
    """The cpu tier's DPO trainer (packed pairs); the control (monkeypatch given): no pair dropped, TRL's own padded
    rows, which cut a row at max_length."""
    import dpo

    trl_rows = []
    if monkeypatch is not None:
        keep_every_row(monkeypatch)
        trl_rows = ["--pack_pairs", "false", "--attn_implementation", "sdpa"]
    args = dpo.parse_args([
        "--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "embedded:smollm2", "--sft_adapter",
        str(sft_adapter), "--train_file", "unused", "--output_dir", str(tmp_path / "dpo"), "--max_length",
        str(MAX_LENGTH), "--test_fraction", "0", "--dtype", "float32", *trl_rows])
    return dpo.build_trainer(*args, pairs)


def pairs_of(tmp_path, scored):
    """The preference step's pairs of these scored instructions."""
    import preference

    from common.io.jsonl import read_jsonl

    out = tmp_path / "preference.jsonl"
    args = preference.parse_args(["--in", "x", "--policy", "p", "--reward-model", "r", "--scored", "s",
                                  "--out", str(out)])
    preference.write_pairs(args, scored)
    return read_jsonl(out)


def test_dpo_drops_long_pairs_and_never_rejects_a_cut_answer(tmp_path, sft_adapter, monkeypatch):
    """Pairs from the preference step: in "cut" the lowest-scored response ran to the cap (not finished). The DPO
    trainer's batches hold whole answers only, each ended by the template's end of turn, the long pairs dropped and
    counted; and the cut response is nowhere: a pair made of it would carry an end of turn (the control)."""
    cut_text = "Plums are"
    scored = [{"id": f"p{i}", "instruction": f"Name fruit number {i}.", "responses": [SHORT, "A pear.", LONG],
               "scores": [0.9, 0.1, 0.5], "finished": [True, True, True]} for i in range(4)]
    scored.append({"id": "cut", "instruction": "Name a stone fruit.", "responses": ["A plum.", cut_text, "A peach."],
                   "scores": [0.9, -1.0, 0.2], "finished": [True, False, True]})
    scored.append({"id": "long", "instruction": "Describe an orchard.", "responses": [LONG, "Trees."],
                   "scores": [0.9, 0.1], "finished": [True, True]})
    pairs = pairs_of(tmp_path, scored)
    assert [(p["id"], p["rejected"][0]["content"]) for p in pairs][-2:] == [("cut", "A peach."), ("long", "Trees.")]

    trainer = build_dpo(tmp_path, sft_adapter, pairs)
    assert trainer.run_facts["pack_pairs"]
    tokenizer = trainer.processing_class
    completions = [trained_text(tokenizer, row) for row in every_row(trainer)]
    assert sorted(completions) == sorted([SHORT + "<|im_end|>\n", "A pear.<|im_end|>\n"] * 4
                                         + ["A plum.<|im_end|>\n", "A peach.<|im_end|>\n"])
    assert trainer.run_facts["dropped_too_long"] == {"train": 1, "eval": 0}  # "long"
    assert trainer.run_facts["train_records"] == 5

    # Controls: without the drop, the long pair's chosen answer is cut; and the cut response, had it been rejected
    # (the rule before), is trained ending in the end of turn, i.e. as if it had finished.
    cut_pair = {**pairs[-2], "id": "as-before", "rejected": [{"role": "assistant", "content": cut_text}]}
    control = build_dpo(tmp_path / "control", sft_adapter, [*pairs, cut_pair], monkeypatch)
    completions = [trained_text(tokenizer, row) for row in every_row(control)]
    assert any(LONG.startswith(t) and t != LONG for t in completions)
    assert cut_text + "<|im_end|>\n" in completions
