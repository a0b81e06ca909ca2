"""The fast generation path: continuous batching over a paged KV cache, on transformers' model forward.

Real Magpie responses end anywhere from a few tokens to the cap, and `generate` runs a batch until its longest row
ends: most of the work goes to rows that have already stopped. Here up to `slots` rows decode together; a row that
ends (stop token, length cap, or the loop rule) frees its slot, and the next prompt is prefilled into it.

- KV cache: paged (PagedCache). Per layer one pool of PAGE-token pages, sized from free memory once; a block table
  names each slot's pages (which slot holds which: PageTable, common/generation/pages.py). A row takes pages as it
  grows (every CHECK_EVERY steps, for the tokens until the next look) and gives them back when it ends, so the rows
  decoded at once are bounded by the tokens really in flight, not by rows x cap. A prompt is admitted only while the
  free pages hold it beside a page of growth for each row in flight; where rows outgrow the pages anyway, the rows
  admitted last give theirs back and are resumed later (their tokens so far prefilled again), so no row is ever cut
  short. Where the pool holds every slot's whole row (always on a CPU), slot s keeps pages of its own in order, so
  SDPA reads them in place. Steps run on the first S' slots (the highest in use, rounded up to a power of two; new
  rows take the lowest free slot), so a draining batch costs less.
- Decoding steps are captured as CUDA graphs, one per slot bucket, on a GPU; the CPU runs the same code eagerly. The
  host never waits for a step between looks, and at a look it reads a snapshot of the slots while the GPU runs one
  more step, so the GPU does not idle while the host admits, moves and grows rows. What the host sends the GPU
  (block-table entries, prefill inputs, new rows) goes from pinned memory, queued behind the GPU's work (on_device).
- On a GPU each attention layer's query, key and value projections run as one GEMM in decoding steps
  (common/generation/patching.py: their weights become slices of one tensor); a prefill runs them apart.
- Decoding attention on a GPU: a Triton kernel of ours (common/generation/decode_kernel.py) reads each slot's pages
  in place through the block table, only the keys the row holds (fp16 or bf16; it runs on a T4 too). Elsewhere, or
  where it disagrees with a plain forward, SDPA over the pages (a view or a contiguous copy) under a mask over the
  first Lb positions (Lb: the longest live row, rounded up to LENGTH_BUCKET). Flash attention's varlen kernel takes
  no block table in torch 2.11 and is 1.9-3.7x slower than the Triton kernel
  (bench/results/decode-attention-h200.json), so it only serves packed prefills.
- Prefill: new prompts are packed into one row (no padding) whose keys and values are scattered into their pages;
  free slots wait until ADMIT_FRACTION of them can be filled at once. Identical prompts are prefilled once
  (instruction generation: every prompt is the same pre-query template).
- Sampling runs outside the graph with transformers' own logits processors
  (common.generation.sampling.logits_processors) on each slot's token history, so the settings mean what they mean
  in `generate`.
- Models in 4-bit (bitsandbytes NF4, the t4 tier's generator) run it too: their linear layers replay in the graphs.

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests, torch 2.11 and 2.13): a cache object of
our own passed to the model's forward (the keyword is `cache` from 5.2x on, `past_key_values` before), 4-D attention
masks and extra keywords (`block_table`, `decode_kernel`) passed through to the attention function unchanged, the
attention registries of `transformers.masking_utils` and the SDPA function of
`transformers.integrations.sdpa_attention`; the model patches of common/generation/patching.py (its attention switch,
compiled norms, MLPs and rotary embedding, fused q/k/v projections), undone by close();
`torch.ops.aten._flash_attention_forward` (packed prefills). make_generator checks the mechanism on the model itself
(one prefill and one decoding step against a plain forward) and returns why not where it fails; the engine then uses
plain `generate`.
"""

import inspect
import itertools
import math
import os
import sys
from collections import Counter

import torch

from common import SetupError
from common.generation import decode_kernel
from common.generation.pages import PAGE, PageTable
from common.generation.patching import ModelPatches
from common.generation.transfers import on_device, to_host
from common.generation.sampling import logits_processors, looping
from common.models import full_attention_only

LENGTH_BUCKET = 256  # SDPA attention reads a multiple of this many positions (a multiple of PAGE)
CHECK_EVERY = 8  # decoding steps between looks at which rows ended (each look reads a snapshot of the slots)
PREFILL_TOKENS = 16384  # at most this many prompt tokens in one prefill forward...
PREFILL_SHARE = 0.1  # ... and fewer where their activations would take more than this share of free GPU memory
# GPU memory a decoding row takes beyond its KV pages, per vocabulary entry: its logits and the sampling's copies
# (six float32 values)
SLOT_BYTES_PER_VOCAB = 24
# Free slots wait until this share of them (or every pending prompt) can be prefilled together: each prefill is a
# forward of its own between decoding steps, so a few large ones cost less than many of a row or two each
ADMIT_FRACTION = 1 / 16
MIN_SLOT_BUCKET = 8


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _pow2_bucket(n, top):
    return min(top, max(MIN_SLOT_BUCKET, 1 << max(0, n - 1).bit_length()))


def nucleus_sample(probs, top_p, candidates=256):
    """One token per row from `probs`, restricted to the nucleus as transformers' TopPLogitsWarper does (the most
    probable tokens whose mass before them is under top_p). The nucleus is looked for among the `candidates` most
    probable tokens, and the whole vocabulary is sorted only where it lies beyond them: on a CPU a full sort of 32
    rows of a 49k vocabulary took as long as the model's forward."""
    if top_p >= 1.0:
        return torch.multinomial(probs, 1).squeeze(1)
    top, index = probs.topk(min(candidates, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) >= top_p).all()):
        top, index = probs.sort(dim=-1, descending=True)
    keep = (top.cumsum(-1) - top) < top_p
    keep[:, 0] = True
    return index.gather(1, torch.multinomial(top * keep, 1)).squeeze(1)


def compute_dtype(model):
    """The dtype activations and the KV cache take: the first floating-point parameter's (the embeddings; a 4-bit
    model's packed weights are integers)."""
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def cache_argument(model):
    """The keyword under which this transformers version's forward takes the KV cache."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


class PagedCache:
    """The model's KV cache during fast generation (the object handed to forward as its cache): per layer one pool of
    pages, (pages, PAGE, kv_heads, head_dim), and a block table, (slots, max_pages) int32, naming slot s's pages in
    order. Page 0 is scratch: every table entry a row does not own points there, so a slot without a row (or past
    its pages) writes there and nobody reads it.

    "decode": every slot writes its one new token at its own position (`positions`) into its page; attention gets
    the pools with `block_table` (the Triton kernel reads each slot's pages in place) or, with `gather` (SDPA), a
    contiguous copy of the first `view` = (slots, length) of every slot's pages. "prefill": the new prompts' keys and
    values go to the flat page indices given, and their attention sees only themselves."""

    is_compileable = False

    def __init__(self, layers, pages, slots, max_pages, kv_heads, head_dim, dtype, device):
        shape = (pages, PAGE, kv_heads, head_dim)
        # every slot's whole row fits: slot s keeps pages 1 + s * max_pages + j, so its positions lie in one piece
        # and SDPA reads them in place (a view) instead of a gathered copy
        self.fixed = pages >= slots * max_pages + 1
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pages, self.slots, self.max_pages = pages, slots, max_pages
        self.page = PAGE  # tokens a page holds (PageTable reads it here)
        self.length = max_pages * PAGE  # the longest row a slot can hold
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.table = torch.zeros(slots, max_pages, dtype=torch.int32, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.heads = torch.arange(kv_heads, device=device)
        self.mode, self.view, self.flat_index, self.source = "decode", (slots, self.length), None, None
        self.gather = True  # SDPA: attention gets a contiguous copy of the pages (the generator sets it per step)
        self.write_index = None  # decode: where each slot's new keys go (flat page rows x heads), set by decoding()

    def decoding(self, slots, length, gather):
        """Set up a decoding step of the first `slots` slots: where each writes its new token's keys and values,
        worked out once here rather than again in every layer's update() (seven small kernels a layer)."""
        self.mode, self.view, self.gather = "decode", (slots, length), gather
        position = self.positions[:slots]
        page = self.table[:slots].gather(1, position // PAGE).long()
        self.write_index = ((page * PAGE + position % PAGE) * self.kv_heads + self.heads).reshape(-1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        flat_k, flat_v = keys.view(-1, self.head_dim), values.view(-1, self.head_dim)
        if self.mode == "prefill":
            # the packed row (1, kv_heads, tokens, dim) -> one (kv_heads, dim) block per token a slot takes
            tokens = self.source
            flat_k.index_copy_(0, self.flat_index, key_states[0].transpose(0, 1)[tokens].reshape(-1, self.head_dim))
            flat_v.index_copy_(0, self.flat_index, value_states[0].transpose(0, 1)[tokens].reshape(-1, self.head_dim))
            return key_states, value_states
        slots, length = self.view
        flat_k.index_copy_(0, self.write_index, key_states.reshape(-1, self.head_dim))
        flat_v.index_copy_(0, self.write_index, value_states.reshape(-1, self.head_dim))
        if not self.gather:
            return keys, values
        if self.fixed:
            rows = (self.slots, self.length, self.kv_heads, self.head_dim)
            return (keys[1:].view(rows)[:slots, :length].transpose(1, 2),
                    values[1:].view(rows)[:slots, :length].transpose(1, 2))
        pages = self.table[:slots, : length // PAGE].long()
        shape = (slots, length, self.kv_heads, self.head_dim)
        return keys[pages].view(shape).transpose(1, 2), values[pages].view(shape).transpose(1, 2)

    def flat_rows(self, pages, n):
        """The flat (page row, head) indices of positions 0..n-1 of a row on `pages`, in the order update() takes a
        prefilled prompt's tokens."""
        position = torch.arange(n)
        rows = torch.tensor(pages, dtype=torch.long)[position // PAGE] * PAGE + position % PAGE
        return (rows[:, None] * self.kv_heads + torch.arange(self.kv_heads)[None, :]).reshape(-1)

    def get_seq_length(self, layer_idx=0):
        return 0


class SlotGenerator:
    """Continuous batching for one model: `generate(prompts, sampling)` -> (generated ids per prompt, looped flags).

    `slots`: how many rows decode at once at most (the tier's GEN_ROWS, PREF_ROWS or JUDGE_ROWS); the KV pages they
    share are sized from free GPU memory (`pages` sets their number), so how many rows really decode at once depends
    on how long they are."""

    def __init__(self, model, pad_token_id, slots=128, graphs=None, memory_limit=None, compiled=None, pages=None):
        self.model, self.pad = model, pad_token_id
        config = model.config.get_text_config(decoder=True)
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab = config.vocab_size
        self.device = model.device
        self.dtype = compute_dtype(model)
        self.slots = slots
        self.requested_pages = pages
        self.memory_limit = memory_limit  # bytes this process may use on the GPU (None: all of it)
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.cache_kw = cache_argument(model)
        self.cache = None
        self.graphs, self.pool = {}, None
        self.kernel = decode_kernels(self.device)[0]  # decoding attention; make_generator checks it, falls back
        if compiled is None:  # SIT_COMPILE_DECODE=0: eager norms and MLPs
            compiled = self.graphs_on and os.environ.get("SIT_COMPILE_DECODE", "1") == "1"
        with ModelPatches(model) as self.patches:  # close() undoes them; a failure here already has
            self.patches.apply(use_slot_attention, compile=compiled,
                               fuse=self.device.type == "cuda")  # a GPU's GEMMs gain from fusing
        self.stats = Counter()  # decoding steps per slot bucket, prefills, preemptions: where a run's time went
        self.timing = False  # bench: time each prefill (CUDA events around it) into stats["prefill_s"]
        self.prefill_events = []
        self.admit_fraction = ADMIT_FRACTION
        self.prefill_tokens = PREFILL_TOKENS  # fewer where GPU memory is short (fit_pages)

    @property
    def compiled(self):
        return self.patches.compiled

    @property
    def fused(self):
        return self.patches.fused

    @property
    def reads_lengths(self):
        """Whether decoding attention reads each slot's pages and key count in place (Triton) rather than a
        contiguous copy under a mask (SDPA)."""
        return self.kernel != "sdpa"

    # ---- memory -------------------------------------------------------------------------------------------------
    def page_bytes(self):
        return 2 * self.layers * self.kv_heads * PAGE * self.head_dim * torch.finfo(self.dtype).bits // 8

    def fit_pages(self, length):
        """How many KV pages to allocate: enough for every slot at `length` tokens where memory allows (always on a
        CPU), else what free GPU memory holds, said; SetupError where not even one row of `length` fits."""
        row_pages = -(-length // PAGE)
        wanted = self.requested_pages or self.slots * row_pages + 1
        if self.device.type != "cuda":
            pages = wanted
        else:
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            if self.memory_limit is not None:
                free = min(free, self.memory_limit - torch.cuda.memory_allocated(self.device))
            config = self.model.config.get_text_config(decoder=True)
            intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
            # prefill activations (a few hidden-size and MLP-size tensors a token live at once), each slot's token
            # history and its share of the logits-sized tensors (SLOT_BYTES_PER_VOCAB), a margin
            per_token = (8 * config.hidden_size + 3 * intermediate) * 2
            self.prefill_tokens = int(min(PREFILL_TOKENS, max(1024, PREFILL_SHARE * free // per_token)))
            workspace = (self.prefill_tokens * per_token + self.slots * (length * 8 + self.vocab * SLOT_BYTES_PER_VOCAB)
                         + 2 * 2**30)
            pages = min(wanted, int((free - workspace) // self.page_bytes()))
            if pages < wanted:
                print(f"generation: a KV cache of {pages * PAGE:,} tokens ({pages * self.page_bytes() / 2**30:.1f} "
                      f"GiB, what free memory holds) shared by up to {self.slots} rows as they grow: fewer rows decode "
                      f"at once while rows are long (rows of {length} tokens at most)", file=sys.stderr, flush=True)
        if pages < row_pages + 1:
            raise SetupError(
                f"generation: the KV cache of one row of {length} tokens does not fit in free GPU memory: lower "
                "MAX_RESPONSE_TOKENS / MAX_INSTRUCTION_TOKENS (generate) or PREF_MAX_TOKENS (preference), or load "
                "the generator in 4-bit (--load-in-4bit)")
        return pages

    def ensure_cache(self, length):
        if self.cache is not None and self.cache.length >= length:
            return
        length = _round_up(length, LENGTH_BUCKET)
        self.cache = None
        self.drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        pages = self.fit_pages(length)
        self.cache = PagedCache(self.layers, pages, self.slots, length // PAGE, self.kv_heads, self.head_dim,
                                self.dtype, self.device)
        self.pages = PageTable(self.cache, self.device)
        self.tokens = torch.full((self.slots, 1), self.pad, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(self.slots, self.vocab, dtype=torch.float32, device=self.device)
        self.index = torch.arange(length, device=self.device)

    def close(self):
        """The model as it was before this generator: its attention implementation, nothing compiled;
        the KV cache and graphs dropped and their memory handed back to the GPU."""
        self.cache = None
        self.drop_graphs()
        self.patches.undo()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def drop_graphs(self):
        """Forget the captured graphs, and their memory pool with them: a later capture into the pool of graphs that
        are gone fails inside PyTorch's allocator (an internal assert), e.g. once the cache grows for longer prompts."""
        self.graphs, self.pool = {}, None

    # ---- one decoding step ----------------------------------------------------------------------------------------
    def forward_step(self, slots, length):
        cache = self.cache
        cache.decoding(slots, length, gather=not self.reads_lengths)
        positions = cache.positions[:slots]
        if self.reads_lengths:  # slot_attention reads each slot's key count from an int32 "mask"
            mask = (positions + 1).to(torch.int32).view(slots, 1, 1, 1)
            extra = {"block_table": cache.table[:slots], "slot_order": decode_kernel.longest_first(mask.view(-1))}
        else:
            mask, extra = (self.index[:length] <= positions).view(slots, 1, 1, length), {}
        out = self.model(input_ids=self.tokens[:slots], position_ids=positions, attention_mask=mask,
                         use_cache=True, logits_to_keep=1, decode_kernel=self.kernel, **extra,
                         **{self.cache_kw: cache})
        self.logits[:slots].copy_(out.logits[:, -1])

    def step(self, slots, length):
        self.stats[slots] += 1
        if not self.graphs_on:
            with torch.no_grad():
                self.forward_step(slots, length)
            return
        graph = self.graphs.get((slots, length))
        if graph is None:
            # Warm-up runs write the same keys/values the real step will (same inputs), so they change nothing.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self.forward_step(slots, length)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
                self.forward_step(slots, length)
            self.graphs[(slots, length)] = graph
        graph.replay()

    # ---- prefill --------------------------------------------------------------------------------------------------
    def prefill(self, assignments):
        """Prefill prompts into slots: assignments = [(slot, prompt ids)]; returns the last-position logits, one
        row per assignment. Packed: the distinct prompts one after another in one row (identical prompts share
        one), position ids restarting at each, attention within each (slot_attention's packed branch), so no token
        is padding and no mask is built; their keys and values are scattered into the slots' pages (grow() gave
        each slot pages for its prompt beforehand)."""
        timed = self.timing and self.device.type == "cuda"
        if timed:  # events, not a sync: the host keeps running ahead of the GPU
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        unique = list(dict.fromkeys(tuple(p) for _, p in assignments))
        row_of = {p: i for i, p in enumerate(unique)}
        lengths = [len(p) for p in unique]
        starts = [0, *itertools.accumulate(lengths)]
        ids = torch.tensor([t for p in unique for t in p])
        positions = torch.cat([torch.arange(n) for n in lengths])
        cache = self.cache
        tokens, flat = [], []
        for slot, p in assignments:
            u, n = row_of[tuple(p)], len(p)
            tokens.append(torch.arange(starts[u], starts[u] + n))
            flat.append(cache.flat_rows(self.pages.held[slot], n))
        tokens = torch.cat(tokens)
        dev = self.device
        cache.mode = "prefill"
        cache.source = on_device(tokens, dev)
        cache.flat_index = on_device(torch.cat(flat), dev)
        bounds = on_device(starts, dev, torch.int32).view(1, 1, 1, -1)
        last = on_device(starts[1:], dev) - 1
        with torch.no_grad():
            out = self.model(input_ids=on_device(ids, dev)[None], position_ids=on_device(positions, dev)[None],
                             attention_mask=bounds, max_length_q=max(lengths), use_cache=True, logits_to_keep=last,
                             **{self.cache_kw: cache})
        cache.mode, cache.source, cache.flat_index = "decode", None, None
        logits = out.logits[0].float()[on_device([row_of[tuple(p)] for _, p in assignments], dev)]
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(assignments)
        self.stats["prefill_tokens"] += int(starts[-1])
        if timed:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.prefill_events.append((began, ended))
        return logits

    def timed_prefills(self):
        """Adds the timed prefills' seconds to stats["prefill_s"] (waits for them)."""
        for began, ended in self.prefill_events:
            ended.synchronize()
            self.stats["prefill_s"] += began.elapsed_time(ended) / 1000
        self.prefill_events = []

    def check(self):
        """None if one prefill and one decoding step give the logits of a plain forward (two slots, prompts of
        different lengths, the longer one on two pages that are not adjacent), else what differs. Runs the real
        code: pages, block table, scatter, masks and the CUDA graph."""
        prompts = [[3 + (7 * i) % 50 for i in range(PAGE + 9)], [5 + (11 * i) % 50 for i in range(5)]]
        follow = [17, 23]
        n = min(len(prompts), self.slots)  # one slot: the long prompt alone
        prompts, follow = prompts[:n], follow[:n]
        self.ensure_cache(LENGTH_BUCKET)
        self.pages.grow({s: 1 for s in range(n)})  # slot 0's second page comes after slot 1's first
        self.pages.grow({s: len(p) + 1 for s, p in enumerate(prompts)})
        prefill = self.prefill(list(enumerate(prompts)))
        cache = self.cache
        cache.positions.zero_()
        for s, (p, t) in enumerate(zip(prompts, follow)):
            cache.positions[s, 0], self.tokens[s, 0] = len(p), t
        slots = _pow2_bucket(n, cache.slots)
        self.step(slots, cache.length if self.reads_lengths else LENGTH_BUCKET)
        worst = 0.0
        with torch.no_grad():
            for s, (p, t) in enumerate(zip(prompts, follow)):
                ref = self.model(input_ids=torch.tensor([p + [t]], device=self.device)).logits[0].float()
                for got, want in ((prefill[s], ref[-2]), (self.logits[s], ref[-1])):
                    worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-6)))
        cache.positions.zero_()
        self.pages.release(list(range(n)))
        tolerance = 1e-3 if self.dtype == torch.float32 else 1e-1
        return None if worst <= tolerance else f"largest relative logit difference {worst:.3g} > {tolerance}"

    # ---- the loop -------------------------------------------------------------------------------------------------
    def generate(self, prompts, sampling, extra_processors=()):
        """Generated token ids (stop token included where a row stopped) and whether each row stopped as a loop.
        `extra_processors`: more logits processors, called as transformers calls them (token history, scores)."""
        if not prompts:
            return [], []
        max_new = sampling.max_new_tokens
        self.ensure_cache(max(map(len, prompts)) + max_new + 1)
        cache, S, L = self.cache, self.cache.slots, self.cache.length
        dev = self.device
        # top-p is applied in choose() (nucleus_sample): the same rule, without sorting the whole vocabulary
        # the caller's processors first: a constraint's -inf stays -inf through the penalty and temperature
        processors = logits_processors(sampling.replace(top_p=1.0))
        processors[:0] = extra_processors
        stop_ids = torch.tensor(sorted(sampling.stop_token_ids) or [-1], device=dev)
        suppress = torch.tensor(sorted(sampling.suppress_at_start), dtype=torch.long, device=dev)
        history = torch.full((S, L + 1), self.pad, dtype=torch.long, device=dev)
        hist_len = torch.zeros(S, dtype=torch.long, device=dev)
        prompt_len = torch.zeros(S, dtype=torch.long, device=dev)
        generated = torch.zeros(S, dtype=torch.long, device=dev)
        active = torch.zeros(S, dtype=torch.bool, device=dev)
        looped = torch.zeros(S, dtype=torch.bool, device=dev)
        cache.positions.zero_()
        self.pages.release(self.pages.holders())  # a call that raised may have left some
        slot_request = [None] * S
        admitted = [0] * S  # when each slot's row was admitted: the last admitted give their pages back first
        resumed = {}  # request -> (its tokens so far, prompt length, generated, looped): rows that gave pages back
        results, loops = [None] * len(prompts), [False] * len(prompts)
        pending = list(range(len(prompts)))
        pending.reverse()  # pop() takes them in order
        window = sampling.loop_window
        rows = torch.arange(S, device=dev)
        admit_min = max(1, int(S * self.admit_fraction))
        # where each slot stands as the host last saw it: the look's snapshot, and the rows it admitted or moved
        positions = [0] * S
        idle = torch.full((self.vocab,), -math.inf, device=dev)
        idle[self.pad] = 0.0

        def choose(scores):
            if sampling.temperature > 0:
                return nucleus_sample(torch.softmax(scores, dim=-1), sampling.top_p)
            return scores.argmax(-1)

        def admit(free):
            """Prefill pending prompts into the free slots (lowest first), prefill_tokens at a time, while the free
            pages hold each prompt and its next CHECK_EVERY tokens beside a page of growth for every row in flight;
            else they wait for rows to end."""
            in_flight = sum(q is not None for q in slot_request)
            while pending and free:
                assignments, budget, wanted, claimed = [], self.prefill_tokens, {}, 0
                while pending and free and budget > 0:
                    r = pending[-1]
                    ids = resumed[r][0][:-1] if r in resumed else prompts[r]
                    pages = self.pages.pages_for(len(ids) + CHECK_EVERY + 1)
                    if claimed + pages + in_flight > self.pages.room() or (assignments and len(ids) > budget):
                        break
                    pending.pop()
                    slot = free.pop(0)
                    wanted[slot], claimed = len(ids) + CHECK_EVERY + 1, claimed + pages
                    assignments.append((slot, ids))
                    budget -= len(ids)
                    slot_request[slot], admitted[slot] = r, self.stats["admitted"]
                    self.stats["admitted"] += 1
                    in_flight += 1
                if not assignments:
                    return
                self.pages.grow(wanted)  # one block-table write for the prefill's rows
                start(assignments)

        def start(assignments):
            logits = self.prefill(assignments)
            fresh = [k for k, (s, _) in enumerate(assignments) if slot_request[s] not in resumed]
            for s, _ in assignments:
                if slot_request[s] in resumed:  # back where it left off: its tokens, no new first token
                    ids, plen, done, loop = resumed.pop(slot_request[s])
                    row = torch.full((L + 1,), self.pad, dtype=torch.long)  # the whole row: nothing of the slot's last
                    row[: len(ids)] = torch.tensor(ids)  # row stays for the processors to read
                    history[s] = on_device(row, dev)
                    hist_len[s], prompt_len[s], generated[s], looped[s] = len(ids), plen, done, loop
                    cache.positions[s, 0], self.tokens[s, 0], active[s] = len(ids) - 1, ids[-1], True
                    positions[s] = len(ids) - 1
            if not fresh:
                return
            assignments = [assignments[k] for k in fresh]
            for s, p in assignments:
                positions[s] = len(p)
            slots = on_device([s for s, _ in assignments], dev)
            lengths = torch.tensor([len(p) for _, p in assignments])
            padded = torch.full((len(assignments), L + 1), self.pad, dtype=torch.long)
            for k, (_, p) in enumerate(assignments):
                padded[k, : len(p)] = torch.tensor(p)
            history[slots] = on_device(padded, dev)  # one copy to the GPU, not one per row
            lengths = on_device(lengths, dev)
            scores = processors(history[slots], logits[on_device(fresh, dev)])
            if len(suppress):
                scores[:, suppress] = -math.inf
            first = choose(scores)
            history[slots, lengths] = first
            hist_len[slots], prompt_len[slots] = lengths + 1, lengths
            generated[slots] = 1
            cache.positions[slots, 0] = lengths
            self.tokens[slots, 0] = first
            looped[slots] = False
            active[slots] = ~torch.isin(first, stop_ids) & (max_new > 1)

        def make_room():
            """Pages for every row in flight to decode its next CHECK_EVERY + 1 tokens, from `positions` (where each
            slot stood at the snapshot, one step before this takes effect). Where the free pages fall short, the rows
            admitted last give theirs back and wait at the front of the queue: resumed, their tokens so far are
            prefilled again and they go on as before. The row admitted first always keeps going (the cache holds at
            least one whole row), so every row ends, none cut short."""
            live = [s for s in range(S) if slot_request[s] is not None]
            if not live:
                return
            wanted = {s: positions[s] + CHECK_EVERY + 1 for s in live}
            missing = {s: self.pages.missing(s, t) for s, t in wanted.items()}
            need = sum(missing.values())
            while need > self.pages.room():
                victim = max(wanted, key=lambda s: admitted[s])
                r, n = slot_request[victim], int(hist_len[victim])  # read after the step in flight (a sync)
                tokens, plen = history[victim, :n].tolist(), int(prompt_len[victim])
                if bool(active[victim]):
                    resumed[r] = (tokens, plen, int(generated[victim]), bool(looped[victim]))
                    pending.append(r)
                    self.stats["preempted"] += 1
                else:  # it ended in the step in flight: done, not preempted
                    results[r], loops[r] = tokens[plen:], bool(looped[victim])
                    self.stats["ended_when_preempted"] += 1
                active[victim], slot_request[victim] = False, None
                self.pages.release([victim])
                del wanted[victim]
                need -= missing.pop(victim)
            self.pages.grow(wanted)

        def compact():
            """Once nothing is pending, move the live rows into the lowest slots, so that the step runs on fewer
            (their pages stay where they are and the block table's rows move; in the fixed layout the keys and
            values move to the new slot's own pages). Their `positions` move with them."""
            used = [s for s in range(S) if slot_request[s] is not None]
            target = _pow2_bucket(len(used), S)
            movers = [s for s in used if s >= target]
            holes = [s for s in range(target) if slot_request[s] is None][: len(movers)]
            if not movers:
                return
            src, dst = on_device(movers, dev), on_device(holes, dev)
            for t in (history, hist_len, prompt_len, generated, active, looped, cache.positions, self.tokens):
                t[dst] = t[src]
            active[src] = False
            for a, b in zip(movers, holes):
                slot_request[b], slot_request[a] = slot_request[a], None
                admitted[b], positions[b] = admitted[a], positions[a]
            self.pages.move(movers, holes)

        def harvest(state):
            """Free the slots whose rows had ended at the snapshot (`state`: active, position, tokens held, prompt
            length, looped, per slot): their tokens start on their way to the host (collect() reads them; the step
            in flight leaves an ended row's tokens as they are) and their pages go back. The free slots, lowest
            first."""
            live, _, held, start, loop = state
            ended = [s for s in range(S) if slot_request[s] is not None and not live[s]]
            if ended:
                tokens, arrived = to_host(history[on_device(ended, dev)])
                outbox.append((tokens, arrived, [(slot_request[s], start[s], held[s], loop[s]) for s in ended]))
                for s in ended:
                    slot_request[s] = None
                self.pages.release(ended)
            return [s for s in range(S) if slot_request[s] is None]

        def collect(wait=False):
            """The harvested rows whose tokens have reached the host, into the results."""
            while outbox and (wait or outbox[0][1] is None or outbox[0][1].query()):
                tokens, arrived, rows_ended = outbox.pop(0)
                if arrived is not None:
                    arrived.synchronize()
                for k, (r, start, end, loop) in enumerate(rows_ended):
                    results[r], loops[r] = tokens[k, start:end].tolist(), bool(loop)

        def decode(slots, length):
            """One decoding step of the first `slots` slots and its sampling, queued on the GPU without a wait."""
            self.step(slots, length)
            live = active[:slots]
            scores = processors(history[:slots], self.logits[:slots])
            if sampling.temperature > 0:
                # a slot without a live row holds stale logits: it samples the pad token, so that nothing it holds
                # changes how the live rows are sampled (nucleus_sample's path, multinomial's draws)
                scores = torch.where(live[:, None], scores, idle)
            token = torch.where(live, choose(scores), self.pad)
            at = (rows[:slots], hist_len[:slots].clamp(max=L))
            history[at] = torch.where(live, token, history[at])
            hist_len[:slots] += live
            generated[:slots] += live
            ended = live & (torch.isin(token, stop_ids) | (generated[:slots] >= max_new))
            active[:slots] &= ~ended
            # a row that ends goes to position 0 at once, as release() puts a slot without a row: decoding
            # attention reads each slot's keys up to its position, so it reads one key there, not the ended row's
            cache.positions[:slots, 0] = (cache.positions[:slots, 0] + 1) * (live & ~ended)
            self.tokens[:slots, 0] = torch.where(live, token, self.tokens[:slots, 0])

        # Every CHECK_EVERY steps the host looks at which rows ended and admits, moves and grows rows. It looks at a
        # snapshot taken before one more step is queued, so the GPU decodes while the host does that work (looking
        # at the live state would leave the GPU idle meanwhile: ~1.5 ms a step at 512 rows on an H200).
        outbox = []  # harvested rows' tokens on their way to the host
        steps, slots, length = 0, None, L
        while True:
            if steps % CHECK_EVERY == 0:
                if window:
                    idx = (hist_len[:, None] - window + torch.arange(window, device=dev)).clamp(min=0)
                    tail = history.gather(1, idx)
                    tail = tail.masked_fill(idx < prompt_len[:, None], -1)
                    stuck = looping(tail) & active & (generated >= window)
                    looped |= stuck
                    active &= ~stuck
                state, arrived = to_host(torch.stack([active.long(), cache.positions[:, 0], hist_len, prompt_len,
                                                      looped.long()]))
                if slots is not None:  # the step the GPU runs while the host works
                    decode(slots, length)
                    steps += 1
                if arrived is not None:
                    arrived.synchronize()
                state = state.tolist()
                positions[:] = state[1]
                collect()
                free = harvest(state)
                if pending and len(free) >= min(admit_min, len(pending)):
                    admit(free)
                elif not pending and len(free) < S:
                    compact()
                make_room()
                if pending and all(r is None for r in slot_request):
                    admit([s for s in range(S)])  # make_room gave every page back: the queue starts again
                if all(r is None for r in slot_request):
                    break
                self.stats["most_rows"] = max(self.stats["most_rows"], sum(r is not None for r in slot_request))
                in_use = max(s for s in range(S) if slot_request[s] is not None) + 1
                slots = _pow2_bucket(in_use, S)
                if not self.reads_lengths:  # the mask's width: the longest live row's keys until the next look
                    longest = max(positions[s] for s in range(slots) if slot_request[s] is not None)
                    length = min(L, _round_up(longest + CHECK_EVERY + 1, LENGTH_BUCKET))
            decode(slots, length)
            steps += 1
        collect(wait=True)
        if self.timing:
            self.timed_prefills()
        return results, loops


SLOT_ATTENTION = "sit_slots"
def flash_varlen_available():
    """PyTorch's flash kernel: built in, switched on, and a GPU it runs on (Ampere or newer; not a T4)."""
    return (hasattr(torch.ops.aten, "_flash_attention_forward") and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


def decode_kernels(device):
    """The decoding attentions that may run here, best first: the Triton kernel over the pages in place
    (common/generation/decode_kernel.py; fp16 and bf16, any CUDA GPU triton supports, a T4 included), then SDPA over a
    contiguous copy of each slot's pages under a mask (always)."""
    if device.type != "cuda":
        return ["sdpa"]
    return (["triton"] if decode_kernel.available() else []) + ["sdpa"]


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention for the paged cache. An int32 mask holds sequence lengths: in a prefill (several query tokens) the
    offsets of the packed prompts (`packed_attention`); in decoding each slot's key count, the keys read from the
    pages in place through `block_table` by the Triton kernel. A boolean or no mask (SDPA over gathered pages, the
    plain forward): `grouped_sdpa_attention`."""
    if attention_mask is not None and attention_mask.dtype == torch.int32 and query.shape[2] > 1:
        return packed_attention(query, key, value, attention_mask.reshape(-1), kwargs["max_length_q"], scaling)
    if attention_mask is not None and attention_mask.dtype == torch.int32:
        return decode_kernel.attend(query, key, value, attention_mask.reshape(-1), kwargs["block_table"],
                                    scaling, kwargs.get("slot_order")), None
    return grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def packed_attention(query, key, value, bounds, max_length, scaling=None):
    """Causal attention within each of the sequences packed into one row (prefill): (1, H, T, D) queries, keys and
    values, `bounds` the int32 offsets where each starts (and T), `max_length` the longest. Flash attention's varlen
    kernel on a GPU that has it (grouped-query heads native); elsewhere SDPA on each sequence in turn."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if q.is_cuda and flash_varlen_available() and q.dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.aten._flash_attention_forward(q, k, v, bounds, bounds, max_length, max_length, 0.0, True,
                                                      False, scale=scaling)[0]
    else:
        groups = q.shape[1] // k.shape[1]
        edges = bounds.tolist()
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(groups, 0),
                v[a:b].transpose(0, 1).repeat_interleave(groups, 0), is_causal=True, scale=scaling,
            ).transpose(0, 1)
            for a, b in zip(edges, edges[1:])
        ])
    return out[None], None


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' SDPA attention, except that one decoding token of a grouped-query model attends per KV head.

    Stock SDPA attention with a mask expands the keys and values to every query head (`repeat_kv`): at decoding,
    where attention is bound by reading the cache, that moves the cache several times over. Here the query heads of
    one KV head become its query rows instead: (B, H, 1, D) -> (B, KV, H/KV, D), the same arithmetic with the cache
    read once. Everything else goes to transformers' own function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and query.shape[2] == 1 and key.shape[1] * groups == query.shape[1]
            and (attention_mask is None or (attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1))
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)):
        batch, heads, _, dim = query.shape
        output = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, key.shape[1], groups, dim), key, value, attn_mask=attention_mask,
            dropout_p=dropout, scale=scaling, is_causal=False,
        )
        return output.reshape(batch, 1, heads, dim), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_slot_attention(model):
    """Switch the model's attention to `slot_attention` (masks made as for SDPA where transformers makes them)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SLOT_ATTENTION)


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
