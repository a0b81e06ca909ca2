#!/usr/bin/env python3
"""Judge throughput on one GPU: steps/judge.py's Judge (prompts, engine, parse, one retry) on a randomly initialised
Llama-3.1-8B (bf16) at the h100 tier's settings (JUDGE_ROWS 256, answers capped at 128 tokens, responses shown cut
to 1,024 tokens), on real instruction/response pairs (a cpu-tier generated.jsonl, repeated to --records).

Unconstrained (--unconstrained), a random model writes no JSON: every answer runs to the cap and is retried once,
the worst case (2 x 128 tokens a record). Held to the schema, as the step runs, every answer parses and ends, but a
random model's reason takes its whole share of the cap; a real judge's answer is ~60 tokens. Prompts use SmolLM2's
tokenizer and chat template (a directory given by --tokenizer; Llama's can't be downloaded here), whose token ids
all lie in Llama's vocabulary.

    python bench/judge_speed.py --records data/runs/smol-cpu/generated.jsonl --tokenizer .gpucheck/smol [--n 512]

Results: JSON under --out (default $OUT, else bench/results) as judge-<gpu>.json.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from generation_speed import build_model
from judge import Judge, judged_records
from provenance import provenance
from timing import gpu_slug, sync_time

from common.generation.chat import end_of_turn, prepare_tokenizer
from common.generation.engines import TransformersEngine, stop_ids
from common.generation.sampling import Sampling
from common.io.jsonl import read_jsonl
from common.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--config", default=str(ROOT / "bench" / "configs" / "llama-3.1-8b.json"))
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-response-tokens", type=int, default=1024)
    p.add_argument("--unconstrained", action="store_true",
                   help="answers only prompted and parsed (the step holds them to the schema: AnswerConstraint)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = p.parse_args()
    source = [r for r in read_jsonl(args.records) if r.get("response")]
    records = [{**source[i % len(source)], "id": f"bench-{i}"} for i in range(args.n)]
    tokenizer = prepare_tokenizer(load_tokenizer(args.tokenizer))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script, not a figure
    model = build_model(args.config, device)
    engine = TransformersEngine.__new__(TransformersEngine)  # the engine around a model built here, not loaded
    engine.tokenizer, engine.model, engine.batch_size, engine.stop_criteria = tokenizer, model, args.rows, {}
    engine.stop_token_ids = stop_ids(tokenizer, model)
    from common.generation.fastgen import make_generator

    engine.fast, why = make_generator(model, tokenizer.pad_token_id, slots=args.rows)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0,
                        stop_token_ids=engine.stop_token_ids,
                        stop_strings=(end_of_turn(tokenizer, "assistant"), "}"))
    judge = Judge(engine, tokenizer, sampling, False, args.max_response_tokens,
                  token_constraint=not args.unconstrained)
    prompt_tokens = [len(tokenizer(judge.prompt(r["instruction"], r["response"], False))["input_ids"])
                     for r in records]
    judged_records(judge, records[: args.rows], {}, 0)  # warm-up: CUDA graph captures
    (out, tokens), wall = sync_time(lambda: judged_records(judge, records, {}, 1))
    unparsed = sum("unparsed" in r["tags"].values() for r in out)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = {"gpu": name, "torch": torch.__version__, "config": os.path.relpath(args.config, ROOT),
              "dtype": "bfloat16", "fast_path": why is None, "why_not_fast": why, "records": args.n,
              "rows": args.rows, "max_new_tokens": args.max_new_tokens,
              "max_response_tokens": args.max_response_tokens,
              "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
              "prompt_tokens_max": max(prompt_tokens), "generated_tokens": tokens,
              "answers": "prompted and parsed" if args.unconstrained else "held to the schema (AnswerConstraint)",
              "records_unparsed": unparsed, "wall_s": round(wall, 2),
              "records_per_s": round(args.n / wall, 2), "generated_tok_s": round(tokens / wall, 1),
              "note": "random weights: unconstrained, every answer runs to the cap and is retried once (worst "
                      "case); constrained, a random model's answers take the reason's whole share of the cap",
              **provenance()}
    slug = gpu_slug(name)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"judge-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
