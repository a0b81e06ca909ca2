"""The fast generation path: continuous batching over a slot KV cache, on transformers' model forward.

Real Magpie responses end anywhere from a few tokens to the cap, and `generate` runs a batch until its longest row
ends: most of the work goes to rows that have already stopped. Here a fixed number of slots decode together; a row
that ends (stop token, length cap, or the loop rule) frees its slot, and the next prompt is prefilled into it.

- KV cache: per layer one (slots, kv_heads, length, head_dim) tensor, allocated once and grown only when a call needs
  longer rows. Slot s writes its token at position p to index p (one scatter per layer and step); the attention mask
  is `index <= p` per slot, so a reused slot needs no clearing. Attention reads only the first Lb indices (Lb: the
  longest live row, rounded up to LENGTH_BUCKET) and the first S' slots (the highest slot in use, rounded up to a
  power of two; new rows take the lowest free slot), so short rows and a draining batch cost less.
- Decoding steps are captured as CUDA graphs, one per (S', Lb), on a GPU; the CPU runs the same code eagerly.
- Decoding attention on a GPU reads each slot's key count (`slot_attention`), so a step reads only the keys the
  rows hold: a Triton kernel of ours (common/decode_kernel.py), else flash attention's varlen kernel, whichever
  first agrees with a plain forward; elsewhere SDPA with a mask over the first Lb indices.
- Prefill: new prompts are packed into one row (no padding) whose keys and values are scattered into their slots;
  free slots wait until ADMIT_FRACTION of them can be filled at once. Identical prompts are prefilled once
  (instruction generation: every prompt is the same pre-query template).
- Sampling runs outside the graph with transformers' own logits processors (common.generation.logits_processors)
  on each slot's token history, so the settings mean what they mean in `generate`.
- The number of slots is checked against free GPU memory before the first batch and reduced, with a message,
  where the KV cache would not fit (SetupError where not even one slot fits).

This leans on transformers internals: a cache object of our own passed to the model's forward (the keyword is
`cache` from 5.2x on, `past_key_values` before), 4-D attention masks passed through unchanged, and the attention
interface registry (grouped SDPA for decoding). make_generator checks the mechanism on the model itself (one prefill
and one decoding step against a plain forward) and returns why not where it fails; the engine then uses plain
`generate`. Measured on transformers 5.17 (device) and 5.24 (CPU tests).
"""

import inspect
import itertools
import math
import os
import sys
import time
from collections import Counter

import torch

from . import SetupError, decode_kernel

LENGTH_BUCKET = 256  # attention reads a multiple of this many cache indices
CHECK_EVERY = 8  # decoding steps between looks at which rows ended (each look waits for the GPU)
PREFILL_TOKENS = 16384  # at most this many prompt tokens in one prefill forward
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


def cache_argument(model):
    """The keyword under which this transformers version's forward takes the KV cache."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def full_attention_only(config):
    """Sliding-window layers would need their own masks: the fast path takes full attention models only."""
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


class SlotCache:
    """The model's KV cache during fast generation (the object handed to forward as its cache).

    "decode": every slot writes its one new token at its own position (`positions`), and the attention sees the
    first `view` = (slots, length) of the cache. "prefill": the new prompts' keys and values go to their slots at the
    flat indices given, and their attention sees only themselves."""

    is_compileable = False

    def __init__(self, layers, slots, kv_heads, length, head_dim, dtype, device):
        # (slots, length, kv_heads, head_dim): the first S' slots are one contiguous block, as flash's varlen
        # kernel wants its keys; attention in the usual (batch, heads, length, dim) layout gets transposed views
        shape = (slots, length, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.kv_heads, self.length, self.head_dim = slots, kv_heads, length, head_dim
        self.mode, self.view, self.flat_index, self.source = "decode", (slots, length), None, None
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        # flat row of (slot s, position 0, head h) in a (slots * length * kv_heads, head_dim) view
        self.base = torch.arange(slots, device=device)[:, None] * (length * kv_heads) + torch.arange(kv_heads,
                                                                                                     device=device)

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
        index = (self.base[:slots] + self.positions[:slots] * self.kv_heads).reshape(-1)
        flat_k.index_copy_(0, index, key_states.reshape(-1, self.head_dim))
        flat_v.index_copy_(0, index, value_states.reshape(-1, self.head_dim))
        return keys[:slots, :length].transpose(1, 2), values[:slots, :length].transpose(1, 2)

    def get_seq_length(self, layer_idx=0):
        return 0


class SlotGenerator:
    """Continuous batching for one model: `generate(prompts, sampling)` -> (generated ids per prompt, looped flags).

    `slots`: how many rows decode at once (the tier's GEN_ROWS, PREF_ROWS or JUDGE_ROWS), reduced to what fits in
    free GPU memory."""

    def __init__(self, model, pad_token_id, slots=128, graphs=None, memory_limit=None, compiled=None):
        self.model, self.pad = model, pad_token_id
        config = model.config.get_text_config(decoder=True)
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab = config.vocab_size
        self.device = model.device
        self.dtype = next(model.parameters()).dtype
        self.requested_slots = slots
        self.memory_limit = memory_limit  # bytes this process may use on the GPU (None: all of it)
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.cache_kw = cache_argument(model)
        self.cache = None
        self.graphs, self.pool = {}, None
        use_slot_attention(model)
        self.kernel = decode_kernels(self.device)[0]  # decoding attention; make_generator checks it, falls back
        if compiled is None:  # 13% more tokens/s at realistic lengths on an H200 (bench/README.md); =0: eager
            compiled = self.graphs_on and os.environ.get("SIT_COMPILE_DECODE", "1") == "1"
        self.compiled = compiled and compile_pointwise(model)
        self.stats = Counter()  # decoding steps per slot bucket, prefills: where a run's time went (bench)
        self.timing = False  # bench: time each prefill (a GPU sync before and after it) into stats["prefill_s"]
        self.admit_fraction = ADMIT_FRACTION

    @property
    def reads_lengths(self):
        """Whether decoding attention takes each slot's key count (Triton, flash) rather than a mask (SDPA)."""
        return self.kernel != "sdpa"

    # ---- memory -------------------------------------------------------------------------------------------------
    def slot_bytes(self, length):
        kv = 2 * self.layers * self.kv_heads * length * self.head_dim * torch.finfo(self.dtype).bits // 8
        return kv + length * 8 + self.vocab * 4 * 6  # + token history, + logits and the sampling's copies of them

    def fit_slots(self, length):
        """The slots whose cache fits: all requested where free memory allows, else fewer (said), never none."""
        if self.device.type != "cuda":
            return self.requested_slots
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if self.memory_limit is not None:
            free = min(free, self.memory_limit - torch.cuda.memory_allocated(self.device))
        config = self.model.config.get_text_config(decoder=True)
        intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
        # prefill activations of PREFILL_TOKENS tokens (a few hidden-size and MLP-size tensors live at once), a margin
        workspace = PREFILL_TOKENS * (8 * config.hidden_size + 3 * intermediate) * 2 + 2 * 2**30
        fits = int((free - workspace) // self.slot_bytes(length))
        slots = min(self.requested_slots, fits)
        if slots < 1:
            raise SetupError(
                f"generation: the KV cache of one row of {length} tokens does not fit in {free / 2**30:.1f} GiB of "
                "free GPU memory: lower MAX_RESPONSE_TOKENS / MAX_INSTRUCTION_TOKENS (generate) or PREF_MAX_TOKENS "
                "(preference), or load the generator in 4-bit (--load-in-4bit)")
        if slots < self.requested_slots:
            if slots >= MIN_SLOT_BUCKET:
                slots = slots // MIN_SLOT_BUCKET * MIN_SLOT_BUCKET
            print(f"generation: {slots} rows at a time instead of {self.requested_slots} (GEN_ROWS, PREF_ROWS, "
                  f"JUDGE_ROWS): the KV cache of {self.requested_slots} rows of {length} tokens needs "
                  f"{self.requested_slots * self.slot_bytes(length) / 2**30:.1f} GiB and "
                  f"{(free - workspace) / 2**30:.1f} GiB is free", file=sys.stderr, flush=True)
        return slots

    def ensure_cache(self, length):
        if self.cache is not None and self.cache.length >= length:
            return
        length = _round_up(length, LENGTH_BUCKET)
        self.cache = None
        self.drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        slots = self.fit_slots(length)
        self.cache = SlotCache(self.layers, slots, self.kv_heads, length, self.head_dim, self.dtype, self.device)
        S = slots
        self.tokens = torch.full((S, 1), self.pad, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(S, self.vocab, dtype=torch.float32, device=self.device)
        self.index = torch.arange(length, device=self.device)

    def drop_graphs(self):
        """Forget the captured graphs, and their memory pool with them: a later capture into the pool of graphs that
        are gone fails inside PyTorch's allocator (an internal assert, seen when the cache grew for longer prompts)."""
        self.graphs, self.pool = {}, None

    # ---- one decoding step ----------------------------------------------------------------------------------------
    def _forward_step(self, slots, length):
        cache = self.cache
        cache.mode, cache.view = "decode", (slots, length)
        positions = cache.positions[:slots]
        if self.reads_lengths:  # slot_attention reads each slot's key count from an int32 "mask"
            mask = (positions + 1).to(torch.int32).view(slots, 1, 1, 1)
        else:
            mask = (self.index[:length] <= positions).view(slots, 1, 1, length)
        out = self.model(input_ids=self.tokens[:slots], position_ids=positions, attention_mask=mask,
                         use_cache=True, logits_to_keep=1, decode_kernel=self.kernel, **{self.cache_kw: cache})
        self.logits[:slots].copy_(out.logits[:, -1])

    def step(self, slots, length):
        self.stats[slots] += 1
        if not self.graphs_on:
            with torch.no_grad():
                self._forward_step(slots, length)
            return
        graph = self.graphs.get((slots, length))
        if graph is None:
            # Warm-up runs write the same keys/values the real step will (same inputs), so they change nothing.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self._forward_step(slots, length)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
                self._forward_step(slots, length)
            self.graphs[(slots, length)] = graph
        graph.replay()

    # ---- prefill --------------------------------------------------------------------------------------------------
    def prefill(self, assignments):
        """Prefill prompts into slots: assignments = [(slot, prompt ids)]; returns the last-position logits, one
        row per assignment. Packed: the distinct prompts one after another in one row (identical prompts share
        one), position ids restarting at each, attention within each (slot_attention's packed branch), so no token
        is padding and no mask is built; their keys and values are scattered into their slots."""
        timed = self.timing and self.device.type == "cuda"
        if timed:
            torch.cuda.synchronize(self.device)
            began = time.perf_counter()
        unique = list(dict.fromkeys(tuple(p) for _, p in assignments))
        row_of = {p: i for i, p in enumerate(unique)}
        lengths = [len(p) for p in unique]
        starts = [0, *itertools.accumulate(lengths)]
        ids = torch.tensor([t for p in unique for t in p])
        positions = torch.cat([torch.arange(n) for n in lengths])
        heads = torch.arange(self.kv_heads)
        length = self.cache.length
        tokens, flat = [], []
        for slot, p in assignments:
            u, n = row_of[tuple(p)], len(p)
            tokens.append(torch.arange(starts[u], starts[u] + n))
            # flat row of (slot, position j, head h): [n, kv_heads], in the order update() takes the tokens
            flat.append(((slot * length + torch.arange(n))[:, None] * self.kv_heads + heads[None, :]).reshape(-1))
        tokens = torch.cat(tokens)
        dev = self.device
        cache = self.cache
        cache.mode = "prefill"
        cache.source = tokens.to(dev)
        cache.flat_index = torch.cat(flat).to(dev)
        bounds = torch.tensor(starts, dtype=torch.int32).view(1, 1, 1, -1).to(dev)
        last = torch.tensor(starts[1:]) - 1
        with torch.no_grad():
            out = self.model(input_ids=ids[None].to(dev), position_ids=positions[None].to(dev), attention_mask=bounds,
                             max_length_q=max(lengths), use_cache=True, logits_to_keep=last.to(dev),
                             **{self.cache_kw: cache})
        cache.mode, cache.source, cache.flat_index = "decode", None, None
        logits = out.logits[0].float()[torch.tensor([row_of[tuple(p)] for _, p in assignments], device=dev)]
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(assignments)
        self.stats["prefill_tokens"] += int(starts[-1])
        if timed:
            torch.cuda.synchronize(self.device)
            self.stats["prefill_s"] += time.perf_counter() - began
        return logits

    def check(self):
        """None if one prefill and one decoding step give the logits of a plain forward (two slots, prompts of
        different lengths), else what differs. Runs the real code: cache, scatter, masks and the CUDA graph."""
        prompts = [[3 + (7 * i) % 50 for i in range(9)], [5 + (11 * i) % 50 for i in range(5)]]
        follow = [17, 23]
        self.ensure_cache(LENGTH_BUCKET)
        prefill = self.prefill(list(enumerate(prompts)))
        cache = self.cache
        cache.positions.zero_()
        for s, (p, t) in enumerate(zip(prompts, follow)):
            cache.positions[s, 0], self.tokens[s, 0] = len(p), t
        slots = _pow2_bucket(2, cache.slots)
        self.step(slots, cache.length if self.reads_lengths else LENGTH_BUCKET)
        worst = 0.0
        with torch.no_grad():
            for s, (p, t) in enumerate(zip(prompts, follow)):
                ref = self.model(input_ids=torch.tensor([p + [t]], device=self.device)).logits[0].float()
                for got, want in ((prefill[s], ref[-2]), (self.logits[s], ref[-1])):
                    worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-6)))
        cache.positions.zero_()
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        return None if worst <= tolerance else f"largest relative logit difference {worst:.3g} > {tolerance}"

    # ---- the loop -------------------------------------------------------------------------------------------------
    def generate(self, prompts, sampling, extra_processors=()):
        """Generated token ids (stop token included where a row stopped) and whether each row stopped as a loop.
        `extra_processors`: more logits processors, called as transformers calls them (token history, scores)."""
        from .generation import logits_processors, looping

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
        slot_request = [None] * S
        results, loops = [None] * len(prompts), [False] * len(prompts)
        pending = list(range(len(prompts)))
        pending.reverse()  # pop() takes them in order
        window = sampling.loop_window
        rows = torch.arange(S, device=dev)
        admit_min = max(1, int(S * self.admit_fraction))

        def choose(scores):
            if sampling.temperature > 0:
                return nucleus_sample(torch.softmax(scores, dim=-1), sampling.top_p)
            return scores.argmax(-1)

        def admit(free):
            """Prefill pending prompts into the free slots (lowest first), PREFILL_TOKENS at a time."""
            while pending and free:
                assignments, budget = [], PREFILL_TOKENS
                while pending and free and budget > 0:
                    r = pending.pop()
                    slot = free.pop(0)
                    assignments.append((slot, prompts[r]))
                    slot_request[slot] = r
                    budget -= len(prompts[r])
                start(assignments)

        def start(assignments):
            logits = self.prefill(assignments)
            slots = torch.tensor([s for s, _ in assignments], device=dev)
            lengths = torch.tensor([len(p) for _, p in assignments])
            padded = torch.full((len(assignments), L + 1), self.pad, dtype=torch.long)
            for k, (_, p) in enumerate(assignments):
                padded[k, : len(p)] = torch.tensor(p)
            history[slots] = padded.to(dev)  # one copy to the GPU (one per row waited for the GPU each time)
            lengths = lengths.to(dev)
            scores = processors(history[slots], logits)
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

        def compact():
            """Once nothing is pending, move the live rows into the lowest slots, so that the step runs on fewer."""
            used = [s for s in range(S) if slot_request[s] is not None]
            target = _pow2_bucket(len(used), S)
            movers = [s for s in used if s >= target]
            holes = [s for s in range(target) if slot_request[s] is None][: len(movers)]
            if not movers:
                return
            src, dst = torch.tensor(movers, device=dev), torch.tensor(holes, device=dev)
            for t in (*cache.keys, *cache.values, history, hist_len, prompt_len, generated, active, looped,
                      cache.positions, self.tokens):
                t[dst] = t[src]
            active[src] = False
            for a, b in zip(movers, holes):
                slot_request[b], slot_request[a] = slot_request[a], None

        def harvest():
            """Collect the rows that ended; return the free slots (lowest first)."""
            ended = [s for s in torch.nonzero(~active).flatten().tolist() if slot_request[s] is not None]
            if ended:
                index = torch.tensor(ended, device=dev)
                rows_cpu = history[index].cpu()
                starts, ends, loop_cpu = prompt_len[index].cpu(), hist_len[index].cpu(), looped[index].cpu()
                for k, s in enumerate(ended):
                    r = slot_request[s]
                    results[r] = rows_cpu[k, starts[k] : ends[k]].tolist()
                    loops[r] = bool(loop_cpu[k])
                    slot_request[s] = None
            return [s for s in range(S) if slot_request[s] is None]

        admit(harvest())
        steps = 0
        while True:
            if steps % CHECK_EVERY == 0:
                if window:
                    idx = (hist_len[:, None] - window + torch.arange(window, device=dev)).clamp(min=0)
                    tail = history.gather(1, idx)
                    tail = tail.masked_fill(idx < prompt_len[:, None], -1)
                    stuck = looping(tail) & active & (generated >= window)
                    looped |= stuck
                    active &= ~stuck
                free = harvest()
                if pending and len(free) >= min(admit_min, len(pending)):
                    admit(free)
                elif not pending and len(free) < S:
                    compact()
                free = [s for s in range(S) if slot_request[s] is None]
                if len(free) == S:
                    break
                in_use = max(s for s in range(S) if slot_request[s] is not None) + 1
                slots = _pow2_bucket(in_use, S)
                if self.reads_lengths:  # each slot reads its own keys: the view is the whole cache
                    length = L
                else:  # the mask's width: the longest live row and the steps until the next look, bucketed
                    longest = int(cache.positions[:slots].max())
                    length = min(L, _round_up(longest + CHECK_EVERY + 1, LENGTH_BUCKET))
            self.step(slots, length)
            scores = processors(history[:slots], self.logits[:slots])
            token = torch.where(active[:slots], choose(scores), self.pad)
            live = active[:slots]
            at = (rows[:slots], hist_len[:slots].clamp(max=L))
            history[at] = torch.where(live, token, history[at])
            hist_len[:slots] += live
            generated[:slots] += live
            ended = live & (torch.isin(token, stop_ids) | (generated[:slots] >= max_new))
            active[:slots] &= ~ended
            cache.positions[:slots, 0] += live & ~ended
            self.tokens[:slots, 0] = torch.where(live, token, self.tokens[:slots, 0])
            steps += 1
        return results, loops


SLOT_ATTENTION = "sit_slots"
POINTWISE_MODULES = ("RMSNorm", "MLP")  # class-name endings: Llama, Qwen2, Mistral, SmolLM2 (Llama) all have them


def compile_pointwise(model):
    """Compile the model's norms and MLPs in place, with dynamic shapes: each class compiles once and serves every
    layer, every slot bucket and every prefill. A decoding step is ~45 small kernels a layer when eager (RMSNorm
    alone is seven), which the CUDA graph replays but still runs one by one; compiled, a norm or the SiLU gate is
    one fused kernel. Attention, with the cache's Python-side bookkeeping, stays eager. True where anything was
    compiled (nothing without `torch.compile` support, e.g. no triton)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # inductor's GPU backend
        return False
    compiled = 0
    for module in model.modules():
        if type(module).__name__.endswith(POINTWISE_MODULES) and not hasattr(module, "_sit_compiled"):
            module.compile(dynamic=True)
            module._sit_compiled = True
            compiled += 1
    return compiled > 0


def uncompile_pointwise(model):
    """Undo compile_pointwise: the modules run eagerly again."""
    for module in model.modules():
        if hasattr(module, "_sit_compiled"):
            module._compiled_call_impl = None
            del module._sit_compiled


def flash_varlen_available():
    """PyTorch's flash kernel: built in, switched on, and a GPU it runs on (Ampere or newer; not a T4)."""
    return (hasattr(torch.ops.aten, "_flash_attention_forward") and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


def decode_kernels(device):
    """The decoding attentions that may run here, best first: the Triton kernel (common/decode_kernel.py), flash
    attention's varlen kernel, masked SDPA (always)."""
    if device.type != "cuda":
        return ["sdpa"]
    candidates = (("triton", decode_kernel.available()), ("flash", flash_varlen_available()))
    return [kernel for kernel, runs in candidates if runs] + ["sdpa"]


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention for the slot cache. An int32 mask holds sequence lengths: in a prefill (several query tokens) the
    offsets of the packed prompts (`packed_attention`); in decoding each slot's key count, read from the cache as it
    lies by the Triton kernel (decode_kernel="triton") or flash attention's varlen kernel, each slot reading only
    the keys it holds. A boolean or no mask: `grouped_sdpa_attention`."""
    if attention_mask is not None and attention_mask.dtype == torch.int32 and query.shape[2] > 1:
        return packed_attention(query, key, value, attention_mask.reshape(-1), kwargs["max_length_q"], scaling)
    if attention_mask is not None and attention_mask.dtype == torch.int32 and kwargs.get("decode_kernel") == "triton":
        return decode_kernel.attend(query, key, value, attention_mask.reshape(-1), scaling), None
    if attention_mask is not None and attention_mask.dtype == torch.int32:
        # The query heads that share a KV head become that head's query rows (max_q = groups, not causal: they are
        # one position), so each slot's keys are read once per KV head, not once per query head.
        slots, heads, _, dim = query.shape
        kv_heads, length = key.shape[1], key.shape[2]
        groups = heads // kv_heads
        offsets = torch.arange(slots + 1, device=query.device, dtype=torch.int32)
        out = torch.ops.aten._flash_attention_forward(
            query.reshape(slots, kv_heads, groups, dim).transpose(1, 2).reshape(slots * groups, kv_heads, dim),
            key.transpose(1, 2).reshape(slots * length, kv_heads, dim),
            value.transpose(1, 2).reshape(slots * length, kv_heads, dim),
            offsets * groups, offsets * length, groups, length, 0.0, False, False, scale=scaling,
            seqused_k=attention_mask.reshape(slots))[0]
        return out.view(slots, groups, kv_heads, dim).transpose(1, 2).reshape(slots, 1, heads, dim), None
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
        uncompile_pointwise(generator.model)
        generator.compiled = False
        generator.drop_graphs()
        try:
            error = generator.check()
        except Exception:
            generator.compiled = compile_pointwise(generator.model)
            raise
        print(f"generation: compiled decoding off ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr, flush=True)
        return error


def make_generator(model, pad_token_id, slots=None):
    """(SlotGenerator, None) where the fast path runs for this model, else (None, why not): SIT_FAST_GENERATE=0, a
    quantized or multi-device model, sliding-window attention, or a check of the mechanism against a plain forward
    that fails on this transformers version. On a CPU it runs too, without CUDA graphs or flash attention: rows
    that end stop costing there as well (the cpu tier's 32 sampled responses: 43 s against 55 s for generate)."""
    if os.environ.get("SIT_FAST_GENERATE", "1") == "0":
        return None, "SIT_FAST_GENERATE=0"
    if getattr(model, "hf_quantizer", None) is not None:
        return None, "a quantized (4-bit) model"
    if len(set((getattr(model, "hf_device_map", None) or {"": 0}).values())) > 1:
        return None, "a model split over devices"
    if not full_attention_only(model.config.get_text_config(decoder=True)):
        return None, "sliding-window attention"
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
        uncompile_pointwise(model)
        return None, f"the fast path does not run on this model or transformers version ({type(e).__name__}: {e})"
    if error is not None:
        uncompile_pointwise(model)
        return None, f"the fast path disagrees with a plain forward on this model ({error})"
    return generator, None
