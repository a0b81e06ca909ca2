"""The SFT and DPO steps' command line for TRL's parser: the --config YAML merged over the step's shared LoRA recipe
(env/lora.yaml), and the trainer's precision flags from the one dtype decision (common/precision.py): --bf16/--fp16,
and the dtype the weights load in (fp32 weights under bf16 autocast on a CPU)."""

import os
import sys
from pathlib import Path

import torch

from common.precision import dtype_name, resolve_dtype

RECIPE = Path(__file__).resolve().parents[3] / "env" / "lora.yaml"


def with_recipe(config, step, recipe=RECIPE):
    """A YAML file holding `recipe`'s section for `step` (the LoRA recipe and learning rates, env/lora.yaml) with
    the tier's YAML `config` over it; a temporary file, removed when the process ends. TrlParser takes one --config."""
    import atexit
    import tempfile

    import yaml

    merged = {**((yaml.safe_load(Path(recipe).read_text()) or {}).get(step) or {}),
              **(yaml.safe_load(Path(config).read_text()) or {})}
    fd, path = tempfile.mkstemp(prefix=f"{step}-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(f"# {recipe} ({step}) with {config} over it\n")
        yaml.safe_dump(merged, f, sort_keys=False)
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    return path


def training_flags(argv, step=None):
    """argv for TRL's parser with the trainer's precision set from the one dtype decision, and (`step` "sft" or
    "dpo") the --config YAML merged over that step's shared recipe (env/lora.yaml).

    The dtype comes from --dtype, else the --config YAML's `dtype`, else "auto". bf16 -> --bf16 true, fp16 -> --fp16
    true, fp32 -> neither (TRL turns bf16 on by default otherwise). The weights load in that dtype on a GPU; on a CPU
    they load in fp32 and bf16 runs as autocast. Flags are appended, so they override the YAML and earlier flags.
    """
    import argparse

    import yaml

    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dtype")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    name = known.dtype
    if name is None and known.config:
        name = (yaml.safe_load(Path(known.config).read_text()) or {}).get("dtype")
    if step and known.config:
        merged = with_recipe(known.config, step)
        argv = [merged if i and argv[i - 1] == "--config" else f"--config={merged}" if a.startswith("--config=")
                else a for i, a in enumerate(argv)]
    dtype = resolve_dtype(name)
    load = dtype if torch.cuda.is_available() else torch.float32
    return [*argv, "--dtype", dtype_name(load), "--bf16", str(dtype == torch.bfloat16).lower(),
            "--fp16", str(dtype == torch.float16).lower()]
