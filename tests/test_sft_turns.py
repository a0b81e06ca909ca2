"""Multi-turn SFT (steps/sft.py): every assistant turn carries loss, with its end of turn, and nothing of the system or
user turns, for each generator family's chat template, with or without {% generation %} markers; a one-turn record
trains exactly as TRL's prompt/completion form did; a conversation that ends on a user turn is refused, naming its
line; the report and the dataset card say how many turns the data has."""

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, run_step
from run_fixture import make_run
from test_recipes import FIXTURES, build_tokenizer

import sft
from common import DataError
from common.generation.chat import DEFAULT_CHAT_TEMPLATE, prepare_tokenizer
from common.io.jsonl import read_jsonl
from common.models import load_tokenizer

CPU_SFT = str(REPO / "env" / "cpu" / "sft.yaml")
SYSTEM = {"role": "system", "content": "Be brief."}
THREE_TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
               {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]
ANSWERS = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]


def smollm2():
    return prepare_tokenizer(load_tokenizer("embedded:smollm2"))


def family_tokenizer(family):
    """A tokenizer with the family's real special tokens at their ids and its chat template (tests/fixtures)."""
    spec = json.loads((FIXTURES / "tokenizers" / f"{family}.json").read_text())
    return prepare_tokenizer(build_tokenizer(spec, (FIXTURES / "chat_templates" / f"{family}.jinja").read_text()))


def base_model_tokenizer():
    """A base model's tokenizer (no chat template): it gets DEFAULT_CHAT_TEMPLATE, which has {% generation %}."""
    tokenizer = load_tokenizer("embedded:smollm2")
    tokenizer.chat_template = None
    return prepare_tokenizer(tokenizer)


def trained_spans(tokenizer, example):
    """The text of each run of tokens that carries loss, in order."""
    spans, run = [], []
    for token, loss in zip(example["input_ids"], example["assistant_masks"]):
        if loss:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    return [tokenizer.decode(s) for s in spans + ([run] if run else [])]


# The embedded model's tokenisation of SYSTEM + THREE_TURNS: (token, role, carries loss). The newline after each
# <|im_end|> belongs to the turn it ends; the assistant header ("<|im_start|>assistant\n") is prompt, not answer.
SMOLLM2_TABLE = [
    ("<|im_start|>", "system", 0), ("system", "system", 0), ("Ċ", "system", 0), ("Be", "system", 0),
    ("Ġbrief", "system", 0), (".", "system", 0), ("<|im_end|>", "system", 0), ("Ċ", "system", 0),
    ("<|im_start|>", "user", 0), ("user", "user", 0), ("Ċ", "user", 0), ("Hi", "user", 0), ("Ġthere", "user", 0),
    ("<|im_end|>", "user", 0), ("Ċ", "user", 0),
    ("<|im_start|>", "assistant", 0), ("ass", "assistant", 0), ("istant", "assistant", 0), ("Ċ", "assistant", 0),
    ("Hello", "assistant", 1), ("!", "assistant", 1), ("<|im_end|>", "assistant", 1), ("Ċ", "assistant", 1),
    ("<|im_start|>", "user", 0), ("user", "user", 0), ("Ċ", "user", 0), ("2", "user", 0), ("+", "user", 0),
    ("2", "user", 0), ("?", "user", 0), ("<|im_end|>", "user", 0), ("Ċ", "user", 0),
    ("<|im_start|>", "assistant", 0), ("ass", "assistant", 0), ("istant", "assistant", 0), ("Ċ", "assistant", 0),
    ("4", "assistant", 1), (".", "assistant", 1), ("<|im_end|>", "assistant", 1), ("Ċ", "assistant", 1),
    ("<|im_start|>", "user", 0), ("user", "user", 0), ("Ċ", "user", 0), ("Thanks", "user", 0),
    ("<|im_end|>", "user", 0), ("Ċ", "user", 0),
    ("<|im_start|>", "assistant", 0), ("ass", "assistant", 0), ("istant", "assistant", 0), ("Ċ", "assistant", 0),
    ("Welcome", "assistant", 1), (".", "assistant", 1), ("<|im_end|>", "assistant", 1), ("Ċ", "assistant", 1),
]


def roles_of_tokens(tokenizer, messages, n_tokens):
    """The role of the message each token was rendered from (by rendering the conversation message by message)."""
    roles, done = [], 0
    for k, message in enumerate(messages):
        end = len(tokenizer.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=True)["input_ids"])
        roles += [message["role"]] * (end - done)
        done = end
    assert done == n_tokens
    return roles


def test_three_turns_with_the_embedded_model_train_each_answer_and_its_end_of_turn_only(smol):
    tokenizer, messages = smollm2(), [SYSTEM, *THREE_TURNS]
    example = sft.to_training_example(messages, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    roles = roles_of_tokens(tokenizer, messages, len(tokens))
    table = list(zip(tokens, roles, example["assistant_masks"]))
    print("\n".join(f"{t!r:16} {r:10} {m}" for t, r, m in table))  # -s shows the table
    assert table == SMOLLM2_TABLE
    assert trained_spans(tokenizer, example) == [f"{a}<|im_end|>\n" for a in ANSWERS]


# family: (tokenizer, what each assistant turn's trained span is around its content)
FAMILIES = {
    "llama-3.1-instruct": (lambda: family_tokenizer("llama-3.1-instruct"), "{}<|eot_id|>"),
    "qwen2.5-instruct": (lambda: family_tokenizer("qwen2.5-instruct"), "{}<|im_end|>\n"),
    "mistral-instruct": (lambda: family_tokenizer("mistral-instruct"), " {}</s>"),
    "base-model-default-template": (base_model_tokenizer, "{}<|im_end|>\n"),  # DEFAULT_CHAT_TEMPLATE, its EOS
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
def test_every_family_trains_each_answer_and_its_end_of_turn_only(family, system, smol):
    make_tokenizer, span = FAMILIES[family]
    tokenizer = make_tokenizer()
    messages = [SYSTEM, *THREE_TURNS] if system else THREE_TURNS
    example = sft.to_training_example(messages, tokenizer)
    assert trained_spans(tokenizer, example) == [span.format(a) for a in ANSWERS]
    # ... and the untrained tokens are the whole rest: every user and system message, every header
    untrained = tokenizer.decode([t for t, m in zip(example["input_ids"], example["assistant_masks"]) if not m])
    assert all(m["content"] in untrained for m in messages if m["role"] != "assistant")
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_a_template_with_generation_markers_gets_its_own_mask_plus_what_ends_the_turn(smol):
    """DEFAULT_CHAT_TEMPLATE marks {% generation %} around content + EOS; the mask here adds only the newline the
    template writes after it (as TRL's prompt/completion form trained it), nothing else."""
    tokenizer = base_model_tokenizer()
    assert "{% generation %}" in DEFAULT_CHAT_TEMPLATE
    example = sft.to_training_example(THREE_TURNS, tokenizer)
    marked = tokenizer.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)["assistant_masks"]
    extra = [t for t, mine, theirs in zip(example["input_ids"], example["assistant_masks"], marked) if mine != theirs]
    assert all(theirs <= mine for mine, theirs in zip(example["assistant_masks"], marked))
    assert tokenizer.decode(extra) == "\n" * len(ANSWERS)


@pytest.fixture(scope="module")
def trl_prepare():
    """TRL's own dataset preparation (SFTTrainer._prepare_dataset, the path a conversational prompt/completion
    dataset took before this step tokenised conversations itself), on a stand-in trainer: (tokenizer, dataset) ->
    the prepared dataset's input_ids and labels."""
    from types import SimpleNamespace

    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir="unused", max_length=512, use_cpu=True, bf16=False, report_to=[])

    def prepare(tokenizer, dataset):
        completion_only = "completion" in dataset.column_names  # what SFTTrainer decides when it is None
        trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=completion_only)
        prepared = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, False, None, "train")
        return prepared.select_columns(["input_ids", "labels"]).to_list()
    return prepare


@pytest.mark.parametrize("family", ["smollm2", "llama-3.1-instruct"])
def test_a_one_turn_record_trains_exactly_as_the_prompt_completion_form_did(family, trl_prepare, smol):
    from datasets import Dataset

    tokenizer = smollm2() if family == "smollm2" else family_tokenizer(family)
    records = [{"id": "a", "instruction": "Name a fruit.", "response": "An apple."},
               {"id": "b", "instruction": "Count to 3.", "response": " 1 2 3\n"},  # leading space, trailing newline
               {"id": "c", "instruction": "Say hi.", "response": "hi",
                "conversation": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}]
    conversations = [sft.conversation_of(r) for r in records]
    before = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in conversations])
    now = trl_prepare(tokenizer, sft.to_dataset(records, tokenizer))
    assert now == trl_prepare(tokenizer, before)
    assert all(any(label != -100 for label in row["labels"]) for row in now)


def test_a_conversation_ending_on_a_user_turn_is_refused_naming_its_line(tmp_path, smol):
    data = tmp_path / "filtered.jsonl"
    good = {"id": "s0-0000000", "instruction": "Hi", "response": "Hello"}
    bad = {"id": "s0-0000002", "instruction": "Hi", "response": "Hello",
           "conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                            {"role": "user", "content": "And?"}]}
    # A blank line (read_jsonl skips it) puts the third record on line 4.
    data.write_text(json.dumps(good) + "\n\n" + json.dumps(good | {"id": "s0-0000001"}) + "\n" + json.dumps(bad) + "\n")
    said = f"{data}:4: record s0-0000002: the conversation ends on a user turn"
    with pytest.raises(DataError, match="^" + re.escape(said)):
        sft.check_conversations(data, read_jsonl(data))
    # ... and the step stops on it before loading a model, with its message alone
    result = run_step("sft", "--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file", data,
                      "--output_dir", tmp_path / "sft", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {said}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "sft").exists()


@pytest.mark.parametrize("messages, fault", [
    ([{"role": "assistant", "content": "Hello"}], "should start (after a system message, if any) with a user turn"),
    ([SYSTEM], "should start"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}], "message 2 of 'conversation' should be"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}], "message 2"),
])
def test_other_conversations_that_cannot_be_trained_are_named(messages, fault):
    assert fault in sft.conversation_fault(messages)


def two_turn_records(n):
    return [{"id": f"s0-{i:07d}", "instruction": f"Name {i} fruits.", "response": "Apple." * (i + 1),
             "conversation": [{"role": "user", "content": f"Name {i} fruits."},
                              {"role": "assistant", "content": "Apple." * (i + 1)},
                              {"role": "user", "content": "One more?"}, {"role": "assistant", "content": "Pear."}]}
            for i in range(n)]


def test_the_trainer_labels_every_assistant_turn(tmp_path, smol):
    """What the real trainer hands the model: labels on both answers and their end of turn, -100 elsewhere."""
    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in two_turn_records(1)))
    trainer = sft.build_trainer(*sft.parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2",
                                            "--train_file", str(data), "--output_dir", str(tmp_path / "sft")]))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    trained = trainer.processing_class.decode(ids[labels != -100])
    assert trained == "Apple.<|im_end|>\nPear.<|im_end|>\n"
    assert trainer.run_facts["train_turns"] == {"2": 1}


def test_sft_trains_on_two_turn_records(tmp_path, smol):
    """The step end to end on a 2-turn JSONL, one step: it trains, and says on what."""
    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in two_turn_records(3)))
    run_step("sft", "--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file", data,
             "--output_dir", tmp_path / "sft", "--max_steps", "1", "--test_fraction", "0", "--dtype", "float32")
    config = json.loads((tmp_path / "sft" / "training_config.json").read_text())
    assert config["train_turns"] == {"2": 3} and config["train_records"] == 3
    losses = [h["loss"] for h in json.loads((tmp_path / "sft" / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 1 and losses[0] > 0


def test_the_report_and_the_dataset_card_say_how_many_turns(tmp_path):
    import dataset as dataset_step
    import report as report_step

    run = make_run(tmp_path / "run")  # every fifth record (ids ending 1, 6) has two turns
    kept = read_jsonl(run / "filtered.jsonl")
    two = sum("conversation" in r for r in kept)
    assert 0 < two < len(kept)
    said = f"conversations of 1 turn: {len(kept) - two} records, of 2 turns: {two} records"
    dataset_step.main(["--run", str(run), "--out", str(run / "dataset"), "--test-fraction", "0.25"])
    assert f"Turns: {said}; `messages` holds every turn." in (run / "dataset" / "README.md").read_text()
    report_step.main(["--run", str(run), "--out", str(run / "report.md"), "--tier", "cpu", "--model-name", "smol"])
    report = Path(run / "report.md").read_text()
    assert f"Kept, by user/assistant turns (SFT trains every assistant turn): {said}." in report
    assert "| turns per conversation (at most) | 1 |" in report
