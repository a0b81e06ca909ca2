#!/usr/bin/env python3
"""The paged engine's scheduling on a CPU, no GPU and no model: which slot buckets its decoding steps ran at, how
many keys they read, how many prompt tokens it prefilled, for bench/generation_speed.py's workload at any sizes.

The engine's own Scheduler (steps/common/generation/scheduler.py) and page table run the workload's requests; the
device is stood in for by `Rows`, which keeps each slot's position and count of tokens as the engine's SlotState
does and ends each row at its drawn length (as EndAt makes the model do), and the loop takes its snapshot one step
ahead of the step in flight as SlotGenerator.generate does. tests/test_schedule_replay.py checks it against the
engine itself (its step and prefill made no-ops) step for step. Given a device run's JSON (--device-run), it also
prices the replay with that run's step time per bucket and prefill time per token: an estimate that holds where the
keys per step stay close to that run's (both printed). Use it to try a scheduling change, a workload or a tier's
settings before spending GPU time.

    PYTHONPATH=steps python bench/schedule_replay.py --requests 8192 --cap 4096 --slots 512 --pages 7468 \\
        --admit 0.03125 --device-run bench/results/generate-realistic-h200-cap4096-paged-512-batch8192-longest-first.json
"""

import argparse
import json
import time
from collections import Counter

import torch
from common.generation.cache import PagedCache
from common.generation.pages import PAGE, PageTable
from common.generation.runner import LENGTH_BUCKET, PREFILL_TOKENS, round_up
from common.generation.scheduler import ADMIT_FRACTION, CHECK_EVERY, Scheduler
from common.generation.slots import Request
from common.generation.stats import Stats
from generation_speed import workload, workload_args
from provenance import provenance


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p)
    p.add_argument("--slots", type=int, default=256, help="rows decoded at once (GEN_ROWS)")
    p.add_argument("--pages", type=int, help=f"KV pages of {PAGE} tokens (a device run's kv_pages; default: "
                   "every slot's whole row)")
    p.add_argument("--admit", type=float, default=ADMIT_FRACTION, help="ADMIT_FRACTION")
    p.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, help="prompt tokens a prefill")
    p.add_argument("--device-run", help="a generate-realistic-*.json whose first paged row prices the replay")
    return p.parse_args(argv)


class Rows:
    """The device's side of the replay (the Scheduler's `rows`): per slot whether its row is live, its position, the
    tokens it holds and its prompt's length, as SlotState keeps them; a row samples its end token once it has
    generated its drawn length (`targets`) or reaches `cap` tokens."""

    def __init__(self, slots, targets, cap, stats):
        self.targets, self.cap, self.stats = targets, cap, stats
        self.live, self.position = [False] * slots, [0] * slots
        self.held, self.prompt_len, self.generated = [0] * slots, [0] * slots, [0] * slots
        self.index = [None] * slots  # the request in each slot
        self.results = [None] * len(targets)  # tokens each request generated
        self.seen = None  # the snapshot the scheduler looks at: (live, position, held, prompt length) per slot
        self.steps = []  # (slot bucket, keys read) per decoding step

    def look(self, scheduler, bucket):
        """Call.look: the snapshot, the step in flight meanwhile, the scheduler's look at the snapshot."""
        self.seen = [list(self.live), list(self.position), list(self.held), list(self.prompt_len)]
        if bucket is not None:
            self.decode(bucket)
        look = scheduler.look(self.seen[0], self.seen[1], self)
        return None if look is None else look[0]

    def ends(self, s):
        """Whether the token slot s just sampled ends its row."""
        return self.generated[s] == self.targets[self.index[s]] + 1 or self.generated[s] >= self.cap

    def decode(self, slots):
        self.steps.append((slots, sum(p + 1 for p in self.position[:slots])))
        for s in range(slots):
            if self.live[s]:
                self.held[s] += 1
                self.generated[s] += 1
                ended = self.ends(s)
                self.live[s] = not ended
                self.position[s] = 0 if ended else self.position[s] + 1

    def start(self, batch):
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += sum(len(request.ids) for _, request in batch)
        for s, request in batch:
            self.index[s] = request.index
            if request.progress:  # back where it gave its pages up
                tokens, self.prompt_len[s], self.generated[s] = request.progress
                self.held[s], self.position[s], self.live[s] = tokens, tokens - 1, True
                request.progress = None
            else:
                self.prompt_len[s] = self.position[s] = len(request.prompt)
                self.held[s], self.generated[s] = len(request.prompt) + 1, 1
                self.live[s] = not self.ends(s) and self.cap > 1

    def finish(self, ended):
        _, _, held, prompt_len = self.seen
        for s, request in ended:
            self.results[request.index] = held[s] - prompt_len[s]

    def move(self, movers, holes):
        for a, b in zip(movers, holes):
            for field in (self.live, self.position, self.held, self.prompt_len, self.generated, self.index):
                field[b] = field[a]
            self.live[a], self.position[a] = False, 0

    def give_way(self, slot, request):
        live = self.live[slot]
        if live:  # the token count stands in for the tokens (Request.ids: all but the last are prefilled again)
            request.progress = (self.held[slot], self.prompt_len[slot], self.generated[slot])
        else:
            self.results[request.index] = self.held[slot] - self.prompt_len[slot]
        self.live[slot], self.position[slot] = False, 0
        return live


class Replayed(Request):
    """A request whose progress holds a token count, not the tokens (Rows)."""

    @property
    def ids(self):
        return range(self.progress[0] - 1) if self.progress else self.prompt


def replay(args):
    """The scheduler's stats and, per decoding step, (slot bucket, keys read)."""
    prompts, targets = workload(args)
    length = round_up(max(map(len, prompts)) + args.cap + 1, LENGTH_BUCKET)  # the engine's cache (ensure_cache)
    pages = args.pages or args.slots * (length // PAGE) + 1
    cache = PagedCache(1, pages, args.slots, length // PAGE, 1, 1, torch.float32, torch.device("cpu"))
    stats = Stats()
    scheduler = Scheduler(PageTable(cache, torch.device("cpu")), args.slots, stats, args.prefill_tokens, args.admit)
    scheduler.submit([Replayed(i, p) for i, p in enumerate(prompts)])
    rows = Rows(args.slots, targets, args.cap, stats)
    bucket, steps = rows.look(scheduler, None), CHECK_EVERY  # SlotGenerator.generate's loop
    while bucket is not None:
        for _ in range(steps):
            rows.decode(bucket)
        bucket, steps = rows.look(scheduler, bucket), CHECK_EVERY - 1
    assert all(r == t + 1 for r, t in zip(rows.results, targets)), "a row did not end at its drawn length"
    return stats, rows.steps, sum(targets)


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
