"""Direct preference optimisation: continue the SFT adapter with TRL's DPOTrainer on the preference pairs.

    python steps/dpo.py --config env/t4/dpo.yaml --model_name_or_path meta-llama/Llama-3.2-3B \
        --sft_adapter data/runs/x/sft --train_file data/runs/x/preference.jsonl --output_dir data/runs/x/dpo

The SFT adapter is loaded as the trainable policy; TRL then keeps a frozen copy of it as a second adapter ("ref")
and computes the reference log-probs through that copy, so the reference model is the SFT model, not the bare base
(at step 0 policy and reference agree and every reward margin is 0). Checkpoints and the finished adapter are
handled as in the SFT step.
"""

from dataclasses import dataclass, field

from common import DataError, OptionError, run_step
from common.files import output_lock
from common.jsonl import read_jsonl
from common.models import load_for_training, load_tokenizer
from common.precision import training_flags
from common.training import checkpoint_dir, compile_layer_by_layer, sharded, train_and_save

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


def build_trainer(data_args, training_args, model_args, pairs):
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOTrainer

    # The SFT adapter's tokenizer carries the chat template and pad token that SFT trained with.
    tokenizer = load_tokenizer(data_args.sft_adapter)
    policy = PeftModel.from_pretrained(load_for_training(model_args), data_args.sft_adapter, is_trainable=True)
    compile_layer_by_layer(training_args, policy)
    columns = list(PAIR_FIELDS)
    trainer = DPOTrainer(
        model=policy,
        args=training_args,
        train_dataset=Dataset.from_list([{k: p[k] for k in columns} for p in pairs]),
        processing_class=tokenizer,
    )
    policy_from_reference(trainer.model)
    return trainer


def main(argv=None):
    from trl import DPOConfig, ModelConfig, TrlParser

    parser = TrlParser((DataArguments, DPOConfig, ModelConfig))
    data_args, training_args, model_args = parser.parse_args_and_config(training_flags(argv))
    if training_args.torch_compile and training_args.gradient_checkpointing and sharded(training_args, by=["fsdp"]):
        # Measured on one GPU (bench/README.md, "Multi-process launch"): the second step's backward failed with
        # "CheckpointError: A different number of tensors was saved during the original forward and recomputation".
        # Without FSDP the pair trains (3 steps on the CPU); DeepSpeed was not tried.
        raise OptionError("DPO under FSDP with both --torch_compile true and --gradient_checkpointing true "
                          "fails in its second step (torch.utils.checkpoint.CheckpointError); pass one of them as "
                          "false (DPO_ARGS=--torch_compile false keeps the memory saving)")
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
