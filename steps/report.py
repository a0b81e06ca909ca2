"""The run report: one page, in markdown and in self-contained HTML, that answers "did it help?".

    python steps/report.py --run data/runs/smol-cpu --out data/runs/smol-cpu/report.md \
        --html data/runs/smol-cpu/report.html --tier cpu --model-name smol

Sections: data funnel (generated, kept, dropped per filter rule, scored, pairs), instruction diversity (opening
words, first verbs, length histograms), reward scores and margins, training curves (SFT loss; DPO loss, reward
margin and accuracy), the evaluation table (base, SFT, DPO with standard errors and deltas against base) and the
settings used (models, tier, seeds, package versions).

Reads only the files the other steps wrote in the run directory. Plots are matplotlib PNGs: the markdown links
them from <out>_plots/ (report_plots/ for report.md), the HTML page embeds them as data URIs, so it is one file.
"""

import argparse
import base64
import csv
import html
import io
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from common import DataError, run_step
from common.files import atomic_path, output_lock, write_text
from common.jsonl import read_jsonl

STAGES = ("base", "sft", "dpo")
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run directory")
    p.add_argument("--out", required=True, type=Path, help="markdown file to write (plots go to <out>_plots/)")
    p.add_argument("--html", type=Path, default=None, help="also write this self-contained HTML page")
    p.add_argument("--tier", default=None, help="hardware tier of the run (make passes GPU)")
    p.add_argument("--model-name", default=None, help="MODEL of the run (make passes it)")
    return p.parse_args(argv)


# ---- Reading the run directory ---------------------------------------------------------------------------------

def read_json(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: missing; the report needs every step's output (run `make report`)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def read_curves(adapter_dir):
    """The adapter's training curves (curves.csv, written by the training step: one row a logged step)."""
    path = Path(adapter_dir) / "curves.csv"
    if not path.exists():
        raise DataError(f"{path}: missing; the report needs every step's output (run `make report`)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def load_run(run):
    """Everything the report shows, read from the run directory."""
    return {
        "summary": read_json(run / "filter_summary.json"),
        "generated": read_jsonl(run / "generated.jsonl"),
        "filtered": read_jsonl(run / "filtered.jsonl"),
        "scored": read_jsonl(run / "scored.jsonl"),
        "pairs": read_jsonl(run / "preference.jsonl"),
        "curves": {stage: read_curves(run / stage) for stage in ("sft", "dpo")},
        "configs": {stage: read_json(run / stage / "training_config.json") for stage in ("sft", "dpo")},
        "lora": read_json(run / "sft" / "adapter_config.json"),
        "evals": {stage: read_json(run / "eval" / f"{stage}.json") for stage in STAGES},
    }


# ---- Formatting: a report is a list of blocks, rendered once as markdown and once as HTML ----------------------

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
    return f"{100 * n / total:.0f}%" if total else ""


def table(header, rows):
    """A markdown pipe table (renders on GitHub); compare.py uses it too."""
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def stats_row(label, values, digits=3):
    if not values:
        return (label, 0, "", "", "", "", "")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    spread = [float(statistics.mean(values)), float(statistics.median(values)), float(sd)]
    return (label, len(values), *[fmt(v, digits) for v in (*spread, min(values), max(values))])


STATS_HEADER = ["", "n", "mean", "median", "stdev", "min", "max"]


def new_figure(panels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(min(4.2 * panels, 12), 3.2), squeeze=False)
    return fig, axes[0]


def png(fig):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def shared_bins(values, n=20):
    """Histogram bin edges over all the values, so that overlaid histograms line up."""
    low, high = (min(values), max(values)) if values else (0, 1)
    high = high if high > low else low + 1
    return [low + (high - low) * i / n for i in range(n + 1)]


def heading(text, level=2):
    return ("heading", level, text)


def para(text):
    return ("para", text)


def grid(header, rows):
    return ("table", header, rows)


def plot(name, fig, caption):
    return ("plot", name, png(fig), caption)


# ---- Sections ----------------------------------------------------------------------------------------------------

def funnel_section(d):
    summary, scored, pairs = d["summary"], d["scored"], d["pairs"]
    total = summary["input"]
    stages = [("generated", total), ("kept by the filters", summary["kept"]),
              ("scored for preference", len(scored)), ("preference pairs", len(pairs))]
    rows = [(name, n, share(n, total)) for name, n in stages]
    dropped = list(summary["dropped"].items())
    responses = sum(len(r["scores"]) for r in scored)
    fig, (left, right) = new_figure(2)
    left.barh([s for s, _ in stages][::-1], [n for _, n in stages][::-1], color="#4c72b0")
    left.set_title("samples at each stage")
    right.barh([r for r, _ in dropped][::-1], [n for _, n in dropped][::-1], color="#c44e52")
    right.set_title("dropped by each filter rule")
    return [
        heading("Data funnel"),
        grid(["stage", "samples", "of generated"], rows),
        *generation_yield(d["generated"], summary),
        para(f"{total - summary['kept']} samples were dropped by the filters. {responses} responses to "
             f"{len(scored)} instructions were sampled and scored; {len(scored) - len(pairs)} instructions gave no "
             "pair (tied scores, margin under the minimum, or no finished response to choose)."),
        heading("Dropped by each filter rule", 3),
        grid(["rule", "dropped", "of generated"], [(rule, n, share(n, total)) for rule, n in dropped]),
        plot("funnel", fig, "Samples at each stage of the chain, and what each filter rule dropped."),
    ]


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
    return [heading("Generation yield", 3), grid(["", "samples", "share"], rows)]


def words(text):
    return re.findall(r"[a-z0-9']+", (text or "").lower())


def first_verb(text):
    return next((w for w in words(text) if w in INSTRUCTION_VERBS), None)


def diversity_section(d):
    kept = [r["instruction"] for r in d["filtered"]]
    openings = Counter(ws[0] for ws in map(words, kept) if ws)
    verbs = Counter(v for v in map(first_verb, kept) if v)
    lengths = {
        "instruction, generated": [len(words(r["instruction"])) for r in d["generated"]],
        "instruction, kept": [len(words(r["instruction"])) for r in d["filtered"]],
        "response, generated (answered)": [len(words(r["response"])) for r in d["generated"] if r.get("response")],
        "response, kept": [len(words(r["response"])) for r in d["filtered"]],
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
        heading("Instruction diversity"),
        para(f"Over the {n} kept instructions: {len(set(kept))} distinct, {len(openings)} distinct opening words, "
             f"{sum(verbs.values())} with a verb from a list of {len(INSTRUCTION_VERBS)} common instruction verbs "
             f"({len(verbs)} distinct). Words are lower-cased runs of letters, digits and apostrophes."),
        heading("Most common opening words", 3),
        grid(["rank", "opening word", "instructions", "share"],
             [(i, w, c, share(c, n)) for i, (w, c) in enumerate(openings.most_common(TOP), 1)]),
        heading("Most common first verbs", 3),
        grid(["rank", "first verb", "instructions", "share"],
             [(i, w, c, share(c, n)) for i, (w, c) in enumerate(verbs.most_common(TOP), 1)]),
        heading("Lengths (words)", 3),
        grid(STATS_HEADER, [stats_row(label, values, 1) for label, values in lengths.items()]),
        plot("lengths", fig, "Instruction and response lengths in words: every generated sample, and those kept."),
    ]


def reward_section(d):
    pairs, scored = d["pairs"], d["scored"]
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
    blocks = [heading("Reward scores"), grid(STATS_HEADER, rows),
              plot("rewards", fig, "Reward margins of the preference pairs, and the scores of chosen and rejected.")]
    if scored and scored[0].get("reward_model") == "embedded:minilm":
        blocks.insert(2, para(OFFLINE_SCORER_NOTE))
    return blocks


TRAINING_METRICS = [("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/margins"), ("dpo", "rewards/accuracies")]


def training_section(d):
    rows, series = [], []
    for stage, metric in TRAINING_METRICS:
        points = [(c["step"], c[metric]) for c in d["curves"][stage] if metric in c]
        if not points:
            continue
        values = [v for _, v in points]
        rows.append((stage, metric, len(points), fmt(values[0]), fmt(values[-1]), fmt(min(values)), fmt(max(values)),
                     int(points[-1][0])))
        series.append((stage, metric, points))
    blocks = [heading("Training"),
              grid(["stage", "metric", "logged steps", "first", "last", "min", "max", "last step"], rows)]
    if series:
        fig, axes = new_figure(len(series))
        for ax, (stage, metric, points) in zip(axes, series):
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
            ax.set_title(f"{stage.upper()} {metric}")
            ax.set_xlabel("step")
        blocks.append(plot("training", fig, "Training curves from the adapters' curves.csv (one point a logged "
                                            "step)."))
    if not rows:
        blocks.append(para("No training step was logged (a run shorter than logging_steps)."))
    blocks.append(para("DPO's reference model is the SFT model, so its reward margin and accuracy start at 0."))
    return blocks


def metric_names(result):
    """The task's metrics (lm-eval keys 'metric,filter'), without their standard errors."""
    return [k for k, v in result.items()
            if "," in k and "_stderr," not in k and (isinstance(v, (int, float)) and not isinstance(v, bool))]


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


def eval_section(d):
    evals = d["evals"]
    base = evals["base"]
    rows, bars = [], []
    for task in eval_tasks(base):
        results = {stage: evals[stage]["results"].get(task, {}) for stage in STAGES}
        for key in metric_names(results["base"]):
            metric = key.split(",")[0]
            rows.append((task, metric, *[value_cell(results[s], key) for s in STAGES],
                         *[delta_cell(results[s], results["base"], key) for s in STAGES[1:]]))
            bars.append((f"{task} {metric}", [results[s].get(key) for s in STAGES],
                         [stderr_of(results[s], key) or 0 for s in STAGES]))
    subtasks = len(base["results"]) - len(eval_tasks(base))
    samples = ", ".join(f"{t} {base.get('n_samples', {}).get(t, {}).get('effective', '?')}" for t in eval_tasks(base))
    notes = [f"Examples per task: {samples} (LIMIT: {limit_text(base.get('limit'))})."
             " ± is lm-eval's standard error; a delta is given ± the standard error of the difference "
             "(the two errors combined as if independent, which overstates it for the same questions), so a delta "
             "within about twice that is noise."]
    if subtasks > 0:
        notes.append(f"{subtasks} subtasks and subgroups of these are in eval/*.json, not listed here.")
    if any(t.startswith("ifeval") for t in eval_tasks(base)):
        notes.append(f"IFEval sentence checks used punkt: {base.get('punkt')}.")
    notes.append(template_note(evals))
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(min(12, max(6, 1.6 * len(bars))), 4.2)
    width = 0.27
    for i, stage in enumerate(STAGES):
        xs = [j + (i - 1) * width for j in range(len(bars))]
        ax.bar(xs, [b[1][i] or 0 for b in bars], width, yerr=[b[2][i] for b in bars], capsize=3, label=stage)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("evaluation (bars: ± standard error)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return [
        heading("Evaluation (lm-evaluation-harness)"),
        grid(["task", "metric", "base", "sft", "dpo", "sft - base", "dpo - base"], rows),
        para(" ".join(notes)),
        plot("eval", fig, "Every metric of every task for base, SFT and DPO, with standard errors."),
    ]


def sampling_text(sampling):
    """One generate record's Sampling.record() in words."""
    if not sampling:
        return "not used"
    return (f"temperature {sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, "
            f"repetition penalty {sampling['repetition_penalty']}, max {sampling['max_new_tokens']} tokens"
            + (f", loop window {sampling['loop_window']}" if sampling.get("loop_window") else ""))


def settings_section(d, tier, model_name):
    generation = (d["generated"] or [{}])[0].get("settings", {})
    sft, dpo, lora, base = d["configs"]["sft"], d["configs"]["dpo"], d["lora"], d["evals"]["base"]
    eval_settings = base.get("settings", {})

    def steps(c):
        return f"max_steps {c['max_steps']}" if c.get("max_steps", -1) > 0 else f"epochs {c.get('num_train_epochs')}"

    def batch(c):
        return f"batch {c.get('per_device_train_batch_size')} x {c.get('gradient_accumulation_steps')} accumulation"

    rows = [
        ("tier (GPU)", tier or "not given"), ("MODEL", model_name or "not given"),
        ("target model", base.get("model")), ("generator", generation.get("model")),
        ("reward model", (d["scored"] or [{}])[0].get("reward_model")),
        ("generation seed", generation.get("seed")),
        ("generator recipe", generation.get("recipe")),
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
    return [heading("Settings"), grid(["setting", "value"], rows),
            para("Package versions: recorded by the eval step of the base model.")]


# ---- Rendering ---------------------------------------------------------------------------------------------------

def to_markdown(title, blocks, plots_dir):
    """Markdown with the plots as PNG files in plots_dir, linked relative to the markdown file."""
    parts = [f"# {title}"]
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "para":
            parts.append(block[1])
        elif kind == "table":
            parts.append(table(block[1], block[2]))
        elif kind == "plot":
            _, name, data, caption = block
            with atomic_path(plots_dir / f"{name}.png") as tmp:
                Path(tmp).write_bytes(data)
            parts.append(f"![{caption}]({plots_dir.name}/{name}.png)")
    return "\n\n".join(parts) + "\n"


def inline_html(text):
    """Escape text for HTML; `code` spans become <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { color: #59636e; font-size: 13px; }
code { background: #f0f2f4; padding: 0 3px; border-radius: 3px; }
"""


def to_html(title, blocks):
    """One self-contained page: inline CSS, plots as base64 data URIs, no external requests."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            body.append(f"<h{block[1]}>{inline_html(block[2])}</h{block[1]}>")
        elif kind == "para":
            body.append(f"<p>{inline_html(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{inline_html(str(c))}</th>" for c in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{inline_html(str(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "plot":
            _, name, data, caption = block
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            body.append(f'<figure id="{name}"><img src="{uri}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def main(argv=None):
    args = parse_args(argv)
    d = load_run(args.run)
    title = f"Run report: {args.run.name}"
    blocks = [*funnel_section(d), *diversity_section(d), *reward_section(d), *training_section(d),
              *eval_section(d), *settings_section(d, args.tier, args.model_name)]
    plots_dir = args.out.with_name(args.out.stem + "_plots")
    with output_lock(args.out):  # (and the plots and the HTML page, written with it)
        write_text(args.out, to_markdown(title, blocks, plots_dir))
        print(f"wrote {args.out} (plots in {plots_dir})")
        if args.html:
            write_text(args.html, to_html(title, blocks))
            print(f"wrote {args.html}")


if __name__ == "__main__":
    run_step(main)
