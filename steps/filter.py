"""Filter generated samples: drop empty, truncated, too short or long, repetitive and duplicated ones.

    python steps/filter.py --in generated.jsonl --out filtered.jsonl --dropped dropped.jsonl --summary summary.json

Each rule is a function of one record returning True to drop it; the first rule that fires names the reason.
Exact duplicates (after normalising case, punctuation and spaces) are checked last, keeping the first seen.
"""

import argparse
import re
import string
from collections import Counter

from common import run_step
from common.jsonl import DataError, read_jsonl, write_json, write_jsonl

FIELDS = {"id": str, "instruction": str, "response": str}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", required=True, help="generated JSONL")
    p.add_argument("--out", required=True, help="kept records (JSONL)")
    p.add_argument("--dropped", required=True, help="dropped records with a 'dropped_by' field (JSONL)")
    p.add_argument("--summary", required=True, help="counts per rule (JSON)")
    p.add_argument("--min-instruction-words", type=int, default=3)
    p.add_argument("--max-instruction-words", type=int, default=300)
    p.add_argument("--min-response-words", type=int, default=3)
    p.add_argument("--max-response-words", type=int, default=2000)
    p.add_argument("--max-repeated-ngram-ratio", type=float, default=0.3,
                   help="drop a response in which more than this share of its word 4-grams repeat an earlier one")
    p.add_argument("--keep-truncated", action="store_true", help="keep texts that ran into the token limit")
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


def rules(args):
    """(name, drop?) in the order they are checked."""
    return [
        ("truncated", lambda r: not args.keep_truncated
         and not (r.get("instruction_finished", True) and r.get("response_finished", True))),
        ("empty", lambda r: not r["instruction"].strip() or not r["response"].strip()),
        ("instruction_length", lambda r: not args.min_instruction_words <= len(words(r["instruction"]))
         <= args.max_instruction_words),
        ("response_length", lambda r: not args.min_response_words <= len(words(r["response"]))
         <= args.max_response_words),
        ("repetition", lambda r: repeated_ngram_ratio(r["response"]) > args.max_repeated_ngram_ratio),
    ]


def filter_records(records, args):
    """Split records into (kept, dropped); each dropped record gets 'dropped_by'."""
    checks = rules(args)
    kept, dropped, seen = [], [], set()
    for record in records:
        reason = next((name for name, drop in checks if drop(record)), None)
        if reason is None:
            key = normalise(record["instruction"])
            if key in seen:
                reason = "duplicate"
            seen.add(key)
        if reason is None:
            kept.append(record)
        else:
            dropped.append({**record, "dropped_by": reason})
    return kept, dropped


def main(argv=None):
    args = parse_args(argv)
    records = read_jsonl(args.inp, required=FIELDS)
    if not records:
        raise DataError(f"{args.inp}: no records to filter")
    kept, dropped = filter_records(records, args)
    by_rule = Counter(r["dropped_by"] for r in dropped)
    summary = {
        "input": len(records),
        "kept": len(kept),
        "dropped": {name: by_rule.get(name, 0) for name, _ in rules(args)} | {"duplicate": by_rule.get("duplicate", 0)},
    }
    write_jsonl(args.dropped, dropped)
    write_json(args.summary, summary)
    write_jsonl(args.out, kept)  # last: make treats this file as the step's output
    print(f"kept {len(kept)} of {len(records)}; dropped {dict(by_rule)}")


if __name__ == "__main__":
    run_step(main)
