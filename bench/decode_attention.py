#!/usr/bin/env python3
"""Decoding attention over the paged KV cache, one layer: the Triton kernel (steps/common/generation/decode_kernel.py)
with the slots started longest first (as fastgen runs it) and in slot order, against a float32 reference.

For each model shape (query heads, KV heads, head size of Llama-3.1-8B, Qwen2.5-3B and SmolLM2-135M), slot count and
mix of key counts, random queries and a random bf16 cache in pages of PAGE tokens (each slot's pages
scattered over the pool through its block table): the largest difference from the reference, and each order's time
(triton.testing.do_bench_cudagraph) with the bytes of keys and values it must read over that time. Mixes: "even",
every slot's key count drawn uniformly from --min-keys..--max-keys; "skewed", the same with one slot in 32 holding
--long-keys (as a 4,096-token cap's longest rows sit among rows of a few hundred).

    python bench/decode_attention.py [--slots 8,64,256,512] [--out DIR] [--tag order]

Results: decode-attention-<gpu>[-<tag>].json under --out (default $OUT, else bench/results), a table on stdout. Exits 1
where the kernel differs from the reference by more than bf16 rounding allows.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from provenance import provenance
from timing import gpu_slug

from common.generation import decode_kernel
from common.generation.pages import PAGE

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-3b": (16, 2, 128), "smollm2-135m": (9, 3, 64)}
TOLERANCE = 2e-2  # bf16 output: ~3 significant digits
LONG_EVERY = 32  # the skewed mix: one slot in this many holds --long-keys


def key_counts(slots, mix, args, generator):
    lengths = torch.randint(args.min_keys, args.max_keys + 1, (slots,), generator=generator, dtype=torch.int32)
    if mix == "skewed":
        lengths[torch.randperm(slots, generator=generator)[: max(1, slots // LONG_EVERY)]] = args.long_keys
    return lengths


def paged_cache(lengths, kv_heads, dim, generator, dtype=torch.bfloat16):
    """On the generator's device: (keys, values) as (slots, KV, most keys, D), the same in pools of pages (pages,
    PAGE, KV, D) and the block table (slots, max_pages) int32 that scatters each slot's pages over the pool (page 0:
    scratch)."""
    page, slots, most, device = PAGE, len(lengths), int(lengths.max()), generator.device
    max_pages = -(-most // page)
    shape = (slots, max_pages * page, kv_heads, dim)
    keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    table = (1 + torch.randperm(slots * max_pages, generator=generator, device=device)).view(slots, max_pages).int()
    pool_k = torch.zeros(1 + slots * max_pages, page, kv_heads, dim, dtype=dtype, device=device)
    pool_v = torch.zeros_like(pool_k)
    pool_k[table.flatten().long()] = keys.view(slots * max_pages, page, kv_heads, dim)
    pool_v[table.flatten().long()] = values.view(slots * max_pages, page, kv_heads, dim)
    return (keys[:, :most].transpose(1, 2), values[:, :most].transpose(1, 2)), (pool_k, pool_v, table)


def reference(q, k, v, lengths, scale):
    """float32, one slot at a time: q (S, H, 1, D), k/v (S, KV, L, D)."""
    out = []
    groups = q.shape[1] // k.shape[1]
    for s, n in enumerate(lengths.tolist()):
        keys = k[s, :, :n].float().repeat_interleave(groups, 0)
        values = v[s, :, :n].float().repeat_interleave(groups, 0)
        weights = torch.softmax(q[s].float() @ keys.transpose(1, 2) * scale, -1)
        out.append((weights @ values).transpose(0, 1))  # (1, H, D)
    return torch.stack(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", default="8,64,256,512")
    p.add_argument("--min-keys", type=int, default=200)
    p.add_argument("--max-keys", type=int, default=1300)
    p.add_argument("--long-keys", type=int, default=4000)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="", help="appended to the JSON's name (decode-attention-<gpu>-<tag>.json)")
    args = p.parse_args()
    from triton.testing import do_bench_cudagraph

    name = torch.cuda.get_device_name()
    slug = gpu_slug(name)
    rows, failed = [], False
    g, gpu = torch.Generator().manual_seed(0), torch.Generator(device="cuda").manual_seed(0)
    for model, (heads, kv_heads, dim) in SHAPES.items():
        for slots in map(int, args.slots.split(",")):
            for mix in ("even", "skewed"):
                scale = dim ** -0.5
                lengths = key_counts(slots, mix, args, g)
                (k, v), (pool_k, pool_v, table) = paged_cache(lengths, kv_heads, dim, gpu)
                q = torch.randn(slots, 1, heads, dim, generator=gpu, device="cuda", dtype=torch.bfloat16)
                q = q.transpose(1, 2)
                lengths = lengths.cuda()
                want = reference(q, k, v, lengths, scale)
                # the order as fastgen hands it over: worked out once a step, not in every layer's attention
                longest, in_order = decode_kernel.longest_first(lengths), torch.arange(slots, dtype=torch.int32,
                                                                                         device="cuda")
                runs = {
                    "longest_first": lambda: decode_kernel.attend(q, pool_k, pool_v, lengths, table, scale, longest),
                    "slot_order": lambda: decode_kernel.attend(q, pool_k, pool_v, lengths, table, scale, in_order),
                }
                row = {"model": model, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "slots": slots,
                       "mix": mix, "mean_keys": round(float(lengths.float().mean()), 1),
                       "most_keys": int(lengths.max()), "splits": decode_kernel.splits_for(slots, kv_heads, q.device)}
                kv_bytes = int(lengths.sum()) * kv_heads * dim * 2 * 2
                for order, run in runs.items():
                    err = float((run().float() - want).abs().max())
                    us = 1000 * do_bench_cudagraph(run, rep=50)
                    row[f"{order}_max_abs_diff"] = round(err, 5)
                    row[f"{order}_us"] = round(us, 1)
                    row[f"{order}_gb_s"] = round(kv_bytes / us / 1e3, 0)
                    failed |= not err <= TOLERANCE
                row["speedup"] = round(row["slot_order_us"] / row["longest_first_us"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out) / f"decode-attention-{slug}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": name, "torch": torch.__version__, "page": PAGE,
                               "keys_per_slot": f"uniform {args.min_keys}-{args.max_keys}; skewed: one slot in "
                               f"{LONG_EVERY} at {args.long_keys}", **provenance(), "results": rows}, indent=1) + "\n")
    print(f"\n{name}; wrote {out}")
    print(f"{'model':<14}{'slots':>6}{'mix':>8}{'splits':>7}{'longest first us':>18}{'slot order us':>15}"
          f"{'GB/s':>7}{'speedup':>9}{'max diff':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['slots']:>6}{r['mix']:>8}{r['splits']:>7}{r['longest_first_us']:>18}"
              f"{r['slot_order_us']:>15}{r['longest_first_gb_s']:>7.0f}{r['speedup']:>9}"
              f"{r['longest_first_max_abs_diff']:>10}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
