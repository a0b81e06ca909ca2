"""Training plumbing shared by the SFT and DPO steps: resumable checkpoints and an atomic final adapter.

Library internals (accelerate 1.15): `accelerate.utils.other.compile_regions_deepspeed`, which compiles each
repeated block in place (its name says DeepSpeed; it works on any model).
"""

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from common import DataError, SetupError
from common.io.files import atomic_path, staging_path
from common.models import local_base_for_saving, portable_base
from common.reporting.cards import model_card

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
    wrap the model a second time (`run_config` records it as compiled all the same). Compiled here rather than by
    the trainer through accelerate, the DPO step ran ~1.25x faster and SFT the same (bench/README.md), and
    work done before training, such as DPO's precompute_ref_log_probs pass, runs compiled too. Returns how the model
    is compiled (None: not).
    """
    if not args.torch_compile:
        return None
    if sharded(args):
        # FSDP and DeepSpeed wrap the layers themselves, so accelerate compiles them, after wrapping; regionally, which
        # compiles each layer in place. Its default, torch.compile of the whole model, hides the PeftModel behind an
        # OptimizedModule: under FSDP, TRL's DPO then no longer sees a PEFT model, has no reference and failed at
        # its first step (bench/README.md, "Multi-process launch"). `accelerate launch` exports this variable as
        # False unless its config says otherwise; the trainer's compile plugin reads it when the trainer is built.
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "true"
        return "each decoder layer, by accelerate after sharding (regional compilation)"
    from accelerate.utils.other import compile_regions_deepspeed as compile_regions_in_place  # not DeepSpeed-only

    compile_regions_in_place(model)
    # The trainer builds its compile plugin from the backend, which TrainingArguments filled in: clear both.
    backend = args.torch_compile_backend
    args.torch_compile, args.torch_compile_backend = False, None
    return f"each decoder layer in place, before the trainer ({backend})"


def held_out(records, test_fraction, args):
    """(train, test): the records held out by id (common/io/splits.py; a record without an id by its prompt), kept out
    of training and evaluated on. With none held out, the trainer evaluates nothing (saying so)."""
    from common.io.splits import split_of

    def key(r):
        return r["id"] if "id" in r else json.dumps(r.get("prompt", r.get("instruction")), sort_keys=True)

    train, test = [], []
    for r in records:
        (test if test_fraction and split_of(key(r), test_fraction) == "test" else train).append(r)
    if not test and args.eval_strategy != "no":
        print(f"no record of {len(records)} falls in the held-out split (test fraction {test_fraction}): "
              "no evaluation during training", flush=True)
        args.eval_strategy = "no"
    return train, test


def drop_too_long(dataset, lengths, max_length, what):
    """(the rows of `dataset` whose length is at most max_length, the indices of those rows). Trainers cut a longer
    row at max_length and train the cut text as if complete: an answer without its end of turn, which teaches the
    model not to stop (what the filter's truncation rule exists to prevent). So such a row is dropped here, counted
    and said, never trained cut."""
    keep = [i for i, n in enumerate(lengths) if max_length is None or n <= max_length]
    if len(keep) == len(lengths):
        return dataset, keep
    print(f"dropped {len(lengths) - len(keep)} of {len(lengths)} {what} longer than max_length {max_length} tokens "
          "(a trainer would cut them and train the cut answer as finished); --max_length keeps them, memory "
          "permitting", flush=True)
    return dataset.select(keep), keep


def drop_too_long_splits(rows, lengths, args, source, what):
    """drop_too_long on the training and held-out rows ({"train": dataset, "eval": dataset or None}, lengths alike):
    ({split: rows kept}, {split: their indices}). No training row left is an error naming `source`; no held-out row
    left turns evaluation off (eval rows None)."""
    kept, keep = {}, {}
    for split in ("train", "eval"):
        if rows[split] is None:
            kept[split], keep[split] = None, []
            continue
        kept[split], keep[split] = drop_too_long(rows[split], lengths[split], args.max_length,
                                                 f"{'training' if split == 'train' else 'held-out'} {what}")
    if not keep["train"]:
        raise DataError(f"{source}: every training {what[:-1]} is longer than max_length {args.max_length} tokens; "
                        "raise --max_length")
    if not keep["eval"]:
        if rows["eval"] is not None and args.eval_strategy != "no":
            print(f"every held-out {what[:-1]} is longer than max_length: no evaluation during training", flush=True)
            args.eval_strategy = "no"
        kept["eval"] = None
    return kept, keep


def evaluate_after_last_step(trainer):
    """Evaluate on the held-out split after the last step too, not only every eval_steps: the curves then end
    with the adapter that is saved."""
    from transformers import TrainerCallback

    class EvaluateLast(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.eval_strategy != "no" and state.global_step >= state.max_steps:
                control.should_evaluate = True

    if trainer.eval_dataset is not None:
        trainer.add_callback(EvaluateLast())


def run_config(trainer):
    """training_config.json: the trainer's resolved arguments, corrected where the step changed them (the layers it
    compiled itself while the trainer's own compile was turned off), with what else ran (`run_facts`: the attention
    kernel, the held-out split's size)."""
    config = json.loads(trainer.args.to_json_string())
    facts = dict(getattr(trainer, "run_facts", {}))
    if facts.get("compiled"):
        config["torch_compile"] = True
        config["torch_compile_backend"] = config.get("torch_compile_backend") or "inductor"
    return json.dumps({**config, **facts}, indent=2, sort_keys=True)


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


def example_counts(trainer):
    """(training rows, held-out test rows) the trainer had, for the model card."""
    return tuple(len(d) if d is not None and not isinstance(d, dict) and hasattr(d, "__len__") else None
                 for d in (trainer.train_dataset, trainer.eval_dataset))


def warmup_scale(step, *, schedule, warmup):
    """A warmup that starts above zero: step k of `warmup` gets (k + 1) / (warmup + 1) of the learning rate, then
    the schedule's own factor. transformers' schedules give step 0 a factor of 0, so the first optimizer step of every
    run changes nothing, and a ratio rounds up to a whole step (0.1 of a 5-step run: 1 of 5 steps wasted)."""
    return (step + 1) / (warmup + 1) if step < warmup else schedule(step)


def warmup_from_the_first_step(trainer):
    """Have the trainer's scheduler use warmup_scale: it wraps the factors of the schedule transformers makes
    (`lr_scheduler_type`), whatever its decay."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    make = trainer.create_scheduler

    def create_scheduler(num_training_steps, optimizer=None):
        if trainer.lr_scheduler is None:
            made = make(num_training_steps, optimizer)
            warmup = trainer.args.get_warmup_steps(num_training_steps)
            if warmup and isinstance(made, LambdaLR):
                # The first scheduler left each group's initial_lr in place: the new one starts from the same rates.
                trainer.lr_scheduler = LambdaLR(made.optimizer, [partial(warmup_scale, schedule=f, warmup=warmup)
                                                                 for f in made.lr_lambdas])
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def train_and_save(trainer, output_dir):
    """Train (resuming from the last checkpoint of an interrupted run), then write the adapter to output_dir.

    output_dir appears only once complete, with the tokenizer, the resolved training config and the log history.
    With several processes (accelerate launch) the main one alone touches the files; all of them take part in
    saving the model (FSDP gathers its shards), and all wait until the adapter is in place.
    """
    check_disk(trainer, output_dir)
    fp32_trainable_under_fp16(trainer)
    evaluate_after_last_step(trainer)
    warmup_from_the_first_step(trainer)
    work = Path(trainer.args.output_dir)
    main = trainer.is_world_process_zero()
    if main:
        last_complete_checkpoint(work)  # deletes a checkpoint cut short, before any process looks
    trainer.accelerator.wait_for_everyone()
    last = last_complete_checkpoint(work)
    if last and main:
        print(f"resuming from {last}")
    local_base_for_saving(trainer.model)  # checkpoints and the adapter are saved without a Hub lookup
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
            (tmp / "training_config.json").write_text(run_config(trainer))
            (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
            write_curves(trainer.state.log_history, tmp)
            portable_base(tmp)  # a Hub id, not this machine's directory: the pushed adapter loads anywhere
            # A model card in place of PEFT's template; `make push` adds the eval table, which comes later.
            (tmp / "README.md").write_text(model_card(tmp, *example_counts(trainer)))
    if main:
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


CURVES = ["loss", "rewards/margins", "rewards/accuracies", "learning_rate"]
EVAL_CURVES = ["eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"]  # on the held-out split


def write_curves(log_history, out_dir):
    """The logged curves as curves.csv (one row a logged step: the training metrics, and the held-out split's eval_*
    where it was evaluated at that step) and curves.png (one panel a training metric, its eval_* beside it)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {}
    for h in log_history:
        if "loss" in h or any(c in h for c in EVAL_CURVES):
            by_step.setdefault(h["step"], {"step": h["step"]}).update(
                {c: h[c] for c in CURVES + EVAL_CURVES if c in h})
    rows = [by_step[step] for step in sorted(by_step)]
    columns = [c for c in CURVES if any(c in h for h in rows)]
    evals = [c for c in EVAL_CURVES if any(c in h for h in rows)]
    with open(out_dir / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *columns, *evals])
        writer.writerows([h["step"], *(h.get(c, "") for c in columns + evals)] for h in rows)
    panels = columns + [c for c in evals if c.removeprefix("eval_") not in columns]
    # A run shorter than logging_steps logs no loss: the figure then says so instead of failing after training.
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no step logged (fewer steps than logging_steps)", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, column in zip(axes[0], panels):
        for name, label, marker in ((column, "train", "."), (f"eval_{column}", "eval (held out)", "o")):
            points = [(h["step"], float(h[name])) for h in rows if name in h]
            if points:
                ax.plot(*zip(*points), marker=marker, label=label)
        if any(f"eval_{column}" in h for h in rows):
            ax.legend()
        ax.set_title(column)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png")
    plt.close(fig)
