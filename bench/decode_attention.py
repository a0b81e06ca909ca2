#!/usr/bin/env python3
"""Decoding attention over the slot cache, one layer: the Triton kernel (steps/common/generation/decode_kernel.py)
against flash attention's varlen kernel (the fallback, fastgen.slot_attention) and a float32 reference.

For each model shape (query heads, KV heads, head size of Llama-3.1-8B, Qwen2.5-3B and SmolLM2-135M) and slot count,
random queries and a random bf16 cache of CACHE_LENGTH positions, each slot holding a length drawn uniformly from
--min-keys..--max-keys: the largest difference from the reference (both kernels), and each kernel's time
(triton.testing.do_bench, CUDA graph replay) with the bytes of keys and values it must read over that time.

    python bench/decode_attention.py [--out DIR]

Results: decode-attention-<gpu>.json under --out (default $OUT, else bench/results), a table on stdout. Exits 1
where the kernel differs from the reference by more than bf16 rounding allows.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from timing import gpu_slug

from common.generation import decode_kernel, fastgen

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-3b": (16, 2, 128), "smollm2-135m": (9, 3, 64)}
CACHE_LENGTH = 1536
TOLERANCE = 2e-2  # bf16 output: ~3 significant digits


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
    p.add_argument("--slots", default="8,32,128,256")
    p.add_argument("--min-keys", type=int, default=200)
    p.add_argument("--max-keys", type=int, default=1300)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = p.parse_args()
    from triton.testing import do_bench_cudagraph

    name = torch.cuda.get_device_name()
    slug = gpu_slug(name)
    rows, failed = [], False
    g = torch.Generator(device="cuda").manual_seed(0)
    for model, (heads, kv_heads, dim) in SHAPES.items():
        for slots in map(int, args.slots.split(",")):
            scale = dim ** -0.5
            cache_k = torch.randn(slots, CACHE_LENGTH, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
            cache_v = torch.randn(slots, CACHE_LENGTH, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = cache_k.transpose(1, 2), cache_v.transpose(1, 2)  # the views update() hands to attention
            q = torch.randn(slots, 1, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            lengths = torch.randint(args.min_keys, args.max_keys + 1, (slots,), device="cuda", generator=g,
                                    dtype=torch.int32)
            want = reference(q, k, v, lengths, scale)
            mask = lengths.view(slots, 1, 1, 1)

            class Layer:
                num_key_value_groups = heads // kv_heads

            runs = {
                "triton": lambda: decode_kernel.attend(q, k, v, lengths, scale),
                "flash": lambda: fastgen.slot_attention(Layer(), q, k, v, mask, scaling=scale)[0],
            }
            row = {"model": model, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "slots": slots,
                   "mean_keys": round(float(lengths.float().mean()), 1),
                   "splits": decode_kernel.splits_for(slots, kv_heads, q.device)}
            kv_bytes = int(lengths.sum()) * kv_heads * dim * 2 * 2
            for kernel, run in runs.items():
                err = float((run().float() - want).abs().max())
                us = 1000 * do_bench_cudagraph(run, rep=50)
                row[f"{kernel}_max_abs_diff"] = round(err, 5)
                row[f"{kernel}_us"] = round(us, 1)
                row[f"{kernel}_gb_s"] = round(kv_bytes / us / 1e3, 0)
                failed |= kernel == "triton" and not err <= TOLERANCE
            row["speedup"] = round(row["flash_us"] / row["triton_us"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out) / f"decode-attention-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": name, "torch": torch.__version__, "cache_length": CACHE_LENGTH,
                               "keys_per_slot": f"uniform {args.min_keys}-{args.max_keys}", "results": rows},
                              indent=1) + "\n")
    print(f"\n{name}; wrote {out}")
    print(f"{'model':<14}{'slots':>6}{'splits':>7}{'triton us':>11}{'flash us':>10}{'triton GB/s':>13}{'speedup':>9}"
          f"{'max diff':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['slots']:>6}{r['splits']:>7}{r['triton_us']:>11}{r['flash_us']:>10}"
              f"{r['triton_gb_s']:>13.0f}{r['speedup']:>9}{r['triton_max_abs_diff']:>10}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
