#!/usr/bin/env python3
"""Generation throughput on one GPU: plain `model.generate` against the engine's `StaticGenerator`.

A randomly initialised model built from a real config (default: Llama-3.1-8B, bf16, made directly on the GPU) is fed
random prompt token ids; EOS and pad are ids the prompts never hold, so every row runs to the full length. For each
batch size it measures

- baseline: `model.generate` with default settings (dynamic cache, eager), greedy;
- fast: `common.generation.StaticGenerator.generate`, the code `TransformersEngine.sample` runs on a GPU, greedy;
  its first call (torch.compile + CUDA-graph capture) is reported separately as compile time;
- fast-hf-loop: the same compiled step with generate's own decoding loop (a host sync per token);
- fast-sample (batch 64): the same with temperature 1.0, top_p 0.9; fast-stop (batch 64): with a stop string
  (a synthetic word-level tokenizer over the vocabulary), as the engine always passes one.

tok/s = new tokens / wall time of the call; ms/step = wall time / decoding steps; decode ms/step excludes the prefill
(a max_new_tokens=1 call timed apart). Peak memory is torch.cuda.max_memory_allocated during the measured call.
Results: JSON under --out (default $OUT, else bench/results) as generate-<gpu>.json, and a table on stdout.

    python bench/generate.py                      # batches 1, 64, 256; 32-token prompts, 256 new tokens
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "steps"))

from timing import sync_time  # noqa: E402
from common.generation import StaticGenerator, grouped_sdpa_attention, use_grouped_sdpa  # noqa: E402

EOS, PAD = 128009, 128004  # <|eot_id|>, <|finetune_right_pad_id|>: never in the random prompts (ids < 128000)
PUBLISHED_BASELINE_H100 = {"1": 11, "64": 680, "256": 2860}  # tok/s, issue 3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "bench" / "configs" / "llama-3.1-8b.json"))
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="measured calls of the fast path (the best is reported)")
    p.add_argument("--extras", default="hf-loop,sample,stop,stock-attention",
                   help="extra fast-path rows, comma-separated: hf-loop, sample, stop, stock-attention ('' for none)")
    p.add_argument("--budget-s", type=float, default=480, help="skip the extras once this much time has passed")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    return p.parse_args()


def build_model(config_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(Path(config_path).read_text())
    config = AutoConfig.for_model(**data)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = None
    return model


def word_tokenizer(vocab_size):
    """A word-level tokenizer over ids 0..vocab_size-1 (token i is 'w{i}'), enough for StopStringCriteria."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["<|eot_id|>"] = EOS
    vocab["<pad>"] = PAD
    vocab["abcdef"] = 128000  # StopStringCriteria tokenizes this prefix to clean the vocabulary
    del vocab[f"w{EOS}"], vocab[f"w{PAD}"], vocab["w128000"]
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="w0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot_id|>", pad_token="<pad>")


def row(variant, batch, new_tokens, wall, prefill, peak, **extra):
    steps = new_tokens
    return {
        "variant": variant, "batch": batch, "steps": steps, "wall_s": round(wall, 4),
        "tok_s": round(batch * steps / wall, 1), "ms_per_step": round(1000 * wall / steps, 3),
        "decode_ms_per_step": round(1000 * (wall - prefill) / max(1, steps - 1), 3), "prefill_s": round(prefill, 4),
        "peak_gib": round(peak / 2**30, 2), **extra,
    }


def baseline(model, ids, new_tokens):
    mask = torch.ones_like(ids)
    gen = lambda n: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,  # noqa
                                   pad_token_id=PAD)
    gen(4)  # warm-up (kernels, allocator)
    _, prefill = sync_time(lambda: gen(1))
    torch.cuda.reset_peak_memory_stats()
    out, wall = sync_time(lambda: gen(new_tokens))
    steps = out.shape[1] - ids.shape[1]
    return row("baseline", ids.shape[0], steps, wall, prefill, torch.cuda.max_memory_allocated()), out[:, ids.shape[1]:]


def fast(gen, ids, new_tokens, repeats, variant="fast", **options):
    prompts = ids.tolist()
    call = lambda n: gen.generate(prompts, max_new_tokens=n, pad_token_id=PAD, **options)  # noqa: E731
    torch.manual_seed(0)
    _, first = sync_time(lambda: call(new_tokens))
    walls, peak, out = [], 0, None
    for _ in range(repeats):
        torch.manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        out, wall = sync_time(lambda: call(new_tokens))
        walls.append(wall)
        peak = max(peak, torch.cuda.max_memory_allocated())
    _, prefill = sync_time(lambda: call(1))
    wall = min(walls)
    steps = len(out[0])
    result = row(variant, ids.shape[0], steps, wall, prefill, peak, first_call_s=round(first, 2),
                 compile_s=round(first - wall, 2), walls_s=[round(w, 4) for w in walls])
    return result, torch.stack(out)


def teacher_forced_agreement(model, prompts, generated, rows=16):
    """Share of generated tokens that are the argmax of one uncompiled full forward over prompt + generated tokens.

    Greedy decoding with a correct cache gives ~1 up to bf16 noise at near-ties; a wrong cache, mask or position
    gives about 0 on a random model. The baseline's own tokens give the noise level to compare with."""
    agree, total = 0, 0
    with torch.no_grad():
        for i in range(0, prompts.shape[0], rows):
            p, g = prompts[i : i + rows], generated[i : i + rows].to(prompts.device)
            logits = model(input_ids=torch.cat([p, g[:, :-1]], dim=1), logits_to_keep=g.shape[1]).logits
            agree += int((logits.argmax(-1) == g).sum())
            total += g.numel()
    return round(agree / total, 4)


def check_grouped_attention():
    """grouped_sdpa_attention against transformers' SDPA attention on one decoding token with a padding mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

    torch.manual_seed(1)
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 384, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.rand(8, 1, 1, 384, device="cuda") > 0.3
    ours, _ = grouped_sdpa_attention(Module(), q, k, v, mask, scaling=128**-0.5)
    ref, _ = sdpa_attention_forward(Module(), q.double(), k.double(), v.double(), mask, scaling=128**-0.5)
    stock, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=128**-0.5)
    rel = lambda a: float((a.double() - ref).norm() / ref.norm())  # noqa: E731
    return {"grouped_vs_fp64_rel_err": rel(ours), "stock_vs_fp64_rel_err": rel(stock),
            "grouped_equals_stock": bool(torch.equal(ours, stock))}


def table(results):
    lines = [f"{'variant':<22}{'batch':>6}{'tok/s':>10}{'ms/step':>9}{'dec ms':>8}{'peak GiB':>9}{'compile s':>10}"]
    for r in results:
        lines.append(f"{r['variant']:<22}{r['batch']:>6}{r['tok_s']:>10.0f}{r['ms_per_step']:>9.2f}"
                     f"{r['decode_ms_per_step']:>8.2f}{r['peak_gib']:>9.1f}{r.get('compile_s', ''):>10}")
    return "\n".join(lines)


def main():
    args = parse_args()
    import transformers

    start = time.time()
    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    out_path = Path(args.out) / f"generate-{slug}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    extras = [e for e in args.extras.split(",") if e]
    report = {
        "gpu": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "config": os.path.relpath(args.config, ROOT),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "decoding": "greedy unless noted",
        "published_baseline_h100_tok_s": PUBLISHED_BASELINE_H100, "results": [], "checks": {},
        "engine": {"prompt_multiple": StaticGenerator.PROMPT_MULTIPLE, "cache_multiple": StaticGenerator.CACHE_MULTIPLE,
                   "compile": "torch.compile mode=reduce-overhead (CUDA graphs), dynamic=False, via generate's "
                              "compile_config; static cache; grouped SDPA at decoding; decoding loop "
                              "decode_without_stalls (custom_generate) unless the variant says hf-loop"},
    }

    def save(result=None):
        if result is not None:
            report["results"].append(result)
            print(json.dumps(result), flush=True)
        report["elapsed_s"] = round(time.time() - start, 1)
        out_path.write_text(json.dumps(report, indent=1) + "\n")

    model, build_s = sync_time(lambda: build_model(args.config))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report["weights_gb"] = round(weights / 1e9, 2)
    report["build_s"] = round(build_s, 1)
    report["checks"]["grouped_attention"] = check_grouped_attention()
    print(json.dumps(report["checks"]), flush=True)
    save()

    torch.manual_seed(0)
    prompts = {b: torch.randint(0, 128000, (b, args.prompt_tokens), device="cuda") for b in batches}
    base_out = {}
    for b in batches:
        result, base_out[b] = baseline(model, prompts[b], args.new_tokens)
        save(result)

    gen = StaticGenerator(model)
    report["engine"]["attn_implementation"] = model.config._attn_implementation
    for b in batches:
        result, out = fast(gen, prompts[b], args.new_tokens, args.repeats)
        n = min(out.shape[1], base_out[b].shape[1])
        result["same_first_token_as_baseline"] = round(float((out[:, 0] == base_out[b][:, 0].cpu()).float().mean()), 4)
        result["same_tokens_as_baseline"] = round(float((out[:, :n] == base_out[b][:, :n].cpu()).float().mean()), 4)
        if b == 64 or b == batches[-1]:
            try:
                report["checks"][f"teacher_forced_agreement_b{b}"] = {
                    "fast": teacher_forced_agreement(model, prompts[b], out),
                    "baseline": teacher_forced_agreement(model, prompts[b], base_out[b])}
            except Exception as e:
                report["checks"][f"teacher_forced_b{b}_error"] = f"{type(e).__name__}: {e}"[:300]
        save(result)

    b = 64 if 64 in batches else batches[-1]
    for extra in extras:
        if time.time() - start > args.budget_s:
            report["skipped"] = report.get("skipped", []) + [extra]
            save()
            continue
        try:
            if extra == "hf-loop":  # the same compiled step and caches, generate's own decoding loop
                hf = StaticGenerator(model, stall_free=False)
                hf.caches = gen.caches
                for b2 in batches:
                    result, _ = fast(hf, prompts[b2], args.new_tokens, 1, "fast-hf-loop")
                    save(result)
                continue
            if extra == "sample":
                result, _ = fast(gen, prompts[b], args.new_tokens, 1, "fast-sample(t=1,p=.9)",
                                 do_sample=True, temperature=1.0, top_p=0.9)
            elif extra == "stop":  # as the engine does: a StopStringCriteria built once, handed to each call
                from transformers import StopStringCriteria

                tok = word_tokenizer(model.config.vocab_size)
                criterion, build = sync_time(lambda: StopStringCriteria(tok, ["<|eot_id|>", "w999999"]))
                report["checks"]["stop_string_criterion_build_s"] = round(build, 2)
                result, out = fast(gen, prompts[b], args.new_tokens, 1, "fast-stop-string",
                                   stopping_criteria=[criterion])
            elif extra == "stock-attention":  # the same static cache + compile, transformers' own SDPA attention
                model.set_attn_implementation("sdpa")
                b2 = batches[-1]
                result, _ = fast(gen, prompts[b2], args.new_tokens, 1, "fast-stock-sdpa")
                use_grouped_sdpa(model)
            else:
                continue
            save(result)
        except Exception as e:  # an extra must not cost the main numbers
            report["checks"][f"{extra}_error"] = f"{type(e).__name__}: {e}"[:500]
            save()

    report["elapsed_s"] = round(time.time() - start, 1)
    save()
    print(f"\n{name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"weights {weights / 1e9:.1f} GB; prompts {args.prompt_tokens} tokens, {args.new_tokens} new; "
          f"wrote {out_path}")
    print(table(report["results"]))


if __name__ == "__main__":
    main()
