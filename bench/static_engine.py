"""The static-cache engine the transformers engine used before continuous batching (commit 13e49bd), kept here only
as the benchmark's "today's engine" row: `StaticGenerator(model).generate(prompt_ids, max_new_tokens, pad_token_id,
**generate_options)`. A batch runs until its longest row ends; see bench/generation_speed.py.

Library internals (transformers 5.17, torch 2.11), as that engine used them: the generation mixin's `_prefill`,
`_update_model_kwargs_for_generation`, `_valid_auto_compile_criteria` and `_pad_token_tensor`, `torch._dynamo`, and
`transformers.masking_utils`.
"""

import os
from collections import deque

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from common.generation.attention import grouped_sdpa_attention


def use_grouped_sdpa(model):
    """Switch a grouped-query SDPA model to grouped_sdpa_attention (same masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("sdpa_grouped", grouped_sdpa_attention)
    AttentionMaskInterface.register("sdpa_grouped", sdpa_mask)
    model.set_attn_implementation("sdpa_grouped")


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


