"""Direct preference optimisation: continue the SFT adapter with TRL's DPOTrainer on the preference pairs.

    python steps/dpo.py --config env/t4/dpo.yaml --model_name_or_path meta-llama/Llama-3.2-3B \
        --sft_adapter data/runs/x/sft --train_file data/runs/x/preference.jsonl --output_dir data/runs/x/dpo

The SFT adapter is loaded as the trainable policy; TRL then keeps a frozen copy of it as a second adapter ("ref")
and computes the reference log-probs through that copy, so the reference model is the SFT model, not the bare base
(at step 0 policy and reference agree and every reward margin is 0). Checkpoints and the finished adapter are
handled as in the SFT step, and so is the held-out split (TEST_FRACTION, by id): its loss and reward accuracy
(`eval_rewards/accuracies`, the share of held-out pairs whose chosen answer gets the larger implicit reward) are
logged every eval_steps and after the last step. A pair whose prompt and longer answer exceed max_length is dropped
and counted (`dropped_too_long`), never cut. `pack_pairs: true` (every tier's YAML) trains a micro-batch's pairs as
one unpadded row, each prompt computed once for both answers (common/training/pair_packing.py); TRL's own path pads
chosen and rejected rows to the longest of the micro-batch (its padding-free DPO is disabled in TRL 1.16), where
`train_sampling_strategy: group_by_length` puts pairs of similar length together.

Library internals (transformers 5.24, TRL 1.16): the trainer's `_get_train_sampler` and `_get_eval_sampler`,
overridden for the length-grouped sampler (DPOTrainer has no public hook for it).
"""

from dataclasses import dataclass, field

from common import DataError, OptionError, run_step
from common.io.files import output_lock
from common.io.jsonl import read_jsonl
from common.io.splits import DEFAULT_TEST_FRACTION
from common.models import load_tokenizer
from common.options import check_value, fraction
from common.training import pair_packing, varlen
from common.training.config import training_flags
from common.training.trainers import (checkpoint_dir, compile_layer_by_layer, drop_too_long_splits, held_out,
                                      sharded, train_and_save)

PAIR_FIELDS = {"prompt": list, "chosen": list, "rejected": list}


def policy_from_reference(model):
    """Make the trainable adapter ("default") an exact copy of the frozen "ref" adapter that TRL made of it.

    TRL copies the SFT adapter to "ref" first and then, for a quantized (4-bit) base, rounds the trainable copy to
    bf16: policy and reference then differ at step 0 (on the T4 tier the first step's reward margin was 0.003, not
    0). The "ref" copy still holds the SFT weights as loaded, so they are copied back; the optimizer is created
    later, in train(). Without a quantized base the two are already equal and this changes nothing.
    """
    if "ref" not in getattr(model, "peft_config", {}):
        return
    for name, param in model.named_parameters():
        if ".default." in name and param.requires_grad:
            ref = model.get_parameter(name.replace(".default.", ".ref."))
            param.data = ref.data.clone()


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "preference JSONL (prompt, chosen, rejected) in TRL's format"})
    sft_adapter: str = field(metadata={"help": "adapter directory written by steps/sft.py"})
    test_fraction: float = field(default=DEFAULT_TEST_FRACTION, metadata={
        "help": "share of pairs (by id) held out of training and evaluated on (0: none)"})
    pack_pairs: bool = field(default=False, metadata={
        "help": "one unpadded row a micro-batch, each prompt computed once for both answers "
                "(common/training/pair_packing.py; needs --attn_implementation varlen)"})

    def __post_init__(self):  # TRL's parser takes the field's type as is: the range is checked here
        self.test_fraction = check_value("--test_fraction", self.test_fraction, fraction)


def pair_lengths(dataset):
    """Each tokenized pair's padded cost: the prompt plus the longer of its two answers."""
    return [len(p) + max(len(c), len(r))
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


def dpo_trainer_class(pack_pairs=False):
    """TRL's DPOTrainer, with `train_sampling_strategy: group_by_length` working on preference pairs (transformers'
    LengthGroupedSampler looks for an `input_ids` column, which tokenized pairs don't have, and a `length` column
    would be dropped with the unused columns before the sampler sees it); with `pack_pairs`, the loss of packed
    pairs (common/training/pair_packing.py) in place of TRL's."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import DPOTrainer

    def grouped(self, dataset, batch_size):
        if (self.args.train_sampling_strategy == "group_by_length"
                and "prompt_ids" in getattr(dataset, "column_names", ())):
            return LengthGroupedSampler(batch_size, lengths=pair_lengths(dataset))
        return None

    class DPOTrainerGrouped(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return grouped(self, dataset, batch) or super()._get_train_sampler(train_dataset)

        def _get_eval_sampler(self, eval_dataset):
            return grouped(self, eval_dataset, self.args.eval_batch_size) or super()._get_eval_sampler(eval_dataset)

    class DPOTrainerPacked(DPOTrainerGrouped):
        def _compute_loss(self, model, inputs, return_outputs):
            return pair_packing.dpo_loss(self, model, inputs, return_outputs)

    return DPOTrainerPacked if pack_pairs else DPOTrainerGrouped


def build_trainer(data_args, training_args, model_args, pairs):
    from datasets import Dataset
    from peft import PeftModel

    train, test = held_out(pairs, data_args.test_fraction, training_args)
    # The SFT adapter's tokenizer carries the chat template and pad token that SFT trained with.
    tokenizer = load_tokenizer(data_args.sft_adapter)
    base, attention = varlen.load(model_args, training_args.max_length)
    facts = {"attn_implementation": attention}
    if data_args.pack_pairs and facts["attn_implementation"] not in (varlen.NAME, varlen.SDPA_NAME):
        raise OptionError("--pack_pairs needs attention per sequence, which is off for this model (see above); "
                          "pass --pack_pairs false")
    policy = PeftModel.from_pretrained(base, data_args.sft_adapter, is_trainable=True)
    facts["compiled"] = compile_layer_by_layer(training_args, policy)
    columns = list(PAIR_FIELDS)
    trainer = dpo_trainer_class(data_args.pack_pairs)(
        model=policy,
        args=training_args,
        train_dataset=Dataset.from_list([{k: p[k] for k in columns} for p in train]),
        eval_dataset=Dataset.from_list([{k: p[k] for k in columns} for p in test]) if test else None,
        processing_class=tokenizer,
        data_collator=pair_packing.pack_pairs if data_args.pack_pairs else None,  # (None: TRL's own)
    )
    policy_from_reference(trainer.model)
    # TRL has tokenised the pairs (and dropped those whose prompt alone fills max_length); drop the ones whose prompt
    # and longer answer exceed it, which its collator would cut (the count covers both).
    rows = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    lengths = {split: pair_lengths(r) if r is not None else [] for split, r in rows.items()}
    rows, _ = drop_too_long_splits(rows, lengths, training_args, data_args.train_file, "pairs")
    trainer.train_dataset, trainer.eval_dataset = rows["train"], rows["eval"]
    trained, evaluated = len(trainer.train_dataset), len(trainer.eval_dataset or [])
    trainer.run_facts = {**facts, "train_records": trained, "eval_records": evaluated,
                         "max_length": training_args.max_length,
                         "dropped_too_long": {"train": len(train) - trained, "eval": len(test) - evaluated},
                         "test_fraction": data_args.test_fraction, "sft_adapter": str(data_args.sft_adapter),
                         "pack_pairs": data_args.pack_pairs}
    return trainer


def parse_args(argv=None):
    from trl import DPOConfig, ModelConfig, TrlParser

    return TrlParser((DataArguments, DPOConfig, ModelConfig)).parse_args_and_config(training_flags(argv, "dpo"))


def main(argv=None):
    data_args, training_args, model_args = parse_args(argv)
    if training_args.torch_compile and training_args.gradient_checkpointing and sharded(training_args, by=["fsdp"]):
        # Measured on one GPU (bench/README.md, "Multi-process launch"): the second step's backward failed with
        # "CheckpointError: A different number of tensors was saved during the original forward and recomputation".
        # Without FSDP the pair trains (3 steps on the CPU); DeepSpeed was not tried.
        raise OptionError("DPO under FSDP with both --torch_compile true and --gradient_checkpointing true "
                          "fails in its second step (torch.utils.checkpoint.CheckpointError); pass one of them as "
                          "false (DPO_ARGS=--torch_compile false keeps the memory saving)")
    if data_args.pack_pairs:
        if model_args.attn_implementation != varlen.NAME:
            raise OptionError(f"--pack_pairs needs --attn_implementation {varlen.NAME} (attention over each pair's "
                              f"shared prompt; it runs on every device), not {model_args.attn_implementation}")
        pair_packing.check_supported(training_args)
    pairs = read_jsonl(data_args.train_file, required=PAIR_FIELDS)
    if not pairs:
        raise DataError(f"{data_args.train_file}: no preference pairs (all under the margin?)")

    output_dir = training_args.output_dir
    training_args.output_dir = str(checkpoint_dir(output_dir))
    with output_lock(output_dir):  # before loading anything: a second run on the same output stops at once
        train_and_save(build_trainer(data_args, training_args, model_args, pairs), output_dir)
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    run_step(main)
