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


def test_t4_llama_fits_one_session_and_says_how_it_was_scaled(tmp_path):
    text, result = make_plan(tmp_path, GPU="t4", MODEL="llama")
    assert result["total_s"] <= SESSION_S, text
    assert "T4 / H200: 0.32 / 4.8 TB/s" in text  # decoding, scaled by bandwidth
    assert "T4 / H200: 65 / 989 TFLOP/s" in text  # training, scaled by FLOP/s
    assert "Unsloth" in text  # the anchor for T4 training
    assert "generate-realistic-h200-t4-4bit.json" in text  # the t4 generator's measurement, named


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
