"""Merge a LoRA adapter into its base model and write a standalone model directory (safetensors).

    python steps/merge.py --model meta-llama/Llama-3.2-3B --adapter data/runs/llama-t4/dpo --out data/runs/llama-t4/merged

The base is loaded unquantized (in --dtype) even when the adapter was trained on a 4-bit base: merging into
4-bit weights would round the adapter away. Free disk space is checked before anything is loaded.
"""

import shutil
import sys
from pathlib import Path

from common import SetupError, run_step
from common.io.files import atomic_path, output_lock
from common.models import load_causal_lm, load_tokenizer, resolve
from common.options import step_parser
from common.precision import resolve_dtype


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--model", required=True, help="base model: Hub id, directory or embedded:smollm2")
    p.add_argument("--adapter", required=True, help="adapter directory (the SFT or DPO step's output)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the merged weights (float16 for T4s)")
    return p.parse_args(argv)


def needed_bytes(model_name, dtype):
    """Size of the merged weights: the parameter count from the config, times the dtype's width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve(model_name))
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return params * resolve_dtype(dtype).itemsize


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = needed_bytes(args.model, args.dtype), shutil.disk_usage(out.parent).free
    if need * 1.05 > free:  # 5% for the tokenizer, config and slack
        raise SetupError(f"{out.parent}: {free / 2**30:.1f} GiB free, the merged model needs {need / 2**30:.1f} "
                         "GiB; free some space or pass --out on a larger disk")
    with output_lock(out):  # before loading anything: a second run on the same output stops at once
        model = load_causal_lm(args.model, dtype=args.dtype, device_map="cpu", adapter=args.adapter)
        tokenizer = load_tokenizer(args.adapter)  # the chat template and pad token the adapter was trained with
        with atomic_path(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    print(f"wrote {out} ({need / 2**30:.2f} GiB)", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
