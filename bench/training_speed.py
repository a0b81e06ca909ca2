"""GPU benchmark of the SFT and DPO steps (issue 5): T4 fit under a memory cap, and H100 speed (tokens/s, MFU).

No weights reach the GPU machine, so each model is built randomly initialised from its real config
(bench/configs/<name>.json) and saved with a tokenizer; synthetic JSONL data of set token lengths is written; then
OUR steps run (steps/sft.py, steps/dpo.py, through their CLI with a tier YAML via --config, plus --max_steps), each
in its own process. A small bootstrap in that process caps GPU memory (torch.cuda.set_per_process_memory_fraction,
for the T4 fit) and adds a callback that times every optimizer step (CUDA-synchronised) and counts the tokens each
step trained on; nothing in the steps is changed for the benchmark.

    python bench/training_speed.py --suite core --out OUT   # T4 fit of Llama-3B and Mistral-7B, SFT/DPO speed, packing
    python bench/training_speed.py --suite final --out OUT  # realistic lengths and packing, 7B on the H100 tier
    python bench/training_speed.py --suite speed --dry-run  # print a suite's runs without running them

Writes OUT/train-<gpu>.json (every run: settings, peak memory, tokens/s, MFU, losses, errors) and prints a table.
Tokens are the non-padding tokens of each batch (DPO: prompt+chosen and prompt+rejected rows). MFU is on the 6N
basis (6 x parameters x tokens/s, the issue's definition) over the H100's 989 TFLOP/s dense bf16; for DPO the
reference forward adds 2N per token, so `mfu_8n` is given too.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from common import installed_versions
from provenance import provenance

REPO = Path(__file__).resolve().parents[1]

BENCH_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger_kernel",
                  "triton", "pyarrow")
CONFIGS = REPO / "bench" / "configs"
PEAK_BF16_DENSE = 989e12  # H100/H200 SXM dense bf16 (the MFU basis)
BUILD_ESTIMATE_S = 40
MIN_VOCAB = 32000  # the smallest vocabulary among bench/configs: every token id must be below it
# SmolLM2's template adds this default system prompt, whose "SmolLM" is token 34519: past Mistral's vocabulary.
DEFAULT_SYSTEM_PROMPT_CUT = " named SmolLM, trained by Hugging Face"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Runs inside each step's process: optional memory cap, then a timing callback, then the step as __main__.
BOOT = r"""
import atexit, json, os, runpy, sys, time
script, result_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import torch
cap = os.environ.get("BENCH_MEM_CAP_GIB")
if cap:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(float(cap) * 2**30 / total, 0)
import transformers
S = {"status": "started", "step_end": [], "step_tokens": [], "step_padded": [], "tok": 0, "pad": 0, "mem_cap_gib": cap}
def _mem():
    free, total = torch.cuda.mem_get_info()
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "device_used_now_gib": (total - free) / 2**30, "reserved_now_gib": torch.cuda.memory_reserved() / 2**30}
def _write():
    S.update(_mem())
    with open(result_path, "w") as f:
        json.dump(S, f)
atexit.register(_write)
class Timing(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        torch.cuda.synchronize()
        S["t_begin"] = time.perf_counter()
        S["mem_before_train"] = _mem()
        S["tok"] = S["pad"] = 0
        try:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            layer = base.model.layers[0]
            down = getattr(layer.mlp.down_proj, "base_layer", layer.mlp.down_proj)
            S["model"] = {"class": type(base).__name__, "attn": base.config._attn_implementation,
                          "mlp": layer.mlp._get_name(), "norm": layer.input_layernorm._get_name(),
                          "base_weight": f"{type(down).__name__}/{down.weight.dtype}",
                          "adapters": sorted(getattr(model, "peft_config", {})),
                          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}
        except Exception as e:
            S["model"] = {"error": repr(e)}
        keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "fp16",
                "bf16", "optim", "max_length", "use_liger_kernel", "padding_free", "packing", "packing_strategy",
                "max_steps", "learning_rate", "beta", "train_sampling_strategy", "eval_strategy")
        S["args"] = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        S["step_end"].append(time.perf_counter())
        S["step_tokens"].append(S["tok"])
        S["step_padded"].append(S["pad"])
        S["tok"] = S["pad"] = 0
    def on_train_end(self, args, state, control, **kw):
        S["status"] = "trained"
        S["log_history"] = state.log_history
        S["mem_after_train"] = _mem()
_init = transformers.Trainer.__init__
def __init__(self, *a, **k):
    _init(self, *a, **k)
    self.add_callback(Timing())
transformers.Trainer.__init__ = __init__
_training_step = transformers.Trainer.training_step
def training_step(self, model, inputs, *a, **k):
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if "pair_tokens" in inputs:  # packed DPO pairs: the tokens of TRL's two rows a pair; "pad" = the row computed
        S["tok"] += int(inputs["pair_tokens"])
    else:
        S["tok"] += int(mask.sum()) if mask is not None else int(ids.numel())
    S["pad"] += int(ids.numel())
    return _training_step(self, model, inputs, *a, **k)
transformers.Trainer.training_step = training_step
try:  # DPO with precompute_ref_log_probs: the reference pass runs once, before training; time it and count its tokens
    from trl.trainer import dpo_trainer as _dpo
    _pre, _ref = _dpo.DPOTrainer._precompute_ref_logps, _dpo.DPOTrainer.compute_ref_log_probs
    def _precompute_ref_logps(self, *a, **k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = _pre(self, *a, **k)
        torch.cuda.synchronize()
        S["precompute_s"] = S.get("precompute_s", 0) + time.perf_counter() - t
        return out
    def compute_ref_log_probs(self, model, inputs):
        S["precompute_tokens"] = S.get("precompute_tokens", 0) + int(inputs["attention_mask"].sum())
        return _ref(self, model, inputs)
    _dpo.DPOTrainer._precompute_ref_logps = _precompute_ref_logps
    _dpo.DPOTrainer.compute_ref_log_probs = compute_ref_log_probs
except (ImportError, AttributeError):
    pass
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
S["status"] = "done"
"""


@dataclass
class Run:
    name: str
    step: str  # sft | dpo
    model: str  # a config in bench/configs
    config: str  # tier YAML
    data: str  # key of DATASETS
    flags: list = field(default_factory=list)
    cap_gib: float | None = None
    max_steps: int = 10
    warmup: int = 3  # optimizer steps left out of the timing
    adapter_from: str | None = None  # DPO: the SFT run whose adapter it continues
    group: str = ""
    note: str = ""
    estimate_s: int = 60
    timeout_s: int = 300


# name: (kind, number of records, prompt words (lo, hi), completion words (lo, hi)). Words are single tokens of the
# SmolLM2 tokenizer, so lengths are in tokens (plus ~30 of chat template); "fixed" overshoots max_length (1024) so
# every sequence is truncated to exactly 1024 tokens: the worst case the tier YAMLs must fit.
DATASETS = {
    "sft_fixed": ("sft", 256, (200, 200), (900, 900)),
    "sft_var": ("sft", 768, (16, 128), (32, 512)),  # the tiers' real limits: instruction <=128, response <=512
    "dpo_fixed": ("dpo", 256, (128, 128), (950, 950)),
    "dpo_var": ("dpo", 384, (16, 128), (32, 512)),
    # The longest rows the tiers keep (max_length 1,024: longer ones are dropped, not cut): what memory must fit.
    "sft_fit": ("sft", 256, (120, 120), (860, 860)),
    "dpo_fit": ("dpo", 256, (100, 100), (860, 860)),
}

SPEED_BASELINE = ["--per_device_train_batch_size", "12", "--gradient_accumulation_steps", "1",
                  "--gradient_checkpointing", "true", "--use_liger_kernel", "false", "--packing", "false",
                  "--padding_free", "false", "--attn_implementation", "sdpa", "--torch_compile", "false"]


# The speed runs as measured (bench/README.md): 8 x 1024 a micro-batch, 2 accumulation steps, no packing.
NOPACK = ["--packing", "false", "--gradient_accumulation_steps", "2"]


def runs_for(suite):
    t4 = [
        Run("t4-llama3b-sft", "sft", "llama-3.2-3b", "env/t4/sft.yaml", "sft_fixed", ["--logging_steps", "1"],
            cap_gib=15, max_steps=2, group="t4", estimate_s=70, timeout_s=300),
        Run("t4-llama3b-dpo", "dpo", "llama-3.2-3b", "env/t4/dpo.yaml", "dpo_fixed", ["--logging_steps", "1"],
            cap_gib=15, max_steps=2, adapter_from="t4-llama3b-sft", group="t4", estimate_s=80, timeout_s=300),
        Run("t4-mistral7b-sft", "sft", "mistral-7b-v0.1", "env/t4/sft-7b.yaml", "sft_fixed", ["--logging_steps", "1"],
            cap_gib=15, max_steps=2, group="t4", estimate_s=100, timeout_s=360),
        Run("t4-mistral7b-dpo", "dpo", "mistral-7b-v0.1", "env/t4/dpo-7b.yaml", "dpo_fixed", ["--logging_steps", "1"],
            cap_gib=15, max_steps=2, adapter_from="t4-mistral7b-sft", group="t4", estimate_s=110, timeout_s=360),
    ]
    # Padding-free packing on realistic lengths (only where the attention kernel keeps packed sequences apart:
    # see --packcheck); each against the same settings without packing, on the same machine.
    pack = [
        Run("var-baseline", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var", SPEED_BASELINE,
            group="packing", note="issue baseline settings on realistic lengths", estimate_s=40),
        Run("pack-none", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var", NOPACK,
            group="packing", estimate_s=50),
        Run("pack-bfd-sdpa", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var",
            ["--packing", "true", "--packing_strategy", "bfd", "--attn_implementation", "sdpa",
             "--gradient_accumulation_steps", "2"],
            group="packing", estimate_s=50),
        Run("pack-bfd-flex", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var",
            ["--packing", "true", "--packing_strategy", "bfd", "--attn_implementation", "flex_attention",
             "--gradient_accumulation_steps", "2"],
            group="packing", warmup=4, estimate_s=110, timeout_s=360),
    ]
    h100_7b = [
        Run("h100-mistral7b-sft", "sft", "mistral-7b-v0.1", "env/h100/sft-7b.yaml", "sft_fixed", [],
            max_steps=4, warmup=2, group="h100-7b", estimate_s=90),
        Run("h100-mistral7b-dpo", "dpo", "mistral-7b-v0.1", "env/h100/dpo-7b.yaml", "dpo_fixed", [],
            max_steps=4, warmup=2, adapter_from="t4-mistral7b-sft", group="h100-7b", estimate_s=100),
    ]
    qwen = [
        Run("t4-qwen3b-sft", "sft", "qwen2.5-3b", "env/t4/sft.yaml", "sft_fixed", ["--logging_steps", "1"],
            cap_gib=15, max_steps=2, group="t4", estimate_s=70),
        Run("t4-qwen3b-dpo", "dpo", "qwen2.5-3b", "env/t4/dpo.yaml", "dpo_fixed", ["--logging_steps", "1"],
            cap_gib=15, max_steps=2, adapter_from="t4-qwen3b-sft", group="t4", estimate_s=80),
    ]
    speed_sft = [
        Run("sft-baseline", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed", SPEED_BASELINE,
            group="speed-sft", note="issue baseline: PEFT LoRA, bf16, SDPA, grad ckpt, no packing, 12 x 1024",
            estimate_s=60),
        Run("sft-tier", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed", NOPACK, warmup=4, group="speed-sft",
            note="env/h100/sft.yaml without packing (full-length rows: one sample a bin)", estimate_s=80),
        Run("sft-liger-ckpt", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed",
            SPEED_BASELINE + ["--use_liger_kernel", "true"], group="speed-sft", note="baseline + Liger",
            estimate_s=55),
        Run("sft-noliger-nockpt", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed",
            NOPACK + ["--use_liger_kernel", "false"], group="speed-sft", note="sft-tier without Liger",
            estimate_s=50),
    ]
    dpo_base = ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
                "--gradient_checkpointing", "true", "--use_liger_kernel", "false", "--torch_compile", "false",
                "--precompute_ref_log_probs", "false", "--train_sampling_strategy", "random"]
    speed_dpo = [
        Run("dpo-baseline", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_fixed", dpo_base, max_steps=6, warmup=2,
            adapter_from="sft-baseline", group="speed-dpo", note="the seed's h100 DPO: 16 pairs, grad ckpt",
            estimate_s=80),
        Run("dpo-liger-ckpt", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_fixed",
            dpo_base + ["--use_liger_kernel", "true"], max_steps=6, warmup=2, adapter_from="sft-baseline",
            group="speed-dpo", estimate_s=75),
        Run("dpo-tier", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_fixed", [], max_steps=6, warmup=2,
            adapter_from="sft-baseline", group="speed-dpo", note="env/h100/dpo.yaml as it stands", estimate_s=70),
    ]
    a100_flags = ["--use_liger_kernel", "true", "--gradient_checkpointing", "false"]
    a100 = [  # Liger and no gradient checkpointing on an A100 40GB (39 GiB cap), worst-case lengths, 3B model
        Run("a100-llama3b-sft", "sft", "llama-3.2-3b", "env/a100/sft.yaml", "sft_fixed",
            a100_flags + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3"], cap_gib=39,
            max_steps=4, warmup=2, group="a100-fit", estimate_s=50),
        Run("a100-llama3b-dpo", "dpo", "llama-3.2-3b", "env/a100/dpo.yaml", "dpo_fixed",
            a100_flags + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8"], cap_gib=39,
            max_steps=3, warmup=1, adapter_from="sft-baseline", group="a100-fit", estimate_s=60),
    ]
    # Round 2 on (issue 5's 2x goal; bench/README.md): torch.compile of each decoder layer, LoRA dropout off, bigger
    # micro-batches, precomputed reference log-probs. Until round 3 the steps let accelerate compile the layers (the
    # "rcompile" runs); since then they compile them in place, and a rerun measures that. Each suite runs its own
    # baselines. Runs are flags over the tier YAMLs as they stand now; each committed JSON records what ran then.
    fast = ["--torch_compile", "true", "--use_liger_kernel", "false"]
    speed2 = [
        Run("sft-tier-rcompile", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed",
            NOPACK + ["--torch_compile", "true", "--use_liger_kernel", "true"], warmup=4, group="speed-sft",
            note="tier + compile, with Liger", estimate_s=110),
        Run("sft-tier-d0", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed", NOPACK + ["--lora_dropout", "0"],
            group="speed-sft", note="tier, LoRA dropout 0 (no dropout copies of each LoRA input)", estimate_s=50),
        Run("sft-tier-rcompile-noliger", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed", NOPACK + fast,
            warmup=4, group="speed-sft", note="compile without Liger (Inductor fuses the norms and SwiGLU)",
            estimate_s=110),
        Run("sft-tier-b12", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed",
            ["--packing", "false", "--per_device_train_batch_size", "12", "--gradient_accumulation_steps", "1"],
            group="speed-sft", note="tier, one micro-batch of 12 x 1024", estimate_s=55),
    ]
    dpo_adapter = Run("dpo-adapter", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var",
                      ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                       "--torch_compile", "false"], max_steps=1, group="speed-dpo",
                      note="a 1-step SFT adapter for the DPO runs to continue", estimate_s=40)
    from transformers import TrainingArguments  # the flag's name changed within transformers 5

    grouped = (["--train_sampling_strategy", "group_by_length"]
               if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__ else ["--group_by_length", "true"])
    t4_ref_check = Run("t4-llama3b-dpo-ref", "dpo", "llama-3.2-3b", "env/t4/dpo.yaml", "dpo_fixed",
                       ["--logging_steps", "1"], cap_gib=15, max_steps=2, adapter_from="dpo-adapter", group="t4",
                       note="4-bit base: first-step reward margin must be 0 (policy == reference)", estimate_s=80)
    # Realistic lengths over 30 steps: is compiling worth its recompiles (shapes vary from batch to batch)?
    speed3_var = [
        Run("var30-pack-liger", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var",
            ["--packing", "true", "--packing_strategy", "bfd", "--gradient_accumulation_steps", "2",
             "--use_liger_kernel", "true", "--torch_compile", "false"], max_steps=30, warmup=5,
            group="packing", note="the old tier: BFD packing, Liger, no compile", estimate_s=100),
        Run("var30-grouped-compile", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var", fast + grouped
            + ["--packing", "false", "--gradient_accumulation_steps", "2"], max_steps=30, warmup=5, group="packing",
            note="no packing, length-grouped batches, compile, no Liger", estimate_s=150),
        Run("var30-pack-compile", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var",
            fast + ["--packing", "true", "--packing_strategy", "bfd", "--gradient_accumulation_steps", "2"],
            max_steps=30, warmup=5, group="packing", note="BFD packing, compile, no Liger", estimate_s=160),
    ]
    # The reference log-probs computed once in a no-grad pass over the dataset (precompute_ref_log_probs) instead of
    # a reference forward in every step; tokens_per_s includes that pass (see summarise).
    pre = ["--precompute_ref_log_probs", "true", "--precompute_ref_batch_size", "16"]
    b4 = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"]
    b8 = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]
    dpo_precompute = [
        Run("dpo-rcompile-noliger", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_fixed", fast + b4, max_steps=6,
            warmup=2, adapter_from="dpo-adapter", group="speed-dpo", note="compile, no Liger, 4 pairs x 4",
            estimate_s=110),
        Run("dpo-pre-rcompile-noliger", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_fixed", fast + b4 + pre,
            max_steps=6, warmup=2, adapter_from="dpo-adapter", group="speed-dpo",
            note="as above, reference log-probs precomputed", estimate_s=120),
        Run("dpo-pre-rcompile-noliger-b8", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_fixed", fast + b8 + pre,
            max_steps=6, warmup=2, adapter_from="dpo-adapter", group="speed-dpo",
            note="as above, 8 pairs a micro-batch", estimate_s=120),
    ]
    dpo_var = [
        Run("dpo-var-baseline", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var", dpo_base, max_steps=12,
            warmup=2, adapter_from="dpo-adapter", group="speed-dpo-var", note="baseline, realistic lengths",
            estimate_s=70),
        Run("dpo-var-tier", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var", [], max_steps=12, warmup=2,
            adapter_from="dpo-adapter", group="speed-dpo-var", note="tier, realistic lengths (shapes vary)",
            estimate_s=120),
    ]
    packcheck = [Run("packcheck", "check", "", "", "", group="packing", estimate_s=90)]
    # Issue 17, training at real lengths: the chain's lengths (sft_var, dpo_var) through the baseline, today's tier
    # (h100 YAMLs before this change: SDPA with a block-diagonal mask, unsorted DPO batches) and the new path (the
    # YAMLs as they stand: varlen Flash attention on packed SFT rows, length-grouped DPO), fixed 1024-token rows for
    # reference, and the t4 settings under the 15 GiB cap. No evaluation during these runs (its compile and passes
    # are not training).
    quiet = ["--eval_strategy", "no", "--test_fraction", "0"]
    real = [
        Run("sft-var-baseline", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var", SPEED_BASELINE + quiet,
            max_steps=8, warmup=2, group="real-sft", note="issue baseline (plain PEFT, grad ckpt, SDPA, 12 padded "
            "rows) on the chain's lengths", estimate_s=60),
        Run("sft-var-varlen", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var", quiet, max_steps=20, warmup=8,
            group="real-sft", note="new h100/sft.yaml: BFD packing + varlen Flash attention + compile",
            estimate_s=110, timeout_s=360),
        Run("sft-var-today", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_var",
            ["--attn_implementation", "sdpa"] + quiet, max_steps=14, warmup=6, group="real-sft",
            note="today's h100/sft.yaml: BFD packing, SDPA with a block-diagonal mask, compile", estimate_s=120,
            timeout_s=360),
        Run("sft-fixed-varlen", "sft", "llama-3.2-3b", "env/h100/sft.yaml", "sft_fixed", NOPACK + quiet,
            max_steps=7, warmup=3, group="real-sft", note="reference: 1024-token rows, 8 x 2, new tier without "
            "packing (nothing to pack)", estimate_s=70),
        replace(dpo_adapter, flags=dpo_adapter.flags + quiet, group="real-dpo"),
        Run("dpo-var-baseline", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var", dpo_base + quiet,
            max_steps=12, warmup=3, adapter_from="dpo-adapter", group="real-dpo",
            note="baseline (grad ckpt, 16 pairs, no compile) on the chain's lengths", estimate_s=70),
        # compile, then one recompile when the second shape marks the lengths dynamic (step 5 in an earlier run):
        # both fall in the warm-up
        Run("dpo-var-grouped", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var", quiet, max_steps=20,
            warmup=8, adapter_from="dpo-adapter", group="real-dpo",
            note="new h100/dpo.yaml: length-grouped micro-batches + compile", estimate_s=120, timeout_s=360),
        Run("dpo-var-today", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var",
            ["--train_sampling_strategy", "random"] + quiet, max_steps=20, warmup=8, adapter_from="dpo-adapter",
            group="real-dpo", note="today's h100/dpo.yaml: random micro-batches, compile", estimate_s=120,
            timeout_s=360),
        Run("t4-sft-var", "sft", "llama-3.2-3b", "env/t4/sft.yaml", "sft_var",
            ["--logging_steps", "1", "--dtype", "float16"] + quiet,
            cap_gib=15, max_steps=3, warmup=1, group="real-t4", note="t4/sft.yaml (4-bit, fp16, 4 x 4, grad ckpt), "
            "15 GiB cap", estimate_s=80),
        Run("t4-dpo-var", "dpo", "llama-3.2-3b", "env/t4/dpo.yaml", "dpo_var",
            ["--logging_steps", "1", "--dtype", "float16"] + quiet,
            cap_gib=15, max_steps=3, warmup=1, adapter_from="dpo-adapter", group="real-t4",
            note="t4/dpo.yaml (4-bit, fp16, 2 x 8 pairs, grad ckpt), 15 GiB cap", estimate_s=90),
    ]
    # Issue 40: the t4 and a100 tiers on padding-free rows and packed DPO pairs, the h100 tier's packed DPO; each new
    # recipe against the one it replaces (the same YAML with the old settings as flags), on the chain's lengths, and
    # the new ones on the longest rows kept (the fit). a100: a 39 GiB cap on an H100 (scaled to an A100 by `make plan`).
    old_t4_sft = ["--padding_free", "false", "--attn_implementation", "sdpa", "--per_device_train_batch_size", "4",
                  "--gradient_accumulation_steps", "4"]
    old_t4_dpo = ["--pack_pairs", "false", "--attn_implementation", "sdpa", "--per_device_train_batch_size", "2",
                  "--gradient_accumulation_steps", "8"]
    old_h100_dpo = ["--pack_pairs", "false", "--attn_implementation", "sdpa", "--train_sampling_strategy",
                    "group_by_length"]
    fp16 = ["--logging_steps", "1", "--dtype", "float16"] + quiet
    curve = ["--logging_steps", "1", "--torch_compile", "false"] + quiet
    tiers = [
        replace(dpo_adapter, flags=dpo_adapter.flags + quiet, group="tiers"),
        Run("h100-dpo-var-packed", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var", quiet, max_steps=20,
            warmup=8, adapter_from="dpo-adapter", group="tiers-h100", note="h100/dpo.yaml: packed pairs, compile",
            estimate_s=120, timeout_s=300),
        Run("t4-sft-var-old", "sft", "llama-3.2-3b", "env/t4/sft.yaml", "sft_var", old_t4_sft + fp16, cap_gib=15,
            max_steps=4, warmup=1, group="tiers-t4", note="the old t4/sft.yaml: 4 padded rows x 4, SDPA",
            estimate_s=70),
        Run("t4-sft-var-new", "sft", "llama-3.2-3b", "env/t4/sft.yaml", "sft_var", fp16, cap_gib=15, max_steps=4,
            warmup=1, group="tiers-t4", note="t4/sft.yaml: 8 padding-free rows x 2, SDPA per sequence",
            estimate_s=60),
        Run("t4-dpo-var-old", "dpo", "llama-3.2-3b", "env/t4/dpo.yaml", "dpo_var", old_t4_dpo + fp16, cap_gib=15,
            max_steps=4, warmup=1, adapter_from="dpo-adapter", group="tiers-t4",
            note="the old t4/dpo.yaml: 2 pairs (4 padded rows) x 8", estimate_s=80),
        Run("t4-dpo-var-new", "dpo", "llama-3.2-3b", "env/t4/dpo.yaml", "dpo_var", fp16, cap_gib=15, max_steps=4,
            warmup=1, adapter_from="dpo-adapter", group="tiers-t4", note="t4/dpo.yaml: 4 packed pairs x 4",
            estimate_s=70),
        Run("a100-sft-fit", "sft", "llama-3.2-3b", "env/a100/sft.yaml", "sft_fit", quiet, cap_gib=39, max_steps=4,
            warmup=2, group="tiers-a100", note="a100/sft.yaml on the longest rows kept, 39 GiB cap", estimate_s=90),
        Run("a100-sft-var", "sft", "llama-3.2-3b", "env/a100/sft.yaml", "sft_var", quiet, cap_gib=39, max_steps=16,
            warmup=6, group="tiers-a100", note="a100/sft.yaml on the chain's lengths", estimate_s=100),
        Run("a100-dpo-fit", "dpo", "llama-3.2-3b", "env/a100/dpo.yaml", "dpo_fit", quiet, cap_gib=39, max_steps=3,
            warmup=1, adapter_from="dpo-adapter", group="tiers-a100", estimate_s=100),
        Run("a100-dpo-var", "dpo", "llama-3.2-3b", "env/a100/dpo.yaml", "dpo_var", quiet, cap_gib=39, max_steps=16,
            warmup=6, adapter_from="dpo-adapter", group="tiers-a100", estimate_s=110),
        Run("t4-llama-sft-fit", "sft", "llama-3.2-3b", "env/t4/sft.yaml", "sft_fit", fp16, cap_gib=15, max_steps=2,
            warmup=1, group="tiers-t4-fit", estimate_s=70),
        Run("t4-llama-dpo-fit", "dpo", "llama-3.2-3b", "env/t4/dpo.yaml", "dpo_fit", fp16, cap_gib=15, max_steps=2,
            warmup=1, adapter_from="dpo-adapter", group="tiers-t4-fit", estimate_s=80),
        Run("t4-mistral-sft-fit", "sft", "mistral-7b-v0.1", "env/t4/sft-7b.yaml", "sft_fit", fp16, cap_gib=15,
            max_steps=2, warmup=1, group="tiers-t4-fit", estimate_s=100),
        Run("t4-mistral-dpo-fit", "dpo", "mistral-7b-v0.1", "env/t4/dpo-7b.yaml", "dpo_fit", fp16, cap_gib=15,
            max_steps=2, warmup=1, adapter_from="t4-mistral-sft-fit", group="tiers-t4-fit", estimate_s=110),
        # Same training: 50 steps of the old and the new recipe, same data and seed, bf16, no compile; the losses
        # (logging_steps 1) should agree within their noise.
        Run("curve-sft-padded", "sft", "llama-3.2-3b", "env/a100/sft.yaml", "sft_var", curve + ["--padding_free",
            "false", "--attn_implementation", "sdpa"], max_steps=50, warmup=5, group="tiers-curve",
            note="a100/sft.yaml's batches as padded rows, SDPA", estimate_s=60),
        Run("curve-sft-free", "sft", "llama-3.2-3b", "env/a100/sft.yaml", "sft_var", curve, max_steps=50, warmup=5,
            group="tiers-curve", note="a100/sft.yaml: padding-free rows, Flash varlen", estimate_s=50),
        Run("curve-dpo-padded", "dpo", "llama-3.2-3b", "env/a100/dpo.yaml", "dpo_var", curve + ["--pack_pairs",
            "false", "--attn_implementation", "sdpa"], max_steps=30, warmup=5, adapter_from="dpo-adapter",
            group="tiers-curve", note="a100/dpo.yaml's batches as TRL's padded rows", estimate_s=130),
        Run("curve-dpo-packed", "dpo", "llama-3.2-3b", "env/a100/dpo.yaml", "dpo_var", curve, max_steps=30,
            warmup=5, adapter_from="dpo-adapter", group="tiers-curve", note="a100/dpo.yaml: packed pairs",
            estimate_s=90),
        Run("h100-dpo-var-grouped", "dpo", "llama-3.2-3b", "env/h100/dpo.yaml", "dpo_var", old_h100_dpo + quiet,
            max_steps=20, warmup=8, adapter_from="dpo-adapter", group="tiers-h100",
            note="the old h100/dpo.yaml: TRL's padded rows grouped by length, compile", estimate_s=120,
            timeout_s=300),
    ]
    sft_base, sft_tier, *sft_ablations = speed_sft
    dpo_base_run, dpo_liger, dpo_tier = speed_dpo
    t4_llama, t4_mistral = t4[:2], t4[2:]
    # The DPO runs of the later rounds continue the 1-step adapter (copies: the round-1 suites keep theirs).
    dpo_base2 = replace(dpo_base_run, adapter_from="dpo-adapter")
    dpo_tier2 = replace(dpo_tier, adapter_from="dpo-adapter", max_steps=10, warmup=3, estimate_s=90)
    suites = {  # in priority order: runs that would end past --deadline are skipped
        "core": [*t4_llama, sft_base, sft_tier, dpo_base_run, dpo_tier, *t4_mistral, *packcheck],
        "final": [*t4_mistral, pack[0], pack[2], pack[1], *h100_7b],
        "extra": [*pack, *sft_ablations, *a100, *h100_7b, dpo_liger, *qwen],
        "t4": [*t4, *packcheck, *qwen, t4_ref_check],
        "speed2": [sft_base, sft_tier, *speed2],
        "speed3-var": speed3_var,
        "dpo-precompute": [dpo_adapter, dpo_base2, *dpo_precompute],
        "speed6": [dpo_adapter, sft_base, sft_tier, dpo_base2, dpo_tier2, *dpo_var],  # the tiers as committed
        # issue 17, in priority order (the baselines before what they are compared with; today's tier last)
        "real": [real[i] for i in (0, 1, 4, 5, 6, 8, 9, 2, 3, 7)],
        "tiers": tiers,
    }
    suites["speed"] = [sft_base, sft_tier, dpo_base_run, dpo_tier, *sft_ablations, dpo_liger, *pack, *a100]
    return suites[suite] if suite in suites else suites["core"] + suites["extra"]


# ---- data and models --------------------------------------------------------------------------------------------

def single_token_words(tokenizer, max_id=MIN_VOCAB):
    """Lower-case words that the tokenizer keeps as one token after a space: n of them make ~n tokens. Their ids
    are below every model's vocabulary size (Mistral's is 32000; SmolLM2's tokenizer has 49152)."""
    vocab = tokenizer.get_vocab()
    words = sorted(w[1:] for w, i in vocab.items() if i < max_id and w.startswith("\u0120") and w[1:].isascii()
                   and w[1:].isalpha() and w[1:].islower() and len(w) >= 5)
    return words[:8000]


def write_data(name, path, words, seed=0, spec=None):
    """Synthetic records of DATASETS[name] (or of `spec`, a tuple of the same form) into path."""
    kind, n, (plo, phi), (clo, chi) = spec or DATASETS[name]
    rng = random.Random(seed)

    def text(lo, hi):
        # The leading space keeps the first word the same single token as the others: without it, the word after
        # the template's newline can be another token, past Mistral's vocabulary (a device-side assert).
        return " " + " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for i in range(n):
            if kind == "sft":
                record = {"id": f"{name}-{i}", "instruction": text(plo, phi), "response": text(clo, chi)}
            else:
                record = {"id": f"{name}-{i}", "prompt": [{"role": "user", "content": text(plo, phi)}],
                          "chosen": [{"role": "assistant", "content": text(clo, chi)}],
                          "rejected": [{"role": "assistant", "content": text(clo, chi)}]}
            f.write(json.dumps(record) + "\n")


def length_stats(name, path, tokenizer):
    """What a dataset's rows look like once rendered with the chat template: the distribution in tokens (SFT: each
    row; DPO: prompt+chosen and prompt+rejected rows), before truncation to max_length."""
    kind, n, prompt_words, answer_words = DATASETS[name]
    lengths = []
    for line in open(path):
        r = json.loads(line)
        if kind == "sft":
            rows = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]]
        else:
            rows = [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]
        lengths += [len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False))["input_ids"]) for m in rows]
    lengths.sort()
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
    return {"records": n, "prompt_tokens_uniform": prompt_words, "answer_tokens_uniform": answer_words,
            "rows": len(lengths), "row_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "min": lengths[0],
                                                 "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": lengths[-1]},
            "note": "uniform word counts (one token each) plus the chat template; sft_var/dpo_var use the tiers' "
                    "limits (instruction <= 128, response <= 512 tokens), as the chain produces them"}


def check_ids(path, tokenizer, n=64):
    """Every token id of the rendered records must be below the smallest model vocabulary."""
    for line in open(path).readlines()[:n]:
        r = json.loads(line)
        messages = ([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]
                    if "instruction" in r else r["prompt"] + r["chosen"])
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
        assert max(ids) < MIN_VOCAB, f"{path}: token id {max(ids)} past the smallest vocabulary ({MIN_VOCAB})"


def build_model(config_name, out_dir, tokenizer_dir, dtype="bfloat16"):
    """A randomly initialised model with the real architecture, saved (safetensors) with the tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in json.loads((CONFIGS / f"{config_name}.json").read_text()).items()
            if not k.startswith("_")}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    t = time.time()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
    template = out_dir / "chat_template.jinja"
    if template.exists():
        template.write_text(template.read_text().replace(DEFAULT_SYSTEM_PROMPT_CUT, ""))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                         tokenize=False)
    assert max(tokenizer(text)["input_ids"]) < config.vocab_size, "chat template tokens past the vocabulary"
    meta = {"config": config_name, "n_params": n_params, "dtype": dtype, "build_s": round(time.time() - t, 1)}
    (out_dir / "bench_meta.json").write_text(json.dumps(meta))
    print(json.dumps(meta), flush=True)


# ---- packed-sequence check --------------------------------------------------------------------------------------

def packing_check():
    """Does a packed batch (TRL's padding-free collator: position_ids restart per sequence, no attention_mask) give
    the same logits as each sequence alone, per attention implementation? A negative control (packed without
    position_ids, plain causal attention across the sequences) shows the check can see contamination."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096)
    torch.manual_seed(0)
    lengths = [37, 200, 128, 91, 300]
    seqs = [torch.randint(3, 1024, (n,)) for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels")
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    state = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).state_dict()
    results = {"lengths": lengths, "collator_keys": sorted(batch)}
    for impl, dtype in (("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.bfloat16),
                        ("flex_attention", torch.bfloat16)):
        key = f"{impl}/{str(dtype).split('.')[-1]}"
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=impl)
            model.load_state_dict(state)
            model = model.cuda().train()  # the training path (dropout is 0 in this config)
            with torch.no_grad():
                # use_cache=False as in training (TRL's fused LM head passes it): transformers detects packed
                # sequences from position_ids only when there is no attention_mask and no KV cache.
                ref = torch.cat([model(input_ids=s[None].cuda(), use_cache=False).logits[0] for s in seqs])
                packed = model(**batch, use_cache=False).logits[0].float()
                control = model(input_ids=batch["input_ids"], use_cache=False).logits[0].float()
                cached = model(**batch).logits[0].float()  # the config's use_cache=True: no packed detection
                ref = ref.float()
            err = ((packed - ref).norm() / ref.norm()).item()
            ctl = ((control - ref).norm() / ref.norm()).item()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            results[key] = {"rel_err_packed": err, "rel_err_control_no_position_ids": ctl,
                            "rel_err_packed_with_kv_cache": ((cached - ref).norm() / ref.norm()).item(),
                            "correct": err < tol and ctl > 10 * max(err, 1e-6)}
        except Exception as e:  # noqa: BLE001 - report and go on
            results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(key, results[key], flush=True)
    return results


def run_packcheck(work, env):
    t = time.time()
    path = work / "packcheck.json"
    try:
        subprocess.run([sys.executable, __file__, "--pack-check", str(path)], env=env, timeout=240, check=False)
        result = json.loads(path.read_text()) if path.exists() else {"error": "no result"}
    except subprocess.TimeoutExpired:
        result = {"error": "timeout"}
    print(f"packing check in {time.time() - t:.0f}s", flush=True)
    return result


# ---- running ----------------------------------------------------------------------------------------------------

def oom(text):
    return "OutOfMemoryError" in text or "CUDA out of memory" in text or "out of memory" in text.lower()


def summarise(run, raw, meta, rc, elapsed, tail):
    r = {"name": run.name, "group": run.group, "step": run.step, "model": run.model, "config": run.config,
         "data": run.data, "flags": run.flags, "note": run.note, "mem_cap_gib": run.cap_gib, "rc": rc,
         "wall_s": round(elapsed, 1), "n_params": meta.get("n_params")}
    r["status"] = raw.get("status", "no result") if rc == 0 else ("OOM" if oom(tail) else "error")
    if rc != 0:
        r["error_tail"] = tail[-1500:]
    for k in ("max_allocated_gib", "max_reserved_gib", "device_used_now_gib", "args", "mem_before_train"):
        if k in raw:
            r[k] = raw[k]
    if "model" in raw:
        r["model_info"] = raw["model"]
    ends, toks, padded = raw.get("step_end", []), raw.get("step_tokens", []), raw.get("step_padded", [])
    r["steps_done"] = len(ends)
    if ends and "t_begin" in raw:
        times = [b - a for a, b in zip([raw["t_begin"], *ends[:-1]], ends)]
        r["step_s"] = [round(t, 3) for t in times]
        w = min(run.warmup, len(ends) - 1) if len(ends) > 1 else 0
        span = ends[-1] - (ends[w - 1] if w > 0 else raw["t_begin"])
        tokens = sum(toks[w:])
        r["timed_steps"] = len(ends) - w
        r["tokens_per_step"] = round(tokens / max(1, len(ends) - w))
        r["padding_efficiency"] = round(tokens / max(1, sum(padded[w:])), 3)
        r["tokens_per_s"] = round(tokens / span, 1)
        r["tokens_per_s_incl_warmup"] = round(sum(toks) / (ends[-1] - raw["t_begin"]), 1)  # compile time included
        r["median_step_s"] = round(statistics.median(times[w:]), 3)
        if meta.get("n_params"):
            r["mfu_6n"] = round(6 * meta["n_params"] * r["tokens_per_s"] / PEAK_BF16_DENSE, 4)
            if run.step == "dpo":
                r["mfu_8n"] = round(8 * meta["n_params"] * r["tokens_per_s"] / PEAK_BF16_DENSE, 4)
        if raw.get("precompute_s"):
            # The reference pass over the whole dataset is part of the cost of every token trained: per token it
            # takes precompute_s / precompute_tokens, added to the training step's time per token.
            r["precompute_s"] = round(raw["precompute_s"], 2)
            r["precompute_tokens"] = raw.get("precompute_tokens")
            pre_tps = raw["precompute_tokens"] / raw["precompute_s"]
            r["precompute_tokens_per_s"] = round(pre_tps, 1)
            r["tokens_per_s_training_only"] = r["tokens_per_s"]
            r["tokens_per_s"] = round(1 / (1 / r["tokens_per_s"] + 1 / pre_tps), 1)
            if meta.get("n_params"):
                r["mfu_6n"] = round(6 * meta["n_params"] * r["tokens_per_s"] / PEAK_BF16_DENSE, 4)
    losses = [h["loss"] for h in raw.get("log_history", []) if "loss" in h]
    if losses:
        r["losses"] = losses
        r["loss_finite"] = all(x == x and abs(x) != float("inf") for x in losses)
    first = next((h for h in raw.get("log_history", []) if "loss" in h), None)
    if run.step == "dpo" and first and "rewards/margins" in first:
        r["first_step_dpo"] = {k: first.get(k) for k in ("loss", "rewards/margins", "rewards/chosen")}
    return r


def tier_dtype(config):
    """DTYPE of the tier whose YAML `config` is (env/<tier>/tier.mk: `DTYPE ?= float16`)."""
    tier_mk = (REPO / config).parent / "tier.mk"
    found = re.search(r"^DTYPE \?= (\S+)", tier_mk.read_text(), re.M) if tier_mk.exists() else None
    return found.group(1) if found else "auto"


def execute(run, work, results, env):
    model_dir = work / "models" / run.model
    meta = json.loads((model_dir / "bench_meta.json").read_text())
    out_dir = work / "runs" / run.name
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".partial"), ignore_errors=True)
    result_path = work / "runs" / f"{run.name}.result.json"
    result_path.unlink(missing_ok=True)
    # the tier's one dtype (its tier.mk's DTYPE, which make passes as --dtype) unless the run's flags say otherwise
    dtype = [] if "--dtype" in run.flags else ["--dtype", tier_dtype(run.config)]
    args = ["--config", str(REPO / run.config), "--model_name_or_path", str(model_dir),
            "--train_file", str(work / "data" / f"{run.data}.jsonl"), "--output_dir", str(out_dir),
            "--max_steps", str(run.max_steps), "--report_to", "none", "--seed", "0", *dtype, *run.flags]
    if run.step == "dpo":
        adapter = work / "runs" / (run.adapter_from or "")
        if not (adapter / "adapter_config.json").exists():
            # The SFT run it continues failed or was skipped: make an adapter with a 1-step SFT (no cap) instead.
            adapter = work / "runs" / f"{run.name}-sft-adapter"
            sft_cfg = run.config.replace("dpo", "sft")
            fallback = Run(adapter.name, "sft", run.model, sft_cfg, "sft_var",
                           ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"], max_steps=1)
            print(f"[{run.name}] no adapter from {run.adapter_from}: making one with a 1-step SFT", flush=True)
            execute(fallback, work, [], env)
        args += ["--sft_adapter", str(adapter)]
    run_env = dict(env)
    if run.cap_gib:
        run_env["BENCH_MEM_CAP_GIB"] = str(run.cap_gib)
    cmd = [sys.executable, "-c", BOOT, str(REPO / "steps" / f"{run.step}.py"), str(result_path), *args]
    log_path = work / "runs" / f"{run.name}.log"
    t = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, timeout=run.timeout_s,
                                  cwd=REPO)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    elapsed = time.time() - t
    tail = log_path.read_text(errors="replace")[-6000:]
    raw = json.loads(result_path.read_text()) if result_path.exists() else {}
    r = summarise(run, raw, meta, rc, elapsed, tail)
    if rc == 124:
        r["status"] = "timeout"
    results.append(r)
    print(f"[{run.name}] {r['status']} in {elapsed:.0f}s: " + json.dumps(
        {k: r.get(k) for k in ("tokens_per_s", "mfu_6n", "max_allocated_gib", "max_reserved_gib", "losses")}),
        flush=True)
    if rc != 0:
        print(tail[-2500:], flush=True)
    return r


def table(results):
    lines = [f"{'run':24} {'status':8} {'bs x acc':8} {'ckpt':5} {'liger':5} {'attn':6} {'tok/s':>9} {'mfu6N':>6} "
             f"{'s/step':>7} {'alloc':>6} {'resv':>6}"]
    for r in results:
        a, m = r.get("args", {}), r.get("model_info", {})
        bs = f"{a.get('per_device_train_batch_size', '?')}x{a.get('gradient_accumulation_steps', '?')}"
        lines.append(
            f"{r['name'][:24]:24} {r['status'][:8]:8} {bs:8} {str(a.get('gradient_checkpointing', '?'))[:5]:5} "
            f"{str(a.get('use_liger_kernel', '?'))[:5]:5} {str(m.get('attn', '?'))[:6]:6} "
            f"{r.get('tokens_per_s', float('nan')):9.0f} {r.get('mfu_6n', float('nan')):6.3f} "
            f"{r.get('median_step_s', float('nan')):7.2f} {r.get('max_allocated_gib', float('nan')):6.2f} "
            f"{r.get('max_reserved_gib', float('nan')):6.2f}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="core", help="core, extra, t4, speed or all")
    p.add_argument("--only", default="", help="comma-separated run names")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--work", default="/tmp/bench-train")
    p.add_argument("--tokenizer", default=str(REPO / ".benchtok"),
                   help="a directory with tokenizer files (SmolLM2's: vocab 49152, fine for random-id benchmarks)")
    p.add_argument("--deadline", type=float, default=540, help="seconds; runs that would end later are skipped")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--build-model", nargs=3, metavar=("CONFIG", "OUT_DIR", "TOKENIZER"), help=argparse.SUPPRESS)
    p.add_argument("--pack-check", metavar="JSON", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.build_model:
        return build_model(*a.build_model)
    if a.pack_check:
        Path(a.pack_check).write_text(json.dumps(packing_check(), indent=1))
        return

    start = time.time()
    runs = runs_for(a.suite)
    if a.only:
        keep = set(a.only.split(","))
        runs = [r for r in runs if r.name in keep]
    if a.dry_run:
        for r in runs:
            print(r.name, r.step, r.model, r.config, r.data, " ".join(r.flags), f"cap={r.cap_gib}",
                  f"steps={r.max_steps}")
        return

    import torch
    from timing import gpu_slug

    work, out = Path(a.work), Path(a.out)
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "hf-datasets"), PYTHONUNBUFFERED="1")
    report = {"gpu": gpu, "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
              "suite": a.suite, "versions": installed_versions(BENCH_PACKAGES),
              "peak_bf16_dense_flops": PEAK_BF16_DENSE, **provenance(),
              "notes": [
                  "Randomly initialised models with the real architectures (bench/configs); SmolLM2's tokenizer "
                  "(vocab 49152) with the models' full vocabularies; synthetic text of set token lengths.",
                  "tokens = non-padding tokens trained on (DPO: prompt+chosen and prompt+rejected rows); "
                  "tokens_per_s over the optimizer steps after `warmup`; mfu_6n = 6*N*tokens_per_s/989e12.",
              ],
              "runs": []}
    if any(r.cap_gib == 15 for r in runs):
        report["notes"].append(
            "T4 fit: this is not a T4. The process is capped at 15 GiB with set_per_process_memory_fraction; a "
            "real T4 has 15360 MiB (about 14.7 GiB usable by PyTorch, less the CUDA context of a few hundred MiB), "
            "so max_reserved should stay under about 14 GiB to be safe there. The H100 runs other kernels (fp16 "
            "SDPA uses flash attention here, the memory-efficient kernel on a T4's sm_75; bitsandbytes' 4-bit "
            "and 8-bit-optimizer kernels are built per architecture), so the T4's memory can differ somewhat and "
            "its speed is not measured here.")
    print(f"GPU: {gpu}; versions: {json.dumps(report['versions'])}", flush=True)

    # Data and models
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace(DEFAULT_SYSTEM_PROMPT_CUT, "")
    words = single_token_words(tokenizer)
    report["data"] = {}
    for name in sorted({r.data for r in runs if r.data} | {"sft_var"}):
        write_data(name, work / "data" / f"{name}.jsonl", words)
        check_ids(work / "data" / f"{name}.jsonl", tokenizer)
        report["data"][name] = length_stats(name, work / "data" / f"{name}.jsonl", tokenizer)
    out_file = out / f"train-{gpu_slug(gpu)}.json"
    for run in runs:
        elapsed = time.time() - start
        model_dir = work / "models" / run.model
        build_s = 0 if run.step == "check" or (model_dir / "bench_meta.json").exists() else BUILD_ESTIMATE_S
        if elapsed + build_s + run.estimate_s > a.deadline:
            report["runs"].append({"name": run.name, "group": run.group, "status": "skipped (deadline)"})
            print(f"[{run.name}] skipped: {elapsed:.0f}s gone, ~{build_s + run.estimate_s}s needed", flush=True)
            continue
        if run.step == "check":
            report["packing_check"] = run_packcheck(work, env)
            continue
        if build_s:
            t = time.time()
            proc = subprocess.run([sys.executable, __file__, "--build-model", run.model, str(model_dir), a.tokenizer],
                                  env=env)
            print(f"built {run.model} in {time.time() - t:.0f}s (rc {proc.returncode})", flush=True)
            if proc.returncode != 0:
                report["runs"].append({"name": run.name, "group": run.group, "status": "model build failed"})
                continue
        execute(run, work, report["runs"], env)
        report["elapsed_s"] = round(time.time() - start, 1)
        out_file.write_text(json.dumps(report, indent=1))  # after every run: a timeout still leaves results
    report["elapsed_s"] = round(time.time() - start, 1)
    out_file.write_text(json.dumps(report, indent=1))
    print(f"\nGPU: {gpu}   wrote {out_file}", flush=True)
    if "packing_check" in report:
        print("packing check:", json.dumps({k: v.get("correct", v.get("error")) for k, v in
                                            report["packing_check"].items() if isinstance(v, dict)}))
    print(table([r for r in report["runs"] if "step" in r]))
    for r in report["runs"]:
        if "step" not in r:
            print(r["name"], r["status"])


if __name__ == "__main__":
    main()
