"""The whole chain through make at toy sizes (the chain_run fixture), then what a user sees."""

import json

from conftest import make, read_lines


def test_report_matches_the_run_files(chain_run):
    report = (chain_run / "report.md").read_text()
    for section in ("## Data funnel", "### Dropped by each filter rule", "## Reward scores", "## Training",
                    "## Evaluation", "## Settings"):
        assert section in report
    summary = json.loads((chain_run / "filter_summary.json").read_text())
    pairs = read_lines(chain_run / "preference.jsonl")
    assert summary["input"] == len(read_lines(chain_run / "generated.jsonl")) == 12
    assert summary["kept"] == len(read_lines(chain_run / "filtered.jsonl"))
    assert "| generated | 12 |" in report
    assert f"| kept by the filters | {summary['kept']} |" in report
    assert f"| preference pairs | {len(pairs)} |" in report
    assert "all-MiniLM-L6-v2" in report  # the offline scorer is named for what it is
    base = json.loads((chain_run / "eval" / "base.json").read_text())["results"]["ifeval_local"]
    assert f"| ifeval_local | prompt_level_strict_acc | {base['prompt_level_strict_acc,none']:.3f} |" in report


def test_evals_cover_base_sft_and_dpo(chain_run):
    for name, adapter in (("base", None), ("sft", "sft"), ("dpo", "dpo")):
        result = json.loads((chain_run / "eval" / f"{name}.json").read_text())
        assert (result["adapter"] or "").endswith(adapter or "") and (result["adapter"] is None) == (adapter is None)
        metrics = result["results"]["ifeval_local"]
        assert result["n_samples"]["ifeval_local"]["effective"] == 4
        for key in ("prompt_level_strict_acc,none", "inst_level_strict_acc,none", "prompt_level_loose_acc,none"):
            assert 0.0 <= metrics[key] <= 1.0


def test_second_make_all_does_nothing(chain_run):
    result = make("all", chain_run)
    assert result.returncode == 0
    assert "Nothing to be done for 'all'" in result.stdout
    assert "steps/" not in result.stdout  # no step ran


def test_bad_variables_list_the_valid_choices(tmp_path):
    result = make("help", tmp_path, GPU="v100")
    assert result.returncode != 0 and "GPU=v100 is not a tier; choose one of: a100 cpu h100 t4" in result.stderr
    result = make("help", tmp_path, MODEL="gpt2")
    assert result.returncode != 0 and "choose one of: llama mistral qwen smol" in result.stderr
