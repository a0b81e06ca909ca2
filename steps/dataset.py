"""Write the run's data as a dataset others can use: SFT conversations in TRL's `messages` format and the
preference pairs, each split into train and test by record id, with a dataset card (README.md, the Hub's YAML
metadata) that says how it was made.

    python steps/dataset.py --run data/runs/smol-cpu --out data/runs/smol-cpu/dataset --test-fraction 0.05

Reads RUN/filtered.jsonl, RUN/preference.jsonl and RUN/filter_summary.json, and where they exist RUN/judged.jsonl
(or the tags in generated.jsonl) for the tag distributions and RUN/scored.jsonl for the preference settings. Writes
OUT/sft/{train,test}.jsonl, OUT/preference/{train,test}.jsonl (a split with no rows has no file) and OUT/README.md,
all at once: OUT appears only when complete. The split is common.io.splits.split_of (a hash of the id), the one the
SFT and DPO steps hold their test split out with, so the same TEST_FRACTION gives the same records on each side.
"""

import math
import sys
from pathlib import Path

from common import DataError, run_step
from common.io.files import atomic_path, output_lock
from common.io.jsonl import read_jsonl, write_jsonl
from common.io.splits import DEFAULT_TEST_FRACTION, split_records
from common.options import fraction, step_parser
from common.reporting.cards import dataset_card
from common.reporting.eval_tables import read_json
from common.reporting.tag_stats import TAG_FIELDS, TAG_TITLES, distribution_table, tagged, tags_of, turns_text

TAG_COLUMNS = ("category", "input_quality", "quality_reason", "difficulty", "safety")
PAIR_FIELDS = ("id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin")


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--run", required=True, type=Path, help="run directory (the chain's outputs)")
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--test-fraction", type=fraction, default=DEFAULT_TEST_FRACTION,
                   help="share of record ids in the test split (make: TEST_FRACTION); 0: no test split")
    p.add_argument("--name", default=None, help="the dataset's title on its card (default: from the run directory)")
    return p.parse_args(argv)


def messages_of(record):
    """The conversation as chat messages: every turn of a multi-turn record, else the instruction and response
    (what the SFT step trains on; the system prompt that steered generation stays a field of its own)."""
    return record.get("conversation") or [{"role": "user", "content": record["instruction"]},
                                          {"role": "assistant", "content": record["response"]}]


def sft_row(record):
    """One SFT row: id, messages, and the tags and diversity measure that let users filter further."""
    row = {"id": record["id"], "messages": messages_of(record)}
    tags = tags_of(record)
    if tags:
        row.update({key: tags.get(key) for key in TAG_COLUMNS})
    if isinstance(record.get("nn_distance"), (int, float)) and math.isfinite(record["nn_distance"]):
        row["nn_distance"] = record["nn_distance"]
    if record.get("system"):
        row["system"] = record["system"]
    return row


def same_columns(rows):
    """Every row with the same keys (None where a row lacks one): the json loader of `datasets` infers one schema
    for all the rows of a split."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def first_settings(records, key="settings"):
    return next((r[key] for r in records if isinstance(r.get(key), dict)), None)


def build(args):
    """(files {subset: {split: rows}}, card info) from the run directory."""
    run = args.run
    kept = read_jsonl(run / "filtered.jsonl", required={"id": str, "instruction": str})
    pairs = read_jsonl(run / "preference.jsonl", required={"id": str, "prompt": list, "chosen": list,
                                                           "rejected": list})
    summary = read_json(run / "filter_summary.json")
    if not kept:
        raise DataError(f"{run / 'filtered.jsonl'}: no records kept by the filters, so no dataset")
    missing = [r["id"] for r in kept if not r.get("conversation") and not isinstance(r.get("response"), str)]
    if missing:
        raise DataError(f"{run / 'filtered.jsonl'}: {len(missing)} records have no response (e.g. {missing[0]}); "
                        "a dataset of instructions alone (generate --instruction-only) is not supported")
    judged_path = run / "judged.jsonl"
    judged = read_jsonl(judged_path) if judged_path.exists() else read_jsonl(run / "generated.jsonl") \
        if (run / "generated.jsonl").exists() else []
    scored = read_jsonl(run / "scored.jsonl") if (run / "scored.jsonl").exists() else []

    sft = {split: same_columns([sft_row(r) for r in part])
           for split, part in zip(("train", "test"), split_records(kept, args.test_fraction))}
    preference = {split: same_columns([{k: p[k] for k in PAIR_FIELDS if k in p} for p in part])
                  for split, part in zip(("train", "test"), split_records(pairs, args.test_fraction))}
    generation = first_settings(kept) or first_settings(judged) or {}
    tag_tables = []
    if tagged(kept) or tagged(judged):
        populations = {"generated": judged, "kept": kept} if tagged(judged) else {"kept": kept}
        for field in TAG_FIELDS:
            header, rows = distribution_table(field, populations)
            tag_tables.append((TAG_TITLES[field], header, rows))
    judge = first_settings(kept, "judge") or first_settings(judged, "judge") or summary.get("judge")
    judge_model = (judge or {}).get("model")
    info = {
        "name": args.name or f"Synthetic instructions: {run.name}",
        "generator": generation.get("model") or "unknown",
        "recipe": generation.get("recipe"),
        "generation": generation,
        "judge": judge,
        "judge_note": ("The judge is the 135M embedded default: its tags are close to guesses; read them as a check "
                       "that judging ran, not as quality labels." if judge_model and (
                           "embedded:smollm2" in judge_model or "135m" in judge_model.lower()) else None),
        "preference": first_settings(scored),
        "summary": summary,
        "test_fraction": args.test_fraction,
        "tag_tables": tag_tables,
        "multi_turn": sum(len(messages_of(r)) > 2 for r in kept),
        "turns": turns_text(kept),
    }
    return {"sft": sft, "preference": preference}, info


def main(argv=None):
    args = parse_args(argv)
    with output_lock(args.out):
        subsets, info = build(args)
        info["files"] = {subset: {split: (f"{subset}/{split}.jsonl", len(rows)) for split, rows in splits.items()}
                         for subset, splits in subsets.items()}
        card = dataset_card(info)
        with atomic_path(args.out) as tmp:
            for subset, splits in subsets.items():
                for split, rows in splits.items():
                    if rows:  # `datasets` refuses a split file without rows
                        write_jsonl(tmp / subset / f"{split}.jsonl", rows)
            (tmp / "README.md").write_text(card, encoding="utf-8")
    counts = ", ".join(f"{subset} {'/'.join(str(n) for _, n in files.values())}"
                       for subset, files in info["files"].items())
    print(f"wrote {args.out} (train/test rows: {counts})", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
