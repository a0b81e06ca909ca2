"""The dataset step (make dataset): SFT conversations in TRL's messages format and preference pairs, split into
train and test by id, and a dataset card whose YAML header the Hub's libraries read. From a hand-written run
(run_fixture.py): no model is loaded."""

import json
import random

import dataset as dataset_step
import pytest
from conftest import read_lines
from run_fixture import make_run

from common.io.splits import split_of, split_records
from common.reporting.cards import model_license, size_category

IDS = [f"s0-{i:07d}" for i in range(4000)]


def test_splits_are_disjoint_cover_everything_and_hold_about_the_fraction():
    records = [{"id": i} for i in IDS]
    train, test = split_records(records, 0.05)
    train_ids, test_ids = {r["id"] for r in train}, {r["id"] for r in test}
    assert not train_ids & test_ids and train_ids | test_ids == set(IDS)
    assert 0.035 < len(test) / len(IDS) < 0.065
    assert split_records(records, 0.0)[1] == []


def test_splits_are_stable_across_reruns_and_record_order():
    records = [{"id": i} for i in IDS]
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    first, again, reordered = (split_records(r, 0.05)[1] for r in (records, records, shuffled))
    assert first == again
    assert {r["id"] for r in reordered} == {r["id"] for r in first}
    # a record's side depends on its id alone: the same with or without the others
    assert all(split_of(r["id"], 0.05) == "test" for r in first)
    # a larger fraction only moves ids from train to test
    assert {r["id"] for r in first} <= {r["id"] for r in split_records(records, 0.2)[1]}


# Which of s0-0000000 ... s0-0000015 are held out, computed once from common/io/splits.py: a split keyed on anything
# that differs between processes or versions (Python's salted hash(), a record's position) would move ids across, and
# SFT, DPO and the dataset step, each in its own process, would disagree.
PINNED_TEST_IDS = {0.05: ["s0-0000001"],
                   0.25: ["s0-0000001", "s0-0000003", "s0-0000009", "s0-0000013", "s0-0000014"]}


def test_splits_give_the_answers_pinned_once():
    ids = [f"s0-{i:07d}" for i in range(16)]
    for fraction, test in PINNED_TEST_IDS.items():
        assert [i for i in ids if split_of(i, fraction) == "test"] == test, fraction


def test_the_chain_trains_without_the_rows_its_dataset_calls_test(chain_run):
    """SFT and DPO (their own processes) held out as many records as the dataset step wrote to its test splits."""
    def lines(path):
        return len(path.read_text().splitlines()) if path.exists() else 0  # a split without rows has no file

    for step, subset, source in (("sft", "sft", "filtered.jsonl"), ("dpo", "preference", "preference.jsonl")):
        config = json.loads((chain_run / step / "training_config.json").read_text())
        held = lines(chain_run / "dataset" / subset / "test.jsonl")
        assert config["eval_records"] == held, step
        assert config["train_records"] + held == lines(chain_run / source), step


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("dataset") / "run")
    dataset_step.main(["--run", str(run), "--out", str(run / "dataset"), "--test-fraction", "0.25"])
    return run, run / "dataset"


def ids(path):
    return [r["id"] for r in read_lines(path)] if path.exists() else []


def test_sft_and_preference_are_split_by_the_same_ids(built):
    run, out = built
    kept = [r["id"] for r in read_lines(run / "filtered.jsonl")]
    train, test = ids(out / "sft" / "train.jsonl"), ids(out / "sft" / "test.jsonl")
    assert sorted(train + test) == sorted(kept) and not set(train) & set(test) and test
    assert test == [i for i in kept if split_of(i, 0.25) == "test"]  # the function SFT and DPO hold out with
    pairs = [p["id"] for p in read_lines(run / "preference.jsonl")]
    assert ids(out / "preference" / "test.jsonl") == [i for i in pairs if i in set(test)]
    assert ids(out / "preference" / "train.jsonl") == [i for i in pairs if i in set(train)]


def test_sft_rows_are_conversations_in_messages_format(built):
    run, out = built
    source = {r["id"]: r for r in read_lines(run / "filtered.jsonl")}
    rows = read_lines(out / "sft" / "train.jsonl") + read_lines(out / "sft" / "test.jsonl")
    for row in rows:
        record, messages = source[row["id"]], row["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        if "conversation" in record:  # multi-turn: every turn, not only the first
            assert messages == record["conversation"] and len(messages) == 4
        else:
            assert messages == [{"role": "user", "content": record["instruction"]},
                                {"role": "assistant", "content": record["response"]}]
        assert row["category"] == record["tags"]["category"] and row["nn_distance"] == record["nn_distance"]
        assert "settings" not in row  # run settings are on the card, not repeated in every row


def test_datasets_reads_the_files_and_the_cards_configs(built):
    import datasets

    run, out = built
    cache = str(run / "datasets-cache")  # not the user's ~/.cache
    sft = datasets.load_dataset("json", data_files={"train": str(out / "sft" / "train.jsonl"),
                                                    "test": str(out / "sft" / "test.jsonl")}, cache_dir=cache)
    assert sft["train"].num_rows == len(read_lines(out / "sft" / "train.jsonl"))
    assert sft["test"].num_rows == len(read_lines(out / "sft" / "test.jsonl"))
    assert sft["train"][0]["messages"][0]["role"] == "user"
    # the directory as the Hub serves it: the subsets and splits come from the card's YAML `configs`
    pairs = datasets.load_dataset(str(out), "preference", cache_dir=cache)
    assert set(pairs) == {"train", "test"}
    assert {"prompt", "chosen", "rejected"} <= set(pairs["train"].column_names)
    assert datasets.load_dataset(str(out), "sft", cache_dir=cache)["test"].num_rows == sft["test"].num_rows


def test_card_yaml_is_parsed_by_huggingface_hub(built):
    from huggingface_hub import DatasetCard

    run, out = built
    card = DatasetCard.load(out / "README.md")
    data = card.data
    assert data.license == "apache-2.0"  # SmolLM2 (the embedded generator) is Apache-2.0
    assert data.language == ["en"] and data.task_categories == ["text-generation"]
    assert data.size_categories == ["n<1K"]
    assert {"synthetic", "magpie"} <= set(data.tags)
    configs = {c["config_name"]: c for c in data.configs}
    assert set(configs) == {"sft", "preference"} and configs["sft"].get("default") is True
    assert configs["sft"]["data_files"] == [{"split": "train", "path": "sft/train.jsonl"},
                                            {"split": "test", "path": "sft/test.jsonl"}]
    summary = json.loads((run / "filter_summary.json").read_text())
    text = card.text
    assert f"| generated | {summary['input']} |" in text and f"| kept (sft) | {summary['kept']} |" in text
    assert f"| dropped: response_length | {summary['dropped']['response_length']} |" in text
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in text and "| generator recipe | smollm2 |" in text
    assert "| instruction_sampling.temperature | 0.8 |" in text and "| reward_model | embedded:minilm |" in text
    assert "### Task category" in text and "| Creative writing | 4 | 20% | 0 | 0% | 0% |" in text
    assert "@article{xu2024magpie" in text and "2406.08464" in text and "Zhangchen Xu" in text


def test_a_run_without_tags_and_without_a_test_split(tmp_path):
    run = make_run(tmp_path / "run", with_tags=False, multi_turn_every=0)
    dataset_step.main(["--run", str(run), "--out", str(run / "dataset"), "--test-fraction", "0"])
    out = run / "dataset"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "preference/train.jsonl", "sft/train.jsonl"]
    assert set(read_lines(out / "sft" / "train.jsonl")[0]) == {"id", "messages"}
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / "README.md")
    assert [c["data_files"] for c in card.data.configs] == [[{"split": "train", "path": "sft/train.jsonl"}],
                                                            [{"split": "train", "path": "preference/train.jsonl"}]]
    assert "Tag distributions" not in card.text


def test_generator_licenses_and_their_terms_for_outputs(tmp_path):
    llama = model_license("meta-llama/Llama-3.1-8B-Instruct")
    assert llama["license"] == "llama3.1" and "\"Llama\" at the beginning" in llama["outputs"]
    assert model_license("Qwen/Qwen2.5-7B-Instruct")["license"] == "apache-2.0"
    assert model_license("Qwen/Qwen2.5-3B-Instruct")["license_name"] == "qwen-research"
    assert model_license("mistralai/Mistral-7B-Instruct-v0.3")["license"] == "apache-2.0"
    assert model_license("embedded:smollm2")["license"] == "apache-2.0"
    unknown = model_license("someone/some-model")
    assert unknown["license"] == "other" and "not known" in unknown["outputs"]
    assert [size_category(n) for n in (0, 999, 1000, 300_000)] == ["n<1K", "n<1K", "1K<n<10K", "100K<n<1M"]

    # a Llama-3.1 generator's card carries its license and the naming rule for models trained on the data
    run = make_run(tmp_path / "run")
    records = read_lines(run / "filtered.jsonl")
    for r in records:
        r["settings"] = {**r["settings"], "model": "meta-llama/Llama-3.1-8B-Instruct", "recipe": "llama-3.1"}
    (run / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset_step.main(["--run", str(run), "--out", str(run / "dataset")])
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(run / "dataset" / "README.md")
    assert card.data.license == "llama3.1" and "Llama 3.1 Community License" in card.text
    assert "SmolLM2-135M-Instruct de-quantized" not in card.text


def test_a_rerun_with_the_records_reordered_writes_the_same_splits(tmp_path):
    run = make_run(tmp_path / "run")
    dataset_step.main(["--run", str(run), "--out", str(tmp_path / "first"), "--test-fraction", "0.3"])
    for name in ("filtered.jsonl", "preference.jsonl"):
        lines = (run / name).read_text().splitlines(keepends=True)
        (run / name).write_text("".join(reversed(lines)))
    dataset_step.main(["--run", str(run), "--out", str(tmp_path / "second"), "--test-fraction", "0.3"])
    for part in ("sft/train.jsonl", "sft/test.jsonl", "preference/train.jsonl", "preference/test.jsonl"):
        assert sorted(ids(tmp_path / "first" / part)) == sorted(ids(tmp_path / "second" / part))


def test_missing_inputs_and_bad_options_are_named(tmp_path):
    from conftest import run_step

    run = make_run(tmp_path / "run")
    (run / "preference.jsonl").unlink()
    result = run_step("dataset", "--run", run, "--out", run / "dataset", check=False)
    assert result.returncode == 2 and "preference.jsonl: no such file" in result.stderr
    result = run_step("dataset", "--run", run, "--out", run / "dataset", "--test-fraction", "1", check=False)
    assert result.returncode == 2 and "--test-fraction" in result.stderr
    assert not (run / "dataset").exists()
