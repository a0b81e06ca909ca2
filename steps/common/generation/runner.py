"""The model side of the fast path (ModelRunner): the KV cache sized from free memory, the packed prefill, the
decoding step (captured as CUDA graphs, one per slot bucket, on a GPU; eager on a CPU), and the check of both
against a plain forward. It owns the model's patches while it lives (patching.ModelPatches) and the step's input and
output buffers (`tokens`, `logits`); which rows are in which slots is the scheduler's and SlotState's business.

- KV cache: cache.PagedCache, its pages handed out by pages.PageTable. Sized once from free GPU memory (fit_pages):
  where the pool holds every slot's whole row (always on a CPU) slot s keeps pages of its own in order, so SDPA
  reads them in place.
- Decoding attention on a GPU: a Triton kernel of ours (decode_kernel.py) reads each slot's pages in place through
  the block table, only the keys the row holds (fp16 or bf16; it runs on a T4 too). Elsewhere, or where it disagrees
  with a plain forward, SDPA over the pages (a view or a contiguous copy) under a mask over the first `length`
  positions. Flash attention's varlen kernel takes no block table in torch 2.11 and is 1.9-3.7x slower than the
  Triton kernel (bench/results/decode-attention-h200.json), so it only serves packed prefills.
- On a GPU each attention layer's query, key and value projections run as one GEMM in decoding steps
  (patching.py: their weights become slices of one tensor); a prefill runs them apart.
- Models in 4-bit (bitsandbytes NF4, the t4 tier's generator) run it too: their linear layers replay in the graphs.

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests): extra forward keywords (`slot_phase`, `block_table`, `decode_kernel`, `slot_order`,
`max_length_q`) and 4-D int32 or boolean attention masks passed through to the attention function unchanged
(attention.py); the cache object's interface (cache.py).
"""

import itertools
import os
import sys

import torch

from common import SetupError
from common.generation import decode_kernel
from common.generation.attention import decode_kernels, use_slot_attention
from common.generation.cache import PagedCache, cache_argument
from common.generation.pages import PAGE, PageTable
from common.generation.patching import ModelPatches
from common.generation.scheduler import CHECK_EVERY, slot_bucket
from common.generation.stats import Stats
from common.generation.transfers import on_device

LENGTH_BUCKET = 256  # SDPA attention reads a multiple of this many positions (a multiple of PAGE)
PREFILL_TOKENS = 16384  # at most this many prompt tokens in one prefill forward...
PREFILL_SHARE = 0.1  # ... and fewer where their activations would take more than this share of free GPU memory
# GPU memory a decoding row takes beyond its KV pages, per vocabulary entry: its logits and the sampling's copies
# (six float32 values)
SLOT_BYTES_PER_VOCAB = 24


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def compute_dtype(model):
    """The dtype activations and the KV cache take: the first floating-point parameter's (the embeddings; a 4-bit
    model's packed weights are integers)."""
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


class ModelRunner:
    """One model's prefills and decoding steps over a paged cache of `slots` rows. `pages`: how many KV pages
    (default: every slot's whole row, or what free GPU memory holds); `memory_limit`: bytes this process may use on
    the GPU (None: all of it); `graphs`, `compiled`: CUDA graphs and compiled norms/MLPs (default: on a GPU)."""

    page = PAGE  # tokens a KV page holds

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
        self.memory_limit = memory_limit
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
        self.stats = Stats()
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
        return 2 * self.layers * self.kv_heads * self.page * self.head_dim * torch.finfo(self.dtype).bits // 8

    def fit_pages(self, length):
        """How many KV pages to allocate: enough for every slot at `length` tokens where memory allows (always on a
        CPU), else what free GPU memory holds, said; SetupError where not even one row of `length` fits."""
        row_pages = -(-length // self.page)
        wanted = self.requested_pages or self.slots * row_pages + 1
        pages = wanted if self.device.type != "cuda" else min(wanted, self.pages_in_free_memory(length))
        if pages < wanted:
            print(f"generation: a KV cache of {pages * self.page:,} tokens ({pages * self.page_bytes() / 2**30:.1f} "
                  f"GiB, what free memory holds) shared by up to {self.slots} rows as they grow: fewer rows decode "
                  f"at once while rows are long (rows of {length} tokens at most)", file=sys.stderr, flush=True)
        if pages < row_pages + 1:
            raise SetupError(
                f"generation: the KV cache of one row of {length} tokens does not fit in free GPU memory: lower "
                "MAX_RESPONSE_TOKENS / MAX_INSTRUCTION_TOKENS (generate) or PREF_MAX_TOKENS (preference), or load "
                "the generator in 4-bit (--load-in-4bit)")
        return pages

    def pages_in_free_memory(self, length):
        """The pages free GPU memory holds beside the prefill's activations and each slot's other tensors (and sets
        prefill_tokens to what PREFILL_SHARE of free memory holds)."""
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
        return int((free - workspace) // self.page_bytes())

    def ensure_cache(self, length):
        """A cache whose slots hold rows of `length` tokens (a new one, and no graphs, where the one there is
        shorter)."""
        if self.cache is not None and self.cache.length >= length:
            return
        length = round_up(length, LENGTH_BUCKET)
        self.cache = None
        self.drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        pages = self.fit_pages(length)
        self.cache = PagedCache(self.layers, pages, self.slots, length // self.page, self.kv_heads, self.head_dim,
                                self.dtype, self.device, self.page)
        self.pages = PageTable(self.cache, self.device)
        self.tokens = torch.full((self.slots, 1), self.pad, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(self.slots, self.vocab, dtype=torch.float32, device=self.device)
        self.index = torch.arange(length, device=self.device)

    def close(self):
        """The model as it was before this runner: its attention implementation, nothing compiled; the KV cache and
        graphs dropped and their memory handed back to the GPU."""
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
        """The model's forward for one token in each of the first `slots` slots (keys up to `length` under SDPA); the
        last logits into `logits`."""
        cache = self.cache
        cache.decoding(slots, length, gather=not self.reads_lengths)
        positions = cache.positions[:slots]
        if self.reads_lengths:  # the Triton kernel reads each slot's key count from an int32 "mask"
            mask = (positions + 1).to(torch.int32).view(slots, 1, 1, 1)
            extra = {"block_table": cache.table[:slots], "slot_order": decode_kernel.longest_first(mask.view(-1))}
        else:
            mask, extra = (self.index[:length] <= positions).view(slots, 1, 1, length), {}
        out = self.model(input_ids=self.tokens[:slots], position_ids=positions, attention_mask=mask,
                         use_cache=True, logits_to_keep=1, slot_phase="decode", decode_kernel=self.kernel, **extra,
                         **{self.cache_kw: cache})
        self.logits[:slots].copy_(out.logits[:, -1])

    def step(self, slots, length):
        """One decoding step: forward_step, replayed from its CUDA graph (captured on first use) on a GPU."""
        self.stats[slots] += 1
        watcher = self.stats.step_watcher
        if watcher is not None:
            watcher.before(slots, self)
        self.run_step(slots, length)
        if watcher is not None:
            watcher.after(slots)

    def run_step(self, slots, length):
        if not self.graphs_on:
            with torch.no_grad():
                self.forward_step(slots, length)
            return
        graph = self.graphs.get((slots, length))
        if graph is None:
            graph = self.capture(slots, length)
        graph.replay()

    def capture(self, slots, length):
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
        return graph

    def keys_to_read(self, longest):
        """The positions a step's SDPA attention reads until the next look: the longest live row's, rounded up to
        LENGTH_BUCKET (the Triton kernel reads each slot's own: the whole row's length, its graph's key)."""
        if self.reads_lengths:
            return self.cache.length
        return min(self.cache.length, round_up(longest + CHECK_EVERY + 1, LENGTH_BUCKET))

    # ---- prefill --------------------------------------------------------------------------------------------------
    def prefill(self, assignments):
        """Prefill prompts into slots: assignments = [(slot, prompt ids)]; returns the last-position logits, one
        row per assignment. Packed: the distinct prompts one after another in one row (identical prompts share
        one: instruction generation's prompts are all the same pre-query template), position ids restarting at
        each, attention within each, so no token is padding and no mask is built; their keys and values are
        scattered into the slots' pages (the page table gave each slot pages for its prompt beforehand)."""
        began = self.stats.prefill_began(self.device)
        unique = list(dict.fromkeys(tuple(p) for _, p in assignments))
        row_of = {p: i for i, p in enumerate(unique)}
        lengths = [len(p) for p in unique]
        starts = [0, *itertools.accumulate(lengths)]
        ids = torch.tensor([t for p in unique for t in p])
        positions = torch.cat([torch.arange(n) for n in lengths])
        tokens, flat = [], []
        for slot, p in assignments:
            u, n = row_of[tuple(p)], len(p)
            tokens.append(torch.arange(starts[u], starts[u] + n))
            flat.append(self.cache.flat_rows(self.pages.held[slot], n))
        dev = self.device
        source, flat_index = on_device(torch.cat(tokens), dev), on_device(torch.cat(flat), dev)
        bounds = on_device(starts, dev, torch.int32).view(1, 1, 1, -1)
        last = on_device(starts[1:], dev) - 1
        with torch.no_grad(), self.cache.prefilling(source, flat_index):
            out = self.model(input_ids=on_device(ids, dev)[None], position_ids=on_device(positions, dev)[None],
                             attention_mask=bounds, max_length_q=max(lengths), use_cache=True, logits_to_keep=last,
                             slot_phase="prefill", **{self.cache_kw: self.cache})
        logits = out.logits[0].float()[on_device([row_of[tuple(p)] for _, p in assignments], dev)]
        self.stats.prefill_ended(began, len(assignments), int(starts[-1]))
        return logits

    # ---- the check ------------------------------------------------------------------------------------------------
    def check(self):
        """None if one prefill and one decoding step give the logits of a plain forward (two slots, prompts of
        different lengths, the longer one on two pages that are not adjacent), else what differs. Runs the real
        code: pages, block table, scatter, masks and the CUDA graph."""
        prompts = [[3 + (7 * i) % 50 for i in range(self.page + 9)], [5 + (11 * i) % 50 for i in range(5)]]
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
        self.step(slot_bucket(n, cache.slots), cache.length if self.reads_lengths else LENGTH_BUCKET)
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
