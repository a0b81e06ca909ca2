"""Counting the judge's tags (category, input quality, difficulty, safety, and whether the quality reason is the
judge's own) of records, for the run report and the dataset card. Records without tags (runs from before the judge)
count as untagged, so both still render. Also how many turns the records' conversations have."""

from collections import Counter

from common.reporting.eval_tables import share
from common.rubric import COPIED, DIFFICULTY, QUALITY, SCALES, UNPARSED, copied_reason, user_turns

TAG_FIELDS = tuple(SCALES)  # category, input_quality, difficulty, safety
TAG_TITLES = {"category": "Task category", "input_quality": "Input quality", "difficulty": "Difficulty",
              "safety": "Safety", "quality_reason": "Quality reason"}
# What became of a record's quality_reason (reason_status), in table order.
OWN_REASON, COPIED_REASON, OTHER_UNPARSED = ("a reason", "unparsed: repeats the prompt's wording",
                                             "unparsed: another fault")
# Magpie's scales, worst to best / easiest to hardest; values are compared in lower case with '_' and '-' as spaces.
ORDERS = {"input_quality": QUALITY, "difficulty": DIFFICULTY,
          "quality_reason": (OWN_REASON, COPIED_REASON, OTHER_UNPARSED)}


def tags_of(record):
    """A record's tags as a dict ({} when untagged): those of its first turn (steps/judge.py)."""
    tags = record.get("tags")
    return tags if isinstance(tags, dict) else {}


def tagged(records):
    return [r for r in records if tags_of(r)]


def reason_status(record):
    """What became of a tagged record's (first turn's) quality_reason: a reason; one that only repeats the judge's
    prompt or the query (common/rubric.py copied_reason: still the copied text in records judged before that rule,
    "unparsed" with the fault in `judge_unparsed` after it); unparsed for another fault; or "missing"."""
    reason = tags_of(record).get("quality_reason")
    if reason is None:
        return "missing"
    if reason == UNPARSED:
        failed = [f for f in record.get("judge_unparsed") or [] if f.get("turn", 1) == 1]
        copied = any(COPIED in faults for f in failed for faults in f.get("faults") or [])
        return COPIED_REASON if copied else OTHER_UNPARSED
    return COPIED_REASON if copied_reason(reason, record.get("instruction")) else OWN_REASON


def counts(records, field):
    """How many tagged records have each value of `field` ("missing" where a tagged record lacks it); for
    quality_reason, each reason_status."""
    if field == "quality_reason":
        return Counter(reason_status(r) for r in tagged(records))
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


def turn_counts(records):
    """{turns: records}: how many records have each number of user turns (generate --turns N), fewest first."""
    return dict(sorted(Counter(len(user_turns(r)) for r in records).items()))


def turns_text(records):
    """How many turns the records' conversations have, e.g. "conversations of 1 turn: 9 records, of 2 turns: 3"."""
    parts = [f"{turns} turn{'s' if turns != 1 else ''}: {n} record{'s' if n != 1 else ''}"
             for turns, n in turn_counts(records).items()]
    return "conversations of " + ", of ".join(parts) if parts else "no records"
