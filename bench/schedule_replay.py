#!/usr/bin/env python3
"""The paged engine's scheduling on a CPU, no GPU and no model: which slot buckets its decoding steps ran at, how
many keys they read, how many prompt tokens it prefilled, for bench/generation_speed.py's workload at any sizes.

The real SlotGenerator runs the workload's requests with its decoding step and prefill replaced by no-ops (logits of
zeros) and EndAt ending each row at its drawn length, so admission, page accounting, preemption, compaction and the
slot buckets are the engine's own: on the 8,192-request h100 workload it reproduces the device run's steps per bucket
exactly. Given a device run's JSON (--device-run), it also prices the replay with that run's step time per bucket
and prefill time per token: an estimate that holds where the keys per step stay close to that run's (both printed).
Use it to try a scheduling change, a workload or a tier's settings before spending GPU time.

    PYTHONPATH=steps python bench/schedule_replay.py --requests 8192 --cap 4096 --slots 512 --pages 7468 \\
        --admit 0.03125 --device-run bench/results/generate-realistic-h200-cap4096-paged-512-batch8192-longest-first.json
"""

import argparse
import json
import time
from collections import Counter

import torch
from common.generation import fastgen
from common.generation.sampling import Sampling
from generation_speed import EndAt, workload, workload_args
from provenance import provenance
from transformers import LlamaConfig, LlamaForCausalLM

EOS, PAD, FILL, VOCAB = 9, 8, 10, 16  # a 16-token vocabulary: the logits the no-op step hands to sampling


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p)
    p.add_argument("--slots", type=int, default=256, help="rows decoded at once (GEN_ROWS)")
    p.add_argument("--pages", type=int, help=f"KV pages of {fastgen.PAGE} tokens (a device run's kv_pages; default: "
                   "every slot's whole row)")
    p.add_argument("--admit", type=float, default=fastgen.ADMIT_FRACTION, help="ADMIT_FRACTION")
    p.add_argument("--prefill-tokens", type=int, default=fastgen.PREFILL_TOKENS, help="prompt tokens a prefill")
    p.add_argument("--device-run", help="a generate-realistic-*.json whose first paged row prices the replay")
    return p.parse_args(argv)


def replay(args):
    """The generator's stats and, per decoding step, (slot bucket, keys read)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    generator = fastgen.SlotGenerator(LlamaForCausalLM(config).eval(), PAD, slots=args.slots, graphs=False,
                                      compiled=False, pages=args.pages)
    generator.admit_fraction, generator.prefill_tokens = args.admit, args.prefill_tokens
    steps = []

    def no_op_step(slots, length):
        generator.logits[:slots].zero_()
        steps.append((slots, int((generator.cache.positions[:slots] + 1).sum())))

    def no_op_prefill(assignments):
        generator.stats["prefills"] += 1
        generator.stats["prefill_tokens"] += sum(len(ids) for _, ids in assignments)
        return torch.zeros(len(assignments), VOCAB)

    generator.forward_step, generator.prefill = no_op_step, no_op_prefill
    prompts, targets = workload(args)
    prompts = [[p[0]] + [FILL] * (len(p) - 1) for p in prompts]  # the first token says where the row ends
    sampling = Sampling(max_new_tokens=args.cap, temperature=0, stop_token_ids=(EOS,))
    rows, _ = generator.generate(prompts, sampling, extra_processors=[EndAt(EOS, PAD)])
    assert all(len(r) == t + 1 for r, t in zip(rows, targets)), "a row did not end at its drawn length"
    return generator.stats, steps, sum(targets)


def main(argv=None):
    args = parse_args(argv)
    began = time.perf_counter()
    stats, steps, useful = replay(args)
    per_bucket, keys = Counter(b for b, _ in steps), Counter()
    for bucket, k in steps:
        keys[bucket] += k
    report = {"slots": args.slots, "pages": args.pages, "requests": args.requests, "useful_tokens": useful,
              "steps_per_slot_bucket": {str(b): n for b, n in sorted(per_bucket.items())},
              "mean_keys_per_slot_bucket": {str(b): round(keys[b] / per_bucket[b] / b) for b in sorted(per_bucket)},
              "prefills": stats["prefills"], "prefill_tokens": stats["prefill_tokens"],
              "preempted": stats["preempted"], "ended_when_preempted": stats["ended_when_preempted"],
              "most_rows": stats["most_rows"],
              "replay_s": round(time.perf_counter() - began, 1), **provenance()}
    if args.device_run:
        with open(args.device_run) as f:
            run = next(r for r in json.load(f)["results"] if "mean_keys_per_slot_bucket" in r)
        step_ms = {int(b): ms for b, ms in run["step_ms_per_slot_bucket"].items()}
        decode = sum(n * step_ms[b] for b, n in per_bucket.items()) / 1000
        prefill = stats["prefill_tokens"] * run["prefill_s"] / run["prefill_tokens"]
        # what the device run spent beyond its replayed steps and timed prefills, per step: sampling, bookkeeping
        steps_run = sum(run["steps_per_slot_bucket"].values())
        other = (run["wall_s"] - run["decode_replay_s"] - run["prefill_s"]) / steps_run * len(steps)
        report["estimate"] = {"device_run": args.device_run, "device_run_mean_keys": run["mean_keys_per_slot_bucket"],
                              "decode_s": round(decode, 1), "prefill_s": round(prefill, 1), "other_s": round(other, 1),
                              "wall_s": round(decode + prefill + other, 1),
                              "useful_tok_s": round(useful / (decode + prefill + other))}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
