import json

import pytest
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
    # training_config.json says what ran: compiled (by the step, not the trainer), and with which attention
    from common.training.trainers import run_config

    recorded = json.loads(run_config(trainer))
    assert recorded["torch_compile"] is True and recorded["compiled"].startswith("each decoder layer in place")
    assert recorded["attn_implementation"] == "sdpa"
    plain = build_trainer(*parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file",
                                  str(data), "--output_dir", str(tmp_path / "sft2")]))
    assert all(layer._compiled_call_impl is None for layer in plain.model.get_base_model().model.layers)
    assert json.loads(run_config(plain))["torch_compile"] is False
    # Under FSDP (accelerate launch --config_file env/accelerate/fsdp.yaml) the layers are sharded first: the step
    # leaves compiling to accelerate, which does it after sharding, layer by layer in place, so the model stays a
    # PeftModel (compiled whole, DPO under FSDP found no reference model).
    from accelerate.utils import TorchDynamoPlugin

    from common.training.trainers import compile_layer_by_layer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "False")  # as `accelerate launch` exports it
    args = parse(["--config", CPU_SFT, "--model_name_or_path", "x", "--train_file", "x", "--output_dir", "x",
                  "--torch_compile", "true"])[1]
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    compile_layer_by_layer(args, layers)
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert TorchDynamoPlugin(backend="inductor").use_regional_compilation is True


RECIPE_KEYS = {"sft": {"use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
                       "warmup_steps", "lr_scheduler_type", "max_grad_norm"},
               "dpo": {"beta", "learning_rate", "warmup_steps", "lr_scheduler_type"}}


def test_every_tier_trains_the_one_recipe_and_flags_still_override():
    """The LoRA recipe and learning rates are stated once (env/lora.yaml); the tier files hold no part of it, every
    tier resolves to it, and a flag overrides both."""
    import yaml
    from dpo import parse_args

    recipe = yaml.safe_load((REPO / "env" / "lora.yaml").read_text())
    for step in ("sft", "dpo"):
        tiers = sorted((REPO / "env").glob(f"*/{step}*.yaml"))
        assert len(tiers) >= 6
        for tier in tiers:
            assert not RECIPE_KEYS[step] & set(yaml.safe_load(tier.read_text())), tier
            argv = ["--config", str(tier), "--model_name_or_path", "m", "--train_file", "x", "--output_dir", "x",
                    "--dtype", "float32", "--use_cpu", "true"]  # parsed on this CPU
            if step == "sft":
                _, args, model_args = parse(argv)
                assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, model_args.use_peft) == (
                    recipe["sft"]["lora_r"], recipe["sft"]["lora_alpha"], recipe["sft"]["lora_dropout"], True)
                assert model_args.lora_target_modules == recipe["sft"]["lora_target_modules"]
                assert args.max_grad_norm == recipe["sft"]["max_grad_norm"]
            else:
                _, args, _ = parse_args([*argv, "--sft_adapter", "x"])
                assert args.beta == recipe["dpo"]["beta"]
            assert (args.learning_rate, args.warmup_steps, args.lr_scheduler_type.value) == (
                recipe[step]["learning_rate"], recipe[step]["warmup_steps"], recipe[step]["lr_scheduler_type"]), tier
    _, args, model_args = parse(["--config", CPU_SFT, "--model_name_or_path", "m", "--train_file", "x", "--output_dir",
                                 "x", "--learning_rate", "1e-3", "--lora_r", "4"])
    assert (args.learning_rate, model_args.lora_r) == (1e-3, 4)


def test_the_cpu_tier_trains_one_sequence_a_micro_batch_and_keeps_its_batch(tmp_path, smol):
    """The cpu tier's memory bound (`make all` under 4 GiB resident at every step): on a CPU the activations autograd
    saves for the backward live in RAM, about 2 MB a token for the LoRA-wrapped 135M model in fp32, and TRL's LM head
    makes temporaries in proportion to the micro-batch's tokens. So the tier trains one sequence a micro-batch (DPO:
    one pair) and accumulates its batch of 8 (DPO: 4 pairs); eight 512-token sequences a micro-batch saved 8 GiB and
    SFT peaked at 15.8 GiB. Counted from the tensors autograd saves for the longest micro-batch, not from RSS."""
    from dpo import parse_args

    data = tmp_path / "filtered.jsonl"
    records = [{"id": f"r{i}", "instruction": f"Count to {i}.", "response": " ".join(map(str, range(i + 2)))}
               for i in range(12)]
    # The longest record the tier's max_length holds (~505 tokens), and one longer, which is dropped, never cut
    records.append({"id": "long", "instruction": "Write a lot.", "response": " ".join(["word"] * 470)})
    records.append({"id": "longer", "instruction": "Write more.", "response": " ".join(f"w{i}" for i in range(700))})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = build_trainer(*parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file",
                                    str(data), "--output_dir", str(tmp_path / "sft"), "--dtype", "float32",
                                    "--test_fraction", "0.3"]))
    args = trainer.args
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8  # the batch the tier trains on
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == len(trainer.train_dataset) and all(b["input_ids"].shape[0] == 1 for b in batches)
    assert all(b["attention_mask"].all() for b in batches)  # one sequence: no padding
    assert 0 < max(len(b["input_ids"]) for b in trainer.get_eval_dataloader()) <= 2
    longest = max(batches, key=lambda b: b["input_ids"].numel())
    tokens = longest["input_ids"].shape[1]
    assert 480 < tokens <= args.max_length == 512  # the long record, whole
    assert sum(trainer.run_facts["dropped_too_long"].values()) == 1  # the longer one
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.compute_loss(trainer.model, dict(longest))
    config = trainer.model.config
    layer_inputs = config.num_hidden_layers * tokens * config.hidden_size * 4  # saved at least: each layer's input
    assert layer_inputs < sum(saved.values()) < 1.5 * 2**30, sum(saved.values())  # measured: 1.0 GiB
    _, dpo_args, _ = parse_args(["--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "m",
                                 "--sft_adapter", "x", "--train_file", "x", "--output_dir", "x", "--dtype", "float32"])
    assert dpo_args.per_device_train_batch_size == 1 and dpo_args.gradient_accumulation_steps == 4
    assert dpo_args.per_device_eval_batch_size <= 2 and dpo_args.max_length <= args.max_length


def test_held_out_records_are_kept_out_of_training_and_evaluated(tmp_path, smol):
    from common.io.splits import split_of

    data = tmp_path / "filtered.jsonl"
    records = [{"id": f"r{i}", "instruction": f"Count to {i}.", "response": " ".join(map(str, range(i + 2)))}
               for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file", str(data),
            "--output_dir", str(tmp_path / "sft"), "--test_fraction", "0.25"]
    trainer = build_trainer(*parse(argv))
    held = [r for r in records if split_of(r["id"], 0.25) == "test"]
    assert 0 < len(held) < 40 and len(trainer.eval_dataset) == len(held)
    assert len(trainer.train_dataset) == 40 - len(held)
    texts = json.dumps(trainer.train_dataset.to_list())
    assert not any(f'"Count to {r["id"][1:]}."' in texts for r in held)  # no held-out instruction is trained on
    assert trainer.args.eval_strategy == "steps" and trainer.run_facts["eval_records"] == len(held)
    none = build_trainer(*parse([*argv[:-1], "0"]))
    assert none.eval_dataset is None and none.args.eval_strategy == "no" and len(none.train_dataset) == 40


def test_eval_entries_land_in_the_curves(tmp_path):
    from common.training.trainers import write_curves

    write_curves([{"loss": 2.0, "step": 1}, {"loss": 1.5, "rewards/accuracies": 0.5, "step": 2},
                  {"eval_loss": 1.75, "eval_rewards/accuracies": 0.25, "step": 2}, {"eval_loss": 1.7, "step": 3}],
                 tmp_path)
    assert (tmp_path / "curves.csv").read_text().splitlines() == [
        "step,loss,rewards/accuracies,eval_loss,eval_rewards/accuracies", "1,2.0,,,", "2,1.5,0.5,1.75,0.25",
        "3,,,1.7,"]


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
        change = (model(ids).logits - base_logits).abs().max().item()
    # The trained adapter changes the model: measured 0.056 after the test chain's 2 steps (Adam moves each weight of
    # the LoRA B matrices, zero at the start, by about the learning rate); an adapter that barely trained, or loaded
    # as zeros, stays far below
    assert change > 0.02, change


# The test chain trains DPO at DTYPE=auto: bf16 where the CPU has it (AVX512-BF16, AMX), fp32 elsewhere. Policy and
# reference hold the same weights at the first step, but bf16 keeps ~3 significant digits of each logit and the two
# forwards (with and without autograd) may take different kernels, so a reward (beta x a sum of ~50 token log-probs)
# may move by a few 0.01 (an estimate; 0 exactly on this 2-core Xeon). The chain's bf16 log is held only to that, which
# a base-model reference would also meet (0.036 on the chain's first pair, measured in fp32):
# test_the_frozen_dpo_reference_is_exactly_the_sft_adapter computes the first step's rewards in fp32, where the bound
# is 1e-4 and a base-model reference is far outside it.
BF16_REWARD_TOLERANCE = 0.05
FP32_REWARD_TOLERANCE = 1e-4


def test_dpo_reference_is_the_sft_policy(chain_run):
    """At DPO's first step the policy is the SFT adapter; with the SFT model as reference the implicit rewards are 0
    (within the rounding of the run's dtype) and the loss is ln 2."""
    import math

    history = json.loads((chain_run / "dpo" / "log_history.json").read_text())
    first = next(h for h in history if "loss" in h)
    assert first["step"] == 1
    bf16 = json.loads((chain_run / "dpo" / "training_config.json").read_text())["bf16"]
    tolerance = BF16_REWARD_TOLERANCE if bf16 else FP32_REWARD_TOLERANCE
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert abs(first[key]) <= tolerance, (key, first[key], "bf16" if bf16 else "fp32")
    assert abs(first["loss"] - math.log(2)) <= tolerance / 2  # -log(sigmoid(m)) = ln 2 - m/2 + ...
    sft_steps = [h for h in json.loads((chain_run / "sft" / "log_history.json").read_text()) if "loss" in h]
    assert len(sft_steps) == 2  # --max_steps 2 from the test chain


def test_the_frozen_dpo_reference_is_exactly_the_sft_adapter(chain_run, tmp_path):
    """TRL keeps a frozen copy ("ref") of the SFT adapter as the reference: both it and the trainable policy must hold
    exactly the SFT adapter's weights before the first step. A zero margin at step 0 alone would also hold if DPO
    ignored the SFT adapter (policy and reference both the bare base); so the adapter must also be far from a no-op."""
    import dpo
    from safetensors.torch import load_file

    from common.io.jsonl import read_jsonl

    args = dpo.parse_args([
        "--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "embedded:smollm2", "--sft_adapter",
        str(chain_run / "sft"), "--train_file", str(chain_run / "preference.jsonl"), "--output_dir",
        str(tmp_path / "dpo"), "--dtype", "float32"])
    pairs = read_jsonl(chain_run / "preference.jsonl", required=dpo.PAIR_FIELDS)
    trainer = dpo.build_trainer(*args, pairs)
    model = trainer.model
    sft = load_file(chain_run / "sft" / "adapter_model.safetensors")
    assert sft and any("lora_B" in k for k in sft)
    for adapter in ("ref", "default"):
        weights = {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters() if f".{adapter}." in n}
        assert weights.keys() == sft.keys(), adapter
        assert all(torch.equal(weights[k].detach().float(), sft[k].float()) for k in sft), adapter
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    # control: the SFT adapter moves the model (its lora_B left zero, a base-model reference would pass the above)
    assert max(v.abs().max().item() for k, v in sft.items() if "lora_B" in k) > 1e-4
    # The first step's rewards in fp32, as the trainer computes them (policy against its reference): 0 within the fp32
    # tolerance, the loss ln 2; and with the bare base as reference (the adapter switched off for it), far from 0.
    import math
    from contextlib import nullcontext

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert all(abs(metrics[f"rewards/{k}"]) <= FP32_REWARD_TOLERANCE for k in ("margins", "chosen", "rejected"))
    assert abs(loss - math.log(2)) <= FP32_REWARD_TOLERANCE

    from common.training.pair_packing import TREE_KEYS, answer_log_probs

    def completion_logps(adapters_on):  # the sum of the chosen and rejected completions' token log-probs
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", *TREE_KEYS)}  # the cpu tier packs its pairs
        with torch.no_grad(), (nullcontext() if adapters_on else model.disable_adapter()):
            out = model(**inputs, labels=batch["labels"], fused_lm_head=True, use_cache=False)
        return answer_log_probs(out.log_probs, batch["answer_of"], len(batch["tree_cu_seq_lens"]) - 1)

    moved = trainer.args.beta * (completion_logps(True) - completion_logps(False)).abs().max().item()
    assert moved > 10 * FP32_REWARD_TOLERANCE, moved  # a base-model reference would fail the check above


def test_fp16_training_keeps_trainable_weights_in_fp32():
    """The T4 helper: under fp16 mixed precision the GradScaler refuses to unscale fp16 gradients (and bf16 ones, which
    TRL makes of a 4-bit base's LoRA weights, on CUDA); the helper turns the trainable weights, only those, to fp32."""
    from types import SimpleNamespace

    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.training.trainers import fp32_trainable_under_fp16

    def lora_model(dtype):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).to(dtype)

    def unscale(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(model(torch.tensor([[1, 2, 3]])).logits.float().sum()).backward()
        scaler.unscale_(opt)

    control = lora_model(torch.float16)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        unscale(control)
    model = lora_model(torch.float16)
    fp32_trainable_under_fp16(SimpleNamespace(args=SimpleNamespace(fp16=True), model=model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)  # the base: untouched
    unscale(model)
    bf16 = lora_model(torch.bfloat16)
    fp32_trainable_under_fp16(SimpleNamespace(args=SimpleNamespace(fp16=False), model=bf16))
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())  # bf16 training: nothing changes


def test_a_4bit_base_gets_its_policy_back_from_the_reference_copy(chain_run, tmp_path, monkeypatch):
    """A 4-bit base (bitsandbytes NF4, which runs on the CPU): TRL copies the SFT adapter to "ref", then rounds the
    trainable copy to bf16 (its rule for a quantized base, DPOTrainer.__init__); build_trainer copies the reference
    back (policy_from_reference), so policy == reference exactly at step 0. Control: without that copy they differ."""
    import dpo

    from common.io.jsonl import read_jsonl

    args = dpo.parse_args([
        "--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "embedded:smollm2", "--sft_adapter",
        str(chain_run / "sft"), "--train_file", str(chain_run / "preference.jsonl"), "--output_dir",
        str(tmp_path / "dpo"), "--dtype", "float32", "--load_in_4bit", "true"])
    pairs = read_jsonl(chain_run / "preference.jsonl", required=dpo.PAIR_FIELDS)

    def adapters():
        model = dpo.build_trainer(*args, pairs).model
        assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
        return [{n.replace(f".{a}.", "."): p.detach() for n, p in model.named_parameters() if f".{a}." in n}
                for a in ("default", "ref")]

    policy, ref = adapters()
    assert policy.keys() == ref.keys() and policy
    assert all(torch.equal(policy[k], ref[k]) and policy[k].dtype == ref[k].dtype for k in ref)
    monkeypatch.setattr(dpo, "policy_from_reference", lambda model: None)  # control: TRL's rounding left in place
    policy, ref = adapters()
    assert {p.dtype for p in policy.values()} == {torch.bfloat16}
    assert any(not torch.equal(policy[k].float(), ref[k].float()) for k in ref)


PAUSE = REPO / "tests" / "fixtures" / "pause_after_checkpoint"


def kill_after_checkpoint(script, args, step, marker, monkeypatch):
    """Run steps/<script>.py until it has written the checkpoint of `step`, hold it there (the pause_after_checkpoint
    fixture) and kill it: the kill lands after that checkpoint and before the next, whatever the machine's speed.
    The wait is kill_midway's (bounded; fails with the step's stderr where it ends first)."""
    import os

    from conftest import kill_midway

    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PAUSE), os.environ.get("PYTHONPATH", "")])))
        m.setenv("SIT_PAUSE_AFTER_CHECKPOINT", f"{step}:{marker}")
        kill_midway(script, args, marker, lines=1, torn=False)


def test_dpo_resumes_after_a_kill_to_the_uninterrupted_adapter_not_a_restart(chain_run, tmp_path, monkeypatch):
    """No warmup and a learning rate whose update is far above the tolerance: the resumed adapter equals the
    uninterrupted one, both differ from the SFT adapter they started from by far more (a DPO that did nothing would
    fail), and the second process ran only the step after the checkpoint (a restart would log step 1 again)."""
    from conftest import run_here, run_step
    from safetensors.torch import load_file

    def args(name):
        return ["--config", REPO / "env/cpu/dpo.yaml", "--model_name_or_path", "embedded:smollm2", "--sft_adapter",
                chain_run / "sft", "--train_file", chain_run / "preference.jsonl", "--output_dir", tmp_path / name,
                "--seed", "0", "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1", "--warmup_steps", "0",
                "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--eval_strategy", "no",
                "--dtype", "float32"]

    run_here("dpo", *args("whole"))
    kill_after_checkpoint("dpo", args("killed"), 1, tmp_path / "held-after-1", monkeypatch)
    assert sorted(p.name for p in (tmp_path / "killed.partial").glob("checkpoint-*")) == ["checkpoint-1"]
    result = run_step("dpo", *args("killed"))
    output = result.stdout + result.stderr
    assert "resuming from" in output
    logged = [h["step"] for h in json.loads((tmp_path / "killed" / "log_history.json").read_text()) if "loss" in h]
    assert logged == [1, 2]
    # the resumed process itself logged step 2 only (the trainer prints each logged step's dict)
    assert output.count("'loss':") == 1, output[-3000:]
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    sft = load_file(chain_run / "sft" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() == sft.keys()
    tolerance = 1e-5
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < tolerance
    moved = max((whole[k] - sft[k]).abs().max().item() for k in whole)
    assert moved > 100 * tolerance, moved  # the 2 DPO updates, far above the tolerance


def test_sft_resumes_from_its_last_checkpoint_after_a_kill(tmp_path, smol, monkeypatch):
    from conftest import run_here, run_step
    from safetensors.torch import load_file

    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Count to {i}.",
                                        "response": " ".join(str(k) for k in range(1, i + 2))}) + "\n"
                            for i in range(12)))

    def args(name):
        return ["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file", data,
                "--output_dir", tmp_path / name, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                "1", "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--dtype", "float32"]

    run_here("sft", *args("whole"))
    # Killed once the first checkpoint is complete, before the second
    kill_after_checkpoint("sft", args("killed"), 2, tmp_path / "held-after-2", monkeypatch)
    assert sorted(p.name for p in (tmp_path / "killed.partial").glob("checkpoint-*")) == ["checkpoint-2"]
    json.loads((tmp_path / "killed.partial" / "checkpoint-2" / "trainer_state.json").read_text())  # whole
    assert not (tmp_path / "killed").exists()  # no half-written adapter under the final name
    (tmp_path / "killed.partial" / "checkpoint-9").mkdir()  # and a checkpoint cut short by the crash
    result = run_step("sft", *args("killed"))
    output = result.stdout + result.stderr
    assert "resuming from" in output
    steps = [h["step"] for h in json.loads((tmp_path / "killed" / "log_history.json").read_text()) if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]
    # the resumed process itself trained steps 3 to 6 only (the trainer prints each logged step's dict): a restart
    # from scratch, deterministic, would end with the same history and adapter but print 6 losses
    assert output.count("'loss':") == 4, output[-3000:]
    assert not (tmp_path / "killed.partial").exists()  # checkpoints are cleared once the adapter is written
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-5) for k in whole)


def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path, smol):
    """make sft NPROC=2 (accelerate launch, DDP; gloo on this CPU) against one process with twice the batch."""
    import csv
    import os

    from conftest import make, run_here

    run = tmp_path / "run"
    run.mkdir()
    (run / "generated.jsonl").write_text("")
    records = [{"id": f"r{i}", "instruction": f"Count to {i}.", "response": " ".join(map(str, range(1, i + 2)))}
               for i in range(16)]
    (run / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # older than filtered.jsonl, in the chain's order: make won't regenerate, judge or filter
    (run / "judged.jsonl").write_text("")
    os.utime(run / "generated.jsonl", (0, 0))
    os.utime(run / "judged.jsonl", (1, 1))
    # No warmup and a learning rate whose updates show: steps 2 and 3 are losses after real updates. Plain SGD, whose
    # update is linear in the gradient: Adam's first steps turn the rounding differences of a gradient near zero
    # (DDP averages in another order) into updates of +-lr, so adapters could not be compared. No LoRA dropout: its
    # masks come from each process's own random stream, so one process and two would train on different noise.
    flags = ("--max_steps 3 --logging_steps 1 --dtype float32 --save_steps 10 --warmup_steps 0 --learning_rate 1.0 "
             "--lr_scheduler_type constant --optim sgd --eval_strategy no --lora_dropout 0 "
             "--gradient_accumulation_steps 1")
    result = make("sft", run, NPROC="2", SFT_ARGS=f"--per_device_train_batch_size 2 {flags}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate.commands.launch --num_processes 2" in result.stdout
    run_here("sft", "--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2", "--train_file",
             run / "filtered.jsonl", "--output_dir", tmp_path / "one", "--per_device_train_batch_size", "4",
             "--seed", "0", *flags.split())
    two, one = (list(csv.DictReader(open(d / "curves.csv"))) for d in (run / "sft", tmp_path / "one"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == ["1", "2", "3"]
    assert all(abs(float(a["loss"]) - float(b["loss"])) < 1e-4 for a, b in zip(one, two))
    assert all(float(r["learning_rate"]) == 1.0 for r in one + two)
    from safetensors.torch import load_file

    adapters = [load_file(d / "adapter_model.safetensors") for d in (run / "sft", tmp_path / "one")]
    moved = max(v.abs().max().item() for k, v in adapters[1].items() if "lora_B" in k)  # B starts at zero
    apart = max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[1])
    assert moved > 1e-3 and apart < 0.01 * moved, (moved, apart)


def assert_curves_are_the_log_history(adapter):
    """curves.csv beside the adapter holds, for each logged step, exactly the values the trainer logged at that step
    (log_history.json beside it), training and held-out alike; curves.png is a picture with something drawn."""
    import csv

    from PIL import Image

    from common.training.trainers import CURVES, EVAL_CURVES

    history = json.loads((adapter / "log_history.json").read_text())
    logged = {}
    for entry in history:
        for key in CURVES + EVAL_CURVES:
            if key in entry:
                logged.setdefault(entry["step"], {})[key] = entry[key]
    rows = list(csv.DictReader(open(adapter / "curves.csv")))
    assert rows and [int(r["step"]) for r in rows] == sorted(logged)
    for r in rows:
        written = {k: float(v) for k, v in r.items() if k != "step" and v != ""}
        assert written == logged[int(r["step"])], r["step"]
    with Image.open(adapter / "curves.png") as png:
        assert png.format == "PNG" and png.width > 300 and png.height > 200
        assert len(png.convert("L").getcolors(maxcolors=2**16) or range(2**16)) > 2  # not a blank canvas


def test_training_curves_are_written_beside_the_adapters(chain_run):
    for name, columns in (("sft", {"loss", "learning_rate", "eval_loss"}),
                          ("dpo", {"loss", "rewards/margins", "rewards/accuracies", "eval_loss"})):
        assert_curves_are_the_log_history(chain_run / name)
        header = (chain_run / name / "curves.csv").read_text().splitlines()[0].split(",")
        assert header[0] == "step" and columns <= set(header), header
        steps = [line.split(",")[0] for line in (chain_run / name / "curves.csv").read_text().splitlines()[1:]]
        assert steps == ["1", "2"]  # --max_steps 2, logged every step (the test chain's flags)


def test_curves_of_a_run_shorter_than_logging_steps(tmp_path):
    """A 1-step run with logging_steps 10 logs no loss: the adapter must still be saved (this once failed on a GPU)."""
    from common.training.trainers import write_curves

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
    # adapter itself moves the logits several times more (0.13 after the test chain's 2 steps), so a merge that
    # dropped or doubled it would fail
    assert torch.allclose(merged_logits, adapted_logits, rtol=1e-4, atol=2e-2) and change > 0.06, change
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
    # with a token it gets as far as the Hub (offline here): refused there with the step's own message, no traceback
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: HF_HUB_OFFLINE is set: pushing to someone/x needs the Hub" in result.stderr
    assert "Traceback" not in result.stderr and sentinel not in result.stdout + result.stderr


def test_warmup_as_a_ratio_never_zeroes_a_step_of_a_short_run(tmp_path, smol):
    """The cpu tier's DPO: 5 steps, warmup 0.1 (rounded up to 1 step). transformers' schedule gives step 0 a learning
    rate of 0 (the control); with warmup_from_the_first_step every step trains, warmup first, then the cosine."""
    from common.training.trainers import warmup_from_the_first_step

    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Name {i}.", "response": "A."}) + "\n"
                            for i in range(5)))

    def rates(patched):
        trainer = build_trainer(*parse(["--config", CPU_SFT, "--model_name_or_path", "embedded:smollm2",
                                        "--train_file", str(data), "--output_dir", str(tmp_path / "sft"),
                                        "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
                                        "--test_fraction", "0"]))
        if patched:
            warmup_from_the_first_step(trainer)
        trainer.create_optimizer_and_scheduler(num_training_steps=5)
        seen = []
        for _ in range(5):
            seen.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        return seen, trainer.args.learning_rate

    control, peak = rates(patched=False)
    assert control[0] == 0 and control[1] == pytest.approx(peak)
    fixed, peak = rates(patched=True)
    assert fixed[0] == pytest.approx(peak / 2) and fixed[1] == pytest.approx(peak)  # (0 + 1) / (1 + 1), then cosine
    assert fixed[1:] == pytest.approx(control[1:]) and all(r > 0 for r in fixed)
