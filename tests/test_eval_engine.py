"""The eval step's generative requests through the fast engine (common/generation/eval_engine.py): the same answers as
lm-eval's own HFLM.generate_until, into lm-eval's request cache, and HFLM's own generate where the engine can't run."""

import pytest
import torch
from conftest import REPO

TASKS_DIR = REPO / "data" / "tasks"
PROMPTS = 5  # ifeval_local's first prompts
MAX_GEN_TOKS = 32
STOPPED = 2  # the first prompts again, with stop strings
# A near-tie between the two best tokens could go either way under a different summation order (the engine's batch
# against generate's single row): prompts whose engine answer passes one closer than this (in logits) are not compared.
MIN_MARGIN = 1e-3


@pytest.fixture(scope="module")
def setup(smol):
    """The embedded model in fp32 (the exact comparison), the tokenizer as the eval step prepares it, ifeval_local
    requests as lm-eval builds them (chat template applied) and HFLM's own answers to them at batch size 1."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from common.generation.chat import prepare_tokenizer
    from common.models import load_causal_lm, load_tokenizer

    tokenizer = prepare_tokenizer(load_tokenizer("embedded:smollm2"))
    model = load_causal_lm("embedded:smollm2", dtype="float32")
    probe = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = manager.load(["ifeval_local"])["tasks"]["ifeval_local"]
    task.set_config(key="generation_kwargs", value={"max_gen_toks": MAX_GEN_TOKS}, update=True)  # as --max-gen-toks
    task.build_all_requests(limit=PROMPTS, apply_chat_template=True, chat_template=probe.apply_chat_template)
    ifeval = [i.args for i in sorted(task.instances, key=lambda i: i.doc_id)]
    assert len(ifeval) == PROMPTS and ifeval[0][0].startswith("<|im_start|>")  # templated by lm-eval
    args = ifeval + [  # a second group: stop strings that end answers early
        (context, {**kwargs, "until": ["\n\n", "."]}) for context, kwargs in ifeval[:STOPPED]
    ] + [(ifeval[3][0], {**ifeval[3][1], "max_gen_toks": 8, "repetition_penalty": 1.3})]  # left to HFLM
    # max_length so that the longest prompt is left-truncated and the others are not
    lengths = sorted(len(probe.tok_encode(context)) for context, _ in ifeval)
    max_length = lengths[-2] + 1 + MAX_GEN_TOKS
    assert lengths[-1] > max_length - MAX_GEN_TOKS
    requests = [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=max_length)
    answers = reference.generate_until(requests)
    return dict(model=model, tokenizer=tokenizer, requests=requests, answers=answers, max_length=max_length)


def spy_on_engine(monkeypatch, dbdict=None):
    """Record every engine call (prompts, rows, and which answers the request cache held when it started)."""
    from common.generation import eval_engine

    calls, make = [], eval_engine.fastgen.make_generator

    def make_generator(model, pad_token_id, slots=None):
        generator, why_not = make(model, pad_token_id, slots=slots)
        if generator is not None:
            generate = generator.generate

            def spied(prompts, sampling, extra_processors=()):
                cached = len(dbdict) if dbdict is not None else None
                rows, looped = generate(prompts, sampling, extra_processors)
                calls.append(dict(prompts=prompts, rows=rows, cached=cached))
                return rows, looped

            generator.generate = spied
        return generator, why_not

    monkeypatch.setattr(eval_engine.fastgen, "make_generator", make_generator)
    return calls


def smallest_margins(model, calls):
    """Per prompt, the smallest gap between the best and second-best logit along the engine's greedy answer (a plain
    forward of prompt + answer); also checks the answer is that forward's argmax throughout."""
    margins = {}
    with torch.no_grad():
        for call in calls:
            for prompt, row in zip(call["prompts"], call["rows"]):
                logits = model(torch.tensor([prompt + row[:-1]])).logits[0, len(prompt) - 1 :].float()
                top = logits.topk(2, dim=-1)
                clear = top.values[:, 0] - top.values[:, 1] > MIN_MARGIN
                assert (top.indices[:, 0] == torch.tensor(row))[clear].all()
                margin = float((top.values[:, 0] - top.values[:, 1]).min())
                margins[tuple(prompt)] = min(margin, margins.get(tuple(prompt), margin))
    return margins


def test_generative_answers_through_the_engine_equal_lm_evals_own_and_reach_the_cache(setup, monkeypatch, capsys,
                                                                                         tmp_path):
    from lm_eval.api.model import CachingLM, hash_args

    from common.generation.eval_engine import ENGINE_CALL_SLOTS, EngineHFLM

    model, requests, expected = setup["model"], setup["requests"], setup["answers"]
    attention = model.config._attn_implementation
    lm = EngineHFLM(pretrained=model, tokenizer=setup["tokenizer"], batch_size=4, max_length=setup["max_length"])
    cached = CachingLM(lm, str(tmp_path / "cache.db"))  # as simple_evaluate(use_cache=...) wraps it
    calls = spy_on_engine(monkeypatch, cached.dbdict)
    answers = cached.generate_until(requests)

    # the engine ran: one call per group of options (fewer requests than ENGINE_CALL_SLOTS x 4 slots); the last
    # request (repetition_penalty) went to HFLM's own generate, said once
    engine_requests = PROMPTS + STOPPED
    assert engine_requests < ENGINE_CALL_SLOTS * 4
    assert lm.engine_off is None and lm.engine_answered == len(requests) - 1 == engine_requests
    assert [len(c["prompts"]) for c in calls] == [PROMPTS, STOPPED]
    assert "with options repetition_penalty=1.3 go through lm-eval's own generate" in capsys.readouterr().err
    # answers reach the cache as each engine call returns, not only when generate_until ends
    assert [c["cached"] for c in calls] == [0, PROMPTS]

    margins = smallest_margins(model, calls)
    prompts = [tuple(lm.encode_context(r.args[0], setup["max_length"] - MAX_GEN_TOKS)) for r in requests[:-1]]
    clear = [i for i, p in enumerate(prompts) if margins[p] > MIN_MARGIN]
    assert len(clear) >= engine_requests - 2, margins  # the comparison covers most requests
    assert [answers[i] for i in clear] == [expected[i] for i in clear]
    assert answers[-1] == expected[-1]  # HFLM's own answer, back in its place
    assert all(a.strip() for a in answers)  # real answers, not empty strings
    # the stop strings cut the second group's answers short of the first's; the longest prompt was left-truncated
    assert all(len(answers[PROMPTS + k]) < len(answers[k]) for k in range(STOPPED))
    assert max(len(c) for c in calls[0]["prompts"]) == setup["max_length"] - MAX_GEN_TOKS
    # the model is left as loaded (log-likelihood requests run on it next)
    assert model.config._attn_implementation == attention

    for request, answer in zip(requests, answers):
        assert cached.dbdict[hash_args("generate_until", request.args)] == answer
    again = cached.generate_until(requests)  # a resumed eval: every answer from the cache, no engine call
    assert again == answers and len(calls) == 2 and lm.engine_answered == engine_requests


def test_lm_evals_own_generate_answers_when_the_engine_is_refused(setup, monkeypatch, capsys):
    from common.generation.eval_engine import EngineHFLM

    monkeypatch.setenv("SIT_FAST_GENERATE", "0")
    model, requests = setup["model"], setup["requests"][PROMPTS : PROMPTS + STOPPED]  # short answers (stop strings)
    lm = EngineHFLM(pretrained=model, tokenizer=setup["tokenizer"], batch_size=1, max_length=setup["max_length"])
    calls = spy_on_engine(monkeypatch)
    answers = lm.generate_until(requests)
    assert answers == setup["answers"][PROMPTS : PROMPTS + STOPPED]  # HFLM's, computed as the reference was
    assert lm.engine_answered == 0 and calls == [] and lm.engine_off == "SIT_FAST_GENERATE=0"
    assert "eval: generative requests through lm-eval's own generate (SIT_FAST_GENERATE=0)" in capsys.readouterr().err
