"""Training plumbing shared by the SFT and DPO steps: resumable checkpoints and an atomic final adapter."""

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from . import SetupError
from .files import atomic_path, staging_path

# What to turn down when training runs out of GPU memory (each is a flag and a key of the tier YAMLs).
MEMORY_KNOBS = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "gradient_checkpointing")


def checkpoint_dir(output_dir):
    """Where the trainer keeps its checkpoints until the adapter is finished: OUTPUT.partial."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".partial")


def sharded(args, by=("fsdp", "deepspeed")):
    """Whether FSDP or DeepSpeed (those of `by`) will wrap the model: from the training arguments or from
    `accelerate launch --config_file`, which says so in the environment."""
    return any(getattr(args, name) or os.environ.get(f"ACCELERATE_USE_{name.upper()}", "false").lower() == "true"
               for name in by)


def compile_layer_by_layer(args, model):
    """With `torch_compile`, compile each decoder layer in place ("regional compilation": the layers are alike, so one
    compile serves all 28 and takes ~20 s instead of minutes), then turn the trainer's own compile off, which would
    wrap the model a second time (so training_config.json shows torch_compile false). Compiled here rather than by
    the trainer through accelerate, the DPO step ran ~1.25x faster and SFT the same (bench/README.md, round 3), and
    work done before training, such as DPO's precompute_ref_log_probs pass, runs compiled too.
    """
    if not args.torch_compile:
        return
    if sharded(args):
        # FSDP and DeepSpeed wrap the layers themselves, so accelerate compiles them, after wrapping; regionally, which
        # compiles each layer in place. Its default, torch.compile of the whole model, hides the PeftModel behind an
        # OptimizedModule: under FSDP, TRL's DPO then no longer sees a PEFT model, has no reference and failed at
        # its first step (bench/README.md, "Multi-process launch"). `accelerate launch` exports this variable as
        # False unless its config says otherwise; the trainer's compile plugin reads it when the trainer is built.
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "true"
        return
    from accelerate.utils.other import compile_regions_deepspeed as compile_regions_in_place  # not DeepSpeed-only

    compile_regions_in_place(model)
    # The trainer builds its compile plugin from the backend, which TrainingArguments filled in: clear both.
    args.torch_compile, args.torch_compile_backend = False, None


def fp32_trainable_under_fp16(trainer):
    """Under fp16 mixed precision (a T4) keep the trainable weights in fp32.

    TRL casts a quantized model's LoRA weights to bf16 (QLoRA's recipe for bf16 GPUs), but fp16 training's GradScaler
    unscales fp32 gradients only: on a T4 the first optimizer step failed with
    '"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16''. fp32 master weights are what
    fp16 autocast expects anyway. The optimizer is created in train(), after this.
    """
    if not trainer.args.fp16:
        return
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def last_complete_checkpoint(work):
    """The newest checkpoint the Trainer finished writing (trainer_state.json comes last); a checkpoint cut short by a
    crash is deleted, since resuming from it would fail."""
    while work.is_dir() and (last := get_last_checkpoint(work)):
        try:
            json.loads((Path(last) / "trainer_state.json").read_text())
            return last
        except (OSError, ValueError):  # missing or half-written
            pass
        print(f"removing incomplete checkpoint {last}")
        shutil.rmtree(last)
    return None


def check_disk(trainer, output_dir):
    """Refuse before training when the disk can't hold the checkpoints and the adapter.

    A checkpoint holds the trainable weights and Adam's two moments (fp32: 12 bytes a parameter), the adapter the
    weights again; save_total_limit checkpoints are kept (three counted when it is unset)."""
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    need = params * 4 * (1 + 3 * (trainer.args.save_total_limit or 3)) + 50 * 2**20  # + tokenizer and state files
    where = Path(output_dir).resolve().parent
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if need > free:
        raise SetupError(f"{where}: {free / 2**20:.0f} MiB free, checkpoints and the adapter of {params:,} trainable "
                         f"parameters need about {need / 2**20:.0f} MiB; free some space, point RUN at a larger disk, "
                         "or keep fewer checkpoints (--save_total_limit)")


def out_of_memory(args):
    """The error for a training step that ran out of GPU memory: which knobs, set how, and what to do."""
    now = ", ".join(f"{k}={getattr(args, k)}" for k in MEMORY_KNOBS if hasattr(args, k))
    return SetupError(
        f"out of GPU memory while training ({now}). Turn a knob down, in the tier's YAML (SFT_CONFIG / DPO_CONFIG) or "
        "as a flag (make SFT_ARGS=... / DPO_ARGS=...): halve --per_device_train_batch_size and double "
        "--gradient_accumulation_steps (the same global batch), lower --max_length, set --gradient_checkpointing true, "
        "or load the base in 4 bits (--load_in_4bit true, the t4 tier's setting). Checkpoints already written are kept: "
        "the same command resumes from the last one.")


def require_weights(saved_dir, work):
    """Trainer.save_model can write no weights and say nothing: no file (FSDP with a sharded state dict) or a
    safetensors file holding no tensors (PEFT 0.21 under FSDP's activation-checkpoint wrapper). Fail the step instead
    of publishing an adapter directory without an adapter."""
    from safetensors import safe_open

    saved = sorted(f.name for f in saved_dir.iterdir()) if saved_dir.is_dir() else []
    tensors = 0
    for name in saved:
        if name.endswith(".safetensors"):  # transformers 5 saves nothing else
            with safe_open(str(saved_dir / name), framework="pt") as f:
                tensors += len(f.keys())
    if not tensors:
        raise SetupError(f"training finished but saving wrote no weights to {saved_dir} (only: "
                         f"{', '.join(saved) or 'nothing'}, no tensors); the checkpoints in {work} are kept, and "
                         "rerunning the step saves again from the last one")


def train_and_save(trainer, output_dir):
    """Train (resuming from the last checkpoint of an interrupted run), then write the adapter to output_dir.

    output_dir appears only once complete, with the tokenizer, the resolved training config and the log history.
    With several processes (accelerate launch) the main one alone touches the files; all of them take part in
    saving the model (FSDP gathers its shards), and all wait until the adapter is in place.
    """
    check_disk(trainer, output_dir)
    fp32_trainable_under_fp16(trainer)
    work = Path(trainer.args.output_dir)
    main = trainer.is_world_process_zero()
    if main:
        last_complete_checkpoint(work)  # deletes a checkpoint cut short, before any process looks
    trainer.accelerator.wait_for_everyone()
    last = last_complete_checkpoint(work)
    if last and main:
        print(f"resuming from {last}")
    try:
        trainer.train(resume_from_checkpoint=last)
    except torch.cuda.OutOfMemoryError as e:
        raise out_of_memory(trainer.args) from e
    if getattr(trainer, "is_fsdp_enabled", False):
        # env/accelerate/fsdp.yaml's SHARDED_STATE_DICT suits checkpoints (each rank writes its shard); for a sharded
        # state dict Trainer.save_model writes no weights at all, and the adapter must be whole anyway.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    # Every process saves into the same staging directory; the main one alone owns it (clears it, renames it).
    with atomic_path(output_dir) if main else nullcontext(staging_path(output_dir)) as tmp:
        trainer.accelerator.wait_for_everyone()  # the main process has cleared the staging directory
        trainer.save_model(str(tmp))  # writes on the main process only
        if main:
            require_weights(tmp, work)
            # to_json_string masks hub tokens; nothing secret is written.
            (tmp / "training_config.json").write_text(trainer.args.to_json_string())
            (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
            write_curves(trainer.state.log_history, tmp)
    if main:
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


CURVES = ["loss", "rewards/margins", "rewards/accuracies", "learning_rate"]


def write_curves(log_history, out_dir):
    """The logged training curves as curves.csv (one row a logged step) and curves.png (one panel a metric)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in log_history if "loss" in h]
    columns = [c for c in CURVES if any(c in h for h in rows)]
    with open(out_dir / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *columns])
        writer.writerows([h["step"], *(h.get(c, "") for c in columns)] for h in rows)
    # A run shorter than logging_steps logs no loss: the figure then says so instead of failing after training.
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(4 * max(1, len(columns)), 3), squeeze=False)
    if not columns:
        axes[0][0].text(0.5, 0.5, "no step logged (fewer steps than logging_steps)", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, column in zip(axes[0], columns):
        ax.plot([h["step"] for h in rows if column in h], [float(h[column]) for h in rows if column in h], marker=".")
        ax.set_title(column)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png")
    plt.close(fig)
