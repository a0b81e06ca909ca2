"""Supervised fine-tuning: a LoRA adapter trained with TRL's SFTTrainer on the filtered instruction/response pairs.

Every SFTConfig and ModelConfig option is a flag (TRL's parser), and a tier's settings are a YAML file:

    python steps/sft.py --config env/t4/sft.yaml --model_name_or_path meta-llama/Llama-3.2-3B \
        --train_file data/runs/x/filtered.jsonl --output_dir data/runs/x/sft

Records become conversational prompt/completion examples, so the loss is computed on the assistant's tokens only.
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
from common.models import load_for_training, load_tokenizer
from common.options import check_value, fraction
from common.training import varlen
from common.training.config import training_flags
from common.training.trainers import checkpoint_dir, compile_layer_by_layer, held_out, train_and_save


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "filtered JSONL with 'instruction' and 'response'"})
    test_fraction: float = field(default=DEFAULT_TEST_FRACTION, metadata={
        "help": "share of records (by id) held out of training and evaluated on (0: none)"})

    def __post_init__(self):  # TRL's parser takes the field's type as is: the range is checked here
        self.test_fraction = check_value("--test_fraction", self.test_fraction, fraction)


def to_examples(records):
    """Conversational prompt/completion examples: the loss covers the (last) assistant turn only."""
    examples = []
    for r in records:
        messages = r.get("conversation") or [{"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["response"]}]
        examples.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return examples


def build_trainer(data_args, training_args, model_args):
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config

    records = read_jsonl(data_args.train_file, required={"instruction": str, "response": str})
    if not records:
        raise DataError(f"{data_args.train_file}: no training records")
    train, test = held_out(records, data_args.test_fraction, training_args)
    tokenizer = prepare_tokenizer(load_tokenizer(model_args.model_name_or_path))
    asked = varlen.requested(model_args)
    model = load_for_training(model_args)
    facts = {"attn_implementation": varlen.apply(model, asked),
             "compiled": compile_layer_by_layer(training_args, model)}
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(to_examples(train)),
        eval_dataset=Dataset.from_list(to_examples(test)) if test else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.run_facts = {**facts, "train_records": len(train), "eval_records": len(test),
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
