"""Table the evaluations of several runs side by side: one row per model of a run (base, SFT, DPO), one column per
task metric. `make compare COMPARE="smol qwen"` evaluates what is missing first, then calls this.

    python steps/compare.py --run smol=data/runs/smol-cpu --run qwen=data/runs/qwen-cpu --out data/runs/compare-cpu.md

Reads only <run>/eval/{base,sft,dpo}.json. Cells are value ± standard error; SFT and DPO rows add, in brackets,
the difference against the base model of the same run.
"""

from pathlib import Path

from common import run_step
from common.io.files import output_lock, write_text
from common.options import step_parser
from common.reporting.eval_tables import (STAGES, eval_tasks, limit_text, metric_names, read_json, signed, table,
                                          value_cell)


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="a run directory and the name its rows get (repeat for each run)")
    p.add_argument("--out", required=True, type=Path, help="markdown file to write")
    return p.parse_args(argv)


def parse_run(spec):
    name, _, path = spec.rpartition("=")
    path = Path(path)
    return name or path.name, path


def columns(evals):
    """Every (task, metric key) of every run, in the order first seen."""
    seen = []
    for evaluation in evals:
        for task in eval_tasks(evaluation):
            for key in metric_names(evaluation["results"][task]):
                if (task, key) not in seen:
                    seen.append((task, key))
    return seen


def cell(evaluation, base, task, key):
    result = evaluation["results"].get(task, {})
    text = value_cell(result, key)
    if evaluation is not base and text and isinstance(base["results"].get(task, {}).get(key), (int, float)):
        text += f" ({signed(result[key] - base['results'][task][key])})"
    return text


def main(argv=None):
    args = parse_args(argv)
    runs = [parse_run(spec) for spec in args.run]
    evals = {(name, stage): read_json(path / "eval" / f"{stage}.json") for name, path in runs for stage in STAGES}
    cols = columns(evals.values())
    rows = []
    for name, _ in runs:
        base = evals[(name, "base")]
        for stage in STAGES:
            evaluation = evals[(name, stage)]
            rows.append((name, stage, *[cell(evaluation, base, task, key) for task, key in cols]))
    header = ["run", "model", *[f"{task} {key.split(',')[0]}" for task, key in cols]]
    about = [(name, str(path), evals[(name, "base")]["model"], ", ".join(evals[(name, "base")].get("tasks", [])),
              limit_text(evals[(name, "base")].get("limit"))) for name, path in runs]
    notes = ["Cells: value ± lm-eval's standard error; SFT and DPO rows add (in brackets) the difference against the "
             "base model of the same run. Each run's report (report.md) gives these differences paired over the same "
             "examples, with their standard error and whether they are beyond noise."]
    settings = {(tasks, limit) for *_, tasks, limit in about}
    if len(settings) > 1:
        notes.append("**The runs were evaluated on different tasks or LIMITs: compare their columns with care.**")
    text = "\n\n".join([
        "# Evaluation across runs", table(["run", "directory", "base model", "tasks", "LIMIT"], about),
        table(header, rows), *notes,
    ])
    with output_lock(args.out):  # a quick write, but `make compare` can be run twice at once like any target
        write_text(args.out, text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_step(main)
