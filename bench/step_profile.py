#!/usr/bin/env python3
"""Where a decoding step's time goes, per slot bucket: the fast path's step (steps/common/generation/fastgen.py) on
a randomly initialised model built from a real config, every slot at a mid-run length, as its CUDA graph replays it
(wall per step) and as torch.profiler sees it run eagerly (GPU time per kernel kind). The gap between the graph's
step and the kernels' sum is what launching the step's kernels (~18 a layer) costs inside the graph.

    PYTHONPATH=steps python bench/step_profile.py [--buckets 8,64,512] [--cap 4096] [--slots 512]

Results: step-profile-<gpu>.json under --out (default $OUT, else bench/results), kernel tables on stdout.
"""

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from generation_speed import PAD, build_model
from provenance import provenance
from timing import gpu_slug, sync_time
from torch.profiler import ProfilerActivity, profile

from common.generation import fastgen

ROOT = Path(__file__).resolve().parents[1]


def kind(name):
    """A kernel's family: GEMMs, our decoding attention, the compiled norms/MLP (Triton), copies, the rest."""
    if re.search(r"nvjet|gemm|cutlass|sm90_xmma|splitKreduce", name):
        return "gemm"
    if name in ("partial", "combine"):
        return "decode attention"
    if name.startswith("triton_"):
        return "compiled pointwise"
    if re.search(r"copy|index|cat|scatter|gather", name, re.I):
        return "copies and indexing"
    return "other elementwise"


def fill_slots(generator, mean_keys):
    """Every slot of the cache holds a row of mean_keys +-50% keys (uniform, seed 0), on pages of its own."""
    cache = generator.cache
    torch.manual_seed(0)
    lengths = torch.randint(mean_keys // 2, mean_keys * 3 // 2, (cache.slots,))
    generator.pages.grow({s: int(lengths[s]) + 1 for s in range(cache.slots)})
    cache.positions[:, 0] = lengths.to(generator.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "bench" / "configs" / "llama-3.1-8b.json"))
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--buckets", default="8,64,512")
    p.add_argument("--cap", type=int, default=4096)
    p.add_argument("--mean-length", type=int, default=560, help="keys a slot holds, on average (uniform +-50%%)")
    p.add_argument("--memory-gib", type=float, default=79.1)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    model = build_model(args.config)
    generator = fastgen.SlotGenerator(model, PAD, slots=args.slots, memory_limit=int(args.memory_gib * 2**30))
    generator.ensure_cache(args.cap + 512)
    L = generator.cache.length
    fill_slots(generator, args.mean_length)
    results = []
    for bucket in [int(b) for b in args.buckets.split(",")]:
        generator.step(bucket, L)  # capture (and compile on first use)
        _, wall = sync_time(lambda: [generator.step(bucket, L) for _ in range(20)])
        with torch.no_grad():
            generator.forward_step(bucket, L)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    generator.forward_step(bucket, L)
                torch.cuda.synchronize()
        by_kind, kernels = defaultdict(float), 0
        for event in prof.key_averages():
            if event.self_device_time_total > 0:
                by_kind[kind(event.key)] += event.self_device_time_total / 3 / 1000
                kernels += event.count / 3
        busy = sum(by_kind.values())
        row = {"slots": bucket, "graph_step_ms": round(wall / 20 * 1000, 2), "kernels_ms": round(busy, 2),
               "kernels_per_step": round(kernels), "ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items())}}
        results.append(row)
        print(json.dumps(row), flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70),
              flush=True)
    name = torch.cuda.get_device_name()
    slug = gpu_slug(name)
    out = Path(args.out) / f"step-profile-{slug}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": name, "torch": torch.__version__, "config": args.config,
                               "slots": generator.cache.slots, "cache_length": L, "mean_keys": args.mean_length,
                               "compiled": generator.compiled, "kernel": generator.kernel, **provenance(),
                               "results": results},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
