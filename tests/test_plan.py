"""make plan (steps/plan.py): each step's expected time from env/costs.json, with no GPU, no setup and no model."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

import plan

STEPS = ["generate", "judge", "filter", "preference", "sft", "dpo", "eval", "report", "dataset"]
SESSION_S = 3 * 3600


def make_plan(tmp_path, **variables):
    """`make plan` as a user runs it (the Makefile's variables, the system Python); the printed table and the JSON."""
    out = tmp_path / f"plan-{len(list(tmp_path.iterdir()))}.json"
    result = subprocess.run(["make", "--no-print-directory", "plan", f"PLAN_ARGS=--json {out}",
                             *[f"{k}={v}" for k, v in variables.items()]],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def table(text):
    """The step lines of the printed plan: name -> the expected time as printed."""
    rows = re.findall(r"^(\w+) +(\d+(?:\.\d)? (?:s|min|h))  ", text, flags=re.M)
    total = re.search(r"^total +(\d+(?:\.\d)? (?:s|min|h))$", text, flags=re.M)
    return dict(rows), total.group(1) if total else None


@pytest.mark.parametrize("tier", ["t4", "a100", "h100"])
def test_the_plan_of_each_gpu_tier_lists_every_step_and_adds_up(tmp_path, tier):
    text, result = make_plan(tmp_path, GPU=tier, MODEL="llama")
    assert [s["step"] for s in result["steps"]] == STEPS
    assert result["total_s"] == pytest.approx(sum(s["seconds"] for s in result["steps"]), abs=0.1)
    for s in result["steps"]:
        assert s["seconds"] == pytest.approx(s["work_s"] + s["startup_s"], abs=0.1) and s["seconds"] > 0
        assert s["basis"], f"{s['step']}: no basis"
    rows, total = table(text)
    assert rows == {s["step"]: plan.duration(s["seconds"]) for s in result["steps"]}
    assert total == plan.duration(result["total_s"])
    # what the estimate rests on: the measured figure's source, and the scaling to the tier's GPU where it differs
    generate = "\n".join(next(s for s in result["steps"] if s["step"] == "generate")["basis"])
    assert "bench/results/" in generate
    assert "memory bandwidth" in generate  # every tier's decoding figure was measured on another GPU
    assert f"env/{tier}/tier.mk" in "\n".join(result["steps"][STEPS.index("eval")]["basis"])
    check_arithmetic(tier, result)
    # control: a rate that is not the measured figure times its scalings is caught
    generate = next(s for s in result["steps"] if s["step"] == "generate")
    generate["rate"] *= 1.1
    with pytest.raises(AssertionError):
        check_arithmetic(tier, result)


def number(text):
    return float(text.replace(",", ""))


TIER_GPU = {"t4": "T4", "a100": "A100", "h100": "H100"}


def check_arithmetic(tier, result):
    """Each step's figures follow from what it says it rests on, and from the tier's own variables: the rate is the
    measured figure (its file present in the repository) times every scaling stated (each bandwidth or FLOP/s factor
    the quotient it quotes, the tier's GPU over the measured one), the work is the units at that rate (plus the
    scoring stated, for preference), eval's the request counts at the tier's EVAL_COST, and the sample count and rows
    are the tier's NUM_SAMPLES and GEN_ROWS."""
    mk = dict(re.findall(r"^(\w+) \?= (.*)$", (REPO / "env" / tier / "tier.mk").read_text(), flags=re.M))
    steps = {s["step"]: s for s in result["steps"]}
    assert result["num_samples"] == int(mk["NUM_SAMPLES"])
    assert steps["generate"]["work"].startswith(f"{int(mk['NUM_SAMPLES']):,} samples x ")
    assert f" tokens, {mk['GEN_ROWS']} rows;" in steps["generate"]["work"]
    for s in result["steps"]:
        for cited in re.findall(r"bench/results/[\w.-]+\.json", "\n".join(s["basis"])):
            assert (REPO / cited).is_file(), f"{s['step']}: {cited} is not in the repository"
        if "rate" not in s:
            continue
        figure = re.match(r"^([\d,.]+) (\S+/s) on an? ([\w-]+)", s["basis"][0])
        assert figure, s["basis"][0]
        rate = number(figure.group(1))
        for line in s["basis"][1:]:
            factor = re.match(r"^x ([\d.]+) for ", line)
            if not factor:
                continue
            rate *= float(factor.group(1))
            quotient = re.search(r"([\w-]+) / (\w+): ([\d.]+) / ([\d.]+) (?:TB/s|TFLOP/s)", line)
            if quotient:  # a hardware scaling: the tier's GPU over the measured one, the factor their quotient
                assert quotient.group(1).startswith(TIER_GPU[tier]) and quotient.group(2) == figure.group(3), line
                assert float(factor.group(1)) == pytest.approx(number(quotient.group(3)) / number(quotient.group(4)),
                                                               rel=0.01), line
        assert s["rate"] == pytest.approx(rate, rel=0.01), (s["step"], s["basis"])
        assert s["rate_unit"] == f"{s['unit']}/s"
        then = sum(number(n) / number(r) for n, r in re.findall(r"then ([\d,]+) \w+ scored at ([\d,.]+) \w+/s",
                                                                 s["work"]))
        assert (s["step"] == "preference") == (then > 0), s["work"]
        assert s["work_s"] == pytest.approx(s["units"] / s["rate"] + then, rel=0.01, abs=0.1), s
    eval_cost = re.search(r"EVAL_COST=([\d.e-]+),([\d.e-]+) from env/(\w+)/tier.mk \((EVAL_COST_\w+)",
                          "\n".join(steps["eval"]["basis"]))
    assert eval_cost and eval_cost.group(3) == tier and mk[eval_cost.group(4)] == f"{eval_cost[1]},{eval_cost[2]}"
    requests = steps["eval"]["requests"]
    per_model = (requests["loglikelihood_tokens"] * float(eval_cost[1])
                 + requests["max_gen_tokens"] * float(eval_cost[2]))
    assert steps["eval"]["work_s"] == pytest.approx(3 * per_model, rel=0.01)  # base, SFT and DPO


def test_t4_llama_fits_one_session_and_says_how_it_was_scaled(tmp_path):
    text, result = make_plan(tmp_path, GPU="t4", MODEL="llama")
    assert result["total_s"] <= SESSION_S, text
    assert result["generator"] == "meta-llama/Llama-3.1-8B-Instruct" and result["model_size"] == "3b"
    basis = {s["step"]: s["basis"] for s in result["steps"]}

    def scaled(step, quotient):  # the step's own basis states the scaling, and its rate is scaled by it
        lines = [b for b in basis[step] if quotient in b]
        assert len(lines) == 1, (step, quotient, basis[step])
        return lines[0]

    for step in ("generate", "judge", "preference"):  # decoding, scaled by bandwidth
        assert scaled(step, "T4 / H200: 0.32 / 4.8 TB/s").startswith("x 0.0667 for memory bandwidth"), step
    for step in ("sft", "dpo"):  # training, measured on an H100 capped at 15 GiB, scaled by FLOP/s
        assert scaled(step, "T4 / H100: 65 / 989 TFLOP/s").startswith("x 0.0657 for fp16/bf16 tensor FLOP/s"), step
    assert any(b.startswith("anchor: Unsloth's T4 figure") for b in basis["sft"])  # the anchor for T4 training
    # the t4 generator's measurement (8B in 4-bit, as the tier runs it), named where the decoding rate comes from
    assert "bench/results/generate-realistic-h200-t4-4bit.json" in basis["generate"][0]
    assert "bench/results/generate-realistic-h200-t4-4bit.json" in basis["preference"][0]
    check_arithmetic("t4", result)  # ... and those scalings are the ones applied


def test_generation_work_scales_with_num_samples(tmp_path):
    _, one = make_plan(tmp_path, GPU="t4", MODEL="llama", NUM_SAMPLES=150)
    _, two = make_plan(tmp_path, GPU="t4", MODEL="llama", NUM_SAMPLES=300)
    for a, b in zip(one["steps"], two["steps"]):
        if a["step"] in ("generate", "judge", "filter", "preference"):
            assert b["units"] == pytest.approx(2 * a["units"], rel=1e-3)
            assert b["work_s"] == pytest.approx(2 * a["work_s"], rel=1e-2)
            assert b["startup_s"] == a["startup_s"]
        if a["step"] == "eval":
            assert b == a  # eval's requests do not depend on the data


def run_plan(*args):
    return subprocess.run([sys.executable, str(REPO / "steps" / "plan.py"), *args], capture_output=True, text=True)


BASE = ["--num-samples", "10", "--gen-rows", "8", "--judge-rows", "8", "--num-responses", "2", "--pref-rows", "8",
        "--pref-max-tokens", "64", "--sft-config", str(REPO / "env/t4/sft.yaml"), "--dpo-config",
        str(REPO / "env/t4/dpo.yaml"), "--tasks", "mmlu"]


def test_an_unknown_tier_or_model_size_is_refused_by_name():
    result = run_plan("--tier", "v100", "--model-size", "3b", *BASE)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: GPU=v100: no costs for this tier") and "t4" in result.stderr
    result = run_plan("--tier", "t4", "--model-size", "70b", *BASE)
    assert result.returncode == 2 and "error: MODEL_SIZE=70b" in result.stderr and "3b, 7b" in result.stderr


def test_eval_requests_are_counted_from_the_sample_the_eval_step_draws():
    """The t4 eval: LIMIT 1000 with IFEval whole is 1,000 MMLU questions over its 57 subjects (stratified, as
    steps/eval.py draws them), 1,000 HellaSwag contexts, TruthfulQA-MC2's 817 and IFEval's 541 answers of up to 512
    tokens; log-likelihood tokens are documents x each task's mean."""
    from common.eval_requests import allocate

    costs = json.loads((REPO / "env/costs.json").read_text())
    tasks = costs["eval_tasks"]
    counts, unknown = plan.count_eval(tasks, ["ifeval", "mmlu", "truthfulqa_mc2", "hellaswag"], "1000,ifeval=all", 512)
    assert sum(allocate(tasks["mmlu"]["subtasks"], 1000).values()) == 1000
    tokens = 1000 * tasks["mmlu"]["tokens"] + 1000 * tasks["hellaswag"]["tokens"] + 817 * tasks["truthfulqa_mc2"]["tokens"]
    assert unknown == [] and counts == {"documents": 1000 + 817 + 1000 + 541, "loglikelihood_tokens": tokens,
                                        "generate_until": 541, "max_gen_tokens": 541 * 512}
    everything, _ = plan.count_eval(tasks, ["mmlu"], "", None)
    assert everything["documents"] == 14042 == sum(tasks["mmlu"]["subtasks"].values())
    counts, unknown = plan.count_eval(tasks, ["mc_local", "gsm8k"], "0.5", None)
    assert unknown == ["gsm8k"] and counts["documents"] == 24  # half of mc_local's 48; an unknown task named


def test_training_configs_are_read_as_yaml_reads_them(tmp_path):
    for path in sorted((REPO / "env").glob("*/sft*.yaml")) + sorted((REPO / "env").glob("*/dpo*.yaml")):
        assert plan.read_flat_yaml(path) == yaml.safe_load(path.read_text()), path
    nested = tmp_path / "nested.yaml"
    nested.write_text("sft:\n  lora_r: 8\n")
    with pytest.raises(plan.OptionError, match="flat"):
        plan.read_flat_yaml(nested)


def test_response_lengths_match_the_bench_mix():
    """The cut log-normal's mean is what bench/generation_speed.py drew: 381 at a 1,024 cap, 412 at 4,096."""
    assert plan.mean_length(300, 0.8, 1023) == pytest.approx(381.1, abs=1)
    assert plan.mean_length(300, 0.8, 4095) == pytest.approx(412.4, abs=1)
