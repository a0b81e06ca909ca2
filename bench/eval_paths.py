"""The eval step's paths against lm-eval's own, and base + SFT + DPO from one load, on one CUDA GPU, with no download.

    PYTHONPATH=steps:bench python bench/eval_paths.py --config bench/configs/llama-3.2-3b.json \
        [--load-in-4bit] [--compare mmlu=2000,hellaswag=1000,truthfulqa=200] [--hflm-batches 32,128] \
        [--three] [--gen-rows 256] [--max-gen-toks 1280] [--tag NAME]

A randomly initialised model is built from the real config, saved, and loaded back through the eval step's own
loader (common.models.load_causal_lm: bf16, or 4-bit NF4 with --load-in-4bit). Requests are synthetic, shaped like
the real tasks' (bench/eval_speed.py's `requests`: MMLU ~120-token prompt + four one-letter choices, HellaSwag ~80 +
four ~25-token endings, TruthfulQA-MC2 ~350 + eight ~12-token answers, IFEval ~70-token prompts), over a word-level
tokenizer of the model's vocabulary, so lengths in tokens are exact.

--compare: per task, lm-eval's HFLM at each of --hflm-batches against EngineHFLM (the packed scorer,
common/generation/loglik.py) on the same requests, in the same process: seconds, and how far the answers are apart
(largest |log-likelihood difference|, share of documents whose argmax choice agrees; a random model's choices are
often near-ties, so bf16 summation order can flip a few).

--three: the whole eval of three models the way steps/eval.py runs it, at the real tasks' document counts (MMLU
14,042, HellaSwag 10,042, TruthfulQA-MC2 817, IFEval 541): one load, then the base, then two LoRA adapters (r 8,
alpha 16, every projection: env/lora.yaml's shape, random weights) put on with eval.Adapters and switched (merged
into the bf16 weights). A random model never stops, so every IFEval answer runs to --max-gen-toks (the worst case);
the JSON also gives the engine's tokens/s, from which an answer-length mix prices realistically. --kinds and --models
run part of it (e.g. --kinds gen --models 1: the base model's IFEval answers alone).

Writes eval-paths-<gpu>-<config>[-tag].json to $OUT or bench/results/ with the commit and command line.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from eval_speed import requests, word_tokenizer
from provenance import provenance
from timing import gpu_slug
from timing import sync_time as timed

REPO = Path(__file__).resolve().parents[1]
FULL = {"mmlu": 14042, "hellaswag": 10042, "truthfulqa": 817, "gen": 541}  # the real tasks' documents


def build(config_path, folder, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return config


def random_model(config_path, load_in_4bit, cap_gib=None):
    """(model, config, load seconds): a random model of the config, saved and loaded back through the eval step's
    loader (bf16, or NF4 with fp16 compute), under a memory cap (GiB) if given."""
    from common.models import load_causal_lm

    dtype = torch.float16 if load_in_4bit else torch.bfloat16
    folder = Path(tempfile.mkdtemp()) / "model"
    config = build(config_path, folder, dtype)
    if cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    model, load_s = timed(lambda: load_causal_lm(str(folder), dtype=str(dtype).split(".")[1],
                                                 load_in_4bit=load_in_4bit))
    return model.eval(), config, load_s


def doc_of(request):
    return request.metadata[1]


def compare(a, b, reqs):
    """Largest |log-likelihood difference| and the share of documents whose argmax choice agrees."""
    docs = {}
    for r, x, y in zip(reqs, a, b):
        docs.setdefault(doc_of(r), []).append((x[0], y[0]))
    agree = sum(max(range(len(v)), key=lambda i: v[i][0]) == max(range(len(v)), key=lambda i: v[i][1])
                for v in docs.values())
    return max(abs(x[0] - y[0]) for x, y in zip(a, b)), agree / len(docs)


def paths(lm_hf, lm_packed, config, counts, batches, budgets):
    rows = []
    for kind, n in counts.items():
        reqs = requests(kind, n, config.vocab_size, seed=1)
        tokens = sum(len(r.args[0].split()) + len(r.args[1].split()) for r in reqs)
        row = {"kind": kind, "docs": n, "requests": len(reqs), "request_words": tokens, "packed": [], "hflm": []}
        for budget in budgets:  # the packed scorer at each token budget a forward; the last one is compared
            lm_packed.loglik_tokens = budget
            packed, packed_s = timed(lambda: lm_packed.loglikelihood(reqs, disable_tqdm=True))
            _, tokenize_s = timed(lambda: lm_packed.encode_all([r.args for r in reqs]))
            row["packed"].append({"loglik_tokens": budget, "seconds": round(packed_s, 2),
                                  "of_it_tokenizing_s": round(tokenize_s, 2)})
        row["packed_s"] = min(p["seconds"] for p in row["packed"])
        for batch in batches:
            lm_hf.batch_size_per_gpu = batch
            torch.cuda.reset_peak_memory_stats()
            theirs, seconds = timed(lambda: lm_hf.loglikelihood(reqs, disable_tqdm=True))
            diff, agree = compare(theirs, packed, reqs)
            row["hflm"].append({"batch": batch, "seconds": round(seconds, 2),
                                "speedup": round(seconds / row["packed_s"], 2),
                                "max_abs_diff": round(diff, 5), "argmax_agrees": round(agree, 4),
                                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        best = min(row["hflm"], key=lambda h: h["seconds"])
        row["speedup_vs_best_hflm"] = round(best["seconds"] / row["packed_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def three(model, tokenizer, config, args):
    """Base, then two adapters, each through EngineHFLM on the full task counts; seconds per model and per part."""
    import eval as eval_step
    from peft import LoraConfig, get_peft_model

    from common.generation.eval_engine import EngineHFLM

    folders = []
    for name in ("sft", "dpo"):  # random adapters of the project's LoRA shape, saved as the training steps save them
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], init_lora_weights=False,
                          task_type="CAUSAL_LM")
        peft = get_peft_model(model, lora)
        folder = Path(tempfile.mkdtemp()) / name
        peft.save_pretrained(folder)
        folders.append((name, str(folder)))
        model = peft.unload()
    gen = {"until": ["</s>"], "max_gen_toks": args.max_gen_toks, "do_sample": False}
    work = {kind: requests(kind, n, config.vocab_size, seed=2, max_gen_toks=args.max_gen_toks)
            for kind, n in FULL.items() if kind in args.kinds.split(",")}
    assert all(r.args[1] == gen for r in work.get("gen", []))
    models = []
    started = time.perf_counter()
    adapters = eval_step.Adapters(model)
    for name, adapter in [("base", None), *folders][: args.models]:
        model = adapters.put_on(eval_step.Job(name, adapter, Path("/dev/null")))
        lm = EngineHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch, gen_rows=args.gen_rows,
                        loglik_tokens=args.loglik_tokens)
        parts = {}
        for kind, reqs in work.items():
            call = lm.generate_until if kind == "gen" else lm.loglikelihood
            out, seconds = timed(lambda: call(reqs, disable_tqdm=True))
            parts[kind] = round(seconds, 2)
            if kind == "gen":
                generated = sum(len(o.split()) for o in out)
                parts["gen_tokens"] = generated
                parts["gen_tokens_per_s"] = round(generated / seconds)
        models.append({"model": name, "seconds": round(sum(v for k, v in parts.items() if k in FULL), 2),
                       "parts": parts, "packed_answered": lm.packed_answered, "engine_answered": lm.engine_answered})
        print(json.dumps(models[-1]), flush=True)
    return {"models": models, "wall_s": round(time.perf_counter() - started, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "bench" / "configs" / "llama-3.2-3b.json"))
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 weights, fp16 compute (the t4 tier's eval)")
    p.add_argument("--compare", default="mmlu=2000,hellaswag=1000,truthfulqa=200", help="KIND=DOCS,...; empty: none")
    p.add_argument("--hflm-batches", default="32,128", help="HFLM batch sizes to time (the best one is compared)")
    p.add_argument("--batch", type=int, default=32, help="EVAL_BATCH (HFLM's fallback batch)")
    p.add_argument("--loglik-tokens", type=int, default=None, help="the packed scorer's tokens a forward (--three)")
    p.add_argument("--loglik-budgets", default="8192", help="--compare: the packed scorer's tokens a forward, each")
    p.add_argument("--three", action="store_true", help="base + two adapters on the full task counts")
    p.add_argument("--kinds", default=",".join(FULL), help="--three: the tasks run (gen: IFEval-like answers)")
    p.add_argument("--models", type=int, default=3, help="--three: base, then sft, then dpo: how many of them")
    p.add_argument("--gen-rows", type=int, default=256, help="EVAL_GEN_ROWS: IFEval rows decoded at once")
    p.add_argument("--max-gen-toks", type=int, default=1280)
    p.add_argument("--cap-gib", type=float, default=None, help="a memory cap (15: a T4)")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from lm_eval.models.huggingface import HFLM

    from common import installed_versions
    from common.generation.eval_engine import EngineHFLM

    gpu = torch.cuda.get_device_name()
    model, config, load_s = random_model(args.config, args.load_in_4bit, args.cap_gib)
    tokenizer = word_tokenizer(config.vocab_size)
    result = {"gpu": gpu, "config": Path(args.config).name, "dtype": "nf4, fp16 compute" if args.load_in_4bit
              else "bfloat16", "cap_gib": args.cap_gib, "load_s": round(load_s, 1), **provenance()}
    batches = [int(b) for b in args.hflm_batches.split(",") if b]
    counts = {k: int(v) for k, v in (item.split("=") for item in args.compare.split(",") if item)}
    if counts:
        lm_hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batches[0])
        lm_packed = EngineHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch,
                               loglik_tokens=args.loglik_tokens)
        lm_packed.loglikelihood(requests("hellaswag", 8, config.vocab_size, seed=99), disable_tqdm=True)  # warm-up
        lm_hf.loglikelihood(requests("hellaswag", 8, config.vocab_size, seed=99), disable_tqdm=True)
        budgets = [int(b) for b in args.loglik_budgets.split(",") if b]
        result["compare"] = paths(lm_hf, lm_packed, config, counts, batches, budgets)
        del lm_hf, lm_packed
    if args.three:
        result["three"] = three(model, tokenizer, config, args)
        result["three"] |= {"kinds": args.kinds,
                            "gen_rows": args.gen_rows, "max_gen_toks": args.max_gen_toks, "batch": args.batch,
                            "documents": FULL}
    result["versions"] = installed_versions(("torch", "transformers", "peft", "bitsandbytes", "lm_eval"))
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    name = f"eval-paths-{gpu_slug(gpu)}-{Path(args.config).stem}{'-4bit' if args.load_in_4bit else ''}"
    (out_dir / f"{name}{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("compare",)}, indent=1))


if __name__ == "__main__":
    main()
