import json

import torch
from conftest import REPO
from sft import build_trainer, parse

CPU_SFT = str(REPO / "env" / "cpu" / "sft.yaml")


def test_sft_loss_covers_only_the_assistant_tokens(tmp_path, smol):
    data = tmp_path / "filtered.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "Name a fruit.", "response": "An apple."}) + "\n")
    trainer = build_trainer(*parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2",
                                    "--train_file", str(data), "--output_dir", str(tmp_path / "sft")]))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokenizer = trainer.processing_class
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tokenizer.decode(ids).count("Name a fruit.") == 1
    trained = tokenizer.decode(ids[labels != -100])
    assert trained.startswith("An apple.<|im_end|>")  # the answer and its end of turn, nothing of the prompt
    assert "Name a fruit." not in trained and "system" not in trained


def test_torch_compile_compiles_each_layer_once_in_place(tmp_path, smol, monkeypatch):
    """--torch_compile (the h100 tier) compiles every decoder layer in place before the trainer and turns the trainer's
    own compile off: the trainer compiling the model again would wrap it twice. Nothing runs, so nothing compiles."""
    data = tmp_path / "filtered.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "Name a fruit.", "response": "An apple."}) + "\n")
    trainer = build_trainer(*parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file",
                                    str(data), "--output_dir", str(tmp_path / "sft"), "--torch_compile", "true"]))
    layers = trainer.model.get_base_model().model.layers
    assert len(layers) == 30 and all(layer._compiled_call_impl is not None for layer in layers)
    assert trainer.args.torch_compile is False and trainer.args.torch_compile_backend is None
    assert trainer.accelerator.state.dynamo_plugin.backend.value == "NO"
    plain = build_trainer(*parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file",
                                  str(data), "--output_dir", str(tmp_path / "sft2")]))
    assert all(layer._compiled_call_impl is None for layer in plain.model.get_base_model().model.layers)
    # Under FSDP (accelerate launch --config_file env/accelerate/fsdp.yaml) the layers are sharded first: the step
    # leaves compiling to accelerate, which does it after sharding, layer by layer in place, so the model stays a
    # PeftModel (compiled whole, DPO under FSDP found no reference model).
    from accelerate.utils import TorchDynamoPlugin
    from common.training import compile_layer_by_layer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "False")  # as `accelerate launch` exports it
    args = parse(["--config", CPU_SFT, "--model_name_or_path", "x", "--train_file", "x", "--output_dir", "x",
                  "--torch_compile", "true"])[1]
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    compile_layer_by_layer(args, layers)
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert TorchDynamoPlugin(backend="inductor").use_regional_compilation is True


def test_adapters_have_the_seed_lora_config_and_load(chain_run, smol):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("sft", "dpo"):
        config = json.loads((chain_run / name / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
        assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, chain_run / "sft")
    with torch.inference_mode():
        assert not torch.allclose(model(ids).logits, base_logits)  # the trained adapter changes the model


def test_dpo_reference_is_the_sft_policy(chain_run):
    """At DPO's first step the policy is the SFT adapter; if the reference were the bare base model, the implicit
    rewards would differ from 0 at once. With the SFT model as reference they are exactly 0 and the loss is ln 2."""
    history = json.loads((chain_run / "dpo" / "log_history.json").read_text())
    first = next(h for h in history if "loss" in h)
    assert first["step"] == 1
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0
    assert abs(first["loss"] - 0.6931) < 1e-3
    sft_steps = [h for h in json.loads((chain_run / "sft" / "log_history.json").read_text()) if "loss" in h]
    assert len(sft_steps) == 2  # --max_steps 2 from the test chain


def test_sft_resumes_from_its_last_checkpoint_after_a_kill(tmp_path, smol):
    from conftest import kill_midway, run_step
    from safetensors.torch import load_file

    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Count to {i}.",
                                        "response": " ".join(str(k) for k in range(1, i + 2))}) + "\n"
                            for i in range(12)))

    def args(name):
        return ["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file", data,
                "--output_dir", tmp_path / name, "--per_device_train_batch_size", "2", "--max_steps", "6",
                "--save_steps", "2", "--logging_steps", "1", "--dtype", "float32"]

    run_step("sft", *args("whole"))
    # Kill once the first checkpoint is complete (its trainer_state.json is written last).
    state = tmp_path / "killed.partial" / "checkpoint-2" / "trainer_state.json"
    kill_midway("sft", args("killed"), state, lines=1, torn=False)
    assert not (tmp_path / "killed").exists()  # no half-written adapter under the final name
    (tmp_path / "killed.partial" / "checkpoint-9").mkdir()  # and a checkpoint cut short by the crash
    result = run_step("sft", *args("killed"))
    assert "resuming from" in result.stdout + result.stderr
    steps = [h["step"] for h in json.loads((tmp_path / "killed" / "log_history.json").read_text()) if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "killed.partial").exists()  # checkpoints are cleared once the adapter is written
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-5) for k in whole)


def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path, smol):
    """make sft NPROC=2 (accelerate launch, DDP; gloo on this CPU) against one process with twice the batch."""
    import csv
    import os

    from conftest import make, run_step

    run = tmp_path / "run"
    run.mkdir()
    (run / "generated.jsonl").write_text("")
    records = [{"id": f"r{i}", "instruction": f"Count to {i}.", "response": " ".join(map(str, range(1, i + 2)))}
               for i in range(16)]
    (run / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.utime(run / "generated.jsonl", (0, 0))  # older than filtered.jsonl: make won't regenerate
    flags = "--max_steps 3 --logging_steps 1 --dtype float32 --save_steps 10"
    result = make("sft", run, NPROC="2", SFT_ARGS=f"--per_device_train_batch_size 2 {flags}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate.commands.launch --num_processes 2" in result.stdout
    run_step("sft", "--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file",
             run / "filtered.jsonl", "--output_dir", tmp_path / "one", "--per_device_train_batch_size", "4",
             "--seed", "0", *flags.split())
    two, one = (list(csv.DictReader(open(d / "curves.csv"))) for d in (run / "sft", tmp_path / "one"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == ["1", "2", "3"]
    assert all(abs(float(a["loss"]) - float(b["loss"])) < 2e-3 for a, b in zip(one, two))


def test_training_curves_are_written_beside_the_adapters(chain_run):
    import csv

    for name, column in (("sft", "loss"), ("dpo", "rewards/margins")):
        rows = list(csv.DictReader(open(chain_run / name / "curves.csv")))
        assert [int(r["step"]) for r in rows] == [1, 2] and all(r[column] != "" for r in rows)
        assert (chain_run / name / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_of_a_run_shorter_than_logging_steps(tmp_path):
    """A 1-step run with logging_steps 10 logs no loss: the adapter must still be saved (this once failed on a GPU)."""
    from common.training import write_curves

    write_curves([{"train_runtime": 2.6, "step": 1}], tmp_path)
    assert (tmp_path / "curves.csv").read_text().splitlines() == ["step"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    write_curves([{"loss": 1.5, "step": 1}, {"loss": 1.25, "rewards/margins": 0.5, "step": 2}], tmp_path)
    assert (tmp_path / "curves.csv").read_text().splitlines() == ["step,loss,rewards/margins", "1,1.5,", "2,1.25,0.5"]


def test_merge_writes_a_model_equal_to_base_plus_adapter(chain_run, smol, tmp_path):
    from conftest import run_step
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    run_step("merge", "--model", "embedded:smollm2", "--adapter", chain_run / "sft", "--out", out, "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32),
                                        chain_run / "sft")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    with torch.inference_mode():
        merged_logits, adapted_logits = merged(ids).logits, adapted(ids).logits
        change = (adapted_logits - base(ids).logits).abs().max()
    # fp32 rounding of W + BA, amplified by this model's large activations (up to ~1e-2 in logits of ~20); the
    # adapter itself moves the logits far more, so a merge that dropped or doubled it would fail
    assert torch.allclose(merged_logits, adapted_logits, rtol=1e-4, atol=2e-2) and change > 0.2, change
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()


def test_merge_refuses_early_when_the_disk_is_too_small(chain_run, tmp_path, monkeypatch):
    import shutil

    import merge
    import pytest
    from common import SetupError

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(SetupError, match=r"GiB free, the merged model needs 0\.\d+ GiB"):
        merge.main(["--model", "embedded:smollm2", "--adapter", str(chain_run / "sft"), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_push_needs_a_token_and_never_prints_it(chain_run):
    from conftest import run_step

    result = run_step("push", "--adapter", chain_run / "dpo", "--repo-id", "someone/x", check=False,
                      env={"HF_TOKEN": ""})
    assert result.returncode == 2 and "HF_TOKEN is not set" in result.stderr
    sentinel = "hf_SENTINELtoken0123456789"
    result = run_step("push", "--adapter", chain_run / "dpo", "--repo-id", "someone/x", check=False,
                      env={"HF_TOKEN": sentinel, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and sentinel not in result.stdout + result.stderr
