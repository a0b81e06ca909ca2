"""Filter generated samples and say why each dropped one was dropped.

    python steps/filter.py --in generated.jsonl --out filtered.jsonl --dropped dropped.jsonl --summary summary.json

Per-record rules run in order and the first that fires names the reason: truncated, empty, bad instruction
(generate's cleaning), instruction/response length in tokens, repetition, non-English, refusal, template debris,
reward below --min-reward (only with --reward-model). Then duplicates: exact ones after normalising case,
punctuation and spaces, and semantic near-duplicates of instructions (cosine similarity of sentence embeddings at
or above --near-duplicate-threshold), keeping the first of each group.

Outputs: kept records (--out), dropped records with a 'dropped_by' field (--dropped), and a summary of counts per
rule as JSON (--summary), markdown and a PNG of length and score histograms (same name, .md and .png).
"""

import argparse
import re
import string
import sys
from collections import Counter
from pathlib import Path

from common import DataError, OptionError, run_step
from common.files import output_lock, write_json, write_text
from common.jsonl import read_jsonl, write_jsonl

FIELDS = {"id": str, "instruction": str}  # "response" is null in instruction-only output
REFUSAL = re.compile(
    r"\b(i('m| am) sorry,? but|i (cannot|can't|can not|won't|am unable to|'m unable to) "
    r"(help|assist|provide|answer|comply|fulfil)|as an ai( language model)?,? i)", re.I
)
TEMPLATE_DEBRIS = re.compile(r"<\|[a-z_]+\|>|\[/?INST\]|<</?SYS>>|</?s>|^(user|assistant|system)\s*:?\s*\n", re.I | re.M)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", required=True, help="generated JSONL")
    p.add_argument("--out", required=True, help="kept records (JSONL)")
    p.add_argument("--dropped", required=True, help="dropped records with a 'dropped_by' field (JSONL)")
    p.add_argument("--summary", required=True, help="counts per rule (JSON; .md and .png beside it)")
    p.add_argument("--tokenizer", default="embedded:smollm2", help="tokenizer that counts lengths")
    p.add_argument("--min-instruction-tokens", type=int, default=4)
    p.add_argument("--max-instruction-tokens", type=int, default=512)
    p.add_argument("--min-response-tokens", type=int, default=4)
    p.add_argument("--max-response-tokens", type=int, default=4096)
    p.add_argument("--max-repeated-ngram-ratio", type=float, default=0.3,
                   help="drop a response in which more than this share of its word 4-grams repeat an earlier one")
    p.add_argument("--language", default="en", help="keep this language (langdetect code); 'any' keeps all")
    p.add_argument("--keep-refusals", action="store_true")
    p.add_argument("--keep-truncated", action="store_true", help="keep texts that ran into the token limit")
    p.add_argument("--embedder", default="embedded:minilm",
                   help="sentence-transformers model for near-duplicates (any Hub id or directory); 'none' skips")
    p.add_argument("--near-duplicate-threshold", type=float, default=0.9)
    p.add_argument("--reward-model", default=None, help="score responses and drop those under --min-reward")
    p.add_argument("--min-reward", type=float, default=None)
    return p.parse_args(argv)


def words(text):
    return text.split()


def repeated_ngram_ratio(text, n=4):
    """Share of a text's word n-grams that repeat an earlier one: 0 for no repetition, near 1 for a loop."""
    tokens = words(text.lower())
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def normalise(text):
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def detect_language(text):
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect is random otherwise
    try:
        return detect(text)
    except LangDetectException:  # no letters at all
        return "unknown"


def rules(args, count_tokens):
    """(name, drop?) in the order they are checked; each takes one record."""
    def response(r):
        return r.get("response") or ""

    def length_outside(text, low, high):
        return not low <= count_tokens(text) <= high

    return [
        ("truncated", lambda r: not args.keep_truncated
         and not (r.get("instruction_finished", True) and r.get("response_finished") is not False)),
        ("empty", lambda r: not r["instruction"].strip() or r.get("response") == ""),
        ("bad_instruction", lambda r: bool(r.get("rejected"))),  # generate's reason: template tokens, an answer...
        ("instruction_length", lambda r: length_outside(r["instruction"], args.min_instruction_tokens,
                                                        args.max_instruction_tokens)),
        ("response_length", lambda r: r.get("response") is not None
         and length_outside(r["response"], args.min_response_tokens, args.max_response_tokens)),
        ("repetition", lambda r: repeated_ngram_ratio(response(r)) > args.max_repeated_ngram_ratio),
        ("language", lambda r: args.language != "any" and len(words(f"{r['instruction']} {response(r)}")) >= 8
         and detect_language(f"{r['instruction']}\n{response(r)}") != args.language),  # unreliable on fewer words
        ("refusal", lambda r: not args.keep_refusals and bool(REFUSAL.search(response(r)))),
        ("template_debris", lambda r: bool(TEMPLATE_DEBRIS.search(f"{r['instruction']}\n{response(r)}"))),
        ("low_reward", lambda r: args.min_reward is not None and r["reward"] < args.min_reward),
    ]


def near_duplicates(texts, embed, threshold, block=512):
    """Indices of texts whose embedding is within `threshold` cosine similarity of an earlier kept text.

    Greedy in input order, block by block, comparing each block with the kept texts so far and within itself:
    memory grows with block x kept, never with n x n.
    """
    import torch

    dropped, kept = set(), None
    for start in range(0, len(texts), block):
        emb = torch.nn.functional.normalize(embed(texts[start : start + block]).float(), dim=-1)
        dup = torch.zeros(len(emb), dtype=torch.bool)
        if kept is not None:
            dup |= (emb @ kept.T).max(dim=1).values >= threshold
        within = emb @ emb.T
        for i in range(len(emb)):
            if not dup[i]:
                dup[i + 1 :] |= within[i, i + 1 :] >= threshold
        keep = ~dup
        dropped.update(start + i for i in torch.nonzero(dup).flatten().tolist())
        kept = emb[keep] if kept is None else torch.cat([kept, emb[keep]])
    return dropped


def sentence_embedder(name):
    from sentence_transformers import SentenceTransformer

    from common.models import device, resolve

    model = SentenceTransformer(resolve(name), device=device())
    return lambda texts: model.encode(texts, convert_to_tensor=True, batch_size=128)


def filter_records(records, args, count_tokens, embed=None):
    """Split records into (kept, dropped); each dropped record gets 'dropped_by'."""
    checks = rules(args, count_tokens)
    kept, dropped, seen = [], [], set()
    for record in records:
        reason = next((name for name, drop in checks if drop(record)), None)
        if reason is None and normalise(record["instruction"]) in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(normalise(record["instruction"]))
            kept.append(record)
        else:
            dropped.append({**record, "dropped_by": reason})
    if embed is not None and kept:
        near = near_duplicates([r["instruction"] for r in kept], embed, args.near_duplicate_threshold)
        dropped += [{**r, "dropped_by": "near_duplicate"} for i, r in enumerate(kept) if i in near]
        kept = [r for i, r in enumerate(kept) if i not in near]
    return kept, dropped


def add_rewards(records, name):
    from common.reward import load_reward, score_in_batches

    scored = [r for r in records if r.get("response")]
    scores = score_in_batches(load_reward(name), [r["instruction"] for r in scored], [r["response"] for r in scored], 16)
    for r, s in zip(scored, scores):
        r["reward"] = s
    for r in records:
        r.setdefault("reward", float("-inf"))


def write_summary(path, summary, kept, count_tokens):
    """The counts as JSON and markdown, and length (and reward) histograms of the kept samples as a PNG."""
    path = Path(path)
    write_json(path, summary)
    rows = [f"| {rule} | {n} |" for rule, n in summary["dropped"].items()]
    write_text(path.with_suffix(".md"), "\n".join([
        f"# Filter summary\n\nKept {summary['kept']} of {summary['input']} samples.\n",
        "| dropped by | samples |", "|---|---|", *rows, "",
    ]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"instruction tokens": [count_tokens(r["instruction"]) for r in kept],
              "response tokens": [count_tokens(r["response"]) for r in kept if r.get("response")]}
    if any("reward" in r for r in kept):
        series["reward"] = [r["reward"] for r in kept]
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
    for ax, (title, values) in zip(axes, series.items()):
        ax.hist(values, bins=20)
        ax.set_title(f"{title} (kept)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))
    plt.close(fig)


def stage(text):
    """Say on stderr what the step is doing now (the kill test waits for these lines)."""
    print(f"filter: {text}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if (args.min_reward is None) != (args.reward_model is None):
        raise OptionError("--reward-model and --min-reward go together: pass both, or neither")
    records = read_jsonl(args.inp, required=FIELDS)
    if not records:
        raise DataError(f"{args.inp}: no records to filter")
    with output_lock(args.out):
        filter_and_write(args, records)


def filter_and_write(args, records):
    from common.models import load_tokenizer

    stage(f"loading the tokenizer ({len(records)} records read from {args.inp})")
    tokenizer = load_tokenizer(args.tokenizer)
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if args.reward_model:
        stage(f"scoring with {args.reward_model}")
        add_rewards(records, args.reward_model)
    embed = None if args.embedder == "none" else sentence_embedder(args.embedder)
    stage("applying the rules and removing duplicates")
    kept, dropped = filter_records(records, args, count_tokens, embed)

    by_rule = Counter(r["dropped_by"] for r in dropped)
    names = [name for name, _ in rules(args, count_tokens)] + ["duplicate", "near_duplicate"]
    summary = {"input": len(records), "kept": len(kept), "dropped": {name: by_rule.get(name, 0) for name in names}}
    stage("writing the outputs")
    write_jsonl(args.dropped, dropped)
    write_summary(args.summary, summary, kept, count_tokens)
    write_jsonl(args.out, kept)  # last: make treats this file as the step's output
    print(f"kept {len(kept)} of {len(records)}; dropped {dict(by_rule)}")


if __name__ == "__main__":
    run_step(main)
