"""make push / make push-data up to the network boundary: HfApi is replaced by a recorder, so the tests see which
files an upload would send (the allow-list, the card), to which kind of repository, how private, and with which
token; and that the token never reaches stdout or stderr. A step run in a subprocess meets the stand-in Hub of
tests/fixtures/stand_in_hub instead. Also: adapters record their base model portably."""

import json
import shutil
import subprocess

import dataset as dataset_step
import push
import pytest
from conftest import REPO, SENTINEL_TOKEN
from run_fixture import make_adapter, make_run

from common.models import EMBEDDED_DEFAULT, hub_id, portable_base

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records every call and what the upload folder holds at upload time."""
    calls = []

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls.append(("init", {"token": token, **kwargs}))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        from pathlib import Path

        files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                 for p in Path(folder_path).rglob("*") if p.is_file()}
        RecordingApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    return RecordingApi.calls


def call(calls, name):
    found = [kwargs for what, kwargs in calls if what == name]
    assert len(found) == 1, f"{name}: {len(found)} calls"
    return found[0]


@pytest.fixture
def adapter_run(tmp_path):
    """A run with an SFT adapter as an embedded-default adapter from before this change looked: PEFT's README
    template, the local directory as its base, and files that must stay local."""
    run = make_run(tmp_path / "run")
    adapter = run / "sft"
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                             str(EMBEDDED_DEFAULT)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "tokenizer.json").write_text("{}")
    (adapter / "tokenizer_config.json").write_text("{}")
    (adapter / "README.md").write_text("---\nbase_model: /somewhere\nlibrary_name: peft\n---\n# Model Card for "
                                       "Model ID\n<!-- Provide a quick summary -->\n")
    (adapter / "optimizer.pt").write_bytes(b"not for the Hub")
    (adapter / "checkpoint-2").mkdir()
    (adapter / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"old")
    return run


def test_adapter_push_sends_the_allow_list_a_portable_base_and_a_card_with_the_evals(adapter_run, hub, capsys):
    adapter = adapter_run / "sft"
    before = {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    push.main(["--adapter", str(adapter), "--repo-id", "me/sit-sft", "--private", "--dataset", "me/sit-data"])
    assert call(hub, "init")["token"] == SENTINEL_TOKEN  # read from HF_TOKEN by the step
    assert call(hub, "create_repo") == {"repo_id": "me/sit-sft", "repo_type": "model", "private": True,
                                        "exist_ok": True}
    upload = call(hub, "upload_folder")
    assert upload["repo_type"] == "model"
    assert sorted(upload["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "curves.csv", "log_history.json", "tokenizer.json", "tokenizer_config.json",
                                       "training_config.json"]
    assert json.loads(upload["files"]["adapter_config.json"])["base_model_name_or_path"] == HUB_ID

    from huggingface_hub import ModelCard

    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.base_model == HUB_ID and card.data.library_name == "peft"
    assert card.data.datasets == ["me/sit-data"] and card.data.license == "apache-2.0"
    assert "| mc_local | acc | 0.250 ± 0.200 | 0.500 ± 0.200 | 0.750 ± 0.200 |" in card.text  # RUN/eval/*.json
    assert "Model Card for Model ID" not in card.text  # PEFT's template replaced
    # the local adapter is untouched: make must not take it for a new one (it would evaluate it again)
    assert {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == before
    out, err = capsys.readouterr()
    assert SENTINEL_TOKEN not in out + err and "me/sit-sft" in err and "(private)" in err


def test_dataset_push_sends_the_splits_and_the_card(tmp_path, hub, capsys):
    run = make_run(tmp_path / "run")
    out = run / "dataset"
    dataset_step.main(["--run", str(run), "--out", str(out), "--test-fraction", "0.25"])
    (out / "notes.txt").write_text("local only")
    (out / "sft" / "train.jsonl.tmp").write_text("a leftover")
    push.main(["--dataset-dir", str(out), "--repo-id", "me/sit-data"])
    assert call(hub, "create_repo") == {"repo_id": "me/sit-data", "repo_type": "dataset", "private": False,
                                        "exist_ok": True}
    upload = call(hub, "upload_folder")
    assert upload["repo_type"] == "dataset"
    assert sorted(upload["files"]) == ["README.md", "preference/test.jsonl", "preference/train.jsonl",
                                       "sft/test.jsonl", "sft/train.jsonl"]
    assert upload["files"]["README.md"] == (out / "README.md").read_bytes()
    out_text, err = capsys.readouterr()
    assert SENTINEL_TOKEN not in out_text + err and "https://huggingface.co/datasets/me/sit-data" in err


def test_no_token_no_upload_and_the_hubs_refusal_is_explained(tmp_path, hub, monkeypatch, capsys):
    from conftest import hub_calls, run_step, stand_in_hub_env

    run = make_run(tmp_path / "run")
    # the step in a process of its own, as make runs it, against the stand-in Hub, which records what it is asked
    # (test_faults.py pushes through it with a token)
    hub = tmp_path / "hub"
    result = run_step("push", "--adapter", run / "sft", "--repo-id", "me/x", check=False,
                      env={"HF_TOKEN": "", **stand_in_hub_env(hub)})
    assert (hub / "installed").exists() and hub_calls(hub) == []  # in place, and asked nothing: not even a client
    assert result.returncode == 2 and "HF_TOKEN is not set" in result.stderr

    from unittest import mock

    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        raise HfHubHTTPError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create",
                             response=mock.Mock())

    monkeypatch.setattr(RecordingApi, "create_repo", refuse)
    from common import SetupError

    with pytest.raises(SetupError, match="refused the upload to me/x") as error:
        push.main(["--adapter", str(run / "sft"), "--repo-id", "me/x"])
    out, err = capsys.readouterr()
    assert SENTINEL_TOKEN not in str(error.value) + out + err


def test_make_passes_the_private_flag_and_the_repositories():
    def dry(*args):
        result = subprocess.run(["make", "-n", "-C", str(REPO), *args, "PY=python", "GPU=cpu", "MODEL=smol",
                                 "RUN=/tmp/sit-run"], capture_output=True, text=True)
        return result.stdout + result.stderr

    text = dry("push-data", "HUB_DATASET=me/data", "HUB_PRIVATE=1")
    assert "steps/push.py --dataset-dir /tmp/sit-run/dataset --repo-id me/data --private" in text
    assert "steps/dataset.py --run /tmp/sit-run --out /tmp/sit-run/dataset --test-fraction 0.05" in text
    assert "--private" not in dry("push-data", "HUB_DATASET=me/data").split("push.py")[-1]
    assert "set HUB_DATASET=namespace/name" in dry("push-data")
    text = dry("push", "HUB_REPO=me/model", "HUB_DATASET=me/data")
    assert "steps/push.py --adapter /tmp/sit-run/dpo --repo-id me/model --evals /tmp/sit-run/eval --dataset me/data" \
        in text


def test_an_adapter_records_its_base_by_hub_id_and_still_loads_offline(tmp_path, smol):
    """What train_and_save does after saving: the embedded default's local directory becomes its Hub id in
    adapter_config.json; the steps, given the base model, load the adapter and its tokenizer as before, offline
    (conftest sets HF_HUB_OFFLINE)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.models import load_tokenizer

    assert hub_id("embedded:smollm2") == hub_id(str(EMBEDDED_DEFAULT)) == HUB_ID
    assert hub_id("meta-llama/Llama-3.2-3B") == "meta-llama/Llama-3.2-3B"
    base = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    shutil.copy(smol / "tokenizer.json", tmp_path / "adapter")
    shutil.copy(smol / "tokenizer_config.json", tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(smol)  # what PEFT writes
    portable_base(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) == {
        **saved, "base_model_name_or_path": HUB_ID}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol), tmp_path / "adapter")
    assert loaded.peft_config["default"].base_model_name_or_path == HUB_ID
    assert load_tokenizer(str(tmp_path / "adapter")).eos_token == "<|im_end|>"


def test_a_trained_adapter_has_a_model_card_and_a_portable_base(chain_run):
    from huggingface_hub import ModelCard

    for stage in ("sft", "dpo"):
        config = json.loads((chain_run / stage / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == HUB_ID
        card = ModelCard.load(chain_run / stage / "README.md")
        assert card.data.base_model == HUB_ID and card.data.library_name == "peft"
        assert f"| method | {stage.upper()} |" in card.text and "| LoRA | r 8, alpha 16, dropout 0.05" in card.text


def test_model_card_from_the_adapter_files(tmp_path):
    from huggingface_hub import ModelCard

    from common.reporting.cards import model_card

    make_adapter(tmp_path / "dpo", "dpo")
    card = ModelCard(model_card(tmp_path / "dpo", 15, 2))
    assert card.data.base_model == HUB_ID and "dpo" in card.data.tags
    for line in ("| method | DPO |", "| data | 15 training examples, 2 held-out test examples |", "| DPO beta | 0.1 |",
                 "| optimisation | lr 0.0001, max_steps 4, batch 2 x 1 accumulation, seed 0 |",
                 "| eval loss (test split), last | 1.6000 |"):
        assert line in card.text
    assert "Not evaluated when this card was written" in card.text
