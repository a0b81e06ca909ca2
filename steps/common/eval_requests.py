"""What an eval asks each model and how long that takes: LIMIT as a seeded random sample (the same documents for
every model evaluated), and EVAL_COST's time estimate. Shared by steps/eval.py and steps/plan.py.

A LIMIT is `N` (documents of each requested task; a fraction in (0, 1) is a share of each task), optionally with
per-task overrides: `1000,ifeval=all` samples 1,000 documents of every task but IFEval, which runs whole. A group
such as MMLU is sampled as a whole, stratified by its subtasks (each subject gets its share of N in proportion to
its size, at least one), so its sample mean estimates the whole group's score as lm-eval weights it (by size).
lm-eval's own --limit takes the first N documents of each subtask, which are not a random sample.

EVAL_COST is `LL_S,TOKEN_S`: seconds per log-likelihood token (a context counted once, as the packed path scores
it, plus each continuation) and seconds per generated token of a request at the tier's rows (the engine's
throughput, inverted), measured per tier and model size (bench/README.md "Eval").

Standard library only: steps/plan.py counts the same sample before setup, with no lm-eval installed.
"""

import math
import random

from common import OptionError

ALL = "all"


# lm-eval's HFLM answers a generative request with at most this many tokens where neither the task nor MAX_GEN_TOKS
# sets a cap
LM_EVAL_MAX_GEN_TOKS = 256


def generation_cap(max_gen_toks, task_cap):
    """Tokens one generative request may take: MAX_GEN_TOKS where given, else the task's own cap, else lm-eval's."""
    return max_gen_toks or task_cap or LM_EVAL_MAX_GEN_TOKS


def parse_limit(text):
    """LIMIT text -> {"*": default, task: override}; each value a count (int), a fraction (float < 1) or None (all).
    Empty text -> {} (every document of every task)."""
    spec = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        task, _, value = item.rpartition("=")
        key = task.strip() or "*"
        if key in spec:
            raise OptionError(f"LIMIT {text!r}: {key if key != '*' else 'the default'} given twice")
        spec[key] = limit_value(value.strip(), text)
    return spec


def limit_value(value, text):
    if value == ALL:
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if 0 < number < 1:
        return number
    if number >= 1 and number.is_integer():
        return int(number)
    raise OptionError(f"LIMIT {text!r}: {value!r} is not a whole number of documents (at least 1), a fraction in "
                      "(0, 1) or 'all'; e.g. LIMIT=1000 or LIMIT=1000,ifeval=all")


def task_limit(spec, task):
    """The limit for one requested task: its own override, else the default (None: all documents)."""
    return spec.get(task, spec.get("*"))


def sample_count(total, limit):
    """How many of `total` documents a limit takes."""
    if limit is None:
        return total
    n = math.ceil(total * limit) if isinstance(limit, float) else limit
    return min(total, n)


def allocate(sizes, n):
    """Split n documents over strata {name: size} in proportion to size (largest remainder), one each at least (a
    subject with none would drop out of its group: n below the number of strata gives one each) and never more than
    a stratum holds. Returns {name: count}."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    n = max(n, len(sizes))
    exact = {name: n * size / total for name, size in sizes.items()}
    counts = {name: max(1, math.floor(exact[name])) for name in sizes}
    by_remainder = sorted(sizes, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: max(0, n - sum(counts.values()))]:
        counts[name] += 1
    while sum(counts.values()) > n:  # the ones given to small strata, taken from the largest
        counts[max(counts, key=lambda name: (counts[name], name))] -= 1
    return counts


def draw(sizes, limit, seed):
    """The documents of one requested task (its leaf subtasks' sizes {leaf: documents}) that `limit` takes:
    {leaf: sorted doc indices}, with a leaf left out where it runs whole. The draw depends on the seed and the leaf's
    name only, so base, SFT and DPO (and a rerun) get the same documents."""
    counts = allocate(sizes, sample_count(sum(sizes.values()), limit))
    picked = {}
    for leaf, count in counts.items():
        if count < sizes[leaf]:
            picked[leaf] = sorted(random.Random(f"{seed}:{leaf}").sample(range(sizes[leaf]), count))
    return picked


def parse_cost(text, option="--cost"):
    """EVAL_COST text -> (seconds per log-likelihood token, seconds per generated token)."""
    try:
        per_ll_token, per_gen_token = (float(x) for x in text.split(","))
    except ValueError:
        raise OptionError(f"{option} {text!r}: expected two numbers LL_S,TOKEN_S (seconds per log-likelihood token, "
                          "per generated token), e.g. 3e-6,7e-5") from None
    return per_ll_token, per_gen_token


def eval_seconds(ll_tokens, gen_tokens, cost):
    """Seconds one model's requests take at EVAL_COST: log-likelihood tokens and generated tokens (every answer to
    its cap, an upper bound) at their measured rates."""
    per_ll_token, per_gen_token = cost
    return ll_tokens * per_ll_token + gen_tokens * per_gen_token


def duration(seconds):
    """Hours from 90 minutes up, minutes from 90 seconds, else seconds (the eval step and the plan say it alike)."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
