"""The fast generation path: continuous batching over a paged KV cache, on transformers' model forward.

Real Magpie responses end anywhere from a few tokens to the cap, and `generate` runs a batch until its longest row
ends: most of the work goes to rows that have already stopped. Here up to `slots` rows decode together; a row that
ends (stop token, length cap, or the loop rule) frees its slot, and the next prompt is prefilled into it.

SlotGenerator.generate is admit -> run -> collect, over these parts (docs/engine.md draws them):
- scheduler.py  which request decodes in which slot: admission, preemption, compaction (host only, no model)
- pages.py      the KV pages: the free list, who holds which, the block table, both layouts
- slots.py      a request's state (Request) and the decoding rows' state on the device (SlotState)
- runner.py     the model: the cache sized from memory, packed prefill, the decoding step and its CUDA graphs, the
                check against a plain forward (cache.py: the cache object; attention.py: the attention it calls)
- sampler.py    the next token: transformers' logits processors, greedy or nucleus sampling
- patching.py   what the runner changes in the model while it lives, undone once
- stats.py      what a run did, for benches

make_generator checks the mechanism on the model itself (one prefill and one decoding step against a plain forward)
and returns why not where it fails; the engine then uses plain `generate`.
"""

import os
import sys

from common.generation.attention import decode_kernels
from common.generation.runner import ModelRunner
from common.generation.sampler import Sampler
from common.generation.scheduler import ADMIT_FRACTION, CHECK_EVERY, Scheduler
from common.generation.slots import Request, SlotState
from common.generation.transfers import on_device
from common.models import full_attention_only


class SlotGenerator(ModelRunner):
    """Continuous batching for one model: `generate(prompts, sampling)` -> (generated ids per prompt, looped flags).

    `slots`: how many rows decode at once at most (the tier's GEN_ROWS, PREF_ROWS or JUDGE_ROWS); the KV pages they
    share are sized from free GPU memory (`pages` sets their number), so how many rows really decode at once depends
    on how long they are. `admit_fraction`: free slots wait until this share of them can be prefilled at once."""

    def __init__(self, model, pad_token_id, slots=128, admit_fraction=ADMIT_FRACTION, **runner):
        super().__init__(model, pad_token_id, slots=slots, **runner)
        self.admit_fraction = admit_fraction

    def generate(self, prompts, sampling, extra_processors=()):
        """Generated token ids (stop token included where a row stopped) and whether each row stopped as a loop.
        `extra_processors`: more logits processors, called as transformers calls them (token history, scores)."""
        if not prompts:
            return [], []
        self.ensure_cache(max(map(len, prompts)) + sampling.max_new_tokens + 1)
        self.cache.positions.zero_()
        self.pages.release(self.pages.holders())  # a call that raised may have left some
        call = Call(self, sampling, extra_processors, len(prompts))
        scheduler = Scheduler(self.pages, self.cache.slots, self.stats, self.prefill_tokens, self.admit_fraction)
        scheduler.submit([Request(i, p) for i, p in enumerate(prompts)])
        bucket = call.look(scheduler, None)  # the first prompts admitted
        steps = CHECK_EVERY
        while bucket is not None:
            for _ in range(steps):
                call.decode(*bucket)
            bucket = call.look(scheduler, bucket)  # ended rows collected, prompts admitted: one more step meanwhile
            steps = CHECK_EVERY - 1
        call.collect(wait=True)
        self.stats.settle()
        return call.results, call.loops


class Call:
    """One generate() call's rows on the device as the scheduler starts, ends, moves and preempts them (the
    scheduler's `rows`), the tokens it samples, and the results on their way to the host."""

    def __init__(self, runner, sampling, extra_processors, requests):
        self.runner, self.max_new, self.loop_window = runner, sampling.max_new_tokens, sampling.loop_window
        cache = runner.cache
        self.sampler = Sampler(sampling, extra_processors, runner.vocab, runner.pad, runner.device)
        self.state = SlotState(cache.slots, cache.length, runner.pad, cache.positions, runner.tokens)
        self.results, self.loops = [None] * requests, [False] * requests
        self.seen = None  # the last snapshot, as lists: (live, position, tokens held, prompt length, looped) per slot
        self.outbox = []  # ended rows' tokens on their way to the host

    def look(self, scheduler, bucket):
        """Every CHECK_EVERY steps the host looks at which rows ended and admits, moves and grows rows: the next
        steps' (slots, keys to read), None once every request is done. It looks at a snapshot taken before one more
        step (at `bucket`) is queued, so the GPU decodes while the host does that work (looking at the live state
        would leave the GPU idle meanwhile: ~1.5 ms a step at 512 rows on an H200)."""
        if self.loop_window:
            self.state.stop_loops(self.loop_window)
        snapshot, arrived = self.state.snapshot()
        if bucket is not None:
            self.decode(*bucket)
        if arrived is not None:
            arrived.synchronize()
        self.seen = snapshot.tolist()
        self.collect()
        look = scheduler.look(self.seen[0], self.seen[1], self)
        return None if look is None else (look[0], self.runner.keys_to_read(look[1]))

    def decode(self, slots, length):
        """One decoding step of the first `slots` slots and its sampling, queued on the GPU without a wait."""
        self.runner.step(slots, length)
        token = self.sampler.next(self.state.history[:slots], self.runner.logits[:slots], self.state.active[:slots])
        self.state.append(slots, token, self.sampler.stops, self.max_new)

    def start(self, batch):
        """Prefill `batch` [(slot, Request)]: resumed rows go on where they stood, new rows sample a first token."""
        logits = self.runner.prefill([(slot, request.ids) for slot, request in batch])
        fresh = [k for k, (_, request) in enumerate(batch) if request.progress is None]
        for slot, request in batch:
            if request.progress is not None:
                self.state.resume(slot, request.progress)
                request.progress = None
        if not fresh:
            return
        device = self.runner.device
        self.state.start([batch[k][0] for k in fresh], [batch[k][1].prompt for k in fresh],
                         lambda history: self.sampler.first(history, logits[on_device(fresh, device)]),
                         self.sampler.stops, self.max_new)

    def finish(self, ended):
        """The rows that had ended at the snapshot: their tokens start on their way to the host (collect() reads
        them; the step in flight leaves an ended row's tokens as they are)."""
        tokens, arrived = self.state.rows_of([slot for slot, _ in ended])
        _, _, held, start, loop = self.seen
        self.outbox.append((tokens, arrived, [(r.index, start[s], held[s], loop[s]) for s, r in ended]))

    def move(self, movers, holes):
        self.state.move(movers, holes)

    def give_way(self, slot, request):
        tokens, prompt_len, generated, live, looped = self.state.take(slot)  # after the step in flight (a sync)
        if live:
            request.progress = (tokens, prompt_len, generated, looped)
            return True
        self.results[request.index], self.loops[request.index] = tokens[prompt_len:], looped
        return False

    def collect(self, wait=False):
        """The ended rows whose tokens have reached the host, into the results."""
        while self.outbox and (wait or self.outbox[0][1] is None or self.outbox[0][1].query()):
            tokens, arrived, ended = self.outbox.pop(0)
            if arrived is not None:
                arrived.synchronize()
            for k, (index, start, end, loop) in enumerate(ended):
                self.results[index], self.loops[index] = tokens[k, start:end].tolist(), bool(loop)


def checked(generator):
    """generator.check(); where it raises with the norms and MLPs compiled, the check again without them, and the
    compile stays off only if that one passes (else compiling was not the cause: restored, and the error raised)."""
    try:
        return generator.check()
    except Exception as e:
        if not generator.compiled:
            raise
        generator.patches.uncompile()
        generator.drop_graphs()
        try:
            error = generator.check()
        except Exception:
            generator.patches.recompile()
            raise
        print(f"generation: compiled decoding off ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr, flush=True)
        return error


def make_generator(model, pad_token_id, slots=None):
    """(SlotGenerator, None) where the fast path runs for this model, else (None, why not): SIT_FAST_GENERATE=0, a
    multi-device model, sliding-window attention, or a check of the mechanism against a plain forward that fails on
    this model or transformers version. A 4-bit (bitsandbytes) model runs it like any other where the check passes.
    On a CPU it runs too, without CUDA graphs or the Triton kernel: rows that end stop costing there as well."""
    if os.environ.get("SIT_FAST_GENERATE", "1") == "0":
        return None, "SIT_FAST_GENERATE=0"
    if len(set((getattr(model, "hf_device_map", None) or {"": 0}).values())) > 1:
        return None, "a model split over devices"
    if not full_attention_only(model.config.get_text_config(decoder=True)):
        return None, "sliding-window attention"
    generator = None
    try:
        generator = SlotGenerator(model, pad_token_id, slots=slots or 128)
        *kernels, last = decode_kernels(generator.device)
        for kernel in kernels:  # a kernel missing or refusing this model: the next one
            generator.kernel = kernel
            try:
                error = checked(generator)
            except Exception as e:
                error = f"{type(e).__name__}: {str(e)[:300]}"
            if error is None:
                break
            print(f"generation: {kernel} decoding attention off ({error})", file=sys.stderr, flush=True)
            generator.drop_graphs()
        else:
            generator.kernel = last
            error = checked(generator)
    except Exception as e:  # what the mechanism needs is missing or changed in this transformers version
        if generator is not None:  # (a generator that failed to build has undone its own patches)
            generator.close()
        return None, f"the fast path does not run on this model or transformers version ({type(e).__name__}: {e})"
    if error is not None:
        generator.close()
        return None, f"the fast path disagrees with a plain forward on this model ({error})"
    return generator, None
