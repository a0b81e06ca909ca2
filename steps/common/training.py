"""Training plumbing shared by the SFT and DPO steps: resumable checkpoints and an atomic final adapter."""

import json
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from .jsonl import atomic_path


def checkpoint_dir(output_dir):
    """Where the trainer keeps its checkpoints until the adapter is finished: OUTPUT.partial."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".partial")


def train_and_save(trainer, output_dir):
    """Train (resuming from the last checkpoint of an interrupted run), then write the adapter to output_dir.

    output_dir appears only once complete, with the tokenizer, the resolved training config and the log history.
    """
    work = Path(trainer.args.output_dir)
    last = get_last_checkpoint(work) if work.is_dir() else None
    if last:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    with atomic_path(output_dir) as tmp:
        trainer.save_model(str(tmp))
        # to_json_string masks hub tokens; nothing secret is written.
        (tmp / "training_config.json").write_text(trainer.args.to_json_string())
        (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    shutil.rmtree(work, ignore_errors=True)
