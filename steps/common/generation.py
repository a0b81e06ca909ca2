"""Generation engines behind one interface: `engine.sample(prompts, sampling, seed)` -> one dict per prompt.

- `transformers` (default): on a GPU the fast path in common/fastgen.py (rows that stop free their slot for the next
  prompt; KV cache sized from free memory; CUDA graphs), elsewhere or where it can't run plain batched `generate`.
- `vllm`: used when installed and asked for (ENGINE=vllm); produces the same records.

`Sampling` holds every setting a call samples with, and both engines apply all of them: nothing is left for a
library or a model's generation_config to fill in (transformers would add top_k=50, Qwen's repetition penalty...).
Each result is {"text": continuation cut at the first stop, "finished": it ended on a stop token or string,
"stop_reason": "stop" | "length" (ran to max_new_tokens) | "loop" (stopped early by the repetition rule),
"tokens": generated tokens}. For a given engine and hardware the result depends only on (prompts, sampling, seed),
so a resumed run reproduces an uninterrupted one.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from .chat import prepare_tokenizer
from .models import load_causal_lm, load_tokenizer, resolve, trust_remote_code
from .precision import dtype_name

ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class Sampling:
    """Everything one engine call samples with. `record()` is what output records store as the settings used."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off (transformers' rule: logits of tokens already in the row shrink)
    stop_token_ids: tuple = ()  # a row is finished at any of these (the model's end-of-turn/end tokens)
    stop_strings: tuple = ()  # ... or at any of these strings (cut from the text)
    suppress_at_start: tuple = ()  # token ids never sampled as a row's first token (Magpie: no markdown openers)
    loop_window: int = 0  # >0: stop a row early (stop_reason "loop") when it ends in a repeating loop (looping())

    def record(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def looping(window, min_repeats=3, min_span=None):
    """Which rows of `window` (rows x the last W generated tokens, -1 where a row has fewer) end in a loop: a block
    of p <= W/min_repeats tokens repeated back to back, covering at least min_span (default W/2) tokens and at
    least min_repeats periods. Greedy decoding of a small model falls into such loops and stays there to the cap,
    so stopping them early only saves the tokens; the filter drops them either way."""
    rows, width = window.shape
    min_span = width // 2 if min_span is None else min_span
    found = torch.zeros(rows, dtype=torch.bool, device=window.device)
    for period in range(1, width // min_repeats + 1):
        same = (window[:, period:] == window[:, :-period]) & (window[:, period:] >= 0)
        # length of the run of matches that ends at the last token
        run = torch.cumprod(same.flip(1).to(torch.int32), dim=1).sum(1) + period
        found |= run >= max(min_span, min_repeats * period)
    return found


class LoopCriterion(StoppingCriteria):
    """`looping()` as a stopping criterion for `generate` (checked on the last `window` tokens of each row)."""

    def __init__(self, window, prompt_length):
        self.window, self.prompt_length = window, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] < self.window:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return looping(generated[:, -self.window:])


def logits_processors(sampling):
    """transformers' processors for a Sampling, in generate's order, first-token suppression excepted (its index
    depends on the prompt's length: engines apply it themselves)."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def process_device_map(rank, world):
    """Where a model goes in one of `world` processes: its own GPU (shared round-robin when there are fewer GPUs than
    processes, which is how one GPU tests sharding), the CPU without GPUs, or wherever it would go alone."""
    if world == 1:
        return None
    gpus = torch.cuda.device_count()
    return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % gpus}" if gpus else "cpu"}


def load_engine(kind, model, dtype="auto", load_in_4bit=False, device_map=None, adapter=None):
    """An engine for `model`; with `adapter` (a LoRA directory, e.g. the SFT step's) the adapted model generates,
    formatting prompts with the adapter's tokenizer (the chat template it was trained with)."""
    if kind == "transformers":
        return TransformersEngine(model, dtype, load_in_4bit, device_map, adapter)
    if kind == "vllm":
        return VLLMEngine(model, dtype, load_in_4bit, adapter)
    raise ValueError(f"unknown engine {kind!r}; choose one of: {', '.join(ENGINES)}")


def stop_ids(tokenizer, model=None):
    """The token ids that end a generation by default: the tokenizer's EOS and the model's generation_config EOS
    ids (Llama-3.1: <|eot_id|>, <|eom_id|>, <|end_of_text|>)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def finish(tokenizer, row, sampling, looped=False):
    """The result dict of one generated row (token ids, stop token included, padding after it allowed)."""
    ids = [int(t) for t in row]
    stop = next((k for k, t in enumerate(ids) if t in sampling.stop_token_ids), None)
    if stop is not None:
        ids = ids[:stop]
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    cut = min((raw.find(s) for s in sampling.stop_strings if s and s in raw), default=-1)
    finished = stop is not None or cut >= 0
    reason = "stop" if finished else ("loop" if looped else "length")
    text = raw[:cut] if cut >= 0 else raw
    return {"text": text.strip(), "finished": finished, "stop_reason": reason,
            "tokens": len(ids) + (stop is not None)}


def say_once(message, _said=set()):
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


class TransformersEngine:
    """A Hugging Face model behind `sample()`: the fast path of common/fastgen.py where it runs (a CUDA GPU, an
    unquantized model on one device, full attention, the transformers internals it was written for), plain batched
    `generate` otherwise, said once. SIT_FAST_GENERATE=0 forces the plain path."""

    def __init__(self, model, dtype="auto", load_in_4bit=False, device_map=None, adapter=None, slots=None):
        from . import fastgen

        self.tokenizer = prepare_tokenizer(load_tokenizer(adapter or model))
        self.model = load_causal_lm(model, dtype=dtype, load_in_4bit=load_in_4bit, device_map=device_map,
                                    adapter=adapter)
        self.stop_token_ids = stop_ids(self.tokenizer, self.model)
        self.fast, why_not = fastgen.make_generator(self.model, self.tokenizer.pad_token_id, slots=slots)
        if self.fast is None:
            say_once(f"generation: plain transformers generate ({why_not})")
        self.stop_criteria = {}

    def sample(self, prompts, sampling, seed):
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        torch.manual_seed(seed)
        if self.fast is not None:
            rows, looped = self.fast.generate(ids, sampling)
        else:
            rows, looped = self._generate(ids, sampling)
        return [finish(self.tokenizer, row, sampling, loop) for row, loop in zip(rows, looped)]

    def _generate(self, ids, sampling):
        """Plain `generate` on a left-padded batch; every option explicit (a neutral GenerationConfig plus our own
        processors), so the model's generation_config adds nothing."""
        from transformers import GenerationConfig, SuppressTokensAtBeginLogitsProcessor

        tokenizer, model = self.tokenizer, self.model
        tokenizer.padding_side = "left"
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        width = batch["input_ids"].shape[1]
        processors = logits_processors(sampling)
        if sampling.suppress_at_start:
            processors.insert(0, SuppressTokensAtBeginLogitsProcessor(list(sampling.suppress_at_start), width,
                                                                      device=model.device))
        criteria = StoppingCriteriaList()
        if sampling.stop_strings:  # built once per set of strings: building reads the whole vocabulary
            key = tuple(sampling.stop_strings)
            if key not in self.stop_criteria:
                self.stop_criteria[key] = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(key))
            criteria.append(self.stop_criteria[key])
        loop = LoopCriterion(sampling.loop_window, width) if sampling.loop_window else None
        if loop:
            criteria.append(loop)
        config = GenerationConfig(do_sample=sampling.temperature > 0, temperature=1.0, top_p=1.0, top_k=0,
                                  repetition_penalty=1.0, max_new_tokens=sampling.max_new_tokens,
                                  eos_token_id=list(sampling.stop_token_ids) or None,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config, logits_processor=processors,
                                    stopping_criteria=criteria)
        rows = output[:, width:]
        looped = [False] * len(rows)
        if loop:
            gen = rows.clone()
            looped = [bool(x) for x in _ends_in_loop(gen, tokenizer.pad_token_id, sampling)]
        return list(rows.cpu()), looped


def _ends_in_loop(rows, pad, sampling):
    """For rows padded after their end: whether each stopped in a loop (its last loop_window tokens loop)."""
    lengths = (rows != pad).sum(1)
    window = sampling.loop_window
    idx = (lengths[:, None] - window + torch.arange(window, device=rows.device)).clamp(min=0)
    tail = rows.gather(1, idx).masked_fill(lengths[:, None] < window, -1)
    return looping(tail) & (lengths < sampling.max_new_tokens)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def batch_bucket(n):
    """The batch size a call of n prompts runs at: a power of two up to 64, then a multiple of 64."""
    return 1 << (n - 1).bit_length() if n <= 64 else _round_up(n, 64)


class _Filler(StoppingCriteria):
    """Marks the rows that only pad the batch up to its bucket as finished from the first step."""

    def __init__(self, filler):
        self.filler = filler

    def __call__(self, input_ids, scores, **kwargs):
        return self.filler


class StaticGenerator:
    """`generate` on a static KV cache, its decoding step compiled (torch.compile, mode "reduce-overhead": CUDA graphs).

    The compiled decoding step is specialised to its shapes (dynamic=False): batch size and cache length. These are
    kept few: prompts are sorted by length and split into chunks of at most MAX_BATCH; a chunk runs at its
    `batch_bucket` size, padded with copies of one of its prompts that a stopping criterion marks finished at once;
    the cache holds the prompt plus max_new_tokens rounded up to a multiple of CACHE_MULTIPLE. Prompts are
    left-padded to a multiple of PROMPT_MULTIPLE only: the prefill runs uncompiled, and its width does not reach the
    decoding step's shapes (the 4-D mask spans the cache), so wider padding would only cost prefill time. Every
    shape is a function of the call alone, never of earlier calls, so a result depends only on (prompts, settings,
    seed). The last KEEP_CACHES caches are kept and reset in place, so the addresses baked into the CUDA graphs hold.

    The decoding loop is `decode_without_stalls` (given to generate as `custom_generate`); generate still prepares
    the inputs, cache, logits processors and stopping criteria, and compiles the forward.
    """

    PROMPT_MULTIPLE = 16
    CACHE_MULTIPLE = 128
    MAX_BATCH = 256
    KEEP_CACHES = 2

    @staticmethod
    def suits(model):
        if os.environ.get("SIT_STATIC_GENERATE", "1") == "0" or model.device.type != "cuda":
            return False
        if getattr(model, "hf_quantizer", None) is not None:
            return False  # 4-bit: plain generate
        if len(set((getattr(model, "hf_device_map", None) or {"": 0}).values())) > 1:
            return False  # a model split over devices: plain generate
        return torch.cuda.get_device_capability(model.device) >= (8, 0)

    def __init__(self, model, compile_config=None, stall_free=True):
        from transformers import CompileConfig
        from transformers.generation.utils import ALL_CACHE_NAMES

        self.model = model
        self.compile_config = compile_config or CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
        self.decode = decode_without_stalls if stall_free else None  # None: generate's own loop
        self.cache_name = ALL_CACHE_NAMES[0]  # "past_key_values" up to transformers 5.2x, then "cache"
        self.caches = {}
        use_grouped_sdpa(model)
        dynamo = torch._dynamo.config  # one compiled graph per (batch bucket, cache length): allow more than 8
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))

    def generate(self, prompts, max_new_tokens, pad_token_id, **options):
        """Token ids of each prompt (lists of ints) -> its generated ids (1-D CPU tensors, pad after a stop), in order.

        `options` go to `generate` (do_sample, temperature, top_p, stopping_criteria as a list, eos_token_id, ...).
        """
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        rows = [None] * len(prompts)
        for first in range(0, len(order), self.MAX_BATCH):
            chunk = order[first : first + self.MAX_BATCH]
            generated = self._generate([prompts[i] for i in chunk], max_new_tokens, pad_token_id, **options)
            for i, row in zip(chunk, generated):
                rows[i] = row
        return rows

    def _generate(self, prompts, max_new_tokens, pad_token_id, stopping_criteria=(), **options):
        n, size = len(prompts), batch_bucket(len(prompts))
        width = _round_up(max(1, *map(len, prompts)), self.PROMPT_MULTIPLE)
        input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((size, width), dtype=torch.long)
        for r in range(size):
            ids = prompts[min(r, n - 1)]
            if ids:
                input_ids[r, width - len(ids) :] = torch.tensor(ids)
                attention_mask[r, width - len(ids) :] = 1
        device = self.model.device
        criteria = StoppingCriteriaList(stopping_criteria)
        if size > n:
            criteria.append(_Filler(torch.arange(size, device=device) >= n))
        if self.decode is not None:
            options["custom_generate"] = self.decode
        # no_grad, not inference_mode: the caches outlive the call and are reset in place by the next one
        with torch.no_grad():
            cache = self._cache(size, _round_up(width + max_new_tokens, self.CACHE_MULTIPLE))
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                stopping_criteria=criteria,
                cache_implementation=None,
                compile_config=self.compile_config,
                **{self.cache_name: cache},
                **options,
            )
        return list(output[:n, width:].cpu())

    def _cache(self, size, length):
        from transformers import StaticCache

        key = (size, length)
        cache = self.caches.pop(key, None)
        if cache is None:
            while len(self.caches) >= self.KEEP_CACHES:
                self.caches.pop(next(iter(self.caches)))
            cache = StaticCache(config=self.model.config.get_text_config(decoder=True), max_cache_len=length)
        else:
            cache.reset()
        self.caches[key] = cache  # most recently used last
        return cache


STOP_CHECK_LAG = 2


def decode_without_stalls(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """generate's sampling/greedy loop (`_sample`, same building blocks), without a host-device sync at every token.

    `_sample` asks the GPU after every token whether all rows have stopped (`bool(unfinished.max() == 0)`), so the
    host waits for each step before it can queue the next, and the Python work of a step (inputs, masks, logits
    processors, stopping criteria) adds to the GPU time instead of overlapping it. Here that answer is copied back
    without waiting and read STOP_CHECK_LAG steps later: the host stays up to that many steps ahead, and at the end
    the steps queued after the last row stopped, which hold only pad tokens, are dropped, so the output is what
    `_sample` returns. Rows that have stopped get pad tokens, as `_sample` does when there is an EOS.
    """
    pad = generation_config._pad_token_tensor
    if pad is None:
        raise ValueError("decode_without_stalls needs a pad_token_id")
    pad = pad.to(input_ids.device)
    forward = (model.get_compiled_call(generation_config.compile_config)
               if model._valid_auto_compile_criteria(model_kwargs, generation_config) else model.__call__)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cuda = input_ids.device.type == "cuda"
    pending = deque()
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        del outputs
        scores = logits_processor(input_ids, logits)
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        input_ids = torch.cat([input_ids, torch.where(unfinished, tokens, pad)[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if input_ids.shape[1] >= generation_config.max_length:
            return input_ids
        done = ~unfinished.any()
        if not cuda:
            if done:
                return input_ids
        else:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(done, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending.append((flag, event))
            if len(pending) > STOP_CHECK_LAG:
                flag, event = pending.popleft()
                event.synchronize()
                if flag:  # every row had stopped STOP_CHECK_LAG steps ago: what came after is padding
                    return input_ids[:, :-STOP_CHECK_LAG]
        model_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        outputs = forward(**model_inputs, return_dict=True)


GROUPED_SDPA = "sdpa_grouped"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' SDPA attention, except that one decoding token of a grouped-query model attends per KV head.

    Stock SDPA attention with a mask (always there with a static cache) expands the keys and values to every query
    head (`repeat_kv`): at decoding, where attention is bound by reading the cache, that moves the cache several
    times over. Here the query heads of one KV head become its query rows instead: (B, H, 1, D) -> (B, KV, H/KV, D),
    the same arithmetic with the cache read once. Everything else goes to transformers' own function.
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


def use_grouped_sdpa(model):
    """Switch a grouped-query model that uses SDPA attention to `grouped_sdpa_attention` (same masks)."""
    config = model.config.get_text_config(decoder=True)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if model.config._attn_implementation != "sdpa" or not heads or not kv_heads or heads == kv_heads:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)
    return model.config._attn_implementation == GROUPED_SDPA


class VLLMEngine:
    """vLLM's offline LLM; per-prompt seeds keep results independent of how vLLM schedules the batch.

    Every Sampling field is passed on: first-token suppression as a one-token call restricted to the other tokens
    (vLLM has no per-position processors), then the rest from there; the loop rule can only label rows afterwards
    (vLLM runs them to the cap), so it saves no time here. Special tokens are kept in the text so that stop strings
    and the template-echo check see them."""

    def __init__(self, model, dtype="auto", load_in_4bit=False, adapter=None):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        name = resolve(model)
        self.tokenizer = prepare_tokenizer(load_tokenizer(adapter or name))
        dtype = dtype_name(dtype)
        self.llm = LLM(model=name, dtype=dtype, trust_remote_code=trust_remote_code(), seed=0,
                       quantization="bitsandbytes" if load_in_4bit else None, enable_lora=adapter is not None)
        self.lora = LoRARequest("adapter", 1, adapter) if adapter else None
        self.stop_token_ids = stop_ids(self.tokenizer, self.llm.llm_engine.get_model_config().hf_config)

    def _params(self, sampling, seed, i, **changes):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        options = dict(temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
                       top_k=0 if greedy or sampling.top_k <= 0 else sampling.top_k,
                       repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_new_tokens,
                       stop=list(sampling.stop_strings), stop_token_ids=list(sampling.stop_token_ids),
                       ignore_eos=True, skip_special_tokens=False, seed=seed * 100_003 + i)
        return SamplingParams(**{**options, **changes})

    def sample(self, prompts, sampling, seed):
        from vllm import TokensPrompt

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        first = [[] for _ in ids]
        if sampling.suppress_at_start:
            banned = set(sampling.suppress_at_start)
            allowed = [t for t in range(len(self.tokenizer)) if t not in banned]
            params = [self._params(sampling, seed, i, max_tokens=1, allowed_token_ids=allowed) for i in range(len(ids))]
            out = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False,
                                    lora_request=self.lora)
            first = [list(o.outputs[0].token_ids) for o in out]
        todo = [i for i, f in enumerate(first) if not (f and f[0] in sampling.stop_token_ids)]
        rest = {i: [] for i in range(len(ids))}
        if todo:
            params = [self._params(sampling, seed + 1, i, max_tokens=sampling.max_new_tokens - len(first[i]))
                      for i in todo]
            out = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i] + first[i]) for i in todo], params,
                                    use_tqdm=False, lora_request=self.lora)
            rest.update({i: list(o.outputs[0].token_ids) for i, o in zip(todo, out)})
        rows = [first[i] + rest[i] for i in range(len(ids))]
        looped = [bool(sampling.loop_window) and len(r) >= sampling.loop_window
                  and bool(looping(torch.tensor([r[-sampling.loop_window:]]))[0]) for r in rows]
        return [finish(self.tokenizer, row, sampling, loop) for row, loop in zip(rows, looped)]
