"""Faults injected into the steps: SIGKILL at several moments, a GPU tier without a GPU, out of memory, a full disk,
and a secret token that must never be written anywhere.

Kills of generate, preference and sft mid-run are in their own test files; here the other long steps."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CHAIN_VARS, REPO, SENTINEL_TOKEN, make, make_command, run_here, run_step

# The filter step held once its first JSONL output is written whole, until the test kills it: unheld, it writes its
# small outputs one after the other faster than a test can look at the disk.
HELD_FILTER = """
import signal, sys
import filter
from common import run_step

write_jsonl = filter.write_jsonl
def held(path, records):
    write_jsonl(path, records)
    signal.pause()
filter.write_jsonl = held
run_step(filter.main)
"""


def test_filter_killed_between_its_writes_then_rerun_gives_the_uninterrupted_output(tmp_path, smol):
    """Killed once its first output is written (the step held there, see HELD_FILTER): make finds no filtered.jsonl,
    written last, and the rerun writes every output as an uninterrupted run does."""
    from conftest import HUNG_STEP_SECONDS
    from test_filter import CASES  # one record for each rule: every stage has work to do

    src, out = tmp_path / "gen.jsonl", tmp_path / "run"
    src.write_text("".join(json.dumps(r) + "\n" for r, _ in CASES))
    args = ["--in", src, "--out", out / "filtered.jsonl", "--dropped", out / "dropped.jsonl", "--summary",
            out / "filter_summary.json", "--tokenizer", "embedded:smollm2", "--embedder", "embedded:minilm"]
    run_here("filter", *args)
    outputs = ("filtered.jsonl", "dropped.jsonl", "filter_summary.json")
    uninterrupted = {f: (out / f).read_bytes() for f in outputs}
    for f in outputs:
        (out / f).unlink()

    proc = subprocess.Popen([sys.executable, "-c", HELD_FILTER, *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()  # only for a step that hangs: the wait is on the files
        while not [f for f in outputs if (out / f).exists()]:
            assert proc.poll() is None, f"the filter ended ({proc.returncode}) before writing an output"
            assert time.monotonic() - started < HUNG_STEP_SECONDS, "no output written (hung?)"
            time.sleep(0.05)
    finally:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert (out / "dropped.jsonl").exists() and not (out / "filtered.jsonl").exists()  # killed between the writes
    run_here("filter", *args)
    assert {f: (out / f).read_bytes() for f in outputs} == uninterrupted


def cached_answers(folder):
    """Rows (answered requests) in the one lm-eval request cache under `folder`; 0 before it exists."""
    dbs = list(Path(folder).glob("*.db"))
    assert len(dbs) <= 1, dbs
    if not dbs:
        return 0
    try:
        with sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True, timeout=10) as db:
            return db.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]
    except sqlite3.OperationalError:  # the file exists but its table is not made yet
        return 0


def test_eval_killed_mid_work_reuses_its_cached_answers_and_matches_the_uninterrupted_run(tmp_path, smol):
    def args(name):
        # Batch 1: every request is computed alone, so the answers cannot depend on which ones the cache held.
        # Answers of 16 tokens: enough to be cut mid-answer; the three runs' time is mostly generating them.
        return ["--model", "embedded:smollm2", "--tasks", "ifeval_local,mc_local", "--batch-size", "1", "--dtype",
                "float32", "--max-gen-toks", "16", "--limit", CHAIN_VARS["LIMIT"],
                "--out", tmp_path / name / "base.json", "--cache-dir", tmp_path / name / "cache"]

    run_here("eval", *args("whole"))
    whole = json.loads((tmp_path / "whole" / "base.json").read_text())
    total = whole["requests"]["total"]
    assert whole["requests"] == {**whole["requests"], "from_cache": 0, "answered": total}
    assert total == cached_answers(tmp_path / "whole" / "cache") == 4 + 4 * 4  # 4 IFEval prompts, 4 x 4 choices
    assert whole["requests"]["by_fast_engine"] == 4  # the IFEval answers came from the fast engine

    # Kill as soon as the first answer is committed to the cache: the model is loaded and answering.
    proc = subprocess.Popen([sys.executable, str(REPO / "steps" / "eval.py"), *map(str, args("killed"))], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and cached_answers(tmp_path / "killed" / "cache") == 0:
        time.sleep(0.05)
    assert proc.poll() is None, f"eval ended (status {proc.returncode}) before any answer reached the cache"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = cached_answers(tmp_path / "killed" / "cache")
    assert 0 < done < total  # the kill landed mid-work
    assert not (tmp_path / "killed" / "base.json").exists()

    run_here("eval", *args("killed"))
    rerun = json.loads((tmp_path / "killed" / "base.json").read_text())
    assert (rerun["requests"]["from_cache"], rerun["requests"]["answered"]) == (done, total - done)  # the rest only
    assert cached_answers(tmp_path / "killed" / "cache") == total
    assert rerun["results"] == whole["results"] and rerun["loglikelihoods"] == whole["loglikelihoods"]


def test_a_missing_tool_is_reported_like_any_step_error(tmp_path):
    """report_png.py ends like every step: one 'error:' line and status 2."""
    missing = tmp_path / "no-chromium"
    result = run_step("report_png", tmp_path / "report.html", tmp_path / "report.png", "--chromium", missing,
                      check=False)
    assert result.returncode == 2
    assert result.stderr == f"error: {missing} not found: install it with `apt-get install -y chromium chromium-driver`\n"


def test_gpu_tier_without_a_gpu_stops_before_installing_or_loading(tmp_path):
    result = make("generate", tmp_path / "run", GPU="t4", MODEL="llama")
    assert result.returncode != 0
    assert "GPU=t4 needs an NVIDIA GPU and nvidia-smi finds none" in result.stderr and "GPU=cpu" in result.stderr
    assert "pip install" not in result.stdout and not (tmp_path / "run").exists()


def trainer_stub(tmp_path, train):
    """The parts of a Trainer that train_and_save reads, with a train() of the test's choosing."""
    args = SimpleNamespace(output_dir=str(tmp_path / "adapter.partial"), fp16=False, save_total_limit=2,
                           per_device_train_batch_size=8, gradient_accumulation_steps=2, max_length=1024,
                           gradient_checkpointing=False)
    return SimpleNamespace(args=args, model=torch.nn.Linear(1000, 1000), train=train, train_dataset=None, eval_dataset=None,
                           is_world_process_zero=lambda: True, accelerator=SimpleNamespace(wait_for_everyone=lambda: None),
                           lr_scheduler=None, create_scheduler=lambda num_training_steps, optimizer=None: None)


def test_out_of_memory_while_training_names_the_tier_knobs(tmp_path):
    from common import SetupError
    from common.training.trainers import train_and_save

    def train(resume_from_checkpoint=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SetupError) as error:
        train_and_save(trainer_stub(tmp_path, train), tmp_path / "adapter")
    message = str(error.value)
    for knob in ("per_device_train_batch_size=8", "gradient_accumulation_steps=2", "max_length=1024",
                 "gradient_checkpointing=False", "--load_in_4bit", "SFT_ARGS", "resumes"):
        assert knob in message
    assert not (tmp_path / "adapter").exists()


def test_a_save_that_writes_no_weights_fails_and_keeps_the_checkpoints(tmp_path):
    """Trainer.save_model silently writes no weights for some setups (FSDP with a sharded state dict did): the step
    must fail, name it, write no adapter directory and keep the checkpoints to resume from."""
    from safetensors.torch import load_file, save_file

    from common import SetupError
    from common.training.trainers import train_and_save

    def train(resume_from_checkpoint=None):
        (tmp_path / "adapter.partial" / "checkpoint-2").mkdir(parents=True)

    trainer = trainer_stub(tmp_path, train)
    trainer.save_model = lambda out: Path(out).mkdir() or (Path(out) / "training_args.bin").write_bytes(b"args")
    with pytest.raises(SetupError, match=r"saving wrote no weights .* \(only: training_args.bin, no tensors\)"):
        train_and_save(trainer, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and (tmp_path / "adapter.partial" / "checkpoint-2").is_dir()

    def save(tensors):  # PEFT under FSDP's activation-checkpoint wrapper wrote a safetensors file of no tensors
        return lambda out: Path(out).mkdir() or save_file(tensors, str(Path(out) / "adapter_model.safetensors"))

    trainer.save_model = save({})
    with pytest.raises(SetupError, match=r"saving wrote no weights .* \(only: adapter_model.safetensors, no tensors"):
        train_and_save(trainer, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and (tmp_path / "adapter.partial" / "checkpoint-2").is_dir()
    trainer.save_model = save({"lora_A.weight": torch.ones(2, 2)})
    trainer.args.to_json_string = lambda: "{}"
    trainer.state = SimpleNamespace(log_history=[{"loss": 1.0, "step": 1}])
    train_and_save(trainer, tmp_path / "adapter")
    assert list(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == ["lora_A.weight"]


def test_dpo_refuses_compile_with_checkpointing_under_fsdp(monkeypatch):
    """Under FSDP that pair failed at DPO's second step on the GPU: the step says so before loading anything."""
    from dpo import main

    from common import DataError, OptionError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = ["--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "x", "--sft_adapter", "x",
            "--train_file", "missing.jsonl", "--output_dir", "x", "--torch_compile", "true",
            "--gradient_checkpointing", "true"]
    refusal = r"--torch_compile true and --gradient_checkpointing true .*DPO_ARGS=--torch_compile false"
    with pytest.raises(OptionError, match=refusal):
        main(args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # one process: the pair is fine, and the step goes on to read
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        main(args)


def test_training_refuses_early_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil

    from common import SetupError
    from common.training.trainers import train_and_save

    calls = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 * 2**20, used=0, free=10 * 2**20))
    with pytest.raises(SetupError, match=r"10 MiB free, checkpoints and the adapter of 1,001,000 trainable"):
        train_and_save(trainer_stub(tmp_path, lambda **kw: calls.append(kw)), tmp_path / "adapter")
    assert calls == []  # refused before training


def test_the_hub_token_is_never_written_or_printed(chain_run, tmp_path):
    """The chain ran with HF_TOKEN set to a sentinel, and `make push` runs here with it against the stand-in Hub
    (tests/fixtures/stand_in_hub): the token reaches the Hub client, and no output file (adapters, configs, reports,
    checkpoints' leftovers), nor make's logs, nor what went up to the Hub holds it."""
    import hashlib

    from conftest import hub_calls, stand_in_hub_env

    hub = tmp_path / "hub"
    # -o: the adapter is pushed as it is, never remade (nothing may train in the shared run)
    pushed = subprocess.run([*make_command("push", chain_run, HUB_REPO="me/x"), "-o", str(chain_run / "dpo")],
                            capture_output=True, text=True,
                            env={**os.environ, "HF_TOKEN": SENTINEL_TOKEN, **stand_in_hub_env(hub)})
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    calls = hub_calls(hub)
    assert [call for call, _ in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[0][1]["token_sha256"] == hashlib.sha256(SENTINEL_TOKEN.encode()).hexdigest()
    files = [p for p in [*chain_run.rglob("*"), *hub.rglob("*")] if p.is_file()] + [chain_run.parent / "make-all.log"]
    assert len(files) > 30 and any(p.name == "adapter_model.safetensors" for p in hub.rglob("*"))
    assert [p for p in files if SENTINEL_TOKEN.encode() in p.read_bytes()] == []
    assert SENTINEL_TOKEN not in pushed.stdout + pushed.stderr
