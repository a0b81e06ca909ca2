"""Eval speed and memory of the t4 tier's settings on a 7B model in 4-bit, on one CUDA GPU, with no download.

    python bench/eval_speed.py [--config bench/configs/mistral-7b-v0.1.json] [--batch 16] [--max-gen-toks 1280]

A randomly initialised model is built from the real config (fp16, on the GPU), saved, and loaded back through the
eval step's own loader (common.models.load_causal_lm, 4-bit NF4, fp16 compute) under a 15 GiB cap
(set_per_process_memory_fraction: what a T4 gives PyTorch). lm-eval's HFLM then answers synthetic requests of the
real tasks' lengths, through the same loglikelihood / generate_until code the eval step runs (the tasks' datasets
can't reach the device machine): MMLU-like (a ~120-token prompt, four one-letter choices: one model pass),
HellaSwag-like (~80-token context, four ~25-token endings: four passes), TruthfulQA-MC2-like (6-shot ~350-token
prompt, ~8 answers of ~12 tokens) and IFEval-like generation (~70-token prompts, run to max_gen_toks: a random model
does not stop). The tokenizer is a word-level one of the model's vocabulary size ("w17 w503 ..."), so a request's
length in tokens is exact. Writes eval-<gpu>-<config>.json to $OUT or bench/results/ and prints a table.
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from provenance import provenance
from timing import gpu_slug
from timing import sync_time as timed

REPO = Path(__file__).resolve().parents[1]

CAP_GIB = 15.0


def word_tokenizer(vocab_size):
    """A fast tokenizer whose every whitespace-separated word 'wN' is token N (0-2 are <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def text(rng, n, vocab_size):
    return " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(n))


def around(rng, mean):
    return max(4, int(rng.uniform(0.6, 1.4) * mean))


def requests(kind, n_docs, vocab, seed=0, max_gen_toks=1280):
    """lm-eval Instances shaped like a real task's: (context, continuation) pairs or (prompt, gen_kwargs)."""
    from lm_eval.api.instance import Instance

    rng, out = random.Random(seed), []
    for doc in range(n_docs):
        if kind == "mmlu":
            ctx = text(rng, around(rng, 120), vocab)
            pairs = [(ctx, " " + text(rng, 1, vocab)) for _ in range(4)]
        elif kind == "hellaswag":
            ctx = text(rng, around(rng, 80), vocab)
            pairs = [(ctx, " " + text(rng, around(rng, 25), vocab)) for _ in range(4)]
        elif kind == "truthfulqa":
            ctx = text(rng, around(rng, 350), vocab)
            pairs = [(ctx, " " + text(rng, around(rng, 12), vocab)) for _ in range(8)]
        else:  # generation
            gen = {"until": ["</s>"], "max_gen_toks": max_gen_toks, "do_sample": False}
            pairs = [(text(rng, around(rng, 70), vocab), gen)]
        out += [Instance(request_type="generate_until" if kind == "gen" else "loglikelihood", doc={},
                         arguments=p, idx=i, metadata=(kind, doc, None)) for i, p in enumerate(pairs)]
    return out


def ceilings():
    """Measured copy bandwidth (GB/s, read + write) and fp16 matmul rate (TFLOP/s) of this GPU."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    _, t = timed(lambda: [y.copy_(x) for _ in range(10)])
    bandwidth = 2 * x.numel() * 10 / t / 1e9
    del x, y
    a, b = (torch.randn(8192, 8192, dtype=torch.float16, device="cuda") for _ in range(2))
    a @ b
    _, t = timed(lambda: [a @ b for _ in range(10)])
    del a, b
    torch.cuda.empty_cache()
    return round(bandwidth), round(2 * 8192**3 * 10 / t / 1e12)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "bench" / "configs" / "mistral-7b-v0.1.json"))
    p.add_argument("--batch", type=int, default=16, help="the t4 tier's EVAL_BATCH")
    p.add_argument("--max-gen-toks", type=int, default=1280, help="the t4 tier's MAX_GEN_TOKS")
    p.add_argument("--docs", default="mmlu=100,hellaswag=50,truthfulqa=25,gen=16")
    p.add_argument("--more-gen-batches", default="", help="also time generation at these batch sizes (gen=N each)")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from common import installed_versions
    from common.models import load_causal_lm

    gpu = torch.cuda.get_device_name()
    bandwidth, tflops = ceilings()
    config = AutoConfig.from_pretrained(args.config)
    folder = Path("/tmp/bench-eval-model")
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    build_s = time.perf_counter() - started

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_GIB * 2**30 / total)
    torch.cuda.reset_peak_memory_stats()
    model, load_s = timed(lambda: load_causal_lm(str(folder), dtype="float16", load_in_4bit=True))
    weights_gib = torch.cuda.memory_allocated() / 2**30

    from lm_eval.models.huggingface import HFLM

    tokenizer = word_tokenizer(config.vocab_size)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch)
    lm.loglikelihood(requests("hellaswag", 8, config.vocab_size, seed=99), disable_tqdm=True)  # warm-up
    rows = []
    runs = [(item.split("=")[0], item.split("=")[1], args.batch) for item in args.docs.split(",")]
    runs += [("gen", b, int(b)) for b in args.more_gen_batches.split(",") if b]
    for kind, n, batch in runs:
        lm.batch_size_per_gpu = batch
        reqs = requests(kind, int(n), config.vocab_size, max_gen_toks=args.max_gen_toks)
        torch.cuda.reset_peak_memory_stats()
        call = lm.generate_until if kind == "gen" else lm.loglikelihood
        out, seconds = timed(lambda: call(reqs, disable_tqdm=True))
        passes = len({r.args[0] for r in reqs}) if kind == "mmlu" else len(reqs)
        row = {"kind": kind, "batch": batch, "docs": int(n), "requests": len(reqs), "model_passes": passes, "seconds": round(seconds, 2),
               "s_per_100_requests": round(100 * seconds / len(reqs), 2),
               "s_per_pass": round(seconds / passes, 4),
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        if kind == "gen":
            tokens = sum(len(tokenizer(o)["input_ids"]) for o in out)
            row |= {"generated_tokens": tokens, "s_per_token_per_request": round(seconds / tokens, 5),
                    "ms_per_step": round(1000 * seconds * batch / tokens, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"gpu": gpu, "measured_copy_gb_s": bandwidth, "measured_fp16_matmul_tflops": tflops,
              "config": Path(args.config).name, "cap_gib": CAP_GIB, "batch": args.batch,
              "max_gen_toks": args.max_gen_toks, "load_in_4bit": "nf4, fp16 compute (common.models.load_causal_lm)",
              "build_and_save_s": round(build_s, 1), "load_4bit_s": round(load_s, 1),
              "weights_gib": round(weights_gib, 2), "rows": rows,
              "versions": installed_versions(("torch", "transformers", "peft", "bitsandbytes", "lm_eval")),
              "cuda": torch.version.cuda, **provenance()}
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    name = f"eval-{gpu_slug(gpu)}-{Path(args.config).stem}.json"
    (out_dir / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{gpu}: copy {bandwidth} GB/s, fp16 matmul {tflops} TFLOP/s; 7B 4-bit weights {weights_gib:.2f} GiB, "
          f"load {load_s:.0f} s")
    print(f"{'kind':<11} {'batch':>5} {'requests':>8} {'passes':>6} {'s/100 req':>9} {'s/pass':>7} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['kind']:<11} {r['batch']:>5} {r['requests']:>8} {r['model_passes']:>6} {r['s_per_100_requests']:>9} "
              f"{r['s_per_pass']:>7} {r['peak_allocated_gib']:>8}")


if __name__ == "__main__":
    main()
