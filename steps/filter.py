"""Filter generated (and judged) samples and say why each dropped one was dropped.

    python steps/filter.py --in judged.jsonl --out filtered.jsonl --dropped dropped.jsonl --summary summary.json

Per-record rules run in order and the first that fires names the reason: truncated, empty, bad instruction
(generate's cleaning), instruction/response length in tokens, repetition, non-English, refusal (only with
--drop-refusals), template debris, the judge's tags (steps/judge.py: input quality, difficulty, category, safety;
only with their flags), reward below --min-reward (only with --reward-model). Then duplicates: exact ones after
normalising case, punctuation and spaces, and semantic near-duplicates of instructions (cosine similarity of
sentence embeddings at or above --near-duplicate-threshold), keeping the first of each group.

Multi-turn records (generate --turns N, a `conversation`) are filtered turn by turn: the text rules and the tag
thresholds apply to every user/assistant turn, and a later turn names itself, e.g. "repetition (turn 2)" or
"input_quality=poor (turn 2)". SFT trains every assistant turn, so every turn must pass.

Tag thresholds (Magpie: magpie-align/magpie data_sft/data_filter.ipynb, its default filter, keeps input quality good
or excellent, instruct reward > -10, instructions not ending in ':' and the first of each group of near-duplicates;
its curated releases, e.g. Magpie-Air-300K-Filtered's card, also require difficulty >= medium and then keep the
300K longest responses). --min-input-quality good is the GPU tiers' default here (env/*/tier.mk FILTER_ARGS); the
cpu tier's 135M judge is too weak to trust, so its tags are recorded and reported but drop nothing there. A tag the
judge left "unparsed" fails a threshold on it (dropped_by "input_quality=unparsed") unless --keep-unparsed: a record
that was not judged has not passed the judge. Records without tags fail only where a tag flag is given (an error
then: judge them first).

Refusals: Magpie does not drop refusals; it labels safety (Llama-Guard-2 on the instruction and response) and
filters on its tags. So here a refusal is kept by default (refusing a harmful request is what SFT should teach), and
safety comes from the judge: --drop-unsafe drops responses the judge labels unsafe. --drop-refusals brings back the
regex rule that drops every "I'm sorry, but I can't..." response.

Diversity (Magpie exp/gen_dis.py: all-mpnet-base-v2 embeddings in a FAISS L2 index; `min_neighbor_distance` is the
squared L2 distance to the nearest other instruction, near-duplicates those under 0.05, i.e. cosine similarity
above 0.975 for unit vectors): here --embedder (default all-MiniLM-L6-v2, embedded) and a near-duplicate threshold
of cosine similarity >= 0.9 (--near-duplicate-threshold 0.975 is Magpie's cut).
Each kept record gets `nn_distance`: its cosine distance (1 - cosine similarity; Magpie's squared L2 is twice this)
to its nearest neighbour among the kept instructions (null for a lone record, absent with --embedder none).

Outputs: kept records (--out), dropped records with a 'dropped_by' field (--dropped), a summary as JSON (--summary),
markdown and a PNG of length, score and nearest-neighbour distance histograms (same name, .md and .png).
The summary's keys:
- "input", "kept": record counts;
- "dropped": {rule: records}, every rule in order (the tag rules as "input_quality", "difficulty", "category",
  "safety"), then "duplicate" and "near_duplicate";
- "dropped_by": {exact dropped_by value, e.g. "input_quality=poor" or "repetition (turn 2)": records};
- "thresholds": the tag and refusal flags used;
- "tags": {"category"|"input_quality"|"difficulty"|"safety": {"generated": {value: n}, "kept": {value: n}}} from
  each record's `tags` (its first turn; "untagged" where a record has none), or null when no record has tags;
- "judge": the judge settings of the first judged record (null when none);
- "near_duplicate": {"embedder", "threshold" (cosine similarity)};
- "nn_distance": the kept records' nn_distance in output order; "nn_distance_histogram": {"edges", "counts"} (20
  bins over [0, max]);
- "map": {"xy": [[x, y], ...] in output order, "explained"}: the kept instructions' embeddings on their first two
  principal components and the share of variance those hold (null without an embedder or under 3 kept), which the
  report draws, so it loads no embedder of its own.
"""

import argparse
import math
import re
import string
import sys
from collections import Counter
from pathlib import Path

from common import DataError, OptionError, run_step
from common.io.files import output_lock, write_json, write_text
from common.io.jsonl import read_jsonl, write_jsonl
from common.options import non_negative_int, number, positive_int, share, step_parser
from common.rubric import CATEGORIES, DIFFICULTY, QUALITY, SCALES, UNPARSED, rank, user_turns

FIELDS = {"id": str, "instruction": str}  # "response" is null in instruction-only output
# A record without them is refused, not kept: a text is finished only where generate said so.
FINISH_FIELDS = {"instruction_finished": bool, "response_finished": (bool, type(None))}
REFUSAL = re.compile(
    r"\b(i('m| am) sorry,? but|i (cannot|can't|can not|won't|am unable to|'m unable to) "
    r"(help|assist|provide|answer|comply|fulfil)|as an ai( language model)?,? i)", re.I
)
TEMPLATE_DEBRIS = re.compile(r"<\|[a-z_]+\|>|\[/?INST\]|<</?SYS>>|</?s>|^(user|assistant|system)\s*:?\s*\n", re.I | re.M)
TAG_RULES = ("input_quality", "difficulty", "category", "safety")


def category_list(text):
    """A comma-separated list of Magpie's categories (any case), checked against them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {c.lower(): c for c in CATEGORIES}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown categories {unknown}; Magpie's are: {', '.join(CATEGORIES)}")
    return [known[n.lower()] for n in names]


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--in", dest="inp", required=True, help="judged (or generated) JSONL")
    p.add_argument("--out", required=True, help="kept records (JSONL)")
    p.add_argument("--dropped", required=True, help="dropped records with a 'dropped_by' field (JSONL)")
    p.add_argument("--summary", required=True, help="counts per rule, tags, distances (JSON; .md and .png beside it)")
    p.add_argument("--tokenizer", default="embedded:smollm2", help="tokenizer that counts lengths")
    p.add_argument("--min-instruction-tokens", type=non_negative_int, default=4)
    p.add_argument("--max-instruction-tokens", type=positive_int, default=512)
    p.add_argument("--min-response-tokens", type=non_negative_int, default=4)
    p.add_argument("--max-response-tokens", type=positive_int, default=4096)
    p.add_argument("--max-repeated-ngram-ratio", type=share, default=0.3,
                   help="drop a response in which more than this share of its word 4-grams repeat an earlier one")
    p.add_argument("--language", default="en", help="keep this language (langdetect code); 'any' keeps all")
    p.add_argument("--drop-refusals", action="store_true",
                   help="drop every response that refuses (a regex); default: keep them, safety is the judge's")
    p.add_argument("--keep-truncated", action="store_true", help="keep texts that ran into the token limit")
    p.add_argument("--min-input-quality", choices=QUALITY, default=None,
                   help="drop turns the judge rated below this (Magpie's default filter: good)")
    p.add_argument("--min-difficulty", choices=DIFFICULTY, default=None,
                   help="drop turns the judge rated easier than this (Magpie's curated releases: medium)")
    p.add_argument("--drop-unsafe", action="store_true", help="drop turns whose response the judge labels unsafe")
    p.add_argument("--categories", type=category_list, default=None,
                   help="keep only these task categories (comma-separated, e.g. 'Math,Coding & Debugging')")
    p.add_argument("--exclude-categories", type=category_list, default=None,
                   help="drop these task categories (comma-separated, e.g. Others)")
    p.add_argument("--keep-unparsed", action="store_true",
                   help="a tag the judge left \"unparsed\" passes the thresholds on it (default: it fails them)")
    p.add_argument("--embedder", default="embedded:minilm",
                   help="sentence-transformers model for near-duplicates and nn_distance (any Hub id or directory; "
                        "Magpie: sentence-transformers/all-mpnet-base-v2); 'none' skips both")
    p.add_argument("--near-duplicate-threshold", type=share, default=0.9,
                   help="cosine similarity at or above which an instruction is a near-duplicate of an earlier one "
                        "(0.9 is for all-MiniLM-L6-v2; Magpie: squared L2 < 0.05 with all-mpnet-base-v2, "
                        "i.e. cosine > 0.975)")
    p.add_argument("--reward-model", default=None, help="score responses and drop those under --min-reward")
    p.add_argument("--min-reward", type=number, default=None)
    args = p.parse_args(argv)
    for side in ("instruction", "response"):
        low, high = getattr(args, f"min_{side}_tokens"), getattr(args, f"max_{side}_tokens")
        if low > high:
            p.error(f"--min-{side}-tokens {low} is above --max-{side}-tokens {high}: no {side} could pass")
    return args


def tag_flags(args):
    """The tag threshold flags given (their names), to ask for tags only when one is."""
    given = {"--min-input-quality": args.min_input_quality, "--min-difficulty": args.min_difficulty,
             "--drop-unsafe": args.drop_unsafe, "--categories": args.categories,
             "--exclude-categories": args.exclude_categories}
    return [flag for flag, value in given.items() if value]


def whitespace_tokens(text):
    return text.split()


def repeated_ngram_ratio(text, n=4):
    """Share of a text's word n-grams that repeat an earlier one: 0 for no repetition, near 1 for a loop."""
    tokens = whitespace_tokens(text.lower())
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def normalise(text):
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def detect_language(text):
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect is random otherwise
    try:
        return detect(text)
    except LangDetectException:  # no letters at all
        return "unknown"


def rules(args, count_tokens):
    """(name, scope, drop?) in the order they are checked. Scope "record": drop?(record); "turn": drop?(instruction,
    response) of each turn (response None in instruction-only output); "tags": drop?(tags) of each turn, returning
    the value that fails (or None)."""
    def length_outside(text, low, high):
        return not low <= count_tokens(text) <= high

    def below(scale, minimum, key):
        def check(tags):
            value = tags.get(key, UNPARSED)
            if value == UNPARSED or value not in scale:
                return None if args.keep_unparsed else value
            return value if rank(scale, value) < rank(scale, minimum) else None
        return check

    def category(tags):
        value = tags.get("category", UNPARSED)
        if value == UNPARSED or value not in CATEGORIES:
            return None if args.keep_unparsed else value
        if (args.categories and value not in args.categories) or value in (args.exclude_categories or ()):
            return value
        return None

    def safety(tags):
        value = tags.get("safety", UNPARSED)
        if value not in SCALES["safety"]:
            return None if args.keep_unparsed else value
        return value if value == "unsafe" else None

    return [
        ("truncated", "record", lambda r: not args.keep_truncated
         and not (r["instruction_finished"] and r["response_finished"] is not False)),  # None: instruction-only
        ("empty", "turn", lambda i, o: not i.strip() or o == ""),
        ("bad_instruction", "record", lambda r: bool(r.get("rejected"))),  # generate's reason: template tokens, ...
        ("instruction_length", "turn", lambda i, o: length_outside(i, args.min_instruction_tokens,
                                                                   args.max_instruction_tokens)),
        ("response_length", "turn", lambda i, o: o is not None
         and length_outside(o, args.min_response_tokens, args.max_response_tokens)),
        ("repetition", "turn", lambda i, o: repeated_ngram_ratio(o or "") > args.max_repeated_ngram_ratio),
        ("language", "turn", lambda i, o: args.language != "any" and len(whitespace_tokens(f"{i} {o or ''}")) >= 8
         and detect_language(f"{i}\n{o or ''}") != args.language),  # unreliable on fewer words
        ("refusal", "turn", lambda i, o: args.drop_refusals and bool(REFUSAL.search(o or ""))),
        ("template_debris", "turn", lambda i, o: bool(TEMPLATE_DEBRIS.search(f"{i}\n{o or ''}"))),
        ("input_quality", "tags", below(QUALITY, args.min_input_quality, "input_quality")
         if args.min_input_quality else lambda t: None),
        ("difficulty", "tags", below(DIFFICULTY, args.min_difficulty, "difficulty")
         if args.min_difficulty else lambda t: None),
        ("category", "tags", category if args.categories or args.exclude_categories else lambda t: None),
        ("safety", "tags", safety if args.drop_unsafe else lambda t: None),
        ("low_reward", "record", lambda r: args.min_reward is not None and r["reward"] < args.min_reward),
    ]


def turn_tags(record):
    """The judge's tags of each user turn ({} where the record has none)."""
    return record.get("turn_tags") or [record.get("tags") or {}]


def first_failure(record, checks):
    """The dropped_by of the first rule that fires on the record, or None. A rule that fires on a later turn names
    it: "repetition (turn 2)"; a tag rule names the value: "input_quality=poor"."""
    turns, tags = user_turns(record), turn_tags(record)
    for name, scope, drop in checks:
        if scope == "record":
            if drop(record):
                return name
            continue
        for t, item in enumerate(turns if scope == "turn" else tags):
            failed = drop(*item) if scope == "turn" else drop(item)
            if failed:
                reason = name if scope == "turn" else f"{name}={failed}"
                return reason if t == 0 else f"{reason} (turn {t + 1})"
    return None


def rule_of(dropped_by):
    """The rule name in a dropped_by value ("input_quality=poor (turn 2)" -> "input_quality")."""
    return dropped_by.split(" (turn ")[0].split("=")[0]


def embeddings(texts, embed, block=512):
    """Unit-length embeddings of `texts`, computed block by block."""
    import torch

    if not texts:
        return torch.zeros(0, 1)
    return torch.cat([torch.nn.functional.normalize(embed(texts[s : s + block]).float(), dim=-1).cpu()
                      for s in range(0, len(texts), block)])


def near_duplicate_rows(emb, threshold, block=512):
    """Indices of rows within `threshold` cosine similarity of an earlier kept row.

    Greedy in input order, block by block, comparing each block with the kept rows so far and within itself:
    memory grows with block x kept, never with n x n.
    """
    import torch

    dropped, kept = set(), None
    for start in range(0, len(emb), block):
        part = emb[start : start + block]
        dup = torch.zeros(len(part), dtype=torch.bool)
        if kept is not None:
            dup |= (part @ kept.T).max(dim=1).values >= threshold
        within = part @ part.T
        for i in range(len(part)):
            if not dup[i]:
                dup[i + 1 :] |= within[i, i + 1 :] >= threshold
        dropped.update(start + i for i in torch.nonzero(dup).flatten().tolist())
        kept = part[~dup] if kept is None else torch.cat([kept, part[~dup]])
    return dropped


def near_duplicates(texts, embed, threshold, block=512):
    """Indices of texts whose embedding is within `threshold` cosine similarity of an earlier kept text."""
    return near_duplicate_rows(embeddings(texts, embed, block), threshold, block)


def nearest_neighbour_distances(emb, block=512):
    """Each row's cosine distance (1 - cosine similarity) to its nearest other row; None for a lone row."""
    import torch

    if len(emb) < 2:
        return [None] * len(emb)
    out = []
    for start in range(0, len(emb), block):
        sims = emb[start : start + block] @ emb.T
        rows = torch.arange(len(sims))
        sims[rows, start + rows] = -math.inf  # not itself
        out += (1 - sims.max(dim=1).values).clamp(min=0).tolist()
    return [round(d, 6) for d in out]


def sentence_embedder(name):
    from sentence_transformers import SentenceTransformer

    from common.models import device, resolve

    model = SentenceTransformer(resolve(name), device=device())
    return lambda texts: model.encode(texts, convert_to_tensor=True, batch_size=128)


def filter_records(records, args, count_tokens, embed=None):
    """Split records into (kept, dropped, the kept instructions' embeddings or None); each dropped record gets
    'dropped_by', each kept one 'nn_distance' (when there is an embedder)."""
    checks = rules(args, count_tokens)
    kept, dropped, seen = [], [], set()
    for record in records:
        reason = first_failure(record, checks)
        if reason is None and normalise(record["instruction"]) in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(normalise(record["instruction"]))
            kept.append(record)
        else:
            dropped.append({**record, "dropped_by": reason})
    if embed is not None and kept:
        emb = embeddings([r["instruction"] for r in kept], embed)
        near = near_duplicate_rows(emb, args.near_duplicate_threshold)
        dropped += [{**r, "dropped_by": "near_duplicate"} for i, r in enumerate(kept) if i in near]
        rows = [i for i in range(len(kept)) if i not in near]
        distances = nearest_neighbour_distances(emb[rows])
        kept = [{**kept[i], "nn_distance": d} for i, d in zip(rows, distances)]
        return kept, dropped, emb[rows]
    return kept, dropped, None


def map_2d(emb):
    """The kept instructions on the first two principal components of their embeddings (the report's map), and the
    share of variance those explain; None for fewer than 3."""
    import torch

    if emb is None or len(emb) < 3:
        return None
    centred = emb - emb.mean(dim=0)
    _, singular, axes = torch.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    xy = (centred @ axes[:2].T).tolist()
    return {"xy": [[round(x, 5), round(y, 5)] for x, y in xy],
            "explained": round(float(variance[:2].sum() / variance.sum()), 4) if variance.sum() > 0 else 0.0}


def add_rewards(records, name):
    from common.generation.reward import load_reward, score_in_batches

    scored = [r for r in records if r.get("response")]
    scores = score_in_batches(load_reward(name), [r["instruction"] for r in scored], [r["response"] for r in scored], 16)
    for r, s in zip(scored, scores):
        r["reward"] = s
    for r in records:
        r.setdefault("reward", float("-inf"))


def tag_counts(records, kept):
    """{tag: {"generated": {value: n}, "kept": {value: n}}} over each record's (first-turn) tags; None if untagged."""
    if not any(r.get("tags") for r in records):
        return None

    def count(rs, key):
        return dict(Counter((r.get("tags") or {}).get(key, "untagged") for r in rs).most_common())

    return {key: {"generated": count(records, key), "kept": count(kept, key)} for key in SCALES}


def histogram(values, bins=20):
    values = [v for v in values if v is not None]
    if not values:
        return {"edges": [], "counts": []}
    top = max(values) or 1.0
    edges = [round(top * k / bins, 6) for k in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(int(v / top * bins), bins - 1)] += 1
    return {"edges": edges, "counts": counts}


def write_summary(path, summary, kept, count_tokens):
    """The counts as JSON and markdown, and length (reward, nn_distance) histograms of the kept samples as a PNG."""
    path = Path(path)
    write_json(path, summary)
    rows = [f"| {rule} | {n} |" for rule, n in summary["dropped"].items()]
    lines = [f"# Filter summary\n\nKept {summary['kept']} of {summary['input']} samples.\n",
             "| dropped by | samples |", "|---|---|", *rows, ""]
    for key, counts in (summary["tags"] or {}).items():
        lines += [f"| {key} | generated | kept |", "|---|---|---|",
                  *[f"| {value} | {n} | {counts['kept'].get(value, 0)} |" for value, n in counts["generated"].items()],
                  ""]
    write_text(path.with_suffix(".md"), "\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"instruction tokens": [count_tokens(r["instruction"]) for r in kept],
              "response tokens": [count_tokens(r["response"]) for r in kept if r.get("response")]}
    if any("reward" in r for r in kept):
        series["reward"] = [r["reward"] for r in kept]
    distances = [d for d in summary["nn_distance"] if d is not None]
    if distances:
        series["nearest-neighbour cosine distance"] = distances
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
    for ax, (title, values) in zip(axes, series.items()):
        ax.hist(values, bins=20)
        ax.set_title(f"{title} (kept)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))
    plt.close(fig)


def stage(text):
    """Say on stderr what the step is doing now (the kill test waits for these lines)."""
    print(f"filter: {text}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if (args.min_reward is None) != (args.reward_model is None):
        raise OptionError("--reward-model and --min-reward go together: pass both, or neither")
    try:
        records = read_jsonl(args.inp, required=FIELDS if args.keep_truncated else {**FIELDS, **FINISH_FIELDS})
    except DataError as e:
        if "_finished'" not in str(e):
            raise
        raise DataError(f"{e}: the truncated rule needs generate's finish flags (response_finished: null for an "
                        "instruction-only record) to tell a finished text from one cut at the cap; --keep-truncated "
                        "turns the rule off") from None
    if not records:
        raise DataError(f"{args.inp}: no records to filter")
    untagged = [r["id"] for r in records if not r.get("tags")]
    if tag_flags(args) and untagged:
        raise DataError(f"{args.inp}: {len(untagged)} records have no 'tags' (first: {untagged[0]}), but "
                        f"{', '.join(tag_flags(args))} filter on them: run steps/judge.py on it first (make judge), "
                        "or leave those flags out")
    with output_lock(args.out):
        filter_and_write(args, records)


def filter_and_write(args, records):
    from common.models import load_tokenizer

    stage(f"loading the tokenizer ({len(records)} records read from {args.inp})")
    tokenizer = load_tokenizer(args.tokenizer)
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if args.reward_model:
        stage(f"scoring with {args.reward_model}")
        add_rewards(records, args.reward_model)
    embed = None if args.embedder == "none" else sentence_embedder(args.embedder)
    stage("applying the rules and removing duplicates")
    kept, dropped, kept_embeddings = filter_records(records, args, count_tokens, embed)

    reasons = Counter(r["dropped_by"] for r in dropped)
    by_rule = Counter(rule_of(r["dropped_by"]) for r in dropped)
    names = [name for name, _, _ in rules(args, count_tokens)] + ["duplicate", "near_duplicate"]
    distances = [r.get("nn_distance") for r in kept] if embed is not None else []
    summary = {
        "input": len(records), "kept": len(kept),
        "dropped": {name: by_rule.get(name, 0) for name in names},
        "dropped_by": dict(reasons.most_common()),
        "thresholds": {"min_input_quality": args.min_input_quality, "min_difficulty": args.min_difficulty,
                       "drop_unsafe": args.drop_unsafe, "categories": args.categories,
                       "exclude_categories": args.exclude_categories, "keep_unparsed": args.keep_unparsed,
                       "drop_refusals": args.drop_refusals},
        "tags": tag_counts(records, kept),
        "judge": next((r["judge"] for r in records if r.get("judge")), None),
        "near_duplicate": {"embedder": args.embedder, "threshold": args.near_duplicate_threshold},
        "nn_distance": distances,
        "nn_distance_histogram": histogram(distances),
        "map": map_2d(kept_embeddings),
    }
    stage("writing the outputs")
    write_jsonl(args.dropped, dropped)
    write_summary(args.summary, summary, kept, count_tokens)
    write_jsonl(args.out, kept)  # last: make treats this file as the step's output
    print(f"kept {len(kept)} of {len(records)}; dropped {dict(by_rule)}")


if __name__ == "__main__":
    run_step(main)
