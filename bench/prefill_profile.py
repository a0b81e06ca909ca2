#!/usr/bin/env python3
"""What a prefill and a decoding step leave on the table: the fast path (steps/common/generation/fastgen.py) on a
randomly initialised model built from a real config.

1. Packed prefills of random prompts (lengths uniform 16-320, as bench/generation_speed.py draws them) at several
   sizes: the GPU time between events around each (`ms`), the kernels' own time under torch.profiler (`kernels_ms`,
   by kind) and the difference, where the GPU idled. Twice: the engine's host-to-GPU copies queued behind the GPU's
   work (transfers.on_device, from pinned memory) and, as before they were, plain copies from pageable memory, each of
   which waits for the GPU to finish everything queued before it.
2. The decoding step's CUDA graph per slot bucket (every slot at 280-840 keys) with the query, key and value
   projections fused into one GEMM (patching.fuse_projections, as the engine runs) and apart.
3. The 32 layers' linear layers alone at several row counts (CUDA graphs): q/k/v and gate/up apart or fused.
4. With --overlap N,...: a prefill and N decoding steps of the largest bucket, one after the other on one stream, and
   the prefill on a second stream while the steps run (both streams at default priority, then the steps on a
   high-priority stream): whether a compute-bound prefill hides under the steps' memory-bound attention.

    PYTHONPATH=steps python bench/prefill_profile.py [--sizes 1000,3660,8000,16000] [--buckets 8,256,512]

Results: prefill-profile-<gpu>[-<tag>].json under --out (default $OUT, else bench/results).
"""

import argparse
import json
import os
import random
from collections import defaultdict
from pathlib import Path

import torch
from common.generation import fastgen, patching, runner
from common.generation.scheduler import CHECK_EVERY
from generation_speed import PAD, build_model
from provenance import provenance
from step_profile import fill_slots, kind
from timing import gpu_slug
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]


def gpu_ms(fn, reps):
    """Mean GPU milliseconds of `fn` over `reps` runs (events around them, after one run)."""
    fn()
    torch.cuda.synchronize()
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began.record()
    for _ in range(reps):
        fn()
    ended.record()
    ended.synchronize()
    return began.elapsed_time(ended) / reps


def graph_ms(fn, reps=20):
    """Mean milliseconds of `fn` replayed as one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return gpu_ms(graph.replay, reps)


def pageable_copy(data, device, dtype=torch.long):
    """The engine's copies as they were: from pageable memory, each waiting for the GPU's queue to empty."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    return tensor.to(device)


def random_prompts(size, rng):
    """Prompts of 16-320 random tokens, as many as ~`size` tokens hold; and their tokens."""
    prompts, tokens = [], 0
    while tokens + 320 < size:
        prompts.append([rng.randint(0, 127999) for _ in range(rng.randint(16, 320))])
        tokens += len(prompts[-1])
    return prompts, tokens


def prefills(generator, sizes, body, reps):
    rng = random.Random(0)
    results = []
    for size in sizes:
        prompts, tokens = random_prompts(size, rng)
        assignments = list(enumerate(prompts))
        generator.pages.grow({s: len(p) + CHECK_EVERY + 1 for s, p in assignments})
        for copies in ("queued", "pageable"):
            original = runner.on_device
            if copies == "pageable":
                runner.on_device = pageable_copy
            try:
                ms = gpu_ms(lambda a=assignments: generator.prefill(a), reps)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    generator.prefill(assignments)
                    torch.cuda.synchronize()
            finally:
                runner.on_device = original
            by_kind = defaultdict(float)
            for event in prof.key_averages():
                if event.self_device_time_total > 0:
                    by_kind[kind(event.key)] += event.self_device_time_total / 1000
            busy = sum(by_kind.values())
            row = {"tokens": tokens, "prompts": len(prompts), "copies": copies, "ms": round(ms, 2),
                   "kernels_ms": round(busy, 2), "idle_ms": round(ms - busy, 2),
                   "tflops": round(2 * tokens * body / ms / 1e9, 1),
                   "ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items())}}
            results.append(row)
            print(json.dumps(row), flush=True)
        generator.pages.release(list(range(len(prompts))))
    return results


def steps(generator, buckets, mean_keys):
    """The decoding step's graph per bucket, projections fused (as the engine runs them) and apart."""
    S, L = generator.cache.slots, generator.cache.length
    fill_slots(generator, mean_keys)
    results = defaultdict(dict)
    for projections in ("fused", "apart"):
        if projections == "apart":
            patching.unfuse_projections(generator.model)
            generator.drop_graphs()
        for bucket in buckets:
            generator.step(bucket, L)  # capture (and compile on first use)
            results[bucket][f"{projections}_ms"] = round(gpu_ms(lambda b=bucket: generator.step(b, L), 20), 3)
    generator.pages.release(list(range(S)))
    for bucket, row in results.items():
        print(json.dumps({"slots": bucket, **row}), flush=True)
    return [{"slots": b, **row} for b, row in results.items()]


def overlap(generator, size, bucket, counts, mean_keys, reps):
    """A prefill of ~`size` prompt tokens (into the first slots, racing the steps' reads of them: timing only) and n
    decoding steps at `bucket` rows: in sequence on one stream, then the prefill on a side stream meanwhile."""
    L = generator.cache.length
    fill_slots(generator, mean_keys)
    prompts, tokens = random_prompts(size, random.Random(1))
    assignments = list(enumerate(prompts))
    generator.pages.grow({s: len(p) + CHECK_EVERY + 1 for s, p in assignments})
    generator.step(bucket, L)
    side, high = torch.cuda.Stream(), torch.cuda.Stream(priority=-100)  # out of range: the highest there is
    results = []
    for n in counts:
        def sequential(n=n):
            generator.prefill(assignments)
            for _ in range(n):
                generator.step(bucket, L)

        def overlapped(n=n, steps_stream=None):
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                generator.prefill(assignments)
            if steps_stream is not None:
                steps_stream.wait_stream(main)
                with torch.cuda.stream(steps_stream):
                    for _ in range(n):
                        generator.step(bucket, L)
                main.wait_stream(steps_stream)
            else:
                for _ in range(n):
                    generator.step(bucket, L)
            main.wait_stream(side)

        row = {"prefill_tokens": tokens, "slots": bucket, "steps": n,
               "prefill_ms": round(gpu_ms(lambda: generator.prefill(assignments), reps), 2),
               "steps_ms": round(gpu_ms(lambda n=n: [generator.step(bucket, L) for _ in range(n)], reps), 2),
               "sequential_ms": round(gpu_ms(sequential, reps), 2),
               "overlapped_ms": round(gpu_ms(overlapped, reps), 2),
               "overlapped_steps_high_priority_ms": round(gpu_ms(lambda: overlapped(steps_stream=high), reps), 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    generator.pages.release(list(range(generator.cache.slots)))
    return results


def gemms(model, rows, body):
    """The 32 layers' linear layers at `rows` rows: apart, and with q/k/v and gate/up each fused."""
    weights = [(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, m.gate_proj.weight,
                m.up_proj.weight, m.down_proj.weight) for a, m in ((x.self_attn, x.mlp) for x in model.model.layers)]
    results = []
    for m in rows:
        row = {"rows": m, **{k: round(v, 3) for k, v in gemm_times(weights, m).items()}}
        row["tflops_apart"] = round(2 * m * body / row["apart_ms"] / 1e9, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def gemm_times(weights, m):
    linear = torch.nn.functional.linear
    x = torch.randn(m, weights[0][0].shape[1], device="cuda", dtype=weights[0][0].dtype)
    inner = torch.randn(m, weights[0][6].shape[1], device="cuda", dtype=x.dtype)
    times = {"apart_ms": graph_ms(lambda: [(linear(x, q), linear(x, k), linear(x, v), linear(x, o), linear(x, g),
                                            linear(x, u), linear(inner, d)) for q, k, v, o, g, u, d in weights]),
             "qkv_apart_ms": graph_ms(lambda: [(linear(x, w[0]), linear(x, w[1]), linear(x, w[2])) for w in weights]),
             "gate_up_apart_ms": graph_ms(lambda: [(linear(x, w[4]), linear(x, w[5])) for w in weights])}
    for name, parts in (("qkv", slice(0, 3)), ("gate_up", slice(4, 6))):
        fused = [torch.cat(w[parts]) for w in weights]  # one layer kind at a time: 1.5 and 7 GiB for the 8B model
        times[f"{name}_fused_ms"] = graph_ms(lambda fused=fused: [linear(x, w) for w in fused])
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "bench" / "configs" / "llama-3.1-8b.json"))
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--cap", type=int, default=4096)
    p.add_argument("--memory-gib", type=float, default=79.1)
    p.add_argument("--sizes", default="1000,3660,8000,16000", help="prompt tokens a prefill packs (3,660: the mean "
                   "prefill of the h100 run at 8,192 requests)")
    p.add_argument("--buckets", default="8,64,256,512")
    p.add_argument("--mean-keys", type=int, default=560)
    p.add_argument("--gemm-rows", default="8,64,256,512,3660")
    p.add_argument("--overlap", default="", help="decoding steps to overlap a prefill with, e.g. 2,4,8 (none: skip)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    model = build_model(args.config)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
              "body_parameters": body, **provenance()}
    report["gemms"] = gemms(model, [int(r) for r in args.gemm_rows.split(",") if r], body)
    generator = fastgen.SlotGenerator(model, PAD, slots=args.slots, memory_limit=int(args.memory_gib * 2**30))
    generator.ensure_cache(args.cap + 512)
    report["compiled"], report["fused"] = generator.compiled, generator.fused
    report["prefills"] = prefills(generator, [int(s) for s in args.sizes.split(",") if s], body, args.reps)
    buckets = [int(b) for b in args.buckets.split(",") if b]
    report["steps"] = steps(generator, buckets, args.mean_keys)
    if args.overlap:
        report["overlap"] = overlap(generator, int(args.sizes.split(",")[0]), max(buckets or [args.slots]),
                                    [int(n) for n in args.overlap.split(",")], args.mean_keys, args.reps)
    out = Path(args.out) / f"prefill-profile-{gpu_slug(report['gpu'])}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
