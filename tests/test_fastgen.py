"""The fast generation path (common/generation/fastgen.py) on the CPU, against transformers' own `generate`.

SlotGenerator runs eagerly on the CPU (no CUDA graphs, masked SDPA over gathered pages instead of the Triton kernel),
so its scheduling (slots refilled, empty slots, tail compaction, rows ending mid-batch), its paged KV cache (pages
taken as rows grow, given back and reused, admission waiting for pages, rows that outgrow the pages resumed), sampling
and loop rule are checked here, in CI, and
so is the engine's choice between it and plain `generate` (SIT_FAST_GENERATE=0, or a fast path that cannot run);
tests/test_gpu.py runs it with CUDA graphs and flash attention."""

import math
import re
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import NearTie, assert_same_greedy_rows
from transformers import LogitsProcessorList

from common import SetupError
from common.generation import decode_kernel, engines, fastgen, patching, runner, sampler, scheduler
from common.generation.attention import SLOT_ATTENTION
from common.generation.cache import PagedCache
from common.generation.chat import end_of_turn, prepare_tokenizer, prompt_text
from common.generation.engines import LoopCriterion, TransformersEngine, stop_ids
from common.generation.pages import PageTable
from common.generation.sampling import Sampling, looping
from common.models import load_causal_lm, load_tokenizer

MAX_NEW = 32
# Greedy SmolLM2 answers (checked in `reference` below): the first three end on <|im_end|> well before MAX_NEW
# tokens, the last two run to the cap. Prompts of different lengths, so prefill pads.
INSTRUCTIONS = {
    "sum": "What is 2+2?",
    "yes": "Reply with just the word yes.",
    "hi": "Say hi.",
    "story": "Write a long story about a dragon who learns to cook pasta in a small Italian village by the sea.",
    "photo": "Explain in detail how photosynthesis works in plants.",
}
SHORT, LONG = ("sum", "yes", "hi"), ("story", "photo")
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
# Engine and generate sum in other orders (batch, padding, masked SDPA): fp32 logits ~1e-5 apart. A row departing
# between two tokens closer than this is a near-tie, reported; any other departure fails (assert_same_greedy_rows).
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def tokenizer(smol):
    return prepare_tokenizer(load_tokenizer("embedded:smollm2"))


@pytest.fixture(scope="module")
def reference_model(smol):
    """The model as transformers loads it (stock attention): what plain `generate` runs."""
    return load_causal_lm("embedded:smollm2", dtype="float32")


@pytest.fixture(scope="module")
def fast_model(smol):
    """A second copy for SlotGenerator, which switches its model's attention to the slot attention."""
    return load_causal_lm("embedded:smollm2", dtype="float32")


@pytest.fixture(scope="module")
def stops(tokenizer, reference_model):
    return stop_ids(tokenizer, reference_model)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ids = {k: tokenizer(prompt_text(tokenizer, text), add_special_tokens=False)["input_ids"]
           for k, text in INSTRUCTIONS.items()}
    assert len({len(p) for p in ids.values()}) == len(ids)  # all lengths differ
    return ids


def greedy_generate(model, tokenizer, prompt, stops, max_new):
    """One prompt through plain greedy `generate`, nothing added by any config: the generated ids (stop included)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=list(stops),
                              pad_token_id=tokenizer.pad_token_id, top_k=None, top_p=None, temperature=None)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(reference_model, tokenizer, prompts, stops):
    rows = {k: greedy_generate(reference_model, tokenizer, p, stops, MAX_NEW) for k, p in prompts.items()}
    # What the tests below rely on: short rows stop mid-batch, long rows run to the cap.
    for k in SHORT:
        assert rows[k][-1] in stops and len(rows[k]) < MAX_NEW, (k, tokenizer.decode(rows[k]))
    for k in LONG:
        assert len(rows[k]) == MAX_NEW and not set(rows[k]) & set(stops), (k, tokenizer.decode(rows[k]))
    return rows


@pytest.fixture(scope="module")
def as_generate(reference_model, prompts, reference):
    """Check greedy rows for prompts[keys] against generate's (`reference`, its first `cap` tokens), near-ties apart."""
    def check(keys, rows, cap=None):
        expected = [reference[k][:cap] for k in keys]
        return assert_same_greedy_rows(reference_model, [prompts[k] for k in keys], rows, expected, NEAR_TIE)
    return check


def greedy(stops, **changes):
    return Sampling(max_new_tokens=MAX_NEW, temperature=0, stop_token_ids=stops).replace(**changes)


def spy(generator):
    """Record every decoding step's slot count and every prefill's slots on the generator."""
    steps, prefills = [], []
    step, prefill = generator.step, generator.prefill

    def spy_step(slots, length):
        steps.append(slots)
        return step(slots, length)

    def spy_prefill(assignments):
        prefills.append([s for s, _ in assignments])
        return prefill(assignments)

    generator.step, generator.prefill = spy_step, spy_prefill
    return steps, prefills


# ---- greedy: the same tokens as generate -------------------------------------------------------------------------

class FixedLogits:
    """A stand-in model whose next-token logits are `scores` at every position."""

    device = torch.device("cpu")

    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def __call__(self, input_ids):
        return SimpleNamespace(logits=self.scores.expand(1, input_ids.shape[1], -1))


def test_the_near_tie_guard_reports_a_tie_and_fails_any_other_difference(tokenizer, reference, as_generate):
    """The control of every comparison with generate below: a departure between two tokens within NEAR_TIE of the
    best logit is reported, one further apart fails, as does a wrong or cut row of the real model."""
    tie = FixedLogits([0.0, 5.0, 5.0 - NEAR_TIE / 2, 1.0])
    with pytest.warns(NearTie, match=r"row 0 departs from generate at token 1 \(2 for 1\) on a near-tie"):
        ties = assert_same_greedy_rows(tie, [[7]], [[1, 2, 3]], [[1, 1, 0]], NEAR_TIE)
    assert ties == [(0, 1, 2, 1, pytest.approx(NEAR_TIE / 2, rel=1e-3))]  # fp32 logits
    apart = FixedLogits([0.0, 5.0, 5.0 - 2 * NEAR_TIE, 1.0])
    with pytest.raises(AssertionError, match="at token 1: 2 for 1, 0.002 below the best logit .not a near-tie"):
        assert_same_greedy_rows(apart, [[7]], [[1, 2]], [[1, 1]], NEAR_TIE)
    assert as_generate(list(INSTRUCTIONS), [reference[k] for k in INSTRUCTIONS]) == []
    (zebra,) = tokenizer(" zebra", add_special_tokens=False)["input_ids"]
    wrong = reference["story"][:5] + [zebra] + reference["story"][6:]
    with pytest.raises(AssertionError, match=f"row 1 departs from generate at token 5: {zebra} for .*not a near-tie"):
        as_generate(["sum", "story"], [reference["sum"], wrong])
    with pytest.raises(AssertionError, match="row 0: 3 tokens where generate wrote 4"):
        as_generate(["sum"], [reference["sum"][:3]], cap=4)


def test_fewer_slots_than_prompts_refill_slots_and_match_generate(fast_model, tokenizer, prompts, as_generate, stops):
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=2)
    steps, prefills = spy(generator)
    keys = list(INSTRUCTIONS)
    rows, looped = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    assert looped == [False] * len(keys)
    assert max(steps) == 2 and sum(map(len, prefills)) == len(keys)
    assert len(prefills) > 1  # ended rows freed their slot for the prompts still pending


def test_empty_slots_beside_the_prompts_change_nothing(fast_model, tokenizer, prompts, as_generate, stops):
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=4)
    steps, _ = spy(generator)
    keys = ["hi", "story", "sum"]
    rows, looped = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    assert looped == [False] * 3
    assert steps and set(steps) == {4}  # one slot never held a prompt, yet decoded along


@pytest.mark.parametrize("pages", [None, 16])  # every slot's whole row (fixed pages); a page short (free list)
def test_tail_compaction_moves_live_rows_to_the_lowest_slots(fast_model, tokenizer, prompts, as_generate, stops,
                                                            monkeypatch, pages):
    """The long row sits in the highest slot and outlives the others: without compaction every step would run all
    four slots; compacted, it moves to slot 0 and the tail steps run on fewer."""
    monkeypatch.setattr(scheduler, "MIN_SLOT_BUCKET", 1)
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=4, pages=pages)
    steps, _ = spy(generator)
    keys = ["sum", "yes", "hi", "story"]
    rows, looped = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    assert looped == [False] * 4
    assert steps[0] == 4 and min(steps) < 4
    assert generator.cache.fixed == (pages is None)


# ---- sampling ----------------------------------------------------------------------------------------------------

# ---- the paged KV cache --------------------------------------------------------------------------------------------

def page_spy(generator, monkeypatch):
    """Record, at every decoding step, how many slots hold pages and how many pages are in use; and every page
    handed to a slot, with the request the slot held then (PageTable.held lists are per slot)."""
    in_use, handed = [], []
    step, grow = generator.step, PageTable.grow

    def spy_step(slots, length):
        owners = [s for s, pages in enumerate(generator.pages.held) if pages]
        in_use.append((len(owners), sum(len(generator.pages.held[s]) for s in owners)))
        return step(slots, length)

    def spy_grow(pages, wanted):
        before = {s: list(pages.held[s]) for s in wanted}
        grow(pages, wanted)
        for s in wanted:
            handed.extend((s, p) for p in pages.held[s][len(before[s]):])

    generator.step = spy_step
    monkeypatch.setattr(PageTable, "grow", spy_grow)  # the table is made when generate() sizes the cache
    return in_use, handed


@pytest.mark.parametrize("tight", [False, True])  # whole rows fit; rows outgrow a pool of 8-token pages
def test_a_slot_without_a_row_decodes_at_position_0(fast_model, tokenizer, prompts, reference, as_generate, stops,
                                                    monkeypatch, tight):
    """Decoding attention reads each slot's keys up to its position: a slot whose row ended, gave its pages back
    (`tight`: preempted) or never held one must sit at 0, not at the length of the row it last held, or every step
    reads that dead row's length again."""
    keys, pages = ["sum", "yes", "hi"], None  # three rows in four slots, ending at different steps
    if tight:  # the pool of test_admission_waits_for_pages_and_rows_that_outgrow_them_resume_exactly
        monkeypatch.setattr(runner.ModelRunner, "page", 8)
        monkeypatch.setattr(runner, "LENGTH_BUCKET", 128)
        keys, pages = ["story", "photo", "sum", "yes", "hi"], 128 // 8 + 1
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=4, pages=pages)
    seen = []
    step = generator.step

    def spy_step(slots, length):
        positions = generator.cache.positions[:slots, 0].tolist()
        seen.append([positions[s] for s in range(slots) if not generator.pages.held[s]])
        return step(slots, length)

    generator.step = spy_step
    rows, _ = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    lengths = sorted(len(reference[k]) for k in keys)
    assert lengths[0] + fastgen.CHECK_EVERY < lengths[-1]  # a row was harvested while another decoded on
    assert sum(map(len, seen)) > len(seen)  # steps ran beside a slot that had given its row back
    assert all(p == 0 for step_positions in seen for p in step_positions)
    assert generator.cache.positions.abs().sum() == 0  # the call ended with every slot at 0
    assert (generator.stats["preempted"] > 0) == tight


@pytest.fixture
def small_pages(monkeypatch):
    """8-token pages, so that 32-token answers cross several of them."""
    monkeypatch.setattr(runner.ModelRunner, "page", 8)
    return 8


def test_rows_take_pages_as_they_grow_give_them_back_and_match_generate(fast_model, tokenizer, prompts, reference,
                                                                         as_generate, stops, small_pages,
                                                                         monkeypatch):
    """Rows of different lengths on 8-token pages: a long row takes a page every 8 tokens (several allocations), a
    short one ends mid-page, and the pages of ended rows go to the rows admitted after them."""
    keys = list(INSTRUCTIONS)
    ends = {k: len(prompts[k]) + len(reference[k]) for k in keys}
    assert any(ends[k] % small_pages for k in SHORT)  # a row ends mid-page
    row_pages = -(-runner.LENGTH_BUCKET // small_pages)
    # a page short of both slots' whole rows: pages come from the free list, not a slot's own (the fixed layout)
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=2, pages=2 * row_pages)
    in_use, handed = page_spy(generator, monkeypatch)
    rows, looped = generator.generate([prompts[k] for k in keys], greedy(stops))
    assert not generator.cache.fixed
    as_generate(keys, rows)
    assert looped == [False] * len(keys)
    per_slot = Counter(s for s, _ in handed)
    grown = [n for n in per_slot.values()]
    assert max(grown) > -(-(len(prompts["story"]) + fastgen.CHECK_EVERY + 1) // small_pages) + 2  # grew often
    assert len(handed) > len(set(p for _, p in handed))  # a page was handed out again after its row ended
    assert not any(generator.pages.held) and len(generator.pages.free) == generator.cache.pages - 1  # all returned
    assert 0 not in {p for _, p in handed}  # the scratch page is nobody's


def test_admission_waits_for_pages_and_rows_that_outgrow_them_resume_exactly(fast_model, tokenizer, prompts,
                                                                             as_generate, stops, small_pages,
                                                                             monkeypatch):
    """A pool of pages smaller than four rows need: prompts wait for pages (fewer rows decode than slots), rows that
    outgrow the pages give theirs back and are resumed later, and every answer is still generate's, none cut."""
    monkeypatch.setattr(runner, "LENGTH_BUCKET", 128)  # the call's rows fit 128 tokens: a pool of 16 pages
    keys = ["story", "photo", "sum", "yes", "hi"]
    row_pages = -(-runner.LENGTH_BUCKET // small_pages)  # the pool must hold one whole row of the call's length
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=4, pages=row_pages + 1)
    in_use, _ = page_spy(generator, monkeypatch)
    need = sum(-(-(len(prompts[k]) + MAX_NEW) // small_pages) for k in keys[:4])
    assert need > row_pages  # the first four rows together do not fit
    rows, looped = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    assert looped == [False] * len(keys)
    assert generator.stats["preempted"] >= 1
    assert max(pages for _, pages in in_use) <= row_pages  # never more pages than there are
    assert min(rows_ for rows_, _ in in_use[:3]) < 4  # prompts were pending, slots free, yet they waited
    assert not any(generator.pages.held) and len(generator.pages.free) == row_pages


def test_a_step_watcher_on_the_stats_sees_every_decoding_step(fast_model, tokenizer, prompts, stops):
    """Benches hook into the engine through its stats object only: a watcher's before/after run around each step."""
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=2)
    calls = []

    class Watcher:
        def before(self, slots, runner):
            calls.append(("before", slots, int((runner.cache.positions[:slots] + 1).sum())))

        def after(self, slots):
            calls.append(("after", slots))

    generator.stats.step_watcher = Watcher()
    generator.generate([prompts[k] for k in SHORT], greedy(stops))
    steps = Counter({k: n for k, n in generator.stats.items() if isinstance(k, int)})
    assert steps and Counter(c[1] for c in calls if c[0] == "before") == steps
    assert [c[0] for c in calls] == ["before", "after"] * sum(steps.values())
    assert calls[0][2] > calls[0][1]  # the first step reads the prompts' keys: more than one a slot


def test_a_prefill_holds_at_most_prefill_tokens_prompt_tokens(fast_model, tokenizer, prompts, as_generate, stops):
    """Free slots for every prompt, but a prefill budget of about two prompts: the prompts go in several prefills,
    none over the budget (a prompt longer than it goes alone)."""
    keys = list(INSTRUCTIONS)
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=len(keys))
    generator.prefill_tokens = budget = 2 * max(len(prompts[k]) for k in keys) - 1
    sizes = []
    prefill = generator.prefill
    generator.prefill = lambda assignments: sizes.append([len(p) for _, p in assignments]) or prefill(assignments)
    rows, _ = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    assert len(sizes) > 1 and sum(map(len, sizes)) == len(keys)
    assert all(sum(s) <= budget or len(s) == 1 for s in sizes), sizes


def test_one_slot_passes_the_check_and_decodes_prompts_in_turn(fast_model, tokenizer, prompts, as_generate, stops):
    """make_generator's check runs on as many slots as there are (eval at batch size 1 asks for one)."""
    generator, why = fastgen.make_generator(fast_model, tokenizer.pad_token_id, slots=1)
    assert why is None and generator.slots == 1
    rows, _ = generator.generate([prompts[k] for k in SHORT], greedy(stops))
    as_generate(SHORT, rows)


def test_where_every_slot_fits_its_whole_row_sdpa_reads_the_pages_in_place(fast_model, tokenizer, prompts,
                                                                            as_generate, stops):
    """The CPU's default pool holds every slot's longest row: slot s keeps its own pages, in order, so the masked
    SDPA reads a view of the pool (no copy a step) and the answers are generate's."""
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=2)
    views = []
    update = PagedCache.update

    def spy(cache, *args, **kwargs):
        keys, values = update(cache, *args, **kwargs)
        if cache.prefill is None:  # decoding
            views.append(keys.untyped_storage().data_ptr() == cache.keys[args[2]].untyped_storage().data_ptr())
        return keys, values

    keys = list(INSTRUCTIONS)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(PagedCache, "update", spy)
        rows, _ = generator.generate([prompts[k] for k in keys], greedy(stops))
    assert generator.cache.fixed and views and all(views)
    as_generate(keys, rows)


def test_a_pool_without_room_for_one_row_is_refused(fast_model, tokenizer, prompts, stops, small_pages):
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=2, pages=4)
    with pytest.raises(SetupError, match="does not fit"):
        generator.generate([prompts["sum"]], greedy(stops))


def test_sampling_is_reproducible_for_a_seed_and_differs_for_another(fast_model, tokenizer, prompts, stops):
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=4)
    sampling = Sampling(max_new_tokens=16, temperature=1.0, top_p=0.9, repetition_penalty=1.1, stop_token_ids=stops)
    batch = [prompts[k] for k in ("hi", "story", "photo")]

    def run(seed):
        torch.manual_seed(seed)
        rows, _ = generator.generate(batch, sampling)
        assert all(rows) and all(len(r) <= 16 for r in rows)
        return rows

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_a_call_samples_the_same_whatever_the_calls_before_it(smol, fast_model, monkeypatch):
    """Slots without a live row keep what earlier calls left (logits, cache pages): a sampled call must not depend on
    it, as sharded runs (NPROC) make different calls before the same batch. Prompts and settings of the sharded
    preference test, where it did."""
    monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: fast_model)
    engine = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=64)
    text = lambda k: prompt_text(engine.tokenizer, f"Name a colour, number {k}.")  # noqa: E731
    calls = [[text(0), text(0), text(1), text(1)], [text(2), text(2), text(3), text(3)], [text(4), text(4)]]
    sampling = engine_sampling(engine, max_new_tokens=12, temperature=0.8, top_p=0.95)
    after_two = [engine.sample(calls[b], sampling, seed=b) for b in (0, 1, 2)][-1]
    engine.fast = fastgen.SlotGenerator(fast_model, engine.tokenizer.pad_token_id, slots=64)  # a fresh generator
    after_one = [engine.sample(calls[b], sampling, seed=b) for b in (0, 2)][-1]
    assert after_two == after_one
    assert all(r["text"] for r in after_one)


class Suppressed:
    """A model whose logits give `banned` tokens -inf: the reference of rows whose first token suppresses them."""

    def __init__(self, model, banned):
        self.model, self.banned, self.device = model, list(banned), model.device

    def __call__(self, input_ids):
        logits = self.model(input_ids=input_ids).logits
        logits[..., self.banned] = -math.inf
        return SimpleNamespace(logits=logits)


def test_first_token_suppression_is_honoured(fast_model, reference_model, tokenizer, prompts, reference, as_generate,
                                             stops):
    """The tokens greedy decoding starts with are suppressed: each row starts with its next best token instead."""
    keys = ["sum", "hi", "story"]
    banned = tuple(sorted({reference[k][0] for k in keys}))
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=4)
    batch = [prompts[k] for k in keys]
    control, _ = generator.generate(batch, greedy(stops, max_new_tokens=3))
    as_generate(keys, control, cap=3)  # unsuppressed, they do come first
    rows, _ = generator.generate(batch, greedy(stops, max_new_tokens=3, suppress_at_start=banned))
    assert not {r[0] for r in rows} & set(banned)
    with torch.no_grad():  # each first token is the best of the others (a plain forward's argmax)
        best = [[int(reference_model(input_ids=torch.tensor([prompts[k]])).logits[0, -1].index_fill(
            0, torch.tensor(banned), -math.inf).argmax())] for k in keys]
    assert_same_greedy_rows(Suppressed(reference_model, banned), batch, [r[:1] for r in rows], best, NEAR_TIE)
    torch.manual_seed(0)
    sampled, _ = generator.generate(batch * 3, Sampling(max_new_tokens=2, temperature=1.0, stop_token_ids=stops,
                                                        suppress_at_start=banned))
    assert not {r[0] for r in sampled} & set(banned)


# ---- the loop rule -----------------------------------------------------------------------------------------------

def test_looping_finds_rows_that_end_in_a_repeated_block():
    phrase = [11, 12, 13, 14, 15]
    window = torch.tensor([
        [9, 8] + [7] * 13,  # period 1
        phrase * 3,  # a 5-token phrase three times
        list(range(100, 115)),  # no repetition
        [1, 2, 3] * 4 + [20, 21, 22],  # a loop that ended: not at the end of the row
        phrase * 2 + [30, 31, 32, 33, 34],  # a phrase only twice
        [-1] * 10 + [7] * 5,  # a short row: its 5 tokens are less than half the window
        [-1] * 7 + [7] * 8,  # a short row that loops over more than half the window
        [-1] * 15,  # nothing generated yet
    ])
    assert looping(window).tolist() == [True, True, False, False, False, False, True, False]
    # The criterion for `generate` looks only at the generated part, and only once it fills the window.
    criterion = LoopCriterion(window=15, prompt_length=4)
    ids = torch.tensor([[5, 6, 7, 8] + [7] * 15, [5, 6, 7, 8] + list(range(100, 115))])
    assert criterion(ids, None).tolist() == [True, False]
    assert criterion(ids[:, :-1], None).tolist() == [False, False]


class ForceCycle:
    """A logits processor that makes every row holding `trigger` write `cycle` over and over (the number of cycle
    tokens already in the row picks the next), and leaves the other rows alone."""

    def __init__(self, trigger, cycle):
        self.trigger, self.cycle = trigger, torch.tensor(cycle)

    def __call__(self, input_ids, scores):
        cycle = self.cycle.to(input_ids.device)
        following = cycle[torch.isin(input_ids, cycle).sum(1) % len(cycle)]
        forced = torch.full_like(scores, -math.inf).scatter_(1, following[:, None], 0.0)
        return torch.where((input_ids == self.trigger).any(1, keepdim=True), forced, scores)


LOOP_INSTRUCTION = "Name a zebra."  # " zebra": the trigger


@pytest.fixture(scope="module")
def cycle(tokenizer, prompts):
    words = [" apple", " pear", " plum"]
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(i) == 1 for i in ids)
    (trigger,) = tokenizer(" zebra", add_special_tokens=False)["input_ids"]
    loop_prompt = tokenizer(prompt_text(tokenizer, LOOP_INSTRUCTION), add_special_tokens=False)["input_ids"]
    assert trigger in loop_prompt and trigger not in prompts["sum"]
    assert not {i[0] for i in ids} & set(loop_prompt + prompts["sum"])
    return trigger, [i[0] for i in ids], loop_prompt


def test_the_slot_generator_stops_a_looping_row_early(fast_model, tokenizer, prompts, as_generate, stops, cycle):
    trigger, words, loop_prompt = cycle
    generator = fastgen.SlotGenerator(fast_model, tokenizer.pad_token_id, slots=2)
    sampling = greedy(stops, loop_window=12)
    rows, looped = generator.generate([loop_prompt, prompts["sum"]], sampling,
                                      extra_processors=[ForceCycle(trigger, words)])
    assert looped == [True, False]
    assert 12 <= len(rows[0]) < MAX_NEW and rows[0] == (words * MAX_NEW)[: len(rows[0])]
    as_generate(["sum"], rows[1:])  # the row beside it is untouched
    record = engines.finish(tokenizer, rows[0], sampling, looped[0])
    assert record["stop_reason"] == "loop" and not record["finished"] and record["tokens"] == len(rows[0])
    # Without the window the forced row runs to the cap.
    rows, looped = generator.generate([loop_prompt], greedy(stops), extra_processors=[ForceCycle(trigger, words)])
    assert looped == [False] and len(rows[0]) == MAX_NEW


# ---- the engine: fast path or plain generate ---------------------------------------------------------------------

PLAIN_MESSAGE = "generation: plain transformers generate ("


@pytest.fixture
def fresh_say_once(monkeypatch):
    """say_once prints each message once a process: forget what earlier tests printed."""
    monkeypatch.setattr(engines.say_once, "__defaults__", (set(),))


@pytest.fixture(scope="module")
def plain_engine(smol):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SIT_FAST_GENERATE", "0")
        engine = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4)
    assert engine.fast is None
    return engine


@pytest.fixture(scope="module")
def fast_engine(smol):
    with pytest.MonkeyPatch.context() as m:
        m.delenv("SIT_FAST_GENERATE", raising=False)
        engine = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4)
    assert isinstance(engine.fast, fastgen.SlotGenerator)
    return engine


def engine_sampling(engine, **changes):
    return Sampling(max_new_tokens=24, temperature=0, stop_token_ids=engine.stop_token_ids,
                    stop_strings=(end_of_turn(engine.tokenizer, "assistant"),)).replace(**changes)


def test_sit_fast_generate_0_uses_plain_generate_and_says_so_once(smol, fast_model, monkeypatch, capfd,
                                                                  fresh_say_once):
    monkeypatch.setenv("SIT_FAST_GENERATE", "0")
    monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: fast_model)  # the weights do not matter here
    first, second = (TransformersEngine("embedded:smollm2", dtype="float32") for _ in range(2))
    assert first.fast is None and second.fast is None
    err = capfd.readouterr().err
    assert err.count(PLAIN_MESSAGE) == 1 and f"{PLAIN_MESSAGE}SIT_FAST_GENERATE=0)" in err


@pytest.mark.parametrize("setting", [None, "1"])
def test_the_fast_path_runs_on_the_cpu(setting, fast_model, tokenizer, monkeypatch, capfd, fresh_say_once):
    if setting is None:
        monkeypatch.delenv("SIT_FAST_GENERATE", raising=False)
    else:
        monkeypatch.setenv("SIT_FAST_GENERATE", setting)
    generator, why = fastgen.make_generator(fast_model, tokenizer.pad_token_id, slots=4)
    assert why is None and isinstance(generator, fastgen.SlotGenerator)
    assert not generator.graphs_on and generator.kernel == "sdpa"  # eager, masked SDPA
    monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: fast_model)
    assert isinstance(TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4).fast, fastgen.SlotGenerator)
    assert PLAIN_MESSAGE not in capfd.readouterr().err


def test_a_decoding_kernel_that_disagrees_with_the_model_gives_way_to_the_next(fast_model, tokenizer, prompts,
                                                                              as_generate, stops, monkeypatch, capfd):
    """make_generator checks each decoding attention against a plain forward, best first: one that writes wrong
    outputs (here a stand-in for the Triton kernel) is said to be off, and the next one (SDPA) decodes."""
    calls = []

    def wrong(query, key, value, lengths, table, scale, order=None):
        calls.append(query.shape[0])
        return torch.zeros_like(query).transpose(1, 2)

    monkeypatch.setattr(fastgen, "decode_kernels", lambda device: ["triton", "sdpa"])
    monkeypatch.setattr(decode_kernel, "attend", wrong)
    generator, why = fastgen.make_generator(fast_model, tokenizer.pad_token_id, slots=4)
    # the stand-in ran in the check's one decoding step (once a layer), and lost
    assert why is None and generator.kernel == "sdpa" and len(calls) == fast_model.config.num_hidden_layers
    assert "generation: triton decoding attention off (largest relative logit difference" in capfd.readouterr().err
    keys = ["sum", "story"]
    rows, _ = generator.generate([prompts[k] for k in keys], greedy(stops))
    as_generate(keys, rows)
    assert len(calls) == fast_model.config.num_hidden_layers  # not called since the check


def test_engine_falls_back_when_the_fast_path_cannot_run(smol, fast_model, tokenizer, monkeypatch, capfd,
                                                         fresh_say_once):
    """A transformers whose forward takes the cache under another keyword: the check fails, plain generate runs."""
    monkeypatch.setenv("SIT_FAST_GENERATE", "1")
    monkeypatch.setattr(runner, "cache_argument", lambda model: "kv_cache_under_another_name")
    generator, why = fastgen.make_generator(fast_model, tokenizer.pad_token_id, slots=4)
    assert generator is None
    assert "does not run on this model" in why or "disagrees with a plain forward" in why, why
    monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: fast_model)
    made = [TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4) for _ in range(2)]
    assert all(e.fast is None for e in made)
    err = capfd.readouterr().err
    assert err.count(PLAIN_MESSAGE) == 1 and f"{PLAIN_MESSAGE}{why})" in err


def test_a_generator_that_does_not_run_leaves_the_model_as_loaded(fast_model, tokenizer, monkeypatch):
    """make_generator switches the model's attention to the engine's: where the check fails it switches it back, and
    a working generator's close() does the same."""
    fast_model.set_attn_implementation("sdpa")  # as loaded (earlier tests' generators left it switched)
    before = fast_model.config._attn_implementation
    monkeypatch.setattr(fastgen.SlotGenerator, "check", lambda self: "largest relative logit difference 0.7 > 0.1")
    generator, why = fastgen.make_generator(fast_model, tokenizer.pad_token_id, slots=2)
    assert generator is None and "disagrees" in why
    assert fast_model.config._attn_implementation == before != SLOT_ATTENTION
    monkeypatch.undo()
    generator, _ = fastgen.make_generator(fast_model, tokenizer.pad_token_id, slots=2)
    assert fast_model.config._attn_implementation == SLOT_ATTENTION
    generator.close()
    assert fast_model.config._attn_implementation == before and generator.cache is None


class StandInQuantizer:
    """What transformers hangs on a model it quantized: marks the fp32 model as 4-bit where the check is forced to
    fail (a real NF4 model on the CPU: test_a_4bit_model_on_the_cpu_takes_the_path_its_check_chooses)."""

    quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    is_compileable = False  # read by generate


def test_a_quantized_model_whose_check_fails_gets_plain_generate_said_once(fast_model, tokenizer, prompts, stops,
                                                                           monkeypatch, capfd, fresh_say_once):
    """Where the check disagrees with a plain forward (as a 4-bit kernel might), every decoding attention is tried
    and the engine says once that plain generate runs, and why; its answers are generate's."""
    monkeypatch.setattr(fast_model, "hf_quantizer", StandInQuantizer(), raising=False)
    monkeypatch.setattr(fastgen.SlotGenerator, "check", lambda self: "largest relative logit difference 0.7 > 0.1")
    monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: fast_model)
    made = [TransformersEngine("embedded:smollm2", dtype="float32", load_in_4bit=True, batch_size=4)
            for _ in range(2)]
    assert all(e.fast is None for e in made)
    err = capfd.readouterr().err
    assert err.count(PLAIN_MESSAGE) == 1
    assert "the fast path disagrees with a plain forward on this model (largest relative logit difference 0.7" in err
    sampling = engine_sampling(made[0], max_new_tokens=8)
    got = made[0].sample([prompt_text(made[0].tokenizer, INSTRUCTIONS["sum"])], sampling, seed=0)
    assert got[0]["tokens"] >= 1 and got[0]["text"]


def test_a_sliding_window_model_gets_plain_generate_said_once(tokenizer, monkeypatch, capfd, fresh_say_once):
    """Neither a window of its own nor a window per layer is masked by the fast path: refused, and plain generate
    answers, past the window (tiny random models of the two kinds, the tokenizer's vocabulary)."""
    import transformers

    torch.manual_seed(0)
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    models = [transformers.MistralForCausalLM(transformers.MistralConfig(**shape)).eval(),  # config.sliding_window
              transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, use_sliding_window=True,
                                                                     max_window_layers=1)).eval()]  # layer_types
    assert models[1].config.layer_types == ["full_attention", "sliding_attention"]
    for model in models:
        assert fastgen.make_generator(model, tokenizer.pad_token_id, slots=4) == (None, "sliding-window attention")
        monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: model)
        engine = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4)
        assert engine.fast is None
        (record,) = engine.sample([prompt_text(engine.tokenizer, INSTRUCTIONS["hi"])],
                                  engine_sampling(engine, max_new_tokens=12), seed=0)
        assert record["tokens"] >= 1 and record["stop_reason"] in ("stop", "length")
    assert capfd.readouterr().err.count(f"{PLAIN_MESSAGE}sliding-window attention)") == 1


def test_a_model_split_over_devices_gets_plain_generate_said_once(reference_model, tokenizer, monkeypatch, capfd,
                                                                  fresh_say_once):
    """A model that accelerate spread over two devices (hf_device_map, as from_pretrained sets it; faked here) is
    refused: the fast path's cache and slots live on one device. Plain generate answers."""
    layers = {f"model.layers.{i}": i * 2 // reference_model.config.num_hidden_layers
              for i in range(reference_model.config.num_hidden_layers)}
    monkeypatch.setattr(reference_model, "hf_device_map", {"model.embed_tokens": 0, **layers, "lm_head": 1},
                        raising=False)
    assert fastgen.make_generator(reference_model, tokenizer.pad_token_id, slots=4) == (
        None, "a model split over devices")
    monkeypatch.setattr(engines, "load_causal_lm", lambda *a, **k: reference_model)
    engine = TransformersEngine("embedded:smollm2", dtype="float32", batch_size=4)
    assert engine.fast is None
    assert capfd.readouterr().err.count(f"{PLAIN_MESSAGE}a model split over devices)") == 1
    (record,) = engine.sample([prompt_text(engine.tokenizer, INSTRUCTIONS["sum"])], engine_sampling(engine), seed=0)
    assert record["stop_reason"] == "stop" and "4" in record["text"]


def test_fast_engine_writes_the_records_of_plain_generate(plain_engine, fast_engine, monkeypatch):
    texts = [INSTRUCTIONS["sum"], INSTRUCTIONS["story"], INSTRUCTIONS["hi"], INSTRUCTIONS["yes"], "Name a planet."]
    prompts = [prompt_text(plain_engine.tokenizer, t) for t in texts]
    rows, finish = [], engines.finish  # the rows each engine's records are written from, in prompt order
    monkeypatch.setattr(engines, "finish",
                        lambda tok, row, *a: rows.append([int(t) for t in row]) or finish(tok, row, *a))
    plain = plain_engine.sample(prompts, engine_sampling(plain_engine), seed=0)
    fast = fast_engine.sample(prompts, engine_sampling(fast_engine), seed=0)
    ids = plain_engine.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    tied = {t[0] for t in assert_same_greedy_rows(plain_engine.model, ids, rows[5:], rows[:5], NEAR_TIE)}
    assert [r for i, r in enumerate(fast) if i not in tied] == [r for i, r in enumerate(plain) if i not in tied]
    assert {r["stop_reason"] for r in plain} == {"stop", "length"}  # rows ending mid-batch and rows at the cap
    assert all(r["text"] and not any(t in r["text"] for t in TEMPLATE_TOKENS) for r in plain)


# ---- a 4-bit (NF4) model on the CPU ---------------------------------------------------------------------------------

# bitsandbytes' CPU NF4 matmul rounds its input and output to bf16 even at fp32 compute (tests/test_loglik.py): another
# summation order can move a logit by ~0.1, so tokens closer than this are a near-tie there
NF4_NEAR_TIE = 0.25
NF4_KEYS, NF4_NEW = ("sum", "hi", "story"), 16  # a row that stops, then two that run to the cap


@pytest.fixture(scope="module")
def four_bit(smol, tokenizer, prompts):
    """The embedded model in NF4, loaded as the engine loads it (load_causal_lm with load_in_4bit, here on the CPU),
    what make_generator decided for it and what the engine said; and plain greedy generate's rows on it."""
    said, decided, make = [], [], fastgen.make_generator
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as m:
        m.delenv("SIT_FAST_GENERATE", raising=False)
        m.setattr(engines, "say_once", said.append)
        m.setattr(fastgen, "make_generator", lambda *a, **k: decided.append(make(*a, **k)) or decided[-1])
        engine = TransformersEngine("embedded:smollm2", dtype="float32", load_in_4bit=True, batch_size=4)
    loaded = time.monotonic() - started
    reference = [greedy_generate(engine.model, tokenizer, prompts[k], engine.stop_token_ids, NF4_NEW) for k in NF4_KEYS]
    yield SimpleNamespace(engine=engine, said=said, why=decided[0][1], reference=reference, loaded=loaded)
    if engine.fast is not None:
        engine.fast.close()


def test_a_4bit_model_on_the_cpu_takes_the_path_its_check_chooses(four_bit, prompts):
    """NF4 layers on the CPU: the engine's path is the one make_generator's check chose (the fast path, or plain
    generate said once and why), and its greedy rows are plain generate's on the same 4-bit model."""
    engine, batch = four_bit.engine, [prompts[k] for k in NF4_KEYS]
    model = engine.model
    assert model.device.type == "cpu" and type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    sampling = greedy(engine.stop_token_ids, max_new_tokens=NF4_NEW)
    started = time.monotonic()
    if engine.fast is not None:
        assert four_bit.why is None and four_bit.said == []
        rows, _ = engine.fast.generate(batch, sampling)
    else:  # refused by the check's numbers, not by a mechanism that fails to run (that says "does not run")
        found = re.fullmatch(r"the fast path disagrees with a plain forward on this model \(largest relative logit "
                             r"difference (\S+) > 0\.001\)", four_bit.why)
        assert found and float(found[1]) < 0.05, four_bit.why  # bf16 rounding; a broken mechanism is ~1 off
        assert four_bit.said == [f"generation: plain transformers generate ({four_bit.why})"]
        assert model.config._attn_implementation != SLOT_ATTENTION  # left as loaded
        rows, _ = engine._generate(batch, sampling)  # what engine.sample runs on this path
    rows = [[int(t) for t in r] for r in rows]
    ties = assert_same_greedy_rows(model, batch, rows, four_bit.reference, NF4_NEAR_TIE)
    print(f"\n4-bit CPU: check -> {four_bit.why or 'fast path'}; {sum(map(len, rows))} tokens in {len(rows)} rows "
          f"against generate, {len(ties)} near-ties; load {four_bit.loaded:.1f} s, "
          f"rows {time.monotonic() - started:.1f} s")


def test_the_fast_path_itself_on_a_4bit_model_writes_generates_tokens(four_bit, tokenizer, prompts):
    """Whatever the check decided: the slot generator on NF4 layers (paged cache, batched decoding steps, a slot
    refilled) gives plain generate's tokens on the same 4-bit model, near-ties at bf16 rounding apart."""
    engine, batch = four_bit.engine, [prompts[k] for k in NF4_KEYS]
    attention = engine.model.config._attn_implementation
    generator = engine.fast or fastgen.SlotGenerator(engine.model, tokenizer.pad_token_id, slots=2)
    try:
        rows, looped = generator.generate(batch, greedy(engine.stop_token_ids, max_new_tokens=NF4_NEW))
    finally:
        if generator is not engine.fast:
            generator.close()
    assert looped == [False] * len(batch) and engine.model.config._attn_implementation == attention
    assert_same_greedy_rows(engine.model, batch, rows, four_bit.reference, NF4_NEAR_TIE)


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_engine_marks_a_looping_row(path, request, cycle, monkeypatch):
    """The loop rule through the engine: LoopCriterion in plain generate, the slot loop's check in the fast path."""
    engine = request.getfixturevalue(f"{path}_engine")
    trigger, words, _ = cycle
    make = engines.logits_processors
    for module in (engines, sampler):  # plain generate's processors, and the slot loop's
        monkeypatch.setattr(module, "logits_processors",
                            lambda s: LogitsProcessorList([*make(s), ForceCycle(trigger, words)]))
    prompts = [prompt_text(engine.tokenizer, LOOP_INSTRUCTION), prompt_text(engine.tokenizer, INSTRUCTIONS["story"])]
    looping_row, other = engine.sample(prompts, engine_sampling(engine, loop_window=12), seed=0)
    assert looping_row["stop_reason"] == "loop" and not looping_row["finished"]
    assert 12 <= looping_row["tokens"] < 24
    # the text is the cycle the row wrote, as many tokens as it counts, and nothing after it
    assert looping_row["text"] == engine.tokenizer.decode((words * 24)[: looping_row["tokens"]]).strip()
    assert other["stop_reason"] == "length" and other["tokens"] == 24  # the row beside it runs on


def tiny_model(family):
    """A randomly initialised two-layer model of a transformers family (Llama, Qwen2, Mistral), in eval mode."""
    import transformers

    config = getattr(transformers, f"{family}Config")(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])  # the target models' families
def test_compiling_swaps_each_models_rotary_embedding_while_a_generator_lives(family, monkeypatch):
    """compile_pointwise compiles the norms, the MLPs and the modeling module's apply_rotary_pos_emb (ten small
    kernels a layer when eager), once however often it is called; uncompile_pointwise puts the very function back.
    Here torch.compile is a recording stand-in (the CPU build has no triton): what is tested is the swap."""
    import importlib.util
    import sys

    model = tiny_model(family)
    config = model.config
    home = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = home.apply_rotary_pos_emb
    called = Counter()

    def recording_compile(fn, **options):
        def run(*args, **kwargs):
            called[getattr(fn, "__name__", type(fn).__name__)] += 1
            return fn(*args, **kwargs)
        return run

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: object() if name == "triton" else find_spec(name, *rest))
    monkeypatch.setattr(torch, "compile", recording_compile)
    try:
        assert patching.compile_pointwise(model)
        assert not patching.compile_pointwise(model)  # already compiled: nothing more
        swapped = home.apply_rotary_pos_emb
        assert swapped is not original and swapped.sit_original is original
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert called["apply_rotary_pos_emb"] == config.num_hidden_layers
    finally:
        patching.uncompile_pointwise(model)
    assert home.apply_rotary_pos_emb is original
    assert not any(hasattr(m, "sit_compiled") for m in model.modules())


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])  # Qwen2's projections have biases
def test_fused_projections_give_the_same_logits_share_one_weight_and_come_apart_again(family):
    """fuse_projections runs q/k/v as one GEMM: the same logits as before, the three weights slices of one tensor (no
    copy kept), a k_proj called on another input than q_proj's computes its own; unfuse_projections gives each its
    own weight and forward back."""
    torch.manual_seed(0)
    model = tiny_model(family)
    config = model.config
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert patching.fuse_projections(model) == config.num_hidden_layers
        assert patching.fuse_projections(model) == 0  # already fused
        attention = model.model.layers[0].self_attn
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        assert q.weight.untyped_storage().data_ptr() == k.weight.untyped_storage().data_ptr()
        assert k.weight.data_ptr() == q.weight.data_ptr() + q.weight.numel() * q.weight.element_size()
        assert (q.bias is None) == (family != "Qwen2")
        torch.testing.assert_close(model(input_ids=ids).logits, before)
        step = model(input_ids=ids[:, :4], use_cache=True)  # a prefill (projections apart), then a decoding step
        torch.testing.assert_close(model(input_ids=ids[:, 4:], past_key_values=step.past_key_values).logits,
                                   before[:, 4:])
        x, other = torch.randn(3, 1, 32), torch.randn(3, 1, 32)  # a decoding step's shape: one token a row
        query, key = q(x), k(x)
        assert key.data_ptr() == query.data_ptr() + q.out_features * query.element_size()  # one GEMM's output
        torch.testing.assert_close(key, torch.nn.functional.linear(x, k.weight, k.bias))
        torch.testing.assert_close(k(other), torch.nn.functional.linear(other, k.weight, k.bias))
        torch.testing.assert_close(v(x), torch.nn.functional.linear(x, v.weight, v.bias))  # q_proj's, then cleared
        prompt = torch.randn(1, 3, 32)  # a prefill's shape: three GEMMs
        query, key = q(prompt), k(prompt)
        assert key.data_ptr() != query.data_ptr() + q.out_features * query.element_size()
        torch.testing.assert_close(key, torch.nn.functional.linear(prompt, k.weight, k.bias))
        patching.unfuse_projections(model)
        assert "forward" not in vars(q) and not hasattr(attention, "sit_fused")
        assert q.weight.untyped_storage().data_ptr() != k.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(model(input_ids=ids).logits, before)
