"""The whole chain through make at toy sizes (the chain_run fixture), then what a user sees.

The report's and the evals' contents are checked in test_report.py and test_eval.py."""

from conftest import make


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
