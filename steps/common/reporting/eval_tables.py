"""Reading and tabling the eval step's results (eval/<stage>.json, lm-evaluation-harness output plus settings):
shared by the run report, the cross-run comparison and the adapters' model cards, so that all three show the same
numbers the same way."""

import json
from dataclasses import dataclass
from pathlib import Path

from common import DataError
from common.reporting.paired import BEYOND, RULE, TOO_FEW, Paired, paired_difference

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
    if limit is None:
        return "none (every example)"
    return f"{limit:g}" if isinstance(limit, (int, float)) else str(limit)  # a number: from older eval steps


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


def unpaired_cell(result, base, key):
    """The difference against `base` ± sqrt(se² + se_base²), as if independent: for eval JSONs without per-example
    results (an older eval step), where no paired standard error can be had."""
    value, base_value = result.get(key), base.get(key)
    if not is_number(value) or not is_number(base_value):
        return ""
    se, base_se = stderr_of(result, key), stderr_of(base, key)
    spread = f" ± {fmt((se ** 2 + base_se ** 2) ** 0.5)}" if se is not None and base_se is not None else ""
    return signed(value - base_value) + spread


def eval_tasks(evaluation):
    """The requested tasks (groups such as mmlu included) in the order asked; their subtasks are left to the JSON."""
    results = evaluation["results"]
    return [t for t in evaluation.get("tasks") or results if t in results] or list(results)


COMPARISONS = (("sft", "base"), ("dpo", "sft"), ("dpo", "base"))  # (later, earlier): a column of later - earlier
MARK = "*"  # after a paired difference beyond noise (paired.RULE)
EVAL_HEADER = ["task", "metric", *STAGES, *[f"{later} - {earlier}" for later, earlier in COMPARISONS]]


@dataclass(frozen=True)
class Comparison:
    task: str
    key: str  # lm-eval's "metric,filter"
    later: str
    earlier: str
    paired: Paired | None  # None: no per-example results in common, the table shows the unpaired difference
    points: bool  # the metric is a share (values in [0, 1]): the headline says its change in points

    @property
    def metric(self):
        return self.key.split(",")[0]


def delta_cell(comparison, results):
    """'+0.052 ± 0.015 *': later - earlier ± its paired standard error, MARK where beyond noise; the unpaired
    difference where there are no per-example results. `results`: {stage: the task's results}."""
    p = comparison.paired
    if p is None:
        return unpaired_cell(results[comparison.later], results[comparison.earlier], comparison.key)
    mark = f" {MARK}" if p.verdict == BEYOND else ""
    return signed(p.diff) + (f" ± {fmt(p.se)}" if p.se is not None else "") + mark


def eval_rows(evals):
    """(rows for EVAL_HEADER, comparisons): one row a metric of each requested task, each model's value ± lm-eval's
    standard error, then the differences of COMPARISONS (a Comparison each). `evals` maps stage -> eval JSON; a
    stage not in it gets empty cells."""
    base = evals["base"]
    rows, comparisons = [], []
    for task in eval_tasks(base):
        results = {stage: evals[stage]["results"].get(task, {}) if stage in evals else {} for stage in STAGES}
        for key in metric_names(results["base"]):
            values = [results[s][key] for s in STAGES if is_number(results[s].get(key))]
            points = all(0 <= v <= 1 for v in values)
            deltas = []
            for later, earlier in COMPARISONS:
                if later not in evals or earlier not in evals:
                    deltas.append("")
                    continue
                paired = paired_difference(evals[earlier], evals[later], task, key)
                comparison = Comparison(task, key, later, earlier, paired if paired and paired.n else None, points)
                comparisons.append(comparison)
                deltas.append(delta_cell(comparison, results))
            rows.append((task, key.split(",")[0], *[value_cell(results[s], key) for s in STAGES], *deltas))
    return rows, comparisons


def label(stage):
    return stage if stage == "base" else stage.upper()


def change_text(c):
    """'SFT raised ifeval prompt_level_strict_acc by 5.2 points (± 1.5)' (DPO's: against which model)."""
    p = c.paired
    scale, unit, digits = (100, " points", 1) if c.points else (1, "", 3)
    spread = f"all {p.n} examples moved the same way" if p.se == 0 else f"± {scale * p.se:.{digits}f}"
    return (f"{label(c.later)} {'raised' if p.diff > 0 else 'lowered'} {c.task} {c.metric} by "
            f"{scale * abs(p.diff):.{digits}f}{unit} ({spread})" + ("" if c.later == "sft" else
                                                                      f" against {label(c.earlier)}"))


def headline(comparisons):
    """One sentence: which differences are beyond noise, and how many are not (or could not be told)."""
    paired = [c for c in comparisons if c.paired is not None]
    if not paired:
        return ("No difference is tested against noise here: these eval JSONs have no per-example results (an older "
                "eval step), so only unpaired differences are shown.")
    beyond = [c for c in paired if c.paired.verdict == BEYOND]
    few = sum(c.paired.verdict == TOO_FEW for c in paired)
    within, total = len(paired) - len(beyond) - few, len(comparisons)
    rest = []
    if within:
        if beyond and within + len(beyond) == total:
            who = "the other comparison is" if within == 1 else f"the other {within} comparisons are"
        elif within == total:
            who = "the comparison is" if within == 1 else f"all {within} comparisons are"
        else:
            who = f"{within} comparison{' is' if within == 1 else 's are'}"
        rest.append(f"{who} within noise")
    if few:
        rest.append(f"{few} comparison{'s rest' if few != 1 else ' rests'} on too few examples to tell")
    if total > len(paired):
        untested = total - len(paired)
        rest.append(f"{untested} comparison{'s' if untested != 1 else ''} without per-example results "
                    f"{'are' if untested != 1 else 'is'} not tested")
    return f"Beyond noise ({RULE}): " + "; ".join([*(map(change_text, beyond) if beyond else ["nothing"]), *rest]) + "."


def read_evals(eval_dir, stages=STAGES):
    """The eval JSONs that exist in eval_dir, by stage (the model card shows what there is)."""
    found = {}
    for stage in stages:
        path = Path(eval_dir) / f"{stage}.json"
        if path.exists():
            found[stage] = read_json(path)
    return found
