"""GPU paths, run on a CUDA machine (`python -m pytest tests/test_gpu.py`); skipped elsewhere, as in CI."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_lines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOKENIZER = os.environ.get("SIT_TEST_TOKENIZER", str(REPO / "data" / "models" / "smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer and chat template: GPU code paths without downloads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpu") / "tiny-chat"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def generate(model, out, nproc=1, extra=()):
    args = [str(REPO / "steps" / "generate.py"), "--model", str(model), "--out", str(out), "--num-samples", "12",
            "--batch-size", "4", "--max-instruction-tokens", "16", "--max-response-tokens", "16", "--dtype",
            "bfloat16", "--instruction-temperature", "0", *extra]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(nproc)]
    result = subprocess.run([*launch, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_lines(out)


def test_sharded_generation_on_one_gpu_matches_one_process(tiny_chat_model, tmp_path):
    one = generate(tiny_chat_model, tmp_path / "one.jsonl")
    two = generate(tiny_chat_model, tmp_path / "two.jsonl", nproc=2)
    assert [r["id"] for r in two] == [r["id"] for r in one] and len({r["id"] for r in two}) == 12
    assert two == one


def test_static_and_plain_paths_write_the_same_schema(tiny_chat_model, tmp_path, monkeypatch):
    fast = generate(tiny_chat_model, tmp_path / "fast.jsonl")
    monkeypatch.setenv("SIT_STATIC_GENERATE", "0")
    plain = generate(tiny_chat_model, tmp_path / "plain.jsonl")
    assert len(fast) == len(plain) == 12
    assert [sorted(r) for r in fast] == [sorted(r) for r in plain]
    assert [r["id"] for r in fast] == [r["id"] for r in plain]
