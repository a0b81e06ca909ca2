"""Preference pairs: sample several responses per instruction, score them with a reward model, keep best vs worst.

    python steps/preference.py --in filtered.jsonl --policy MODEL --reward-model RM \
        --scored scored.jsonl --out preference.jsonl

Reward models (steps/common/reward.py): a sequence classifier (any Hub id or directory, e.g.
OpenAssistant/reward-model-deberta-v3-large-v2) or a sentence-transformers embedder such as `embedded:minilm`,
whose cosine score measures only whether a response is on the instruction's topic.

Outputs: --scored holds every instruction with all its responses and scores (appended in batches, resumable);
--out holds the pairs whose margin reaches --min-margin (ties only with --ties keep), in TRL's conversational
preference format.
With --policy-adapter (the SFT adapter) the responses are on-policy for DPO.
"""

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import DataError, run_step
from common.chat import end_of_turn, prompt_text
from common.files import output_lock
from common.generation import ENGINES, Sampling, load_engine, process_device_map
from common.jsonl import ResumableWriter, read_jsonl, write_jsonl
from common.precision import dtype_name
from common.reward import load_reward, score_in_batches
from common.shards import merge_shards, process_rank, shard_lock, shard_paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", required=True, help="filtered JSONL (id, instruction)")
    p.add_argument("--policy", required=True, help="model that samples the responses (Hub id or directory)")
    p.add_argument("--policy-adapter", default=None,
                   help="LoRA adapter on --policy (e.g. the SFT step's output: on-policy pairs for DPO)")
    p.add_argument("--reward-model", required=True, help="sequence classifier or sentence-transformers directory")
    p.add_argument("--scored", required=True, help="all responses and scores (JSONL)")
    p.add_argument("--out", required=True, help="preference pairs (JSONL)")
    p.add_argument("--num-responses", type=int, default=4, help="responses sampled per instruction")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-response-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="instructions per generation batch")
    p.add_argument("--reward-batch-size", type=int, default=16)
    p.add_argument("--min-margin", type=float, default=0.0, help="drop pairs whose chosen-rejected margin is below")
    p.add_argument("--ties", choices=["drop", "keep"], default="drop",
                   help="pairs whose chosen and rejected score the same (margin 0): drop them, or keep them")
    p.add_argument("--allow-truncated-chosen", action="store_true",
                   help="let a response cut off at the token limit be chosen (default: only finished ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="transformers", choices=ENGINES)
    p.add_argument("--dtype", default="auto", help="auto (see common/precision.py), bfloat16, float16 or float32")
    p.add_argument("--load-in-4bit", action="store_true")
    return p.parse_args(argv)


def pair(record, responses, scores, finished=None):
    """Best vs worst response of one instruction, in TRL's conversational preference format.

    The chosen response must have ended on its own: a response cut off at the token limit would teach the model
    not to stop. Returns None when no response finished.
    """
    finished = finished or [True] * len(scores)
    candidates = [i for i in range(len(scores)) if finished[i]]
    if not candidates:
        return None
    best = max(candidates, key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    return {
        "id": record["id"],
        "prompt": [{"role": "user", "content": record["instruction"]}],
        "chosen": [{"role": "assistant", "content": responses[best]}],
        "rejected": [{"role": "assistant", "content": responses[worst]}],
        "score_chosen": scores[best],
        "score_rejected": scores[worst],
        "margin": scores[best] - scores[worst],
    }


def score_batches(args, batches, target, rank=0, world=1):
    """Sample and score these (batch number, instructions) pairs into `target`, resuming what an earlier run wrote;
    returns every scored record of the batches."""
    share = [r for _, batch in batches for r in batch]
    writer = ResumableWriter(target, keep=lambda n: n if n >= len(share) else n - n % args.batch_size)
    if [r["id"] for r in writer.done] != [r["id"] for r in share[: len(writer.done)]]:
        writer.close()
        raise DataError(f"{writer.partial}: holds other instructions than {args.inp}; delete it to start over")
    todo = batches[len(writer.done) // args.batch_size :] if len(writer.done) < len(share) else []
    if todo:
        policy = load_engine(args.engine, args.policy, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                             adapter=args.policy_adapter, device_map=process_device_map(rank, world))
        tokenizer = policy.tokenizer
        reward = load_reward(args.reward_model, args.dtype)
        sampling = Sampling(max_new_tokens=args.max_response_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop_token_ids=policy.stop_token_ids, stop_strings=(end_of_turn(tokenizer, "assistant"),))
        k = args.num_responses
        bar = tqdm(total=len(share), initial=len(writer.done), desc=f"preference[{rank}]" if world > 1 else "preference",
                   unit="instruction", position=rank)
        start, tokens = time.time(), 0
        for b, batch in todo:
            prompts = [prompt_text(tokenizer, r["instruction"]) for r in batch for _ in range(k)]
            samples = policy.sample(prompts, sampling, args.seed * 1_000_003 + b)
            texts = [s["text"] for s in samples]
            scores = score_in_batches(reward, [r["instruction"] for r in batch for _ in range(k)], texts,
                                      args.reward_batch_size)
            writer.write([
                {"id": r["id"], "instruction": r["instruction"], "responses": texts[j * k : (j + 1) * k],
                 "finished": [s["finished"] for s in samples[j * k : (j + 1) * k]],
                 "scores": scores[j * k : (j + 1) * k], "reward_model": args.reward_model,
                 "dtype": dtype_name(args.dtype)}
                for j, r in enumerate(batch)
            ])
            tokens += sum(s["tokens"] for s in samples)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.time() - start):.0f}")
        bar.close()
    writer.finish()
    return writer.done


def main(argv=None):
    args = parse_args(argv)
    records = read_jsonl(args.inp, required={"id": str, "instruction": str})
    if not records:
        raise DataError(f"{args.inp}: no instructions")
    rank, world = process_rank()
    shard = shard_paths(args.scored, world)[rank] if world > 1 else None
    with output_lock(args.out), shard_lock(shard):  # a second run stops here, at once
        score_and_pair(args, records, rank, world)


def score_and_pair(args, records, rank, world):
    batches = [(b, records[first : first + args.batch_size]) for b, first in enumerate(range(0, len(records),
                                                                                          args.batch_size))]
    # Under torchrun (NPROC > 1) each process takes every world-th batch, on its own GPU, into a shard of --scored;
    # process 0 merges the shards in input order and makes the pairs. Batch b has the same seed either way.
    if world == 1:
        scored = score_batches(args, batches, args.scored)
    elif Path(args.scored).exists():  # finished by an earlier run: only the pairs are left
        scored = read_jsonl(args.scored) if rank == 0 else None
    else:
        score_batches(args, batches[rank::world], shard_paths(args.scored, world)[rank], rank, world)
        position = {r["id"]: i for i, r in enumerate(records)}
        scored = merge_shards(args.scored, world, lambda r: position[r["id"]]) if rank == 0 else None
    if rank:
        return

    pairs = [pair(r, r["responses"], r["scores"], None if args.allow_truncated_chosen else r["finished"])
             for r in scored]
    kept = [p for p in pairs if p and p["margin"] >= args.min_margin and (p["margin"] > 0 or args.ties == "keep")]
    write_jsonl(args.out, kept)
    print(f"wrote {args.out}: {len(kept)} pairs of {len(pairs)} instructions ({pairs.count(None)} without a "
          f"finished response, the rest under the margin {args.min_margin} or tied)", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
