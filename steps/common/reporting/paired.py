"""Paired differences between two models' eval results: base, SFT and DPO answer the same examples, so a difference
is judged against the spread of the per-example differences, not of the two scores as if independent.

Reads the eval JSON's "examples" ({leaf task: {"doc_id": [...], "metric,filter": [value per doc]}}) and "leaves"
({requested task: [leaf tasks]}); a JSON without them (an older eval step) gives None, and the caller falls back.
"""

import math
import statistics
from dataclasses import dataclass

Z = 2  # beyond noise where |difference| > Z paired standard errors: about 95% two-sided
RULE = f"|difference| > {Z} paired standard errors, about 95%"
BEYOND, WITHIN, NO_CHANGE, TOO_FEW = "beyond noise", "within noise", "no change", "too few examples"
TOLERANCE = 1e-6  # how far the paired difference may be from the difference of lm-eval's results (float sums)


@dataclass(frozen=True)
class Paired:
    diff: float | None  # b - a over the paired examples (None without any)
    se: float | None  # its paired standard error (None below 2 examples)
    n: int  # examples (documents; prompts for an instruction-level metric) in both a and b
    units: int | None  # instructions in them, for an instruction-level metric; else None
    up: int  # examples whose value went up from a to b (for a 0/1 metric, McNemar's b)
    down: int  # ... and down (McNemar's c)
    unmatched: int  # examples in only one of a and b (left out of the pairing)
    reported: float | None  # the difference of lm-eval's results[task][metric], b - a
    verdict: str

    @property
    def agrees(self):
        """Whether the paired difference is the difference of lm-eval's results (it is, over the same examples)."""
        return self.diff is not None and self.reported is not None and abs(self.diff - self.reported) <= TOLERANCE


def verdict(diff, se, n):
    if n < 2 or se is None:
        return TOO_FEW
    if diff == 0:
        return NO_CHANGE
    # se == 0 with a difference: every example moved the same way, which no noise explains
    return BEYOND if abs(diff) > Z * se else WITHIN


def leaves_of(evaluation, task):
    """The leaf tasks whose examples make up a requested task (a group such as mmlu: its subtasks)."""
    return (evaluation.get("leaves") or {}).get(task) or [task]


def per_example(evaluation, task, key):
    """{(leaf, doc_id): value} of a requested task's metric over all its leaves, or None where the JSON lacks them."""
    examples = evaluation.get("examples")
    if not isinstance(examples, dict):
        return None
    found = {}
    for leaf in leaves_of(evaluation, task):
        columns = examples.get(leaf) or {}
        if "doc_id" not in columns or key not in columns:
            return None  # part of a group's examples would not give the group's score
        found.update(((leaf, doc), value) for doc, value in zip(columns["doc_id"], columns[key]))
    return found


def scalar_stats(pairs):
    """(diff, se, units) of per-example values: the mean of d_i = b_i - a_i and its standard error."""
    d = [float(b) - float(a) for a, b in pairs]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return sum(d) / len(d), se, None


def clustered_stats(pairs):
    """(diff, se, units) of list values (one 0/1 per instruction of a prompt): total correct / total instructions,
    a ratio estimator whose standard error is clustered by prompt (a prompt's instructions are not independent)."""
    D = [sum(map(float, b)) - sum(map(float, a)) for a, b in pairs]
    m = [len(a) for a, _ in pairs]
    n, total = len(D), sum(m)
    diff = sum(D) / total
    se = (math.sqrt(n / (n - 1) * sum((Di - diff * mi) ** 2 for Di, mi in zip(D, m))) / total) if n > 1 else None
    return diff, se, total


def result_difference(a, b, task, key):
    va, vb = (e.get("results", {}).get(task, {}).get(key) for e in (a, b))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
    return vb - va if numbers else None


def paired_difference(a, b, task, key):
    """b - a of a requested task's metric ("acc,none"), paired by (leaf, doc_id) over the examples both answered:
    a Paired, or None where either JSON has no per-example values of it."""
    ea, eb = per_example(a, task, key), per_example(b, task, key)
    if ea is None or eb is None:
        return None
    common = [k for k in ea if k in eb]
    unmatched = len(ea) + len(eb) - 2 * len(common)
    pairs = [(ea[k], eb[k]) for k in common]
    reported = result_difference(a, b, task, key)
    if not pairs:
        return Paired(None, None, 0, None, 0, 0, unmatched, reported, TOO_FEW)
    clustered = isinstance(pairs[0][0], list)
    diff, se, units = (clustered_stats if clustered else scalar_stats)(pairs)
    totals = [(sum(map(float, x)), sum(map(float, y))) if clustered else (float(x), float(y)) for x, y in pairs]
    up, down = sum(y > x for x, y in totals), sum(y < x for x, y in totals)
    return Paired(diff, se, len(pairs), units, up, down, unmatched, reported, verdict(diff, se, len(pairs)))
