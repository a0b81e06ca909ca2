"""The run report: one page, in markdown and in self-contained HTML, that answers "did it help?".

    python steps/report.py --run data/runs/smol-cpu --out data/runs/smol-cpu/report.md \
        --html data/runs/smol-cpu/report.html --tier cpu --model-name smol

Sections: data funnel (generated, kept, dropped per filter rule, scored, pairs, and why the rest gave no pair),
instruction diversity (opening words, first verbs, length histograms), the judge's tags of generated and kept
samples (category, input quality, difficulty, safety, and the quality reasons that only repeat the judge's prompt),
nearest-neighbour distances and a 2-D map of the kept instructions coloured by category (these three where the
records carry tags and distances), reward scores and margins, training curves (SFT loss; DPO loss, reward margin and
accuracy; each with its value on the held-out test split where the trainer logged one, and that split's size n), the
evaluation (a headline of what changed beyond noise; base, SFT, DPO with standard errors where lm-eval gives one, and
their paired differences over the same examples; examples per task; time per model) and the settings used (models,
tier, seeds, package versions).

Reads only the files the other steps wrote in the run directory. Plots are matplotlib PNGs: the markdown links
them from <out>_plots/ (report_plots/ for report.md), the HTML page embeds them as data URIs, so it is one file.
"""

import csv
import math
import statistics
import sys
import textwrap
from collections import Counter
from pathlib import Path

from common import DataError, run_step
from common.io.files import output_lock, write_text
from common.io.jsonl import read_jsonl
from common.options import step_parser
from common.reporting.eval_tables import (EVAL_HEADER, MARK, STAGES, eval_rows, eval_tasks, fmt, headline, limit_text,
                                          metric_names, read_json, share, signed, stderr_of)
from common.reporting.paired import RULE, leaves_of
from common.reporting.render import Heading, Para, Table, new_figure, plot, to_html, to_markdown
from common.reporting.tag_stats import (COPIED_REASON, TAG_FIELDS, TAG_TITLES, distribution_table, reason_status,
                                        tagged, tags_of, turns_text)
from common.rubric import words

TOP = 10  # rows in the opening-word and verb tables
OFFLINE_SCORER_NOTE = (
    "The reward model here is `embedded:minilm` (all-MiniLM-L6-v2, cosine similarity of instruction and response "
    "embeddings): it measures whether a response is on the instruction's topic, not whether it is correct, helpful "
    "or safe. These pairs prove the pipeline runs; they are not a quality signal like a trained reward model's."
)
# The first of these in an instruction is its "first verb" (a word list, not a parser: no tagger offline).
INSTRUCTION_VERBS = set("""
    add analyze analyse answer arrange brainstorm build calculate categorize change check choose classify compare
    compose compute convert correct count create debug define demonstrate describe design detail determine develop
    discuss draft edit elaborate estimate evaluate explain explore extract find fix generate give guide help identify
    illustrate imagine implement improve list make name offer organize outline paraphrase plan predict prepare
    present produce propose provide rank recommend rephrase rewrite share show simplify solve sort suggest summarize
    summarise teach tell translate turn use walk write
""".split())


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--run", required=True, type=Path, help="run directory")
    p.add_argument("--out", required=True, type=Path, help="markdown file to write (plots go to <out>_plots/)")
    p.add_argument("--html", type=Path, default=None, help="also write this self-contained HTML page")
    p.add_argument("--tier", default=None, help="hardware tier of the run (make passes GPU)")
    p.add_argument("--model-name", default=None, help="MODEL of the run (make passes it)")
    return p.parse_args(argv)


# ---- Reading the run directory ---------------------------------------------------------------------------------

def read_curves(adapter_dir):
    """The adapter's training curves (curves.csv, written by the training step: one row a logged step)."""
    path = Path(adapter_dir) / "curves.csv"
    if not path.exists():
        raise DataError(f"{path}: missing; the report needs every step's output (run `make report`)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def read_optional_json(path, default):
    """A JSON file a step writes once it has run: `default` where it is missing."""
    return read_json(path) if Path(path).exists() else default


def load_run(run):
    """Everything the report shows, read from the run directory."""
    return {
        "summary": read_json(run / "filter_summary.json"),
        "generated": read_jsonl(run / "generated.jsonl"),
        "filtered": read_jsonl(run / "filtered.jsonl"),
        "scored": read_jsonl(run / "scored.jsonl"),
        "pairs": read_jsonl(run / "preference.jsonl"),
        # Instructions without a pair by cause (the preference step's count); None before that step has run.
        "preference_summary": read_optional_json(run / "preference_summary.json", None),
        "curves": {stage: read_curves(run / stage) for stage in ("sft", "dpo")},
        # Every logged entry, eval_* ones included (curves.csv has the training steps only)
        "histories": {stage: read_json(run / stage / "log_history.json") for stage in ("sft", "dpo")},
        "judged": read_jsonl(run / "judged.jsonl") if (run / "judged.jsonl").exists() else None,
        "configs": {stage: read_json(run / stage / "training_config.json") for stage in ("sft", "dpo")},
        "lora": read_json(run / "sft" / "adapter_config.json"),
        "evals": {stage: read_json(run / "eval" / f"{stage}.json") for stage in STAGES},
    }


# ---- Tables and histograms (a report is a list of blocks: common/reporting/render.py) -------------------

def stats_row(label, values, digits=3):
    if not values:
        return (label, 0, "", "", "", "", "")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    spread = [float(statistics.mean(values)), float(statistics.median(values)), float(sd)]
    return (label, len(values), *[fmt(v, digits) for v in (*spread, min(values), max(values))])


STATS_HEADER = ["", "n", "mean", "median", "stdev", "min", "max"]


def shared_bins(values, n=20):
    """Histogram bin edges over all the values, so that overlaid histograms line up."""
    low, high = (min(values), max(values)) if values else (0, 1)
    high = high if high > low else low + 1
    return [low + (high - low) * i / n for i in range(n + 1)]


# ---- Sections ----------------------------------------------------------------------------------------------------

def funnel_section(outputs):
    summary, scored, pairs = outputs["summary"], outputs["scored"], outputs["pairs"]
    total = summary["input"]
    sft, dpo = outputs["configs"]["sft"], outputs["configs"]["dpo"]
    stages = [("generated", total), ("kept by the filters", summary["kept"]),
              ("trained on by SFT", sft.get("train_records")), ("scored for preference", len(scored)),
              ("preference pairs", len(pairs)), ("trained on by DPO", dpo.get("train_records"))]
    stages = [(name, n) for name, n in stages if n is not None]
    rows = [(name, n, share(n, total)) for name, n in stages]
    dropping, idle = fold_rules(summary["dropped"])
    responses = sum(len(r["scores"]) for r in scored)
    causes, source = no_pair_causes(outputs)
    fig, (left, right) = new_figure(2)
    left.barh([s for s, _ in stages][::-1], [n for _, n in stages][::-1], color="#4c72b0")
    left.set_title("samples at each stage")
    bars = dropping + ([(idle, 0)] if idle else [])
    right.barh([textwrap.fill(r, 40) for r, _ in bars][::-1], [n for _, n in bars][::-1], color="#c44e52")
    right.tick_params(axis="y", labelsize=7)
    right.set_title("dropped by each filter rule")
    return [
        Heading("Data funnel"),
        Table(["stage", "samples", "of generated"], rows),
        Para(f"Kept, by user/assistant turns (SFT trains every assistant turn): {turns_text(outputs['filtered'])}."),
        *generation_yield(outputs["generated"], summary),
        Para(f"{total - summary['kept']} samples were dropped by the filters. {responses} responses to "
             f"{len(scored)} instructions were sampled and scored; {len(scored) - len(pairs)} instructions gave no "
             "pair."),
        Para(too_long_text(sft, "SFT", "conversations") + " " + too_long_text(dpo, "DPO", "pairs")),
        Heading("Instructions without a pair, by cause", 3),
        *([Table(["cause", "instructions", "of scored"],
                 [(c, n, share(n, len(scored))) for c, n in causes.items() if n]), Para(source)]
          if any(causes.values()) else [Para(("Every scored instruction gave a pair. "
                                              if outputs["preference_summary"] else "") + source)]),
        Heading("Dropped by each filter rule", 3),
        Table(["rule", "dropped", "of generated"],
              [(rule, n, share(n, total)) for rule, n in dropping] + ([(idle, 0, share(0, total))] if idle else [])),
        plot("funnel", fig, "Samples at each stage of the chain, and what each filter rule dropped"
                            + (" (the rules that dropped nothing on one line)." if idle else ".")),
    ]


def too_long_text(config, stage, rows):
    """What a trainer dropped as longer than its max_length (training_config.json), in a sentence."""
    dropped = config.get("dropped_too_long")
    if dropped is None:
        return f"{stage}: rows over max_length not counted (a run before the count)."
    return (f"{stage} dropped {dropped['train']} training and {dropped['eval']} held-out {rows} longer than its "
            f"max_length ({config['max_length']} tokens), which the trainer would have cut and trained as if "
            "finished.")


def fold_rules(dropped):
    """([(rule, n)] of the filter rules that dropped something, "no drops: rule, rule, ..." or None): the rules that
    dropped nothing on one line."""
    idle = [rule for rule, n in dropped.items() if not n]
    return [(rule, n) for rule, n in dropped.items() if n], ("no drops: " + ", ".join(idle) if idle else None)


def no_pair_causes(outputs):
    """({cause: instructions} of the scored instructions that gave no pair, where the counts come from): the
    preference step's summary (preference_summary.json, written before its pairs)."""
    summary = outputs["preference_summary"]
    if summary is None:
        return {}, "The preference step has not run (no preference_summary.json)."
    cut = summary.get("rejected_instead_of_a_cut_response", 0)
    return summary["no_pair"], ("Causes as the preference step counted them (preference_summary.json: min margin "
                                f"{summary['min_margin']}, ties {summary['ties']}). A response cut at the token cap "
                                f"is neither chosen nor rejected: in {cut} pair{'s' if cut != 1 else ''} the lowest "
                                "finished response was rejected where a cut one scored lower.")


def generation_yield(generated, summary):
    """Yield (kept / generated) and how the generator ended its texts: at the length cap, or stopped as a loop."""
    total = len(generated)
    answered = [r for r in generated if r.get("response_stop")]

    def count(records, key, value):
        return sum(r.get(key) == value for r in records)

    rows = [("yield: kept by the filters", summary["kept"], share(summary["kept"], total)),
            ("instructions cut at the length cap", count(generated, "instruction_stop", "length"),
             share(count(generated, "instruction_stop", "length"), total)),
            ("instructions stopped as loops", count(generated, "instruction_stop", "loop"),
             share(count(generated, "instruction_stop", "loop"), total))]
    if answered:
        rows += [(f"responses cut at the length cap (of {len(answered)} answered)", count(answered, "response_stop",
                                                                                         "length"),
                  share(count(answered, "response_stop", "length"), len(answered))),
                 ("responses stopped as loops", count(answered, "response_stop", "loop"),
                  share(count(answered, "response_stop", "loop"), len(answered)))]
    return [Heading("Generation yield", 3), Table(["", "samples", "share"], rows)]


def first_verb(text):
    return next((w for w in words(text) if w in INSTRUCTION_VERBS), None)


def diversity_section(outputs):
    kept = [r["instruction"] for r in outputs["filtered"]]
    openings = Counter(ws[0] for ws in map(words, kept) if ws)
    verbs = Counter(v for v in map(first_verb, kept) if v)
    lengths = {
        "instruction, generated": [len(words(r["instruction"])) for r in outputs["generated"]],
        "instruction, kept": [len(words(r["instruction"])) for r in outputs["filtered"]],
        "response, generated (answered)": [len(words(r["response"])) for r in outputs["generated"] if r.get("response")],
        "response, kept": [len(words(r["response"])) for r in outputs["filtered"]],
    }
    fig, (left, right) = new_figure(2)
    for ax, kind in ((left, "instruction"), (right, "response")):
        generated, kept_lengths = [v for k, v in lengths.items() if k.startswith(kind)]
        bins = shared_bins(generated + kept_lengths)
        ax.hist(generated, bins=bins, alpha=0.5, label="generated", color="#8c8c8c")
        ax.hist(kept_lengths, bins=bins, alpha=0.8, label="kept", color="#4c72b0")
        ax.set_title(f"{kind} length (words)")
        ax.set_ylabel("samples")
        ax.legend()
    n = len(kept)
    return [
        Heading("Instruction diversity"),
        Para(f"Over the {n} kept instructions: {len(set(kept))} distinct, {len(openings)} distinct opening words, "
             f"{sum(verbs.values())} with a verb from a list of {len(INSTRUCTION_VERBS)} common instruction verbs "
             f"({len(verbs)} distinct). Words are lower-cased runs of letters, digits and apostrophes."),
        Heading("Most common opening words", 3),
        Table(["rank", "opening word", "instructions", "share"],
             [(i, w, c, share(c, n)) for i, (w, c) in enumerate(openings.most_common(TOP), 1)]),
        Heading("Most common first verbs", 3),
        Table(["rank", "first verb", "instructions", "share"],
             [(i, w, c, share(c, n)) for i, (w, c) in enumerate(verbs.most_common(TOP), 1)]),
        Heading("Lengths (words)", 3),
        Table(STATS_HEADER, [stats_row(label, values, 1) for label, values in lengths.items()]),
        plot("lengths", fig, "Instruction and response lengths in words: every generated sample, and those kept."),
    ]


def judge_model(outputs):
    """The judge's model as recorded by the judge step (a 'judge' settings dict in the records or the filter
    summary), else the generator: Magpie's default, and the judge's here unless told otherwise."""
    for source in (*(outputs["judged"] or [])[:1], *outputs["filtered"][:1], outputs["summary"]):
        settings = source.get("judge") if isinstance(source, dict) else None
        if isinstance(settings, dict) and settings.get("model"):
            return settings["model"]
    return (outputs["generated"] or [{}])[0].get("settings", {}).get("model")


def weak_judge(model):
    return model is not None and ("embedded:smollm2" in str(model) or "135m" in str(model).lower())


WEAK_JUDGE_NOTE = (
    "The judge here is `{model}` (SmolLM2-135M-Instruct, de-quantized from a 4-bit GGUF): held to the answer's "
    "schema, a model this small gives a valid value for every tag, but its categories and ratings are close to "
    "guesses (it rates nearly everything alike). The tags prove the judging step runs end to end; they are not a "
    "measure of the data's quality, as the same tags from an 8B judge (Magpie uses Llama-3-8B-Instruct) would be."
)
TAG_PANELS = ("category", "input_quality", "difficulty")


def tags_section(outputs):
    """Histograms of the judge's tags over every judged record and over the kept ones; nothing for a run whose
    records carry no tags."""
    judged = outputs["judged"] if outputs["judged"] is not None else outputs["generated"]
    kept = outputs["filtered"]
    if not tagged(judged) and not tagged(kept):
        return []
    populations = {"generated": judged, "kept": kept}
    model = judge_model(outputs)
    blocks = [Heading("Judge tags"),
              Para(f"Each instruction's task category, input quality, difficulty and safety label, given by the "
                   f"judge (`{model}`), over the {len(tagged(judged))} judged samples and the {len(tagged(kept))} "
                   "kept by the filters. `unparsed`: the judge's answer did not fit the schema after one retry.")]
    if weak_judge(model):
        blocks.append(Para(WEAK_JUDGE_NOTE.format(model=model)))
    fig, axes = new_figure(len(TAG_PANELS))
    for field in TAG_FIELDS:
        header, rows = distribution_table(field, populations)
        blocks += [Heading(TAG_TITLES[field], 3), Table(header, rows)]
        if field in TAG_PANELS:
            ax = axes[TAG_PANELS.index(field)]
            values = [row[0] for row in rows][::-1]
            positions = range(len(values))
            for offset, (name, column, colour) in enumerate((("generated", 1, "#8c8c8c"), ("kept", 3, "#4c72b0"))):
                by_value = {row[0]: row[column] for row in rows}
                ax.barh([p + (offset - 0.5) * 0.4 for p in positions], [by_value[v] for v in values], 0.4,
                        label=name, color=colour)
            ax.set_yticks(list(positions), values, fontsize=7)
            ax.set_title(TAG_TITLES[field].lower())
            ax.legend(fontsize=7)
    blocks.append(plot("tags", fig, "The judge's tags of every judged sample and of those kept by the filters."))
    header, rows = distribution_table("quality_reason", populations)
    copied = sum(reason_status(r) == COPIED_REASON for r in tagged(judged))
    blocks += [Heading(TAG_TITLES["quality_reason"], 3), Table(header, rows),
               Para(f"{copied} of the {len(tagged(judged))} judged reasons only repeat the judge prompt's wording or "
                    "the query, and count as unparsed: a reason with no word, one that is a value from the prompt's "
                    "lists, or two words or more found in a row in the prompt's fixed text or the query "
                    "(common/rubric.py copied_reason).")]
    return blocks


def neighbour_section(outputs):
    """Magpie's diversity measure: each kept instruction's distance to its nearest kept neighbour in embedding
    space (the filter records it as nn_distance)."""
    distances = [r["nn_distance"] for r in outputs["filtered"]  # (a lone record has no neighbour: no finite distance)
                 if isinstance(r.get("nn_distance"), (int, float)) and math.isfinite(r["nn_distance"])]
    if not distances:
        return []
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(6, 3.2)
    ax.hist(distances, bins=20, color="#8172b2")
    ax.set_xlabel("cosine distance to the nearest kept neighbour")
    ax.set_ylabel("instructions")
    return [Heading("Nearest-neighbour distance"),
            Para("Cosine distance (1 - cosine similarity) of each kept instruction's embedding to its nearest kept "
                 "neighbour, as Magpie reports it: near 0, the set repeats itself; the near-duplicate filter drops "
                 "everything closer than its threshold."),
            Table(STATS_HEADER, [stats_row("nearest-neighbour distance", distances)]),
            plot("neighbours", fig, "Distance of each kept instruction to its nearest kept neighbour.")]


MAP_CATEGORIES = 9  # the most common categories get a colour each; the rest share one


def map_section(outputs):
    """The kept instructions' embeddings in 2-D (the filter's PCA, filter_summary.json "map"), coloured by the
    judge's category."""
    import numpy as np

    kept, summary_map = outputs["filtered"], outputs["summary"].get("map")
    if not summary_map or len(summary_map["xy"]) != len(kept) or not tagged(kept):
        return []
    coords, explained = np.array(summary_map["xy"]), summary_map["explained"]
    embedder = (outputs["summary"].get("near_duplicate") or {}).get("embedder", "the filter's embedder")
    categories = [str(tags_of(r).get("category", "missing")) for r in kept]
    shown = [c for c, _ in Counter(categories).most_common(MAP_CATEGORIES)]
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(8, 5)
    for category in [*shown, "other"]:
        idx = [i for i, c in enumerate(categories) if (c if c in shown else "other") == category]
        if idx:
            ax.scatter(coords[idx, 0], coords[idx, 1], s=14, alpha=0.75, label=f"{category} ({len(idx)})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return [Heading("Map of the kept instructions"),
            Para(f"The {len(kept)} kept instructions embedded with `{embedder}` (by the filter) and projected "
                 f"on their first two principal components, which hold {100 * explained:.0f}% of the embeddings' "
                 "variance: nearby points are instructions about similar things. Colour: the judge's category."),
            plot("map", fig, "The kept instructions' embeddings in two dimensions (PCA), coloured by category.")]


def reward_section(outputs):
    pairs, scored = outputs["pairs"], outputs["scored"]
    margins = [p["margin"] for p in pairs]
    chosen = [p["score_chosen"] for p in pairs if "score_chosen" in p]
    rejected = [p["score_rejected"] for p in pairs if "score_rejected" in p]
    every = [s for r in scored for s in r["scores"]]
    rows = [stats_row("chosen - rejected margin", margins), stats_row("chosen score", chosen),
            stats_row("rejected score", rejected), stats_row("score of every response", every)]
    fig, (left, right) = new_figure(2)
    left.hist(margins, bins=20, color="#55a868")
    left.set_title("reward margin (chosen - rejected)")
    left.set_ylabel("pairs")
    bins = shared_bins(chosen + rejected)
    right.hist(chosen, bins=bins, alpha=0.6, label="chosen", color="#4c72b0")
    right.hist(rejected, bins=bins, alpha=0.6, label="rejected", color="#c44e52")
    right.set_title("reward score")
    right.legend()
    blocks = [Heading("Reward scores"), Table(STATS_HEADER, rows),
              plot("rewards", fig, "Reward margins of the preference pairs, and the scores of chosen and rejected.")]
    if scored and scored[0].get("reward_model") == "embedded:minilm":
        blocks.insert(2, Para(OFFLINE_SCORER_NOTE))
    return blocks


TRAINING_METRICS = [("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/margins"), ("dpo", "rewards/accuracies")]


def eval_points(history, metric):
    """(step, value) of a metric on the held-out split (the trainer logs it as eval_<metric>), from log_history."""
    return [(h["step"], h[f"eval_{metric}"]) for h in history if isinstance(h.get(f"eval_{metric}"), (int, float))]


HELD_OUT_UNITS = {"sft": ("row", "rows"), "dpo": ("pair", "pairs")}
FEW_HELD_OUT = 30  # below this many held-out rows or pairs the report says the eval curves are noise


def held_out_n(outputs, stage):
    """How many rows (SFT) or pairs (DPO) the trainer evaluated on: training_config.json's eval_records, None where
    the run did not record it."""
    n = outputs["configs"][stage].get("eval_records")
    return n if isinstance(n, int) else None


def n_text(n, stage):
    """'n=3 rows' (or 'n not recorded')."""
    if n is None:
        return "n not recorded"
    one, many = HELD_OUT_UNITS[stage]
    return f"n={n} {one if n == 1 else many}"


def training_section(outputs):
    rows, panels = [], []
    for stage, metric in TRAINING_METRICS:
        train = [(c["step"], c[metric]) for c in outputs["curves"][stage] if metric in c]
        held_out = eval_points(outputs["histories"][stage], metric)
        for name, points, n in ((metric, train, ""), (f"eval_{metric}", held_out,
                                                       n_text(held_out_n(outputs, stage), stage))):
            if points:
                values = [v for _, v in points]
                rows.append((stage, name, len(points), fmt(values[0]), fmt(values[-1]), fmt(min(values)),
                             fmt(max(values)), int(points[-1][0]), n))
        if train or held_out:
            panels.append((stage, metric, train, held_out))
    blocks = [Heading("Training"),
              Table(["stage", "metric", "logged steps", "first", "last", "min", "max", "last step", "held-out n"],
                    rows)]
    evaluated = sorted({stage for stage, _, _, held_out in panels if held_out}, key=list(HELD_OUT_UNITS).index)
    if panels:
        fig, axes = new_figure(len(panels))
        for ax, (stage, metric, train, held_out) in zip(axes, panels):
            ax.plot([s for s, _ in train], [v for _, v in train], marker=".", label="train")
            title = f"{stage.upper()} {metric}"
            if held_out:  # the test split, held out of training (TEST_FRACTION)
                n = n_text(held_out_n(outputs, stage), stage)
                ax.plot([s for s, _ in held_out], [v for _, v in held_out], marker="o", label=f"eval (held out, {n})")
                ax.legend(fontsize=7)
                title += f"\n(eval on {n})"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        sizes = "; ".join(f"{stage.upper()} {n_text(held_out_n(outputs, stage), stage)}" for stage in evaluated)
        blocks.append(plot("training", fig, "Training curves from the adapters' curves.csv (one point a logged step)"
                                            + (f", and the same metrics on the held-out test split (eval_*, from "
                                               f"log_history.json; {sizes})." if evaluated else ".")))
    if not rows:
        blocks.append(Para("No training step was logged (a run shorter than logging_steps)."))
    few = [f"{stage.upper()} on {n_text(held_out_n(outputs, stage), stage)}" for stage in evaluated
           if held_out_n(outputs, stage) is not None and held_out_n(outputs, stage) < FEW_HELD_OUT]
    if few:
        blocks.append(Para(f"The held-out metrics rest on few examples ({', '.join(few)}): an accuracy over n of them "
                           "moves in steps of 1/n and a loss is an average of n values, so their changes from step "
                           "to step are mostly noise at this size."))
    blocks.append(Para("DPO's reference model is the SFT model, so its reward margin and accuracy start at 0."))
    return blocks


def template_note(evals):
    """Which chat template prompted each model (eval.py records it): the model's own, or the project's default for a
    base model without one, and whether base, SFT and DPO all had the same."""
    used = {stage: (evals[stage].get("settings", {}).get("chat_template"),
                    evals[stage].get("settings", {}).get("chat_template_sha256")) for stage in STAGES}
    if len(set(used.values())) == 1:
        source, digest = used["base"]
        return f"Chat template for base, SFT and DPO alike: {source or 'not recorded'}" + (
            f" (sha256 {digest})." if digest else ".")
    return "Chat templates differ between the models, so their scores are not comparable: " + "; ".join(
        f"{stage} {source} ({digest})" for stage, (source, digest) in used.items()) + "."


def examples(evaluation, task):
    """Examples lm-eval scored of a task (its n_samples' effective count; a group's: its leaf tasks'), None where
    not recorded."""
    counts = evaluation.get("n_samples", {})
    found = [counts.get(t, {}).get("effective") for t in ([task] if task in counts else leaves_of(evaluation, task))]
    return sum(found) if found and all(isinstance(n, int) for n in found) else None


def eval_bars(evals):
    """[(task, metric, n, values, standard errors)] of every metric eval_rows tables, for the bar chart: a value or
    standard error lm-eval did not give (IFEval's instruction-level metrics have none) is None, never 0."""
    base = evals["base"]
    bars = []
    for task in eval_tasks(base):
        results = [evals[stage]["results"].get(task, {}) for stage in STAGES]
        for key in metric_names(results[0]):
            values = [r.get(key) if isinstance(r.get(key), (int, float)) else None for r in results]
            errors = [stderr_of(r, key) for r in results]
            errors = [e if e is not None and math.isfinite(e) else None for e in errors]
            bars.append((task, key.split(",")[0], examples(base, task), values, errors))
    return bars


def sample_note(evals, tasks):
    """Which examples the models answered: the eval step's seeded sample where it recorded one."""
    samples = [evals[stage].get("sample") for stage in STAGES if "examples" in evals[stage]]
    if not samples[0]:
        return "Base, SFT and DPO answered the same lm-eval documents, paired by document id."
    if any(s != samples[0] for s in samples):
        return ("The models' samples of examples differ (eval/*.json \"sample\"): each difference pairs the examples "
                "both models answered.")
    seeds = sorted({str(v.get("seed")) for v in samples[0].values()})
    sizes, whole = [], True
    for task in tasks:
        drawn = [samples[0][leaf] for leaf in leaves_of(evals["base"], task) if leaf in samples[0]]
        n, of = sum(d["n"] for d in drawn), sum(d["of"] for d in drawn)
        whole = whole and n == of
        if drawn:
            sizes.append(f"{task} {'all ' if n == of else f'{n} of '}{of}")
    if whole:
        return f"Base, SFT and DPO answered every example of each task: {', '.join(sizes)}."
    return (f"Base, SFT and DPO answered the same examples, a seeded random sample (seed {', '.join(seeds)}) of N "
            f"of M per task: {', '.join(sizes)}.")


def paired_notes(evals, comparisons):
    """What the difference columns are, what n each rests on, and where pairing fell short."""
    paired = [c for c in comparisons if c.paired is not None]
    if not paired:
        return ["These eval JSONs have no per-example results (written without lm-eval's samples), so each difference "
                "is given unpaired: ± the two standard errors combined as if independent (sqrt(se1² + se2²)), which "
                "overstates the error of a difference on the same questions, and none is marked beyond noise."]
    tasks = list(dict.fromkeys(c.task for c in paired))
    sizes = []
    for task in tasks:
        ns = sorted({c.paired.n for c in paired if c.task == task})
        units = sorted({c.paired.units for c in paired if c.task == task and c.paired.units})
        sizes.append(f"{task} {'/'.join(map(str, ns))}" + (
            f" ({'/'.join(map(str, units))} instructions for its instruction-level metrics)" if units else ""))
    notes = [f"A difference (later - earlier) is paired: the mean of the per-example differences ± their standard "
             f"error (for an instruction-level metric, a ratio over instructions clustered by prompt). {MARK} marks "
             f"a difference beyond noise ({RULE}). Each comparison rests on the n examples both models answered: "
             f"{', '.join(sizes)}.", sample_note(evals, tasks)]
    short = [f"{c.task} {c.metric} {c.later} - {c.earlier} ({c.paired.unmatched})" for c in paired
             if c.paired.unmatched]
    if short:
        notes.append(f"Examples answered by one model only, left out of the pairing: {', '.join(short)}.")
    off = [f"{c.task} {c.metric} {c.later} - {c.earlier} ({signed(c.paired.diff)} vs {signed(c.paired.reported)})"
           for c in paired if not c.paired.unmatched and c.paired.reported is not None and not c.paired.agrees]
    if off:
        notes.append(f"**The per-example results do not add up to lm-eval's scores** for {', '.join(off)}: check "
                     "eval/*.json.")
    unpaired = [f"{c.task} {c.metric} {c.later} - {c.earlier}" for c in comparisons if c.paired is None]
    if unpaired:
        notes.append(f"Unpaired (no per-example results): {', '.join(unpaired)}: ± the two standard errors combined "
                     "as if independent, which overstates the error; not marked.")
    return notes


def offline_note(base):
    """What a score on the cpu tier's local stand-in tasks means, and what it does not."""
    local = [t for t in eval_tasks(base) if t.endswith("_local")]
    if not local:
        return None
    tiny = "embedded:smollm2" in str(base.get("model")) or "135m" in str(base.get("model")).lower()
    return (f"The local tasks ({', '.join(local)}) are a few dozen self-written stand-ins for IFEval and MMLU/HellaSwag"
            + (", here with the cpu tier's embedded 135M model" if tiny else "") + ": their scores show that the "
            "chain trains and evaluates end to end, and a difference beyond noise shows an adapter changed the "
            "model's answers on these few examples. They are not a benchmark and say nothing of the model on the "
            "real tasks.")


def time_blocks(evals):
    """Each model's evaluation time: the eval step's estimate before it ran, and the wall clock it measured."""
    rows, loads = [], set()
    for stage in STAGES:
        spent, requests = evals[stage].get("time") or {}, evals[stage].get("requests") or {}
        if "wall_s" not in spent:
            continue
        expected = spent.get("expected_s")
        cached = f"{requests['from_cache']} of {requests['total']}" if "from_cache" in requests else "not recorded"
        rows.append((stage, "no estimate (no --cost)" if expected is None else fmt(float(expected), 0),
                     fmt(float(spent["wall_s"]), 1), cached))
        if "load_s" in spent:  # one base model load shared by the models evaluated in one run of the step
            n = spent.get("models_this_load", "?")
            loads.add(f"{fmt(float(spent['load_s']), 1)} s, once for {n} model{'s' * (n != 1)}")
    if not rows:
        return []
    load = (f"its requests, the model's loading not included (the base model's load: {'; '.join(sorted(loads))})"
            if loads else "its wall clock, loading the model included")
    return [Table(["model", "expected (s)", "measured (s)", "requests answered from the cache"], rows),
            Para("Expected: the eval step's estimate before it ran, from this tier's measured cost per token (--cost;"
                 f" every generation counted to its token cap, so an upper bound); measured: {load}. Requests "
                 "answered from the cache take no model time.")]


def eval_section(outputs):
    evals = outputs["evals"]
    base = evals["base"]
    rows, comparisons = eval_rows(evals)
    bars = eval_bars(evals)
    # n (examples scored) beside each metric: the table's third column
    n_of = {(task, metric): n for task, metric, n, _, _ in bars}
    rows = [(task, metric, "?" if n_of.get((task, metric)) is None else n_of[task, metric], *rest)
            for task, metric, *rest in rows]
    subtasks = len(base["results"]) - len(eval_tasks(base))
    samples = ", ".join(f"{t} {'?' if examples(base, t) is None else examples(base, t)}" for t in eval_tasks(base))
    no_stderr = [f"{task} {metric}" for task, metric, _, values, errors in bars
                 if any(v is not None and e is None for v, e in zip(values, errors))]
    notes = [f"Examples per task (n): {samples} (LIMIT: {limit_text(base.get('limit'))}). A model's value is given "
             "± lm-eval's standard error.", *paired_notes(evals, comparisons)]
    if no_stderr:
        notes.append(f"lm-eval gives no standard error for {', '.join(no_stderr)}: no ± on its values in the table, "
                     "no error bar in the chart.")
    if subtasks > 0:
        notes.append(f"{subtasks} subtasks and subgroups of these are in eval/*.json, not listed here.")
    if any(t.startswith("ifeval") for t in eval_tasks(base)):
        notes.append("IFEval's inst_level metrics are shares of the instructions within its n prompts; its sentence "
                     f"checks used punkt: {base.get('punkt')}.")
    notes += [n for n in (offline_note(base), template_note(evals)) if n]
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(min(12, max(6, 1.6 * len(bars))), 4.2)
    width = 0.27
    for i, stage in enumerate(STAGES):
        xs = [j + (i - 1) * width for j in range(len(bars))]
        values = [b[3][i] or 0 for b in bars]
        ax.bar(xs, values, width, label=stage)
        # error bars only where a standard error exists: a missing one is not drawn as a zero-height bar
        shown = [j for j, b in enumerate(bars) if b[3][i] is not None and b[4][i] is not None]
        if shown:
            ax.errorbar([xs[j] for j in shown], [values[j] for j in shown], yerr=[bars[j][4][i] for j in shown],
                        fmt="none", ecolor="black", capsize=3, linewidth=1)
    labels = [f"{task} {metric}\n(n={'?' if n is None else n})" + ("\nno std. error" if f"{task} {metric}" in no_stderr
                                                                   else "") for task, metric, n, _, _ in bars]
    ax.set_xticks(range(len(bars)), labels, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("evaluation (error bars: ± standard error, where lm-eval gives one)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caption = "Every metric of every task for base, SFT and DPO, n examples each; error bars: ± standard error" + (
        f", none for {', '.join(no_stderr)} (lm-eval gives none)." if no_stderr else ".")
    return [
        Heading("Evaluation (lm-evaluation-harness)"),
        Para(headline(comparisons)),
        Table([*EVAL_HEADER[:2], "n", *EVAL_HEADER[2:]], rows),
        Para(" ".join(notes)),
        plot("eval", fig, caption),
        *time_blocks(evals),
    ]


def sampling_text(sampling):
    """One generate record's Sampling.record() in words."""
    if not sampling:
        return "not used"
    return (f"temperature {sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, "
            f"repetition penalty {sampling['repetition_penalty']}, max {sampling['max_new_tokens']} tokens"
            + (f", loop window {sampling['loop_window']}" if sampling.get("loop_window") else ""))


def settings_section(outputs, tier, model_name):
    generation = (outputs["generated"] or [{}])[0].get("settings", {})
    sft, dpo, lora, base = outputs["configs"]["sft"], outputs["configs"]["dpo"], outputs["lora"], outputs["evals"]["base"]
    eval_settings = base.get("settings", {})

    def steps(c):
        return f"max_steps {c['max_steps']}" if c.get("max_steps", -1) > 0 else f"epochs {c.get('num_train_epochs')}"

    def batch(c):
        return f"batch {c.get('per_device_train_batch_size')} x {c.get('gradient_accumulation_steps')} accumulation"

    rows = [
        ("tier (GPU)", tier or "not given"), ("MODEL", model_name or "not given"),
        ("target model", base.get("model")), ("generator", generation.get("model")),
        ("reward model", (outputs["scored"] or [{}])[0].get("reward_model")),
        ("generation seed", generation.get("seed")),
        ("generator recipe", generation.get("recipe")),
        ("turns per conversation (at most)", generation.get("turns")),
        ("instruction sampling", sampling_text(generation.get("instruction_sampling"))),
        ("response sampling", sampling_text(generation.get("response_sampling"))),
        ("SFT", f"lr {sft.get('learning_rate')}, {steps(sft)}, {batch(sft)}, seed {sft.get('seed')}"),
        ("LoRA", f"r {lora.get('r')}, alpha {lora.get('lora_alpha')}, dropout {lora.get('lora_dropout')}, "
                 f"modules {', '.join(sorted(lora.get('target_modules') or []))}"),
        ("DPO", f"beta {dpo.get('beta')}, lr {dpo.get('learning_rate')}, {steps(dpo)}, {batch(dpo)}, "
                f"seed {dpo.get('seed')}"),
        ("evaluation", "; ".join([f"tasks {', '.join(base.get('tasks', []))}",
                                  f"limit {limit_text(base.get('limit'))}",
                                  *[f"{k.replace('_', ' ')} {v}" for k, v in eval_settings.items()]])),
    ]
    rows += [(name, version) for name, version in base["versions"].items()]
    rows.append(("python", sys.version.split()[0]))
    return [Heading("Settings"), Table(["setting", "value"], rows),
            Para("Package versions: recorded by the eval step of the base model.")]


def main(argv=None):
    args = parse_args(argv)
    outputs = load_run(args.run)
    title = f"Run report: {args.run.name}"
    blocks = [*funnel_section(outputs), *diversity_section(outputs), *tags_section(outputs), *neighbour_section(outputs),
              *map_section(outputs), *reward_section(outputs), *training_section(outputs),
              *eval_section(outputs), *settings_section(outputs, args.tier, args.model_name)]
    plots_dir = args.out.with_name(args.out.stem + "_plots")
    with output_lock(args.out):  # (and the plots and the HTML page, written with it)
        write_text(args.out, to_markdown(title, blocks, plots_dir))
        print(f"wrote {args.out} (plots in {plots_dir})")
        if args.html:
            write_text(args.html, to_html(title, blocks))
            print(f"wrote {args.html}")


if __name__ == "__main__":
    run_step(main)
