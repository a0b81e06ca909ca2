"""Reading and tabling the eval step's results (eval/<stage>.json, lm-evaluation-harness output plus settings):
shared by the run report, the cross-run comparison and the adapters' model cards, so that all three show the same
numbers the same way."""

import json
from pathlib import Path

from common import DataError

STAGES = ("base", "sft", "dpo")


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: missing; the report needs every step's output (run `make report`)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def fmt(x, digits=3):
    """Floats with `digits` decimals, integers as they are."""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def limit_text(limit):
    return "none (every example)" if limit is None else f"{limit:g}"


def signed(x, digits=3):
    return f"{x:+.{digits}f}"


def share(n, total):
    """n of total as a whole percentage ("" for an empty total)."""
    return f"{100 * n / total:.0f}%" if total else ""


def table(header, rows):
    """A markdown pipe table (renders on GitHub and on the Hub)."""
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_names(result):
    """The task's metrics (lm-eval keys 'metric,filter'), without their standard errors."""
    return [k for k, v in result.items() if "," in k and "_stderr," not in k and is_number(v)]


def stderr_of(result, key):
    value = result.get(key.replace(",", "_stderr,", 1))
    return value if isinstance(value, (int, float)) else None


def value_cell(result, key):
    """'0.333 ± 0.063' (value ± standard error), or the value alone where lm-eval gives no standard error."""
    value = result.get(key)
    if not isinstance(value, (int, float)):
        return ""
    se = stderr_of(result, key)
    return fmt(value) + (f" ± {fmt(se)}" if se is not None else "")


def delta_cell(result, base, key):
    """The difference against base, ± the standard error of the difference (sqrt(se² + se_base²))."""
    value, base_value = result.get(key), base.get(key)
    if not isinstance(value, (int, float)) or not isinstance(base_value, (int, float)):
        return ""
    se, base_se = stderr_of(result, key), stderr_of(base, key)
    spread = f" ± {fmt((se ** 2 + base_se ** 2) ** 0.5)}" if se is not None and base_se is not None else ""
    return signed(value - base_value) + spread


def eval_tasks(evaluation):
    """The requested tasks (groups such as mmlu included) in the order asked; their subtasks are left to the JSON."""
    results = evaluation["results"]
    return [t for t in evaluation.get("tasks") or results if t in results] or list(results)


EVAL_HEADER = ["task", "metric", "base", "sft", "dpo", "sft - base", "dpo - base"]


def eval_rows(evals, stages=STAGES):
    """(rows for EVAL_HEADER, bars): one row a metric of each requested task, for base and each later stage, with
    deltas against base. `bars` holds (label, values, standard errors) per metric, for a bar chart. `evals` maps
    stage -> eval JSON; a stage not in it gets empty cells."""
    base = evals["base"]
    rows, bars = [], []
    for task in eval_tasks(base):
        results = {stage: evals[stage]["results"].get(task, {}) if stage in evals else {} for stage in stages}
        for key in metric_names(results["base"]):
            metric = key.split(",")[0]
            rows.append((task, metric, *[value_cell(results[s], key) for s in stages],
                         *[delta_cell(results[s], results["base"], key) for s in stages[1:]]))
            bars.append((f"{task} {metric}", [results[s].get(key) for s in stages],
                         [stderr_of(results[s], key) or 0 for s in stages]))
    return rows, bars


def read_evals(eval_dir, stages=STAGES):
    """The eval JSONs that exist in eval_dir, by stage (the model card shows what there is)."""
    found = {}
    for stage in stages:
        path = Path(eval_dir) / f"{stage}.json"
        if path.exists():
            found[stage] = read_json(path)
    return found
