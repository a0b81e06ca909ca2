"""The run report (markdown and HTML) from the chain_run fixture: every section, with the run's own numbers."""

import base64
import csv
import json
import re
import shutil
import statistics
from collections import Counter

import compare
import pytest
import report as report_step
from conftest import make, read_lines, run_step
from run_fixture import MC_CORRECT, make_run, mc_eval

from common.reporting.eval_tables import COMPARISONS, metric_names, stderr_of
from common.reporting.paired import BEYOND, paired_difference

SECTIONS = ["Data funnel", "Generation yield", "Dropped by each filter rule", "Instruction diversity", "Most common opening words",
            "Most common first verbs", "Lengths (words)", "Reward scores", "Training",
            "Evaluation (lm-evaluation-harness)", "Settings"]
PLOTS = ["funnel", "lengths", "rewards", "training", "eval"]


@pytest.fixture(scope="module")
def report(chain_run):
    return (chain_run / "report.md").read_text()


def row(report, *first_cells):
    """The table row that starts with these cells, as a list of cells."""
    start = "| " + " | ".join(map(str, first_cells)) + " |"
    lines = [line for line in report.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"{start!r}: {len(lines)} rows"
    return [c.strip() for c in lines[0].strip("|").split("|")]


def folded_rules(report):
    """The rules on the funnel's one line of rules that dropped nothing ("no drops: a, b")."""
    cells = [c.strip() for line in report.splitlines() if line.startswith("| no drops: ") for c in line.split("|")]
    assert cells and cells[2] == "0", cells
    return cells[1].removeprefix("no drops: ").split(", ")


def section(report, title):
    """The text under a heading, up to the next heading."""
    return re.split(r"\n#+ ", report.split(f" {title}\n", 1)[1], maxsplit=1)[0]


def test_every_section_is_there_in_both_forms(chain_run, report):
    page = (chain_run / "report.html").read_text()
    for title in SECTIONS:
        level = "###" if title.startswith(("Generation", "Dropped", "Most", "Lengths")) else "##"
        assert f"\n{level} {title}\n" in report
        assert f">{title}</h{len(level)}>" in page.replace("&#x27;", "'")
    for name in PLOTS:
        assert f"(report_plots/{name}.png)" in report
        assert (chain_run / "report_plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_html_is_self_contained(run, report):
    """Every plot the markdown links is embedded in the HTML page, in order; every table is in both."""
    page = (run / "report.html").read_text()
    names = re.findall(r"\(report_plots/([\w-]+)\.png\)", report)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(names)
    for name, data in zip(names, images):
        assert base64.b64decode(data) == (run / "report_plots" / f"{name}.png").read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    assert page.count("<table>") == sum(line.startswith("|---") for line in report.splitlines())
    return names


def test_html_is_self_contained_with_the_plots_embedded(chain_run, report):
    names = assert_html_is_self_contained(chain_run, report)
    assert set(PLOTS) <= set(names)
    assert (chain_run / "report.html").read_text().count("<table>") >= 10


def test_funnel_counts_match_the_run_files(chain_run, report):
    summary = json.loads((chain_run / "filter_summary.json").read_text())
    pairs = read_lines(chain_run / "preference.jsonl")
    scored = read_lines(chain_run / "scored.jsonl")
    assert summary["input"] == len(read_lines(chain_run / "generated.jsonl")) == 12
    assert summary["kept"] == len(read_lines(chain_run / "filtered.jsonl"))
    assert row(report, "generated")[1:] == ["12", "100%"]
    assert row(report, "kept by the filters")[1] == str(summary["kept"])
    assert row(report, "scored for preference")[1] == str(len(scored))
    assert row(report, "preference pairs")[1] == str(len(pairs))
    for rule, n in summary["dropped"].items():
        if n:
            assert row(report, rule)[1] == str(n)
        else:  # folded into the one line of the rules that dropped nothing
            assert rule in folded_rules(report)
    generated = read_lines(chain_run / "generated.jsonl")
    assert row(report, "yield: kept by the filters")[1] == str(summary["kept"])
    capped = sum(r["instruction_stop"] == "length" for r in generated)
    assert row(report, "instructions cut at the length cap")[1] == str(capped)
    answered = [r for r in generated if r["response_stop"]]
    assert row(report, f"responses cut at the length cap (of {len(answered)} answered)")[1] == str(
        sum(r["response_stop"] == "length" for r in answered))
    assert f"{sum(len(r['scores']) for r in scored)} responses to {len(scored)} instructions" in report


def test_diversity_counts_match_the_kept_instructions(chain_run, report):
    kept = read_lines(chain_run / "filtered.jsonl")
    openings = Counter(re.findall(r"[a-z0-9']+", r["instruction"].lower())[0] for r in kept)
    top_count = openings.most_common(1)[0][1]
    first = row(section(report, "Most common opening words"), 1)
    assert openings[first[1]] == top_count and first[2] == str(top_count)
    lengths = [len(re.findall(r"[a-z0-9']+", r["instruction"].lower())) for r in kept]
    assert row(report, "instruction, kept")[1:4] == [str(len(kept)), f"{statistics.mean(lengths):.1f}",
                                                      f"{float(statistics.median(lengths)):.1f}"]
    assert f"Over the {len(kept)} kept instructions: {len({r['instruction'] for r in kept})} distinct" in report


def test_reward_stats_match_the_pairs(chain_run, report):
    pairs = read_lines(chain_run / "preference.jsonl")
    margins = [p["margin"] for p in pairs]
    assert row(report, "chosen - rejected margin")[1:] == [
        str(len(margins)), f"{statistics.mean(margins):.3f}", f"{statistics.median(margins):.3f}",
        f"{statistics.stdev(margins) if len(margins) > 1 else 0.0:.3f}", f"{min(margins):.3f}", f"{max(margins):.3f}"]
    every = [s for r in read_lines(chain_run / "scored.jsonl") for s in r["scores"]]
    assert row(report, "score of every response")[1:3] == [str(len(every)), f"{statistics.mean(every):.3f}"]
    assert "all-MiniLM-L6-v2" in report  # the offline scorer is named for what it is


def test_training_rows_match_the_curves(chain_run, report):
    for stage, metric in (("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/margins"), ("dpo", "rewards/accuracies")):
        with open(chain_run / stage / "curves.csv") as f:
            points = [(float(r["step"]), float(r[metric])) for r in csv.DictReader(f)]
        values = [v for _, v in points]
        assert row(report, stage, metric)[2:] == [str(len(points)), f"{values[0]:.3f}", f"{values[-1]:.3f}",
                                                  f"{min(values):.3f}", f"{max(values):.3f}", str(int(points[-1][0])),
                                                  ""]
    assert row(report, "dpo", "rewards/margins")[3] == "0.000"  # the reference is the SFT model itself
    for stage, unit in (("sft", "row"), ("dpo", "pair")):  # the held-out split's size beside its metrics
        n = json.loads((chain_run / stage / "training_config.json").read_text())["eval_records"]
        for line in report.splitlines():
            if line.startswith(f"| {stage} | eval_"):
                assert line.endswith(f"| n={n} {unit}{'' if n == 1 else 's'} |")


def test_eval_table_has_standard_errors_and_paired_differences(chain_run, report):
    evals = {m: json.loads((chain_run / "eval" / f"{m}.json").read_text()) for m in ("base", "sft", "dpo")}
    assert all("examples" in e for e in evals.values()), "the eval step writes per-example results"
    for task, metric in (("ifeval_local", "prompt_level_strict_acc"), ("ifeval_local", "inst_level_strict_acc"),
                         ("mc_local", "acc"), ("mc_local", "acc_norm")):
        key = f"{metric},none"
        cells = row(report, task, metric)
        assert cells[2] == "4"  # n: the examples scored
        if metric != "inst_level_strict_acc":
            values = [evals[m]["results"][task][key] for m in ("base", "sft", "dpo")]
            errors = [evals[m]["results"][task][f"{metric}_stderr,none"] for m in ("base", "sft", "dpo")]
            assert cells[3:6] == [f"{v:.3f} ± {e:.3f}" for v, e in zip(values, errors)]
        for cell, (later, earlier) in zip(cells[6:], COMPARISONS):
            p = paired_difference(evals[earlier], evals[later], task, key)
            assert (p.n, p.unmatched) == (4, 0) and p.agrees  # the examples add up to lm-eval's scores
            assert cell == f"{p.diff:+.3f}" + ("" if p.se is None else f" ± {p.se:.3f}") + (
                " *" if p.verdict == BEYOND else "")
    assert section(report, "Evaluation (lm-evaluation-harness)").startswith("\nBeyond noise (|difference| > 2 paired")
    assert "both models answered: ifeval_local 4 (" in report and "instruction-level metrics), mc_local 4." in report
    no_stderr = row(report, "ifeval_local", "inst_level_strict_acc")  # lm-eval gives none for this one
    assert no_stderr[3] == f"{evals['base']['results']['ifeval_local']['inst_level_strict_acc,none']:.3f}"
    ifeval = evals["base"]["results"]["ifeval_local"]
    without = [f"ifeval_local {k.split(',')[0]}" for k in metric_names(ifeval) if stderr_of(ifeval, k) is None]
    assert "ifeval_local inst_level_strict_acc" in without  # the chart says which metrics have no error bar
    assert f"error bars: ± standard error, none for {', '.join(without)} (lm-eval gives none)" in report
    assert "Examples per task (n): ifeval_local 4, mc_local 4 (LIMIT: 4)" in report


def test_settings_name_tier_models_seeds_and_versions(chain_run, report):
    base = json.loads((chain_run / "eval" / "base.json").read_text())
    assert row(report, "tier (GPU)")[1] == "cpu" and row(report, "MODEL")[1] == "smol"
    assert row(report, "target model")[1] == "embedded:smollm2" == row(report, "generator")[1]
    assert row(report, "reward model")[1] == "embedded:minilm"
    assert row(report, "generation seed")[1] == "0"
    assert "max_steps 2" in row(report, "SFT")[1] and "seed 0" in row(report, "DPO")[1]
    for package in ("torch", "transformers", "trl", "peft", "lm_eval"):
        assert row(report, package)[1] == base["versions"][package]
    assert "tasks ifeval_local, mc_local; limit 4" in row(report, "evaluation")[1]


def test_missing_inputs_are_named(chain_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain_run, run, ignore=shutil.ignore_patterns("*.safetensors"))
    (run / "eval" / "sft.json").unlink()
    result = run_step("report", "--run", run, "--out", run / "report.md", check=False)
    assert result.returncode == 2 and "eval/sft.json: missing" in result.stderr


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver")
def test_report_png_renders_the_whole_page(chain_run):
    result = make("report-png", chain_run)
    assert result.returncode == 0, result.stdout + result.stderr
    from PIL import Image

    with Image.open(chain_run / "report.png") as image:
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width == 1200 and height > 3000  # the whole page, not a window's worth
    assert len(colours) > 1000  # plots (anti-aliased lines, fills), not a blank page


# ---- From a hand-written run (run_fixture.py): the sections that need the judge's tags and the eval split ----------

@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    report_step.main(["--run", str(run), "--out", str(run / "report.md"), "--html", str(run / "report.html"),
                      "--tier", "cpu", "--model-name", "smol"])
    return run, (run / "report.md").read_text()


NEW_SECTIONS = ["Judge tags", "Task category", "Input quality", "Difficulty", "Safety", "Nearest-neighbour distance",
                "Map of the kept instructions"]


def test_tag_sections_count_generated_and_kept(tagged_run):
    run, text = tagged_run
    for title in NEW_SECTIONS:
        assert f" {title}\n" in text
    names = assert_html_is_self_contained(run, text)
    assert names == ["funnel", "lengths", "tags", "neighbours", "map", "rewards", "training", "eval"]
    generated, kept = read_lines(run / "generated.jsonl"), read_lines(run / "filtered.jsonl")
    for field, title in (("category", "Task category"), ("input_quality", "Input quality"),
                         ("difficulty", "Difficulty"), ("safety", "Safety")):
        all_counts = Counter(r["tags"][field] for r in generated)
        kept_counts = Counter(r["tags"][field] for r in kept)
        part = section(text, title)
        for value, n in all_counts.items():
            cells = row(part, value)
            assert cells[1] == str(n) and cells[3] == str(kept_counts[value])
    # scales in their order, unparsed last
    def values(title):
        return [line.split("|")[1].strip() for line in section(text, title).splitlines() if line.startswith("| ")][1:]

    assert values("Input quality") == ["very poor", "poor", "average", "good", "excellent"]
    assert values("Task category")[-1] == "unparsed"
    assert "135M" not in section(text, "Task category")
    assert "SmolLM2-135M-Instruct, de-quantized" in section(text, "Judge tags")  # a weak judge, said so


def test_neighbour_distances_and_the_map(tagged_run):
    run, text = tagged_run
    distances = [r["nn_distance"] for r in read_lines(run / "filtered.jsonl")]
    assert row(text, "nearest-neighbour distance")[1:4] == [
        str(len(distances)), f"{statistics.mean(distances):.3f}", f"{statistics.median(distances):.3f}"]
    assert f"The {len(distances)} kept instructions embedded with `embedded:minilm`" in text
    assert "which hold 31% of the embeddings' variance" in text  # the filter's map, drawn as given
    assert (run / "report_plots" / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_loss_and_accuracy_next_to_the_training_curves(tagged_run):
    run, text = tagged_run
    for stage, metric in (("sft", "eval_loss"), ("dpo", "eval_loss"), ("dpo", "eval_rewards/accuracies")):
        history = json.loads((run / stage / "log_history.json").read_text())
        values = [h[metric] for h in history if metric in h]
        assert row(text, stage, metric)[2:5] == [str(len(values)), f"{values[0]:.3f}", f"{values[-1]:.3f}"]
        assert row(text, stage, metric)[-1] == "n not recorded"  # training_config.json without eval_records
    assert row(text, "sft", "loss")[2] == "4"
    assert "on the held-out test split" in text


def render(run):
    """The report of a run directory, as markdown (the HTML page beside it)."""
    report_step.main(["--run", str(run), "--out", str(run / "report.md"), "--html", str(run / "report.html")])
    return (run / "report.md").read_text()


def test_error_bars_only_where_lm_eval_gives_a_standard_error(tmp_path):
    """IFEval's instruction-level metrics come without a standard error ("N/A"): no error bar is drawn for them (not
    a zero-height one), and the chart says which metrics have none."""
    run = make_run(tmp_path / "run")
    for stage in ("base", "sft", "dpo"):
        path = run / "eval" / f"{stage}.json"
        result = json.loads(path.read_text())
        result["tasks"].append("ifeval_local")
        result["results"]["ifeval_local"] = {
            "alias": "ifeval_local", "prompt_level_strict_acc,none": 0.5, "prompt_level_strict_acc_stderr,none": 0.25,
            "inst_level_strict_acc,none": 0.6, "inst_level_strict_acc_stderr,none": "N/A"}
        result["n_samples"]["ifeval_local"] = {"original": 8, "effective": 4}
        path.write_text(json.dumps(result))
    text = render(run)
    bars = report_step.eval_bars(report_step.load_run(run)["evals"])
    assert [(task, metric, n, errors) for task, metric, n, _, errors in bars] == [
        ("mc_local", "acc", 4, [0.2] * 3), ("ifeval_local", "prompt_level_strict_acc", 4, [0.25] * 3),
        ("ifeval_local", "inst_level_strict_acc", 4, [None] * 3)]
    caption = re.search(r"!\[(.*)\]\(report_plots/eval\.png\)", text).group(1)
    assert caption.endswith("error bars: ± standard error, none for ifeval_local inst_level_strict_acc "
                            "(lm-eval gives none).")
    notes = section(text, "Evaluation (lm-evaluation-harness)")
    assert "no standard error for ifeval_local inst_level_strict_acc: no ± on its values in the table" in notes
    assert row(text, "ifeval_local", "inst_level_strict_acc")[2:4] == ["4", "0.600"]  # n, then the value alone
    assert row(text, "mc_local", "acc")[2:4] == ["4", "0.250 ± 0.200"]


def test_held_out_metrics_carry_their_n(tmp_path):
    """Every eval_* metric (the held-out test split) has beside it how many rows or pairs it was computed on, in the
    table and the chart's caption; few of them are called noise."""
    run = make_run(tmp_path / "run")
    for stage, n in (("sft", 3), ("dpo", 1)):
        path = run / stage / "training_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_records": 12, "eval_records": n}))
    training = section(render(run), "Training")
    assert row(training, "sft", "eval_loss")[-1] == "n=3 rows"
    for metric in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert row(training, "dpo", metric)[-1] == "n=1 pair"
    assert row(training, "sft", "loss")[-1] == row(training, "dpo", "rewards/accuracies")[-1] == ""  # not held out
    assert "on the held-out test split (eval_*, from log_history.json; SFT n=3 rows; DPO n=1 pair)" in training
    assert "The held-out metrics rest on few examples (SFT on n=3 rows, DPO on n=1 pair)" in training


def test_rules_that_dropped_nothing_share_one_line(tagged_run):
    _, text = tagged_run
    part = section(text, "Dropped by each filter rule")
    rules = [line.split("|")[1].strip() for line in part.splitlines() if line.startswith("| ")][1:]
    assert rules == ["response_length", "no drops: truncated, near_duplicate"]
    assert row(part, "response_length")[1] == "5" and folded_rules(part) == ["truncated", "near_duplicate"]
    assert report_step.fold_rules({"a": 0, "b": 2, "c": 0}) == ([("b", 2)], "no drops: a, c")
    assert report_step.fold_rules({"b": 2}) == ([("b", 2)], None)


def test_instructions_without_a_pair_by_cause(tmp_path):
    """The pairs' funnel by cause, as the preference step counted them (its summary), with the pairs whose rejected
    answer is the lowest finished one because a cut one scored lower."""
    import preference

    run = make_run(tmp_path / "run")
    scored = read_lines(run / "scored.jsonl")
    for i, r in enumerate(scored):
        if i < 4:  # a response cut at the token cap: one finished response is no pair
            r["finished"] = [False, True]
        elif i < 6:  # tied
            r["scores"] = [0.3, 0.3]
        elif i == 6:  # a margin under --min-margin 0.05
            r["scores"] = [0.31, 0.3]
    args = preference.parse_args(["--in", "x", "--policy", "p", "--reward-model", "r", "--scored", "s", "--out",
                                  str(run / "preference.jsonl"), "--min-margin", "0.05"])
    preference.write_pairs(args, scored)
    assert len(read_lines(run / "preference.jsonl")) == len(scored) - 7
    part = section(render(run), "Instructions without a pair, by cause")
    found = [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines() if line.startswith("| ")]
    assert found[1:] == [
        ["fewer than 2 finished responses (one cut at the token cap is neither chosen nor rejected)", "4", "27%"],
        ["tie: the best finished response scores no higher than the worst", "2", "13%"],
        ["margin under --min-margin", "1", "7%"]]
    assert "as the preference step counted them" in part and "in 0 pairs the lowest finished" in part
    (run / "preference_summary.json").unlink()
    assert "The preference step has not run" in section(render(run), "Instructions without a pair, by cause")


def test_reasons_that_repeat_the_prompt_count_as_unparsed(tmp_path):
    """Judged reasons that only repeat the judge's prompt or the query: as text in a run judged before the rule, as
    "unparsed" with the fault after it; both counted apart from the judge's own reasons."""
    from common.rubric import COPIED

    run = make_run(tmp_path / "run")
    reasons = {0: "one sentence on the query's clarity, specificity and coherence", 1: "One sentence.",
               2: "[...]", 3: "Very easy", 6: "explain a haiku about autumn", 7: "Compound interest, in simple words."}

    def retag(r):
        i = int(r["id"].split("-")[1])
        if i in reasons:
            r["tags"]["quality_reason"] = reasons[i]
        elif i in (4, 5):
            r["tags"]["quality_reason"] = "unparsed"
            r["judge_unparsed"] = [{"turn": 1, "answers": ["..", ".."],
                                    "faults": [[COPIED], [COPIED]] if i == 4 else [["no reason"], ["no reason"]]}]
        return r

    for name in ("generated.jsonl", "filtered.jsonl"):
        records = [retag(r) for r in read_lines(run / name)]
        (run / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    part = section(render(run), "Quality reason")
    # generated: 0-4, 6 and 7 copied, 5 unparsed otherwise; kept (i % 4 != 3): 0, 1, 2, 4 and 6 copied, 5
    assert row(part, "a reason")[1:4] == ["12", "60%", "9"]
    assert row(part, "unparsed: repeats the prompt's wording")[1:4] == ["7", "35%", "5"]
    assert row(part, "unparsed: another fault")[1:4] == ["1", "5%", "1"]
    assert "7 of the 20 judged reasons only repeat the judge prompt's wording or the query" in part


def test_a_run_without_the_judge_renders_without_its_sections(tmp_path):
    run = make_run(tmp_path / "run", with_tags=False)
    report_step.main(["--run", str(run), "--out", str(run / "report.md"), "--html", str(run / "report.html")])
    text = (run / "report.md").read_text()
    assert re.findall(r"^## (.+)$", text, flags=re.M) == [
        "Data funnel", "Instruction diversity", "Reward scores", "Training", "Evaluation (lm-evaluation-harness)",
        "Settings"]
    assert assert_html_is_self_contained(run, text) == ["funnel", "lengths", "rewards", "training", "eval"]


def test_blocks_render_by_kind(tmp_path):
    from common.reporting.render import Heading, Para, Plot, Table, to_html, to_markdown

    blocks = [Heading("A"), Para("text with `code`"), Heading("B", 3), Table(["x", "y"], [(1, "a|b")]),
              Plot("p", b"\x89PNG-bytes", "a caption")]
    md = to_markdown("T", blocks, tmp_path / "t_plots")
    assert md == ("# T\n\n## A\n\ntext with `code`\n\n### B\n\n| x | y |\n|---|---|\n| 1 | a\\|b |\n\n"
                  "![a caption](t_plots/p.png)\n")
    assert (tmp_path / "t_plots" / "p.png").read_bytes() == b"\x89PNG-bytes"
    page = to_html("T", blocks)
    assert "<h2>A</h2>" in page and "<p>text with <code>code</code></p>" in page and "<h3>B</h3>" in page
    assert "<td>a|b</td>" in page and '<figure id="p">' in page


def test_compare_tables_runs_with_the_shared_eval_tables(tmp_path):
    one, two = make_run(tmp_path / "one"), make_run(tmp_path / "two")
    compare.main(["--run", f"a={one}", "--run", f"b={two}", "--out", str(tmp_path / "compare.md")])
    text = (tmp_path / "compare.md").read_text()
    assert row(text, "a", "base")[2] == "0.250 ± 0.200"
    assert row(text, "b", "dpo")[2] == "0.750 ± 0.200 (+0.500)"
    for stage in MC_CORRECT:  # eval JSONs with per-example results table alike
        (two / "eval" / f"{stage}.json").write_text(json.dumps(mc_eval(stage, MC_CORRECT[stage])))
    compare.main(["--run", f"a={one}", "--run", f"b={two}", "--out", str(tmp_path / "compare.md")])
    assert row((tmp_path / "compare.md").read_text(), "b", "sft")[2] == "0.550 ± 0.080 (+0.300)"
