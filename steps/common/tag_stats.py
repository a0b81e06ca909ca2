"""Counting the judge's tags (category, input quality, difficulty, safety) of records, for the run report and the
dataset card. Records without tags (runs from before the judge) count as untagged, so both still render."""

from collections import Counter

from .evals import share
from .judge import DIFFICULTY, QUALITY, SCALES, UNPARSED

TAG_FIELDS = tuple(SCALES)  # category, input_quality, difficulty, safety
TAG_TITLES = {"category": "Task category", "input_quality": "Input quality", "difficulty": "Difficulty",
              "safety": "Safety"}
# Magpie's scales, worst to best / easiest to hardest; values are compared in lower case with '_' and '-' as spaces.
ORDERS = {"input_quality": QUALITY, "difficulty": DIFFICULTY}


def tags_of(record):
    """A record's tags as a dict ({} when untagged): those of its first turn (steps/judge.py)."""
    tags = record.get("tags")
    return tags if isinstance(tags, dict) else {}


def tagged(records):
    return [r for r in records if tags_of(r)]


def counts(records, field):
    """How many tagged records have each value of `field` ("missing" where a tagged record lacks it)."""
    return Counter(str(tags_of(r).get(field, "missing")) for r in tagged(records))


def _key(value):
    return str(value).lower().replace("_", " ").replace("-", " ").strip()


def ordered_values(field, *counters):
    """The values seen in any of the counters: a known scale in its order, then the rest by how often they occur,
    the unparsed and missing ones last."""
    total = Counter()
    for c in counters:
        total.update(c)
    order = ORDERS.get(field, [])
    last = (UNPARSED, "missing")

    def rank(value):
        k = _key(value)
        if k in last:
            return (2, last.index(k), "")
        if k in order:
            return (0, order.index(k), "")
        return (1, -total[value], str(value))

    return sorted(total, key=rank)


def distribution_table(field, populations):
    """(header, rows): each value of `field` with its count and share in each population ({name: records}), and
    for two populations (generated, kept) the share of the first's records the second kept."""
    names = list(populations)
    counters = {name: counts(records, field) for name, records in populations.items()}
    totals = {name: sum(c.values()) for name, c in counters.items()}
    header = ["value"] + [h for name in names for h in (name, "share")]
    if len(names) == 2:
        header.append(f"{names[1]} of {names[0]}")
    rows = []
    for value in ordered_values(field, *counters.values()):
        row = [value]
        for name in names:
            row += [counters[name][value], share(counters[name][value], totals[name])]
        if len(names) == 2:
            row.append(share(counters[names[1]][value], counters[names[0]][value]))
        rows.append(row)
    return header, rows
