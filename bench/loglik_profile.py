"""Where the packed log-likelihood scorer's time goes, on one CUDA GPU, with no download.

    PYTHONPATH=steps:bench python bench/loglik_profile.py --config bench/configs/llama-3.2-3b.json \
        [--docs mmlu=2000,hellaswag=1000] [--loglik-tokens 16384] [--load-in-4bit] [--lora] [--tag NAME]

A randomly initialised model is built from the real config (bf16, or NF4 with fp16 compute). Requests are token ids
shaped like the real tasks' (as bench/eval_speed.py's: MMLU ~120-token prompt + four one-token choices, HellaSwag
~80 + four ~25-token endings, TruthfulQA-MC2 ~350 + eight ~12-token answers). Per task:

- `score_s`: common/generation/loglik.score end to end, as the eval step runs it;
- `parts_s`: the same forwards with a CUDA synchronisation after each part: packing (CPU), layout (CPU lists to
  device tensors), the tree mask, the decoder, the LM head + log_softmax, reading the sums back;
- `causal_decoder_s`: the decoder alone on the same [rows, T] inputs without a mask (SDPA's causal flash kernel):
  a ceiling for what the mask costs;
- `tokens`, `tokens_per_s`, `tflops`: tokens laid out (padding excluded) and the decoder's matmul rate at 2 x params
  per token (attention excluded), against the GPU's measured matmul peak.

--compile: then again with the generation engine's compiled norms, MLPs and rotary embedding (compile_pointwise).
--lora: the same with a random LoRA adapter of the project's shape (r 8, every projection) active, unmerged and
then merged (PEFT's merge_adapter), and how far the merged answers are from the unmerged ones.

Writes loglik-profile-<gpu>-<config>[-4bit][-tag].json to $OUT or bench/results/.
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from eval_paths import random_model
from eval_speed import around, ceilings
from provenance import provenance
from timing import gpu_slug
from timing import sync_time as timed

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"mmlu": (120, 4, 1), "hellaswag": (80, 4, 25), "truthfulqa": (350, 8, 12)}  # context, choices, choice


def token_requests(kind, docs, vocab, seed=1):
    """[(context ids, continuation ids)] of a task's shape (a one-token continuation stays one token)."""
    rng, out = random.Random(seed), []
    ctx_mean, choices, cont_mean = SHAPES[kind]
    for _ in range(docs):
        ctx = [rng.randrange(3, vocab) for _ in range(around(rng, ctx_mean))]
        for _ in range(choices):
            n = 1 if cont_mean == 1 else around(rng, cont_mean)
            out.append((ctx, [rng.randrange(3, vocab) for _ in range(n)]))
    return out


def parts(model, requests, row_tokens, batch_tokens, device):
    """Seconds per part of the scorer, each part synchronised; and the forwards' shapes."""
    from common.generation import loglik

    sync = torch.cuda.synchronize
    t = dict.fromkeys(("pack", "layout", "mask", "decoder", "head", "readback", "causal_decoder"), 0.0)
    shapes, tokens = [], 0
    start = time.perf_counter()
    forwards = list(loglik.batches(loglik.pack(loglik.pieces(requests, row_tokens), row_tokens), batch_tokens))
    t["pack"] = time.perf_counter() - start
    lm = loglik.base_model(model)
    with torch.inference_mode():
        for rows in forwards:
            sync()
            a = time.perf_counter()
            ids, pos, doc, branch, scored = loglik.layout(rows)
            ids, pos, doc, branch = (torch.tensor(x, device=device) for x in (ids, pos, doc, branch))
            at = torch.tensor([p for _, where, _ in scored for p in where], device=device)
            targets = torch.tensor([tk for _, _, cont in scored for tk in cont], device=device)
            owner = torch.tensor([c for c, (_, _, cont) in enumerate(scored) for _ in cont], device=device)
            sync()
            b = time.perf_counter()
            mask = loglik.model_mask(model, loglik.tree_mask(doc, branch))
            sync()
            c = time.perf_counter()
            hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                      use_cache=False).last_hidden_state
            sync()
            d = time.perf_counter()
            logits = lm.get_output_embeddings()(hidden[at[:, 0], at[:, 1]])
            logprobs, _ = loglik.token_scores(logits, targets)
            sums = torch.zeros(len(scored), device=device).index_add_(0, owner, logprobs)
            sync()
            e = time.perf_counter()
            sums.tolist()
            f = time.perf_counter()
            lm.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False)
            sync()
            g = time.perf_counter()
            for k, dt in zip(("layout", "mask", "decoder", "head", "readback", "causal_decoder"),
                             (b - a, c - b, d - c, e - d, f - e, g - f)):
                t[k] += dt
            shapes.append(list(ids.shape))
            tokens += int((doc >= 0).sum())
    return {k: round(v, 3) for k, v in t.items()}, shapes, tokens


def profile(model, kind, requests, args, device, peak_tflops, params):
    from common.generation import loglik

    row_tokens = min(loglik.ROW_TOKENS, args.loglik_tokens)
    loglik.score(model, requests[:64], row_tokens=row_tokens, batch_tokens=args.loglik_tokens)  # warm-up
    answers, score_s = timed(lambda: loglik.score(model, requests, row_tokens=row_tokens,
                                                  batch_tokens=args.loglik_tokens))
    split, shapes, tokens = parts(model, requests, row_tokens, args.loglik_tokens, device)
    row = {"kind": kind, "requests": len(requests), "tokens": tokens, "forwards": len(shapes),
           "rows_x_T": sorted({tuple(s) for s in shapes}, key=lambda s: -s[0] * s[1])[:6],
           "score_s": round(score_s, 3), "parts_s": split,
           "tokens_per_s": round(tokens / score_s),
           "decoder_tflops": round(2 * params * tokens / split["decoder"] / 1e12, 1),
           "causal_decoder_tflops": round(2 * params * tokens / split["causal_decoder"] / 1e12, 1),
           "score_share_of_peak": round(2 * params * tokens / score_s / 1e12 / peak_tflops, 3)}
    print(json.dumps(row), flush=True)
    return row, answers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "bench" / "configs" / "llama-3.2-3b.json"))
    p.add_argument("--docs", default="mmlu=2000,hellaswag=1000,truthfulqa=200")
    p.add_argument("--loglik-tokens", type=int, default=16384)
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--lora", action="store_true", help="also with a LoRA adapter, unmerged and merged")
    p.add_argument("--compile", action="store_true", help="then again with patching.compile_pointwise")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from common import installed_versions

    gpu = torch.cuda.get_device_name()
    model, config, _ = random_model(args.config, args.load_in_4bit)
    device = model.get_input_embeddings().weight.device
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    if args.load_in_4bit:  # packed 4-bit weights count half an element each
        params = sum(m.in_features * m.out_features for m in model.modules()
                     if hasattr(m, "in_features") and m is not model.get_output_embeddings())
    bandwidth, peak = ceilings()
    result = {"gpu": gpu, "config": Path(args.config).name, "dtype": "nf4, fp16 compute" if args.load_in_4bit
              else "bfloat16", "loglik_tokens": args.loglik_tokens, "decoder_params": params,
              "measured_peak_tflops": peak, "measured_bandwidth_gbs": bandwidth, **provenance(), "tasks": []}
    work = {k: token_requests(k, int(n), config.vocab_size) for k, n in (x.split("=") for x in args.docs.split(","))}
    plain = {}
    for kind, reqs in work.items():
        row, plain[kind] = profile(model, kind, reqs, args, device, peak, params)
        result["tasks"].append(row)
    if args.compile:  # the generation engine's compiled norms, MLPs and rotary embedding, on the scorer's forwards
        from common.generation.patching import compile_pointwise

        result["compiled"] = compile_pointwise(model)
        for kind, reqs in work.items():
            (row, _), first_s = timed(lambda: profile(model, kind, reqs, args, device, peak, params))
            result["tasks"].append({"compiled": True, "first_call_s": round(first_s, 1), **row})
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft = get_peft_model(model, lora).eval()
        states = ("unmerged",) if args.load_in_4bit else ("unmerged", "merged")  # merging into NF4 re-quantizes
        originals = {}
        for state in states:
            if state == "merged":
                originals = {n: p.detach().clone() for n, p in peft.named_parameters()
                             if n.endswith("base_layer.weight")}
                _, merge_s = timed(peft.merge_adapter)
                result["merge_s"] = round(merge_s, 2)
            answers = {}
            for kind, reqs in work.items():
                row, answers[kind] = profile(peft, kind, reqs, args, device, peak, params)
                result["tasks"].append({"lora": state, **row})
            if state == "unmerged":
                unmerged = answers
            else:
                result["merged_vs_unmerged_max_abs"] = {
                    k: round(max(abs(a[0] - b[0]) for a, b in zip(answers[k], unmerged[k])), 4) for k in work}
        if originals:
            _, unmerge_s = timed(peft.unmerge_adapter)
            result["unmerge_s"] = round(unmerge_s, 2)
            # a merge then an unmerge in the weights' dtype rounds: the share of weights it leaves changed, and how far
            after = dict(peft.named_parameters())
            changed = sum(int((after[n] != w).sum()) for n, w in originals.items())
            result["unmerge_changed_share"] = round(changed / sum(w.numel() for w in originals.values()), 5)
            result["unmerge_max_rel"] = max(float(((after[n] - w).abs() / w.abs().clamp_min(1e-12)).max())
                                            for n, w in originals.items())
    result["versions"] = installed_versions(("torch", "transformers", "peft", "bitsandbytes"))
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    name = f"loglik-profile-{gpu_slug(gpu)}-{Path(args.config).stem}{'-4bit' if args.load_in_4bit else ''}"
    (out_dir / f"{name}{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
