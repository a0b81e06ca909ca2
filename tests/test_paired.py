"""Paired differences of two models' eval results (common/reporting/paired.py), checked against hand computations,
and the report's eval section and the model card that show them (synthetic eval JSONs, no chain run)."""

import math
import statistics

import pytest
import report as report_step
from run_fixture import MC_CORRECT, eval_result, mc_eval

from common.reporting.cards import with_evaluation
from common.reporting.eval_tables import EVAL_HEADER, eval_rows, headline
from common.reporting.paired import BEYOND, NO_CHANGE, TOO_FEW, WITHIN, paired_difference, verdict
from common.reporting.render import to_markdown


def model(examples, leaves=None):
    """An eval JSON with per-example results, and lm-eval's results computed from them: a scalar metric's mean, an
    instruction-level metric's total correct / total instructions, a group's over all its leaves' examples."""
    leaves = {**{leaf: [leaf] for leaf in examples}, **(leaves or {})}
    results = {}
    for task, parts in leaves.items():
        for key in [k for k in examples[parts[0]] if k != "doc_id"]:
            values = [v for leaf in parts for v in examples[leaf][key]]
            if isinstance(values[0], list):
                results.setdefault(task, {})[key] = sum(map(sum, values)) / sum(map(len, values))
            else:
                results.setdefault(task, {})[key] = sum(values) / len(values)
    return {"tasks": list(leaves), "results": results, "examples": examples, "leaves": leaves}


def one_task(values, docs=None, key="acc,none"):
    return model({"mc": {"doc_id": list(docs or range(len(values))), key: values}})


def lm_eval_stderr(values):
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n)."""
    return statistics.stdev(values) / math.sqrt(len(values))


def test_paired_difference_and_standard_error_by_hand():
    """Two correlated models (SFT keeps every answer base got right and gets 2 more): d = 0,0,0,0,0,1,1,0,0,0, so
    diff = 0.2 and se = sqrt(sum((d - 0.2)²) / 9) / sqrt(10) = sqrt(1.6 / 90) = 2/15, under the unpaired
    sqrt(se_a² + se_b²) = 0.226 of the same scores."""
    a, b = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    p = paired_difference(one_task(a), one_task(b), "mc", "acc,none")
    assert p.diff == pytest.approx(0.2, abs=1e-15) and p.se == pytest.approx(2 / 15, rel=1e-12)
    assert (p.n, p.units, p.up, p.down, p.unmatched) == (10, None, 2, 0, 0)  # McNemar's b = 2, c = 0
    assert p.verdict == WITHIN  # 0.2 < 2 x 0.133
    unpaired = math.hypot(lm_eval_stderr(a), lm_eval_stderr(b))
    assert unpaired == pytest.approx(0.2261, abs=1e-4) and p.se < unpaired
    assert p.reported == pytest.approx(0.2) and p.agrees

    # a continuous metric (mc2): d = 0.1 eight times, 0.3, -0.1: diff 0.1, se = sqrt(0.08 / 9 / 10)
    base = [0.2, 0.35, 0.5, 0.1, 0.6, 0.25, 0.4, 0.3, 0.45, 0.55]
    d = [0.1] * 8 + [0.3, -0.1]
    p = paired_difference(one_task(base, key="mc2,none"), one_task([x + y for x, y in zip(base, d)], key="mc2,none"),
                          "mc", "mc2,none")
    assert p.diff == pytest.approx(0.1, rel=1e-12) and p.se == pytest.approx(math.sqrt(0.08 / 90), rel=1e-9)
    assert (p.up, p.down, p.verdict) == (9, 1, BEYOND) and p.agrees


def test_instruction_level_metric_is_a_ratio_clustered_by_prompt():
    """Per prompt a list of 0/1, one per instruction: D = 1, 1, 0, -1 over m = 2, 3, 1, 1 instructions, so
    diff = 1/7 and se = sqrt(4/3 x sum((D - m/7)²)) / 7 with residuals 5/7, 4/7, -1/7, -8/7."""
    key = "inst_level_strict_acc,none"
    a = [[True, False], [True, True, False], [False], [True]]  # lm-eval logs these as booleans
    b = [[True, True], [True, True, True], [False], [False]]
    p = paired_difference(one_task(a, key=key), one_task(b, key=key), "mc", key)
    assert p.diff == pytest.approx(1 / 7, rel=1e-12)
    assert p.se == pytest.approx(math.sqrt(4 / 3 * (25 + 16 + 1 + 64) / 49) / 7, rel=1e-12)
    assert (p.n, p.units, p.up, p.down) == (4, 7, 2, 1)
    assert p.reported == pytest.approx(5 / 7 - 4 / 7) and p.agrees


def test_misaligned_doc_ids_pair_the_intersection():
    """Documents 1, 2, 3 are in both (b's in another order); 0 and 4 in one each. Paired: d = 0, 1, 0 by doc id."""
    a = one_task([0, 1, 0, 1], docs=[0, 1, 2, 3])
    b = one_task([1, 1, 0, 1], docs=[3, 1, 4, 2])
    p = paired_difference(a, b, "mc", "acc,none")
    assert (p.n, p.unmatched, p.up, p.down) == (3, 2, 1, 0)
    assert p.diff == pytest.approx(1 / 3) and p.se == pytest.approx(1 / 3)  # stdev(0, 1, 0) / sqrt(3)
    assert p.reported == pytest.approx(0.25) and not p.agrees  # lm-eval's scores cover all 4 of each


def test_a_group_pairs_the_examples_of_all_its_leaves():
    """mmlu-like: a group's score is the mean over all its leaves' examples; the same doc id in two leaves is two
    examples."""
    leaves = {"grp": ["x", "y"]}
    a = model({"x": {"doc_id": [0, 1], "acc,none": [0, 0]}, "y": {"doc_id": [0, 1, 2], "acc,none": [1, 0, 0]}}, leaves)
    b = model({"x": {"doc_id": [0, 1], "acc,none": [1, 1]}, "y": {"doc_id": [0, 1, 2], "acc,none": [1, 0, 1]}}, leaves)
    p = paired_difference(a, b, "grp", "acc,none")
    assert (p.n, p.up, p.down) == (5, 3, 0) and p.diff == pytest.approx(3 / 5) and p.agrees
    assert paired_difference(a, b, "y", "acc,none").n == 3


def test_verdict_rule_at_the_boundary():
    assert verdict(0.2, 0.1, 10) == WITHIN  # exactly 2 standard errors: not beyond
    assert verdict(0.2 + 1e-12, 0.1, 10) == verdict(-0.2 - 1e-12, 0.1, 10) == BEYOND
    assert verdict(0.01, 0.0, 10) == BEYOND  # every example moved the same way
    assert verdict(0.0, 0.0, 10) == verdict(0.0, 0.3, 10) == NO_CHANGE
    assert verdict(1.0, None, 1) == TOO_FEW
    # 3 of 9 up: diff = 1/3 and se = 0.5 / 3, exactly 2 se apart; 4 of 9 up is beyond
    at = paired_difference(one_task([0] * 9), one_task([1] * 3 + [0] * 6), "mc", "acc,none")
    assert at.diff == 2 * at.se and at.verdict == WITHIN
    past = paired_difference(one_task([0] * 9), one_task([1] * 4 + [0] * 5), "mc", "acc,none")
    assert past.diff > 2 * past.se and past.verdict == BEYOND
    same_way = paired_difference(one_task([0, 0, 0]), one_task([1, 1, 1]), "mc", "acc,none")
    assert (same_way.se, same_way.verdict) == (0, BEYOND)
    alone = paired_difference(one_task([0]), one_task([1]), "mc", "acc,none")
    assert (alone.diff, alone.se, alone.verdict) == (1, None, TOO_FEW)


def test_without_per_example_results_there_is_no_pairing():
    new, old = one_task([0, 1]), {"tasks": ["mc"], "results": {"mc": {"acc,none": 0.5}}}
    assert paired_difference(old, new, "mc", "acc,none") is None
    assert paired_difference(new, new, "mc", "acc_norm,none") is None  # a metric without per-example values
    half = {"tasks": ["grp"], "results": {"grp": {"acc,none": 1.0}}, "leaves": {"grp": ["x", "y"]},
            "examples": {"x": {"doc_id": [0], "acc,none": [1]}, "y": {"doc_id": [0]}}}  # y lacks it: no partial group
    assert paired_difference(half, half, "grp", "acc,none") is None


# ---- The report's eval section and the model card ------------------------------------------------------------

def eval_markdown(evals, tmp_path):
    blocks = report_step.eval_section({"evals": evals})
    return to_markdown("T", blocks, tmp_path / "t_plots")


def cells(text, *first):
    start = "| " + " | ".join(first) + " |"
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return [c.strip() for c in lines[0].strip("|").split("|")]


def test_report_table_and_headline_name_what_is_beyond_noise(tmp_path):
    """SFT - base: 12 up of 40 (d: 12 ones, 28 zeros; se = sqrt(8.4 / 39 / 40) = 0.073); DPO - SFT: 2 up, 1 down
    (se = sqrt(2.975 / 39 / 40) = 0.044, within noise); DPO - base: 14 up, 1 down (se = sqrt(10.775 / 39 / 40))."""
    text = eval_markdown({stage: mc_eval(stage, MC_CORRECT[stage]) for stage in MC_CORRECT}, tmp_path)
    assert "| task | metric | n | base | sft | dpo | sft - base | dpo - sft | dpo - base |" in text
    assert cells(text, "mc_local", "acc")[2:] == ["40", "0.250 ± 0.069", "0.550 ± 0.080", "0.575 ± 0.079",
                                                  "+0.300 ± 0.073 *", "+0.025 ± 0.044", "+0.325 ± 0.083 *"]
    headline = text.split("## Evaluation (lm-evaluation-harness)\n\n", 1)[1].split("\n", 1)[0]
    assert headline == ("Beyond noise (|difference| > 2 paired standard errors, about 95%): SFT raised mc_local acc "
                        "by 30.0 points (± 7.3); DPO raised mc_local acc by 32.5 points (± 8.3) against base; the "
                        "other comparison is within noise.")
    assert "* marks a difference beyond noise (|difference| > 2 paired standard errors" in text
    assert "Each comparison rests on the n examples both models answered: mc_local 40." in text
    assert "a seeded random sample (seed 1234) of N of M per task: mc_local 40 of 48." in text
    assert "cpu tier's embedded 135M model" in text and "not a benchmark" in text
    assert cells(text, "dpo")[1:] == ["120", "98.5", "0 of 40"]  # expected vs measured seconds
    assert "loading not included (the base model's load: 12.0 s, once for 3 models)" in text
    assert "unpaired" not in text.lower()

    whole = {stage: mc_eval(stage, MC_CORRECT[stage], of=40) for stage in MC_CORRECT}
    assert "answered every example of each task: mc_local all 40." in eval_markdown(whole, tmp_path)


def test_report_falls_back_to_unpaired_differences_without_examples(tmp_path):
    evals = {stage: mc_eval(stage, MC_CORRECT[stage]) for stage in MC_CORRECT}
    for stage in ("sft", "dpo"):
        del evals[stage]["examples"]  # as written by an older eval step
    text = eval_markdown(evals, tmp_path)
    se = [evals[s]["results"]["mc_local"]["acc_stderr,none"] for s in ("base", "sft", "dpo")]
    assert cells(text, "mc_local", "acc")[6:] == [f"+0.300 ± {math.hypot(se[0], se[1]):.3f}",
                                                  f"+0.025 ± {math.hypot(se[1], se[2]):.3f}",
                                                  f"+0.325 ± {math.hypot(se[0], se[2]):.3f}"]
    assert "No difference is tested against noise here: these eval JSONs have no per-example results" in text
    assert "so each difference is given unpaired" in text and " *" not in text

    del evals["dpo"]["time"]  # one old JSON among new ones: paired where both have examples
    evals["sft"]["examples"] = mc_eval("sft", MC_CORRECT["sft"])["examples"]
    text = eval_markdown(evals, tmp_path)
    assert cells(text, "mc_local", "acc")[6] == "+0.300 ± 0.073 *"
    assert ("SFT raised mc_local acc by 30.0 points (± 7.3); 2 comparisons without per-example results are not "
            "tested.") in text
    assert "Unpaired (no per-example results): mc_local acc dpo - sft, mc_local acc dpo - base" in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.endswith(" of 40 |")] == ["base", "sft"]


def test_headline_when_nothing_is_beyond_noise():
    same = {stage: mc_eval(stage, MC_CORRECT["base"]) for stage in MC_CORRECT}
    rows, comparisons = eval_rows(same)
    assert [c.paired.verdict for c in comparisons] == [NO_CHANGE] * 3 and rows[0][5:] == ("+0.000 ± 0.000",) * 3
    assert headline(comparisons) == ("Beyond noise (|difference| > 2 paired standard errors, about 95%): nothing; "
                                     "all 3 comparisons are within noise.")


def test_model_card_shows_the_paired_differences():
    card = "---\nlibrary_name: peft\n---\n# A card\n\n## Evaluation\n\nNot evaluated.\n\n## License\n\nApache.\n"
    paired = with_evaluation(card, {stage: mc_eval(stage, MC_CORRECT[stage]) for stage in MC_CORRECT}, "dpo")
    assert "| " + " | ".join(EVAL_HEADER) + " |" in paired
    assert "| +0.300 ± 0.073 * | +0.025 ± 0.044 | +0.325 ± 0.083 * |" in paired and "SFT raised mc_local" in paired
    old = with_evaluation(card, {stage: eval_result(stage, acc) for stage, acc in (("base", 0.25), ("sft", 0.5))},
                          "sft")
    assert "| 0.250 ± 0.200 | 0.500 ± 0.200 |  | +0.250 ± 0.283 |  |  |" in old and "as if independent" in old
