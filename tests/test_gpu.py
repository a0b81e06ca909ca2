"""GPU paths, run on a CUDA machine (`python -m pytest tests/test_gpu.py`); skipped elsewhere, as in CI.

On the embedded SmolLM2 weights: the fast path (common/fastgen.py: slot KV cache, CUDA graphs, the Triton or flash
decoding attention where the dtype allows it) against plain `generate` (SIT_FAST_GENERATE=0). The two paths draw their random numbers
differently (the fast path samples every slot's token in one call, `generate` one padded batch at a time), so sampled
texts are not expected to match between them. What is compared: greedy texts between the paths (float32, where both
compute the same logits up to rounding), sampled texts at temperature 1 against another run of the same path and seed,
one process or two sharing the GPU, and that what they write is real text.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_lines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMOL = REPO / "data" / "models" / "smollm2-135m-instruct"
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
PLAIN_MESSAGE = "generation: plain transformers generate ("
INSTRUCTIONS = ["What is 2+2?", "Say hi.", "Name a planet.", "Reply with just the word yes.",
                "Write a long story about a dragon who learns to cook pasta in a small Italian village.",
                "Explain in detail how photosynthesis works in plants.", "Give me a tip for sleeping better."]


@pytest.fixture(scope="module")
def smol_gpu():
    if not (SMOL / "config.json").exists():
        pytest.skip(f"the embedded model is missing ({SMOL}): `make prepare` writes it")
    return SMOL


def generate(out, nproc=1, env=None, extra=()):
    """steps/generate.py on the embedded model, instructions and responses sampled at temperature 1 (the recipe's
    top-p, repetition penalty and loop rule); returns (records, stderr)."""
    args = [str(REPO / "steps" / "generate.py"), "--model", "embedded:smollm2", "--out", str(out), "--num-samples",
            "12", "--batch-size", "4", "--max-instruction-tokens", "24", "--max-response-tokens", "32", "--dtype",
            "bfloat16", "--seed", "7", "--instruction-temperature", "1", "--response-temperature", "1", *extra]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(nproc)]
    result = subprocess.run([*launch, *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return read_lines(out), result.stderr


def assert_real_text(records):
    assert len(records) == 12
    for r in records:
        assert r["instruction"].strip()
        assert not any(t in r["instruction"] + r["response"] for t in TEMPLATE_TOKENS)
        if r["instruction_finished"] and not r["rejected"]:
            assert r["response"].strip()
        else:
            assert r["response"] == ""
    assert len({r["instruction"] for r in records}) > 1  # sampled, not one instruction repeated
    assert any(r["response"].strip() for r in records)


def test_sampled_fast_path_reproduces_itself_and_writes_real_text(smol_gpu, tmp_path):
    first, stderr = generate(tmp_path / "first.jsonl")
    assert PLAIN_MESSAGE not in stderr  # the fast path ran
    again, _ = generate(tmp_path / "again.jsonl")
    assert_real_text(first)
    assert again == first


def test_sharded_generation_on_one_gpu_matches_one_process(smol_gpu, tmp_path):
    one, _ = generate(tmp_path / "one.jsonl")
    two, stderr = generate(tmp_path / "two.jsonl", nproc=2)
    assert PLAIN_MESSAGE not in stderr
    assert [r["id"] for r in two] == [r["id"] for r in one] and len({r["id"] for r in two}) == 12
    assert two == one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # shards merged and removed


def test_fast_and_plain_paths_write_the_same_schema(smol_gpu, tmp_path):
    fast, fast_err = generate(tmp_path / "fast.jsonl")
    plain, plain_err = generate(tmp_path / "plain.jsonl", env={"SIT_FAST_GENERATE": "0"})
    assert PLAIN_MESSAGE not in fast_err and f"{PLAIN_MESSAGE}SIT_FAST_GENERATE=0)" in plain_err
    assert [r["id"] for r in fast] == [r["id"] for r in plain]
    assert [sorted(r) for r in fast] == [sorted(r) for r in plain]
    assert [r["settings"] for r in fast] == [r["settings"] for r in plain]
    assert_real_text(fast)
    assert_real_text(plain)


@pytest.fixture(scope="module")
def engines(smol_gpu):
    """The fast and the plain engine on the GPU, float32 (the flash kernel takes no float32: masked SDPA decodes,
    under CUDA graphs)."""
    from common.generation import TransformersEngine

    with pytest.MonkeyPatch.context() as m:
        m.delenv("SIT_FAST_GENERATE", raising=False)
        fast = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4)
        m.setenv("SIT_FAST_GENERATE", "0")
        plain = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4)
    assert fast.fast is not None and fast.fast.graphs_on and plain.fast is None
    return fast, plain


def test_greedy_texts_agree_between_the_fast_and_plain_paths(engines):
    from common.chat import end_of_turn, prompt_text
    from common.generation import Sampling

    fast, plain = engines
    prompts = [prompt_text(fast.tokenizer, t) for t in INSTRUCTIONS]
    sampling = Sampling(max_new_tokens=32, temperature=0, stop_token_ids=fast.stop_token_ids,
                        stop_strings=(end_of_turn(fast.tokenizer, "assistant"),))
    # 7 prompts on 4 slots: slots are refilled, rows end mid-batch and others run to the cap
    got, want = fast.sample(prompts, sampling, seed=0), plain.sample(prompts, sampling, seed=0)
    assert [r["text"] for r in got] == [r["text"] for r in want]
    assert got == want
    assert {r["stop_reason"] for r in want} == {"stop", "length"}
    assert all(r["text"] and not any(t in r["text"] for t in TEMPLATE_TOKENS) for r in got)
    # sampled at temperature 1: the same seed gives the same texts again, another seed others
    sampled = sampling.replace(temperature=1.0, top_p=0.95)
    first = fast.sample(prompts, sampled, seed=1)
    assert fast.sample(prompts, sampled, seed=1) == first and fast.sample(prompts, sampled, seed=2) != first
    assert all(r["text"] and not any(t in r["text"] for t in TEMPLATE_TOKENS) for r in first)


def test_a_longer_call_after_graphs_were_captured_regrows_the_cache(engines):
    """A later call whose prompts need a longer KV cache drops the captured graphs and their memory pool: capturing
    into the pool of freed graphs failed inside PyTorch's allocator (the judge's long prompts after the check)."""
    from common.chat import prompt_text
    from common.generation import Sampling

    fast, plain = engines
    sampling = Sampling(max_new_tokens=8, temperature=0, stop_token_ids=fast.stop_token_ids)
    short = [prompt_text(fast.tokenizer, t) for t in INSTRUCTIONS[:2]]
    fast.sample(short, sampling, seed=0)
    length = fast.fast.cache.length
    long = [prompt_text(fast.tokenizer, "Repeat this: " + "word " * (length + 50))]
    got = fast.sample(long, sampling, seed=0)
    assert fast.fast.cache.length > length and fast.fast.graphs
    assert got == plain.sample(long, sampling, seed=0)


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (16, 2, 128), (9, 3, 64)])  # Llama-8B, Qwen-3B, SmolLM2
@pytest.mark.parametrize("slots", [4, 64])  # few slots: keys split over programs; many: one program a slot and head
def test_the_triton_decoding_kernel_matches_attention_over_each_slots_keys(heads, kv_heads, dim, slots):
    """common/decode_kernel.py on random bf16 queries and a slot cache laid out as fastgen's, each slot holding a
    different number of keys (one of them a single key), against float32 softmax attention over those keys alone;
    keys past a slot's length are huge, so reading any of them would show."""
    from common import decode_kernel

    if not decode_kernel.available():
        pytest.skip("no triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    length = 700
    cache_k = torch.randn(slots, length, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    cache_v = torch.randn(slots, length, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    lengths = torch.randint(1, length + 1, (slots,), device="cuda", generator=g, dtype=torch.int32)
    lengths[0] = 1
    for s, n in enumerate(lengths.tolist()):
        cache_k[s, n:], cache_v[s, n:] = 1e4, 1e4
    q = torch.randn(slots, 1, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    out = decode_kernel.attend(q, cache_k.transpose(1, 2), cache_v.transpose(1, 2), lengths, dim ** -0.5)
    assert out.shape == (slots, 1, heads, dim)
    groups = heads // kv_heads
    for s, n in enumerate(lengths.tolist()):
        keys = cache_k[s, :n].float().transpose(0, 1).repeat_interleave(groups, 0)  # (heads, n, dim)
        values = cache_v[s, :n].float().transpose(0, 1).repeat_interleave(groups, 0)
        want = torch.softmax(q[s].float() @ keys.transpose(1, 2) * dim ** -0.5, -1) @ values  # (heads, 1, dim)
        torch.testing.assert_close(out[s, 0].float(), want[:, 0], atol=2e-2, rtol=2e-2)
