"""The whole chain through make at toy sizes (the chain_run fixture), then what a user sees.

The report's and the evals' contents are checked in test_report.py and test_eval.py."""

from conftest import make


def test_second_make_all_does_nothing(chain_run):
    result = make("all", chain_run)
    assert result.returncode == 0
    assert "Nothing to be done for 'all'" in result.stdout
    assert "steps/" not in result.stdout  # no step ran


def test_make_all_printed_its_plan_first_and_kept_it(chain_run):
    """`make all` runs the plan before the chain (make plan's table, with no GPU and no setup) and keeps it in RUN, so
    the second `make all` has nothing to do (above)."""
    import json

    log = (chain_run.parent / "make-all.log").read_text()
    assert log.index("make plan: GPU=cpu") < log.index("steps/generate.py")
    plan = json.loads((chain_run / "plan.json").read_text())
    assert plan["num_samples"] == 12 and [s["step"] for s in plan["steps"]][:2] == ["generate", "judge"]


def test_bad_variables_list_the_valid_choices(tmp_path):
    result = make("help", tmp_path, GPU="v100")
    assert result.returncode != 0 and "GPU=v100 is not a tier; choose one of: a100 cpu h100 t4" in result.stderr
    result = make("help", tmp_path, MODEL="gpt2")
    assert result.returncode != 0 and "choose one of: llama mistral qwen smol" in result.stderr


def test_every_step_records_the_one_dtype_decision(chain_run):
    """The cpu tier's DTYPE=auto is decided once (bf16 only on a CPU with native bf16) and each output says what it
    ran in: generation and scoring settings, the trainers' mixed precision, eval settings."""
    import json

    from common.precision import dtype_name, resolve_dtype

    decided = dtype_name(resolve_dtype("auto"))
    first = lambda path: json.loads((chain_run / path).read_text().splitlines()[0])  # noqa: E731
    assert first("generated.jsonl")["settings"]["dtype"] == decided
    assert first("scored.jsonl")["dtype"] == decided
    for adapter in ("sft", "dpo"):
        config = json.loads((chain_run / adapter / "training_config.json").read_text())
        assert (config["bf16"], config["fp16"]) == (decided == "bfloat16", False)
    for model in ("base", "sft", "dpo"):
        assert json.loads((chain_run / "eval" / f"{model}.json").read_text())["settings"]["dtype"] == decided
