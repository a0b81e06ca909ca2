"""Near-duplicate removal at scale on the CPU: embed N synthetic instructions with all-MiniLM-L6-v2 and run the
filter's blockwise greedy dedup, for N = 10k, 30k, 100k, so the growth is visible.

    .venv/bin/python bench/dedup.py --sizes 10000 30000 100000 --out bench/results/dedup-cpu.json

The instructions are built from templates x topics x details, with paraphrased copies mixed in, so many of them
are near-duplicates; a second timing runs the dedup on random (all distinct) vectors, its worst case, where every
block is compared with everything kept so far.
"""

import argparse
import json
import os
import platform
import random
import resource
import time
from pathlib import Path

from filter import near_duplicates, sentence_embedder
from provenance import provenance

TEMPLATES = ["Write a {d} poem about {t}.", "Explain {t} to a {d} audience.", "Give me {d} tips about {t}.",
             "What are the {d} facts everyone should know about {t}?", "Summarise the history of {t} in a {d} way.",
             "Compare {t} with something {d}.", "Draft a {d} email asking a friend about {t}.",
             "List {d} questions a student might ask about {t}."]
DETAILS = ["short", "funny", "detailed", "simple", "surprising", "formal", "five", "three", "beginner", "expert"]
PARAPHRASE = [("Write", "Compose"), ("Explain", "Describe"), ("Give me", "Share"), ("about", "on")]


def instructions(n, seed=0):
    rng = random.Random(seed)
    topics = [f"{a} {b}" for a in ("ancient", "modern", "urban", "marine", "solar", "quantum", "medieval", "arctic",
                                    "digital", "tropical", "rural", "industrial")
              for b in ("bridges", "gardens", "music", "cooking", "trains", "forests", "markets", "robots", "maps",
                        "languages", "festivals", "rivers", "libraries", "volcanoes", "bees", "glass")]
    out = []
    while len(out) < n:
        text = rng.choice(TEMPLATES).format(t=rng.choice(topics), d=rng.choice(DETAILS)) + f" (#{len(out)})"
        if out and rng.random() < 0.2:  # a paraphrase of an earlier instruction
            text = rng.choice(out)
            for a, b in rng.sample(PARAPHRASE, 2):
                text = text.replace(a, b)
        out.append(text)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", default="bench/results/dedup-cpu.json")
    args = p.parse_args()
    import torch

    embed = sentence_embedder("embedded:minilm")
    embed(["warm up"])
    rows = []
    for n in args.sizes:
        texts = instructions(n)
        start = time.time()
        vectors = embed(texts)
        embedded = time.time()
        # Time the dedup apart from the embedding: the filter embeds block by block, here all at once.
        dropped = near_duplicates([str(i) for i in range(n)], lambda batch, v=vectors: v[[int(i) for i in batch]],
                                  args.threshold)
        done = time.time()
        # Worst case for the dedup itself: nothing is a duplicate, so every block is compared with all n kept.
        distinct = torch.nn.functional.normalize(torch.randn(n, vectors.shape[1]), dim=-1)
        worst_start = time.time()
        none = near_duplicates([str(i) for i in range(n)], lambda batch: distinct[[int(i) for i in batch]],
                               args.threshold)
        worst = time.time() - worst_start
        rows.append({"n": n, "embed_s": round(embedded - start, 1), "dedup_s": round(done - embedded, 1),
                     "total_s": round(done - start, 1), "dropped": len(dropped),
                     "dedup_s_all_distinct": round(worst, 1), "dropped_all_distinct": len(none),
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
        print(rows[-1], flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (no GPU)",
              "torch_threads": torch.get_num_threads(), "threshold": args.threshold, **provenance(), "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
