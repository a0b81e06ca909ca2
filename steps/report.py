"""One markdown page for a run: the data funnel, what each filter dropped, reward margins, training and evals.

    python steps/report.py --run data/runs/smol-cpu --out data/runs/smol-cpu/report.md

Reads only the files the other steps wrote in the run directory.
"""

import argparse
import json
import statistics
from pathlib import Path

from common import run_step
from common.jsonl import read_jsonl, write_text

MODELS = ("base", "sft", "dpo")
OFFLINE_SCORER_NOTE = (
    "The reward model here is `embedded:minilm` (all-MiniLM-L6-v2, cosine similarity of instruction and response "
    "embeddings): it measures whether a response is on the instruction's topic, not whether it is correct, helpful "
    "or safe. These pairs prove the pipeline runs; they are not a quality signal like a trained reward model's."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run directory")
    p.add_argument("--out", required=True, help="markdown file to write")
    return p.parse_args(argv)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def fmt(x, digits=3):
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def funnel_section(run):
    summary = json.loads((run / "filter_summary.json").read_text())
    pairs = read_jsonl(run / "preference.jsonl")
    scored = read_jsonl(run / "scored.jsonl")
    rows = [("generated", summary["input"]), ("kept by the filters", summary["kept"]),
            ("scored for preference", len(scored)), ("preference pairs", len(pairs))]
    dropped = [(rule, n) for rule, n in summary["dropped"].items()]
    return "\n\n".join([
        "## Data funnel", table(["stage", "samples"], rows),
        "### Dropped by each filter rule", table(["rule", "dropped"], dropped),
    ]), pairs, scored


def reward_section(pairs, scored):
    margins = [p["margin"] for p in pairs]
    all_scores = [s for r in scored for s in r["scores"]]
    rows = []
    if margins:
        rows.append(("chosen - rejected margin", fmt(statistics.mean(margins)), fmt(min(margins)), fmt(max(margins))))
    if all_scores:
        rows.append(("score of every response", fmt(statistics.mean(all_scores)), fmt(min(all_scores)),
                     fmt(max(all_scores))))
    return "## Reward scores\n\n" + table(["", "mean", "min", "max"], rows)


def training_section(run):
    rows = []
    for name, keys in (("sft", ["loss", "mean_token_accuracy"]), ("dpo", ["loss", "rewards/margins", "rewards/accuracies"])):
        history = json.loads((run / name / "log_history.json").read_text())
        steps = [h for h in history if "loss" in h]
        if not steps:
            continue
        first, last = steps[0], steps[-1]
        for key in keys:
            if key in last:
                rows.append((name, key, fmt(float(first[key])), fmt(float(last[key])), last.get("step", "")))
    return "## Training\n\n" + table(["stage", "metric", "first logged", "last logged", "at step"], rows)


def eval_section(run):
    evals = {m: json.loads((run / "eval" / f"{m}.json").read_text()) for m in MODELS}
    rows = []
    for task, metrics in evals["base"]["results"].items():
        for key, base_value in metrics.items():
            if not isinstance(base_value, (int, float)) or "stderr" in key or key == "sample_len":
                continue
            values = [evals[m]["results"].get(task, {}).get(key) for m in MODELS]
            stderr = metrics.get(key.replace(",", "_stderr,"))
            deltas = [fmt(v - base_value, 3) if isinstance(v, (int, float)) else "" for v in values[1:]]
            rows.append((task, key.split(",")[0], *[fmt(v) for v in values], *deltas, fmt(stderr)))
    limit = evals["base"].get("limit")
    note = f"Examples per task: {'all' if limit is None else limit}. IFEval sentence checks used punkt: {evals['base'].get('punkt')}."
    header = ["task", "metric", "base", "sft", "dpo", "sft - base", "dpo - base", "base stderr"]
    return "## Evaluation (lm-evaluation-harness)\n\n" + table(header, rows) + "\n\n" + note, evals


def settings_section(run, evals):
    generated = read_jsonl(run / "generated.jsonl")
    settings = generated[0].get("settings", {}) if generated else {}
    sft_config = json.loads((run / "sft" / "training_config.json").read_text())
    rows = [("generator", settings.get("model")), ("target model", evals["base"]["model"]),
            ("instruction sampling", f"temperature {settings.get('instruction_temperature')}, "
                                     f"top-p {settings.get('instruction_top_p')}"),
            ("response sampling", f"temperature {settings.get('response_temperature')}"),
            ("SFT", f"lr {sft_config.get('learning_rate')}, epochs {sft_config.get('num_train_epochs')}, "
                    f"batch {sft_config.get('per_device_train_batch_size')} x {sft_config.get('gradient_accumulation_steps')}"),
            ("seed", settings.get("seed")), ("lm-eval", evals["base"].get("lm_eval_version"))]
    return "## Settings\n\n" + table(["", ""], rows)


def main(argv=None):
    args = parse_args(argv)
    run = args.run
    funnel, pairs, scored = funnel_section(run)
    evals_md, evals = eval_section(run)
    parts = [f"# Run report: {run.name}", funnel, reward_section(pairs, scored), training_section(run), evals_md,
             settings_section(run, evals)]
    if scored and scored[0].get("reward_model") == "embedded:minilm":
        parts.insert(3, OFFLINE_SCORER_NOTE)
    write_text(args.out, "\n\n".join(parts) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_step(main)
