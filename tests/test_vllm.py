"""ENGINE=vllm without vLLM (a GPU package CI does not install): the engine and the judge's structured outputs
against the stand-in of tests/fixtures/stand_ins/vllm, which records what the code asks of vLLM and answers with the
token ids each test chooses."""

import json
import shutil
import sys

import pytest
from conftest import REPO, read_lines

from common.generation.engines import load_engine
from common.generation.sampling import Sampling
from common.models import EMBEDDED_DEFAULT


@pytest.fixture
def vllm(monkeypatch):
    """The stand-in vllm package, imported fresh; gone again after the test."""
    def forget():
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]

    forget()
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures" / "stand_ins"))
    import vllm

    yield vllm
    forget()


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_engine_hands_vllm_every_sampling_setting_and_reads_its_rows(vllm, smol, tmp_path, monkeypatch):
    adapter = tmp_path / "sft"  # its tokenizer formats the prompts
    adapter.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, adapter)
    engine = load_engine("vllm", "embedded:smollm2", dtype="float32", adapter=str(adapter))
    [llm] = vllm.LLM.instances
    assert llm.model == str(EMBEDDED_DEFAULT)
    assert {k: llm.kwargs[k] for k in ("dtype", "seed", "quantization", "enable_lora")} == {
        "dtype": "float32", "seed": 0, "quantization": None, "enable_lora": True}

    tok, stop = engine.tokenizer, engine.tokenizer.eos_token_id
    world, more = ids_of(tok, " world"), ids_of(tok, " and so on and on")
    sampling = Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1,
                        stop_token_ids=(stop,), stop_strings=("###",), suppress_at_start=(5, 6))
    prompts = ["Hello", "Hi there", "Bye"]
    first = {0: ids_of(tok, "Hello")[:1], 1: [stop], 2: ids_of(tok, " Bye")[:1]}  # row 1 ends at its first token
    first_of = {tuple(ids_of(tok, p)): first[i] for i, p in enumerate(prompts)}

    def respond(self, prompt, params):  # row 0 stops (vLLM may add tokens after the stop), row 2 runs to the cap
        if params.max_tokens == 1:
            return first_of[tuple(prompt)]
        return world + [stop, 7, 7] if prompt == ids_of(tok, "Hello") + first[0] else more[:params.max_tokens]

    monkeypatch.setattr(vllm.LLM, "respond", respond)
    results = engine.sample(prompts, sampling, seed=3)

    suppress, rest = llm.calls
    assert suppress["prompts"] == [ids_of(tok, p) for p in prompts]
    assert rest["prompts"] == [ids_of(tok, "Hello") + first[0], ids_of(tok, "Bye") + first[2]]  # row 1 is done
    for call in (suppress, rest):
        assert call["lora_request"].lora_path == str(adapter)
        for p in call["params"]:
            assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.stop, p.stop_token_ids) == (
                0.7, 0.9, 20, 1.1, ["###"], [stop])
            assert p.ignore_eos and not p.skip_special_tokens  # stops are the sampling's own; template text kept
    assert [p.max_tokens for p in suppress["params"]] == [1, 1, 1]
    allowed = suppress["params"][0].allowed_token_ids
    assert 5 not in allowed and 6 not in allowed and len(allowed) == len(tok) - 2
    assert [p.max_tokens for p in rest["params"]] == [4, 4] and rest["params"][0].allowed_token_ids is None
    # a seed per prompt (its position in the call), so results do not depend on how vLLM batches
    assert [p.seed for p in suppress["params"]] == [3 * 100_003 + i for i in range(3)]
    assert [p.seed for p in rest["params"]] == [4 * 100_003, 4 * 100_003 + 2]

    assert results[0] == {"text": tok.decode(first[0] + world).strip(), "finished": True, "stop_reason": "stop",
                          "tokens": 1 + len(world) + 1}
    assert results[1] == {"text": "", "finished": True, "stop_reason": "stop", "tokens": 1}
    assert results[2]["finished"] is False and results[2]["stop_reason"] == "length" and results[2]["tokens"] == 5
    greedy = engine._params(Sampling(max_new_tokens=4, temperature=0, top_p=0.5, top_k=7), seed=0, i=0)
    assert (greedy.temperature, greedy.top_p, greedy.top_k) == (0, 1.0, 0)  # greedy: no truncation of the choice


ANSWER = {"category": "Math", "reason": "Asks for one concrete sum.", "input_quality": "good", "difficulty": "easy",
          "safety": "safe"}


@pytest.mark.parametrize("api", ["structured_outputs", "guided_decoding"])  # vLLM >= 0.11, and before it
def test_the_judge_on_vllm_constrains_its_answers_to_the_schema(vllm, smol, tmp_path, monkeypatch, api):
    """judge.py --engine vllm: every answer is decoded under the answer's JSON schema, with no prefill and no '}'
    stop; an answer outside the lists is asked again once, and the tags come from the answers."""
    import judge

    from common.rubric import PREFILL, SCHEMA

    if api == "guided_decoding":
        monkeypatch.delattr(vllm.sampling_params, "StructuredOutputsParams")
    records = [{"id": "a", "instruction": "What is 2 + 2?", "response": "4"},
               {"id": "b", "instruction": "What is 3 + 5?", "response": "8"}]
    src, out = tmp_path / "generated.jsonl", tmp_path / "judged.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))

    tok = judge.load_tokenizer("embedded:smollm2")

    def respond(llm, prompt, params):  # the first answer about "3 + 5" names no listed category
        bad = "3 + 5" in tok.decode(prompt) and len(llm.calls) == 1
        return ids_of(tok, json.dumps({**ANSWER, "category": "Arithmetic" if bad else "Math"})) + [tok.eos_token_id]

    monkeypatch.setattr(vllm.LLM, "respond", respond)
    judge.main(["--in", str(src), "--out", str(out), "--model", "embedded:smollm2", "--engine", "vllm",
                "--dtype", "float32"])
    [llm] = vllm.LLM.instances
    first, retry = llm.calls
    assert len(first["prompts"]) == 2 and len(retry["prompts"]) == 1
    assert "Your previous answer could not be used (category 'Arithmetic'" in tok.decode(retry["prompts"][0])
    for call in (first, retry):
        for prompt, params in zip(call["prompts"], call["params"]):
            assert not tok.decode(prompt).endswith(PREFILL)  # the schema starts the answer, not a prefill
            assert getattr(params, api).json == SCHEMA
            assert getattr(params, {"structured_outputs": "guided_decoding"}.get(api, "structured_outputs")) is None
            assert "}" not in params.stop and params.temperature == 0
    judged = read_lines(out)
    assert [r["tags"] for r in judged] == [{"category": "Math", "input_quality": "good", "difficulty": "easy",
                                            "safety": "safe", "quality_reason": ANSWER["reason"]}] * 2
    assert all(r["judge"]["engine"] == "vllm" and r["judge"]["constrained"] == "json schema (vLLM)" for r in judged)
    assert not any("judge_unparsed" in r for r in judged)
