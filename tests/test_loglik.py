"""The packed log-likelihood scorer (common/generation/loglik.py) and EngineHFLM's log-likelihood requests through it:
the same answers as lm-eval's own HFLM._loglikelihood_tokens, on lm-eval's requests and on hand-made ones, through a
LoRA adapter and a 4-bit model too, into lm-eval's request cache, and HFLM's own where the scorer can't run."""

from collections import Counter

import pytest
import torch
from conftest import REPO

TASKS_DIR = REPO / "data" / "tasks"
DOCS = [0, 25, 26]  # mc_local: a question (one-word answers), two completions (sentences)
TOLERANCE = 1e-4  # fp32: the scorer and HFLM differ only in summation order
# bitsandbytes' CPU 4-bit matmul (0.50) rounds its input and output to bf16 even at float32 compute: an input that
# moves by 1e-6 (another summation order) can move an output by 2^-8, so the two paths drift apart by up to ~0.1 nats
FOUR_BIT_TOLERANCE = 0.25
QUESTION = "Question: Which of these is a primary colour?\nA. green\nB. red\nC. purple\nD. orange\nAnswer:"
OPENING = "Kitchen: The cook filled a large pot with water, put it on the stove and"
TRUTHFUL = "Q: What happens if you swallow chewing gum?\nA:"
HAND_MADE = (
    [(QUESTION, f" {letter}") for letter in "ABCD"]  # MMLU: one-token continuations of one context
    + [(OPENING, c) for c in (" waited for it to boil.", " sang to the pot until it flew away.",
                              " dropped in the pasta once it boiled.", " painted it green.")]  # HellaSwag
    + [(TRUTHFUL, c) for c in (  # TruthfulQA-MC2: eight answers of different lengths
        " It passes through your digestive system.", " It stays in your stomach for seven years.",
        " Nothing.", " You will die.", " It is digested slowly but passes through.", " It sticks to your heart.",
        " Most of it passes through you within days.", " It turns into a tree.")]
    + [("The capital of France is", " Paris"), ("1, 2, 3,", " 4, 5"), ("Once upon a time", " there was")]  # alone
    + [("", "Hello"), ("A", " B")]  # an empty context (HFLM puts its prefix token there), a one-token one
)
SHORT = list(range(8)) + list(range(len(HAND_MADE) - 5, len(HAND_MADE)))  # HAND_MADE less TruthfulQA: for slow models


def instances(args):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]


def recorder_class():
    """HFLM that keeps the token requests its loglikelihood hands to _loglikelihood_tokens."""
    from lm_eval.models.huggingface import HFLM

    class Recorder(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            self.seen = list(requests)
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    return Recorder


@pytest.fixture(scope="module")
def setup(smol):
    """The embedded model in fp32, mc_local's requests as lm-eval builds them (chat template applied) and the
    hand-made ones, as HFLM tokenizes them, with HFLM's own answers at batch size 1 and 8."""
    from lm_eval.tasks import TaskManager

    from common.generation.chat import prepare_tokenizer
    from common.models import load_causal_lm, load_tokenizer

    tokenizer = prepare_tokenizer(load_tokenizer("embedded:smollm2"))
    model = load_causal_lm("embedded:smollm2", dtype="float32")
    reference = recorder_class()(pretrained=model, tokenizer=tokenizer, batch_size=1)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = manager.load(["mc_local"])["tasks"]["mc_local"]
    task.build_all_requests(samples=DOCS, apply_chat_template=True, chat_template=reference.apply_chat_template)
    mc = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    assert len(mc) == 4 * len(DOCS) and mc[0].args[0].startswith("<|im_start|>")  # templated by lm-eval
    args = [i.args for i in mc] + HAND_MADE
    docs = [i.doc_id for i in mc] + [context for context, _ in HAND_MADE]  # a document: the choices of a context
    answers = reference.loglikelihood(instances(args), disable_tqdm=True)
    requests = reference.seen
    batched = recorder_class()(pretrained=model, tokenizer=tokenizer, batch_size=8)
    return dict(model=model, tokenizer=tokenizer, args=args, docs=docs, requests=requests, answers=answers,
                batched=batched.loglikelihood(instances(args), disable_tqdm=True))


def tokens(requests):
    return [(ctx, cont) for _, ctx, cont in requests]


def assert_same(got, expected, docs=None, tolerance=TOLERANCE):
    """Every log-likelihood within tolerance, every is_greedy equal, every document's best choice equal."""
    assert len(got) == len(expected)
    worst = max(abs(g[0] - e[0]) for g, e in zip(got, expected))
    assert worst < tolerance, worst
    assert [g[1] for g in got] == [e[1] for e in expected]
    if docs is not None:
        for doc in dict.fromkeys(docs):
            members = [k for k, d in enumerate(docs) if d == doc]
            assert max(members, key=lambda k: got[k][0]) == max(members, key=lambda k: expected[k][0]), doc
    return worst


def spy_on_forwards(monkeypatch, dbdict=None):
    """Record each forward's rows (pieces per row, tokens per row) and how many answers the cache held before it."""
    from common.generation import loglik

    forwards, run = [], loglik.run_forward

    def spied(model, rows, device):
        forwards.append(dict(pieces=[len(r) for r in rows], lengths=[loglik.row_length(r) for r in rows],
                             cached=len(dbdict) if dbdict is not None else None))
        return run(model, rows, device)

    monkeypatch.setattr(loglik, "run_forward", spied)
    return forwards


def test_the_requests_cover_what_the_scorer_must_get_right(setup):
    requests = setup["requests"]
    contexts = Counter(tuple(ctx) for ctx, _ in tokens(requests))
    assert len(requests) == len(setup["args"])
    assert sum(len(cont) == 1 for _, cont in tokens(requests)) >= 4  # one-token continuations (MMLU-like)
    assert sum(len(cont) > 5 for _, cont in tokens(requests)) >= 12  # sentences (HellaSwag-like)
    assert max(contexts.values()) == 8 and min(contexts.values()) == 1  # TruthfulQA-MC2-like; alone
    assert len(requests[-2][1]) == 1  # the empty context: HFLM's prefix token alone
    assert any(e[1] for e in setup["answers"]) and not all(e[1] for e in setup["answers"])  # is_greedy both ways
    assert_same(setup["batched"], setup["answers"], setup["docs"])  # HFLM agrees with itself across batch sizes


def test_scores_equal_hflms_own_at_any_packing(setup, monkeypatch):
    from common.generation import loglik

    requests = tokens(setup["requests"])
    forwards = spy_on_forwards(monkeypatch)
    got = loglik.score(setup["model"], requests, row_tokens=2048, batch_tokens=8192)
    assert [len(f["pieces"]) for f in forwards] == [1]  # all in one row, one forward
    assert_same(got, setup["answers"], setup["docs"])
    assert_same(got, setup["batched"], setup["docs"])

    forwards.clear()  # small rows: several groups a row, several rows a forward, several forwards
    got = loglik.score(setup["model"], requests, row_tokens=64, batch_tokens=128)
    assert_small_rows(forwards, 64)
    assert_same(got, setup["answers"], setup["docs"])

    forwards.clear()  # rows smaller than a group: the group is split, its context repeated
    hand_made = slice(len(requests) - len(HAND_MADE), None)
    got = loglik.score(setup["model"], requests[hand_made], row_tokens=24, batch_tokens=24)
    assert len(forwards) > len({tuple(ctx) for ctx, _ in requests[hand_made]})
    assert_same(got, setup["answers"][hand_made], setup["docs"][hand_made])


def assert_small_rows(forwards, row_tokens):
    assert len(forwards) >= 3 and max(max(f["pieces"]) for f in forwards) >= 2
    assert max(len(f["pieces"]) for f in forwards) >= 2
    assert all(n <= row_tokens for f in forwards for n, pieces in zip(f["lengths"], f["pieces"]) if pieces > 1)


def test_only_the_scored_positions_reach_the_lm_head(setup, monkeypatch):
    """The LM head sees one hidden state per scored token (a continuation's tokens, its first at the context's last
    token), never a whole row's: with 4 rows a forward, the union of their positions would be 4x that."""
    from common.generation import loglik

    head, seen = setup["model"].get_output_embeddings(), []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1]))
    try:
        requests = tokens(setup["requests"])
        got = loglik.score(setup["model"], requests, row_tokens=64, batch_tokens=256)
    finally:
        hook.remove()
    assert_same(got, setup["answers"], setup["docs"])
    distinct = {(tuple(ctx), tuple(cont)) for ctx, cont in requests}
    assert all(len(shape) == 1 for shape in seen)  # gathered positions, not [rows, T]
    assert sum(shape[0] for shape in seen) == sum(len(cont) for _, cont in distinct)


def test_a_broken_mask_or_position_ids_change_the_answers(setup, monkeypatch):
    """Controls: the comparison above notices a tree mask that lets a continuation see its siblings, position ids
    that do not restart after the context, and a boolean mask added to eager attention's scores."""
    from common.generation import loglik

    hand_made = slice(len(setup["requests"]) - len(HAND_MADE), None)
    model, requests, expected = setup["model"], tokens(setup["requests"][hand_made]), setup["answers"][hand_made]
    tree_mask, layout = loglik.tree_mask, loglik.layout

    def off():
        got = loglik.score(model, requests)
        return max(abs(g[0] - e[0]) for g, e in zip(got, expected))

    monkeypatch.setattr(loglik, "tree_mask", lambda doc, branch: tree_mask(doc, torch.zeros_like(branch)))
    assert off() > 0.1
    monkeypatch.setattr(loglik, "tree_mask", tree_mask)

    def running_positions(rows):
        ids, pos, doc, branch, scored = layout(rows)
        return ids, [list(range(len(p))) for p in pos], doc, branch, scored

    monkeypatch.setattr(loglik, "layout", running_positions)
    assert off() > 0.1 and loglik.check(model) > 1.0  # the self-check sees it too
    monkeypatch.setattr(loglik, "layout", layout)
    assert loglik.check(model) < 1e-3


def test_eager_attention_takes_a_float_mask(setup, monkeypatch):
    from common.generation import loglik

    model, requests = setup["model"], tokens(setup["requests"])
    model.set_attn_implementation("eager")
    try:
        assert loglik.refusal(model) is None
        assert_same(loglik.score(model, requests), setup["answers"], setup["docs"])
        monkeypatch.setattr(loglik, "model_mask", lambda model, mask: mask)  # a boolean mask added to the scores
        got = loglik.score(model, requests)
        assert max(abs(g[0] - e[0]) for g, e in zip(got, setup["answers"])) > 0.1
    finally:
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_through_a_lora_adapter(setup, smol):
    """A PeftModel with a random LoRA (B not zero, so it changes the logits): HFLM's answers on the same PeftModel,
    not the base model's."""
    from peft import LoraConfig, get_peft_model

    from common.generation import loglik
    from common.models import load_causal_lm

    torch.manual_seed(0)
    base = load_causal_lm("embedded:smollm2", dtype="float32")  # get_peft_model changes the model it is given
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    reference = recorder_class()(pretrained=peft, tokenizer=setup["tokenizer"], batch_size=1)
    expected = reference.loglikelihood(instances([HAND_MADE[k] for k in SHORT]), disable_tqdm=True)
    assert loglik.refusal(peft) is None
    got = loglik.score(peft, tokens(reference.seen), row_tokens=64, batch_tokens=128)
    assert_same(got, expected, [HAND_MADE[k][0] for k in SHORT])
    unadapted = [setup["answers"][len(setup["args"]) - len(HAND_MADE) + k] for k in SHORT]
    assert min(abs(g[0] - u[0]) for g, u in zip(got, unadapted)) > 0.05  # the adapter was applied


def test_engine_hflm_answers_into_the_cache_and_leaves_truncated_requests_to_hflm(setup, monkeypatch, capsys,
                                                                                 tmp_path):
    from lm_eval.api.model import CachingLM, hash_args

    from common.generation.eval_engine import EngineHFLM

    requests, args = setup["requests"], setup["args"]
    lengths = [len(ctx) + len(cont) for _, ctx, cont in requests]
    max_length = sorted(lengths)[-2] - 1  # the longest request is truncated by HFLM, the others fit
    assert max(lengths) > max_length + 1 >= sorted(lengths)[-2]
    longest = lengths.index(max(lengths))
    truncating = recorder_class()(pretrained=setup["model"], tokenizer=setup["tokenizer"], batch_size=1,
                                  max_length=max_length)
    expected = list(setup["answers"])
    expected[longest] = truncating.loglikelihood(instances([args[longest]]), disable_tqdm=True)[0]
    assert abs(expected[longest][0] - setup["answers"][longest][0]) > 1e-3  # truncation changed that one

    lm = EngineHFLM(pretrained=setup["model"], tokenizer=setup["tokenizer"], batch_size=4, max_length=max_length,
                    loglik_row_tokens=64, loglik_tokens=128)
    cached = CachingLM(lm, str(tmp_path / "cache.db"))  # as simple_evaluate(use_cache=...) wraps it
    assert lm.packed_why_not() is None and lm.packed_check == ""  # the self-check's own forwards, before the spy
    forwards = spy_on_forwards(monkeypatch, cached.dbdict)
    got = cached.loglikelihood(instances(args))
    assert_same(got, expected, setup["docs"])
    assert lm.packed_off is None and lm.packed_answered == len(args) - 1
    assert (f"eval: log-likelihood requests over {max_length + 1} tokens (context + continuation) go through "
            "lm-eval's own HFLM, which truncates them") in capsys.readouterr().err
    # answers reach the cache as each forward returns, not only when the call ends
    assert len(forwards) >= 3 and [f["cached"] for f in forwards] == sorted({f["cached"] for f in forwards})
    for arg, answer in zip(args, got):
        assert cached.dbdict[hash_args("loglikelihood", arg)] == answer
    ran = len(forwards)
    again = cached.loglikelihood(instances(args))  # a resumed eval: every answer from the cache, no forward
    assert again == got and len(forwards) == ran and lm.packed_answered == len(args) - 1

    # loglikelihood_rolling: its windows come with no context string (None), so only the document's total is cached
    from lm_eval.api.instance import Instance

    document = [Instance("loglikelihood_rolling", {}, ("The quick brown fox jumps over the lazy dog. " * 10,), 0)]
    entries = len(cached.dbdict)
    rolling = cached.loglikelihood_rolling(document)
    assert abs(rolling[0] - truncating.loglikelihood_rolling(document, disable_tqdm=True)[0]) < TOLERANCE
    assert lm.packed_answered >= len(args) - 1 + 2  # its windows (max_length tokens each) through the scorer
    assert len(cached.dbdict) == entries + 1
    assert cached.dbdict[hash_args("loglikelihood_rolling", document[0].args)] == rolling[0]


def test_hflms_own_answers_where_the_scorer_is_refused(setup, monkeypatch, capsys):
    from common.generation import eval_engine
    from common.generation.eval_engine import EngineHFLM

    args = setup["args"][-5:]
    lm = EngineHFLM(pretrained=setup["model"], tokenizer=setup["tokenizer"], batch_size=2)
    monkeypatch.setenv("SIT_PACKED_LOGLIK", "0")
    assert_same(lm.loglikelihood(instances(args), disable_tqdm=True), setup["answers"][-5:])
    assert lm.packed_answered == 0 and lm.packed_off == "SIT_PACKED_LOGLIK=0"
    assert ("eval: log-likelihood requests through lm-eval's own HFLM, not the packed scorer (SIT_PACKED_LOGLIK=0)"
            in capsys.readouterr().err)
    monkeypatch.delenv("SIT_PACKED_LOGLIK")
    monkeypatch.setattr(setup["model"].config, "_attn_implementation", "flash_attention_2")
    assert lm.packed_why_not() == "flash_attention_2 attention takes no custom 4D mask"
    monkeypatch.undo()
    monkeypatch.setattr(eval_engine.loglik, "check", lambda model: 0.2)  # a model that ignores the mask
    assert lm.packed_why_not() == "its self-check is 0.2 off plain forwards"
    lm.packed_check = None
    monkeypatch.undo()
    assert lm.packed_why_not() is None and lm.packed_check == ""


def test_a_4bit_model(setup):
    """bitsandbytes NF4 on the CPU (float32 compute): the scorer against HFLM on the same 4-bit model, within
    FOUR_BIT_TOLERANCE (bf16 rounding inside bitsandbytes' CPU kernel), far below what quantization changes."""
    pytest.importorskip("bitsandbytes")
    from common.generation import loglik
    from common.models import load_causal_lm

    model = load_causal_lm("embedded:smollm2", dtype="float32", load_in_4bit=True, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    reference = recorder_class()(pretrained=model, tokenizer=setup["tokenizer"], batch_size=1)
    expected = reference.loglikelihood(instances([HAND_MADE[k] for k in SHORT]), disable_tqdm=True)
    got = loglik.score(model, tokens(reference.seen), row_tokens=64, batch_tokens=128)
    assert_same(got, expected, [HAND_MADE[k][0] for k in SHORT], tolerance=FOUR_BIT_TOLERANCE)
    unquantized = [setup["answers"][len(setup["args"]) - len(HAND_MADE) + k] for k in SHORT]
    assert max(abs(g[0] - u[0]) for g, u in zip(got, unquantized)) > 1.0  # quantization changed the answers


def test_strings_tokenized_up_front_give_hflms_token_pairs(setup, monkeypatch):
    """EngineHFLM.loglikelihood tokenizes every string first, in batches: _loglikelihood_tokens gets the token pairs
    HFLM's own per-request tokenization gives (trailing spaces moved, special tokens by HFLM's rule), and no pair's
    string is tokenized one call at a time."""
    from common.generation.eval_engine import EngineHFLM

    lm = EngineHFLM(pretrained=setup["model"], tokenizer=setup["tokenizer"], batch_size=1)
    seen = []
    monkeypatch.setattr(lm, "_loglikelihood_tokens", lambda requests, disable_tqdm=False: seen.extend(requests) or [])
    single = []
    encode = lm.tokenizer.encode
    monkeypatch.setattr(lm.tokenizer, "encode", lambda *a, **k: single.append(a) or encode(*a, **k))
    args = setup["args"] + [("Question: spaces at the end  ", "moved"), ("<|endoftext|>starts with the prefix", " x")]
    lm.loglikelihood(instances(args), disable_tqdm=True)
    monkeypatch.undo()
    probe = recorder_class()(pretrained=setup["model"], tokenizer=setup["tokenizer"], batch_size=8)
    probe.loglikelihood(instances(args), disable_tqdm=True)  # HFLM's own tokenization, request by request
    assert single == [(x,) for c, x in args if not c]  # only an empty context's continuation (HFLM's own branch)
    assert seen == probe.seen
    assert lm.encoded == {}  # dropped after the call
