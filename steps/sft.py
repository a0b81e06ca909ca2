"""Supervised fine-tuning: a LoRA adapter trained with TRL's SFTTrainer on the filtered instruction/response pairs.

Every SFTConfig and ModelConfig option is a flag (TRL's parser), and a tier's settings are a YAML file:

    python steps/sft.py --config env/t4/sft.yaml --model_name_or_path meta-llama/Llama-3.2-3B \
        --train_file data/runs/x/filtered.jsonl --output_dir data/runs/x/sft

Each record is one conversation (its `conversation`, from generate --turns N, else its instruction and response),
tokenised here turn by turn so that the loss covers every assistant turn (its tokens and its end of turn) and nothing
of the system or user turns, whatever the chat template (to_training_example). A conversation must end on an
assistant turn: one that ends on a user turn is refused, naming its line. A conversation longer than max_length is
dropped before training and counted (`dropped_too_long` in training_config.json), never cut: a cut answer would be
trained as if finished.
About TEST_FRACTION of them (decided by id: common/io/splits.py) are held out of training; the loss on them is logged
every eval_steps and after the last step (`eval_loss` in log_history.json and the curves). The LoRA recipe and
learning rates come from env/lora.yaml, the rest from the tier's YAML. `attn_implementation: varlen` (the h100 tier)
trains packed sequences through PyTorch's Flash varlen kernel where it runs (common/training/varlen.py), else SDPA.
Checkpoints go to OUTPUT_DIR.partial and a rerun resumes from the last one; OUTPUT_DIR appears when training is
done, holding the adapter, the tokenizer (with the chat template and pad token used in training) and the config.
"""

from dataclasses import dataclass, field

from common import DataError, run_step
from common.generation.chat import prepare_tokenizer
from common.io.files import output_lock
from common.io.jsonl import read_jsonl
from common.io.splits import DEFAULT_TEST_FRACTION
from common.models import load_tokenizer
from common.options import check_value, fraction
from common.reporting.tag_stats import turn_counts
from common.training import varlen
from common.training.config import training_flags
from common.training.trainers import (checkpoint_dir, compile_layer_by_layer, drop_too_long_splits, held_out,
                                      train_and_save)


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "filtered JSONL with 'instruction' and 'response'"})
    test_fraction: float = field(default=DEFAULT_TEST_FRACTION, metadata={
        "help": "share of records (by id) held out of training and evaluated on (0: none)"})

    def __post_init__(self):  # TRL's parser takes the field's type as is: the range is checked here
        self.test_fraction = check_value("--test_fraction", self.test_fraction, fraction)


ROLES = ("system", "user", "assistant")


def conversation_of(record):
    """The messages SFT trains on: every turn of a multi-turn record, else its instruction and response."""
    return record.get("conversation") or [{"role": "user", "content": record["instruction"]},
                                          {"role": "assistant", "content": record["response"]}]


def conversation_fault(messages):
    """Why these messages can't be trained on (None: they can)."""
    if not isinstance(messages, list) or not messages:
        return "'conversation' should be a non-empty list of messages"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"message {i} of 'conversation' should be {{'role': one of {', '.join(ROLES)}, 'content': text}}"
    if next((m["role"] for m in messages if m["role"] != "system"), None) != "user":
        return "the conversation should start (after a system message, if any) with a user turn"
    if messages[-1]["role"] != "assistant":
        return (f"the conversation ends on a {messages[-1]['role']} turn, which SFT would train as an answer; "
                "end it on an assistant turn (drop the last turn or the record)")
    return None


def check_conversations(path, records):
    """Refuse the first record that can't be trained on, naming its file, line and id."""
    for index, record in enumerate(records):
        fault = conversation_fault(conversation_of(record))
        if fault:
            raise DataError(f"{path}:{line_of_record(path, index)}: record {record.get('id', index + 1)}: {fault}")


def line_of_record(path, index):
    """The line of the index-th record of a JSONL file: read_jsonl skips blank lines, so count the others."""
    with open(path, encoding="utf-8") as f:
        filled = (n for n, line in enumerate(f, 1) if line.strip())
        return next(n for i, n in enumerate(filled) if i == index)


def to_training_example(messages, tokenizer):
    """{input_ids, assistant_masks} of one conversation, for TRL's SFTTrainer (which takes a dataset with
    `input_ids` as tokenised and builds the labels from `assistant_masks`).

    The conversation is rendered with the tokenizer's chat template as a whole; each assistant turn's span is where
    the conversation up to and including that turn goes beyond the conversation before it with the assistant header
    (add_generation_prompt): the turn's content and whatever the template ends it with (end-of-turn token, EOS,
    newline). This needs no {% generation %} markers in the template, and for a one-turn record it gives exactly
    what TRL gives a conversational prompt/completion example (prompt = the user turn, completion = the answer).
    """
    def render(part, **kwargs):  # as TRL's _tokenize renders a conversational example
        return tokenizer.apply_chat_template(part, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    input_ids = render(messages)
    mask = [0] * len(input_ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(messages[: k + 1])
        if through != input_ids[: len(through)]:
            # The template renders an earlier turn differently once later turns follow (some drop past reasoning):
            # the turn's tokens can't be placed in the whole conversation.
            raise DataError("the chat template renders a conversation's earlier turns differently once later turns "
                            f"follow (at assistant turn {k + 1}), so its assistant turns can't be masked; "
                            "train on one-turn records (generate --turns 1)")
        # The answer starts where the prompt and prompt+answer diverge, as TRL cuts a prompt/completion example.
        start = common_prefix_length(render(messages[:k], add_generation_prompt=True), through)
        mask[start : len(through)] = [1] * (len(through) - start)
    return {"input_ids": input_ids, "assistant_masks": mask}


def common_prefix_length(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def to_dataset(records, tokenizer, num_proc=None):
    """The records as a tokenised datasets.Dataset (tokenised in `num_proc` processes, as TRL would)."""
    from datasets import Dataset

    conversations = Dataset.from_list([{"messages": conversation_of(r)} for r in records])
    return conversations.map(lambda example: to_training_example(example["messages"], tokenizer),
                             remove_columns=["messages"], num_proc=num_proc, desc="Tokenising conversations")


def build_trainer(data_args, training_args, model_args):
    from trl import SFTTrainer, get_peft_config

    records = read_jsonl(data_args.train_file, required={"instruction": str, "response": str})
    if not records:
        raise DataError(f"{data_args.train_file}: no training records")
    check_conversations(data_args.train_file, records)
    train, test = held_out(records, data_args.test_fraction, training_args)
    tokenizer = prepare_tokenizer(load_tokenizer(model_args.model_name_or_path))
    rows = {split: to_dataset(part, tokenizer, training_args.dataset_num_proc) if part else None
            for split, part in (("train", train), ("eval", test))}
    lengths = {split: [len(ids) for ids in r["input_ids"]] if r is not None else [] for split, r in rows.items()}
    rows, keep = drop_too_long_splits(rows, lengths, training_args, data_args.train_file, "conversations")
    kept = {"train": [train[i] for i in keep["train"]], "eval": [test[i] for i in keep["eval"]]}
    max_length = training_args.max_length
    if training_args.padding_free and not training_args.packing:
        # Unpacked padding-free rows: TRL refuses a max_length it would not apply; the rows over it are dropped above.
        training_args.max_length = None
    dropped = {"train": len(train) - len(kept["train"]), "eval": len(test) - len(kept["eval"])}
    model, attention = varlen.load(model_args, max_length)
    facts = {"attn_implementation": attention,
             "compiled": compile_layer_by_layer(training_args, model)}
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=rows["train"],
        eval_dataset=rows["eval"],
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.run_facts = {**facts, "train_records": len(kept["train"]), "eval_records": len(kept["eval"]),
                         "max_length": max_length, "dropped_too_long": dropped,
                         "train_turns": {str(n): count for n, count in turn_counts(kept["train"]).items()},
                         "test_fraction": data_args.test_fraction, "lora_r": model_args.lora_r,
                         "lora_alpha": model_args.lora_alpha, "lora_dropout": model_args.lora_dropout,
                         "lora_target_modules": model_args.lora_target_modules}
    return trainer


def parse(argv=None):
    from trl import ModelConfig, SFTConfig, TrlParser

    return TrlParser((DataArguments, SFTConfig, ModelConfig)).parse_args_and_config(training_flags(argv, "sft"))


def main(argv=None):
    data_args, training_args, model_args = parse(argv)
    output_dir = training_args.output_dir
    training_args.output_dir = str(checkpoint_dir(output_dir))
    with output_lock(output_dir):  # before loading anything: a second run on the same output stops at once
        train_and_save(build_trainer(data_args, training_args, model_args), output_dir)
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    run_step(main)
