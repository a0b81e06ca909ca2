"""Generation engines behind one interface: `engine.sample(prompts, sampling, seed)` -> one dict per prompt.

- `transformers` (default): the fast path in common/generation/fastgen.py (rows that stop free their slot for the next
  prompt; a paged KV cache sized from free memory, on a GPU our Triton kernel and CUDA graphs; 4-bit models too), or
  plain batched `generate` where it can't run (sliding-window attention, a transformers version it does not work on).
- `vllm`: used when installed and asked for (ENGINE=vllm); produces the same records.

`Sampling` holds every setting a call samples with, and both engines apply all of them: nothing is left for a
library or a model's generation_config to fill in (transformers would add top_k=50, Qwen's repetition penalty...).
Each result is {"text": continuation cut at the first stop, "finished": it ended on a stop token or string,
"stop_reason": "stop" | "length" (ran to max_new_tokens) | "loop" (stopped early by the repetition rule),
"tokens": generated tokens}. For a given engine and hardware the result depends only on (prompts, sampling, seed),
so a resumed run reproduces an uninterrupted one.
"""

import os

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from common import say_once
from common.generation.chat import prepare_tokenizer
from common.generation.sampling import first_stop, logits_processors, looping
from common.models import load_causal_lm, load_tokenizer, resolve, trust_remote_code
from common.precision import dtype_name

ENGINES = ("transformers", "vllm")


class LoopCriterion(StoppingCriteria):
    """`looping()` as a stopping criterion for `generate` (checked on the last `window` tokens of each row)."""

    def __init__(self, window, prompt_length):
        self.window, self.prompt_length = window, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] < self.window:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return looping(generated[:, -self.window:])


def process_device_map(rank, world):
    """Where a model goes in one of `world` processes: its own GPU (shared round-robin when there are fewer GPUs than
    processes, which is how one GPU tests sharding), the CPU without GPUs, or wherever it would go alone."""
    if world == 1:
        return None
    gpus = torch.cuda.device_count()
    return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % gpus}" if gpus else "cpu"}


def load_engine(kind, model, dtype="auto", load_in_4bit=False, device_map=None, adapter=None, batch_size=64):
    """An engine for `model`; with `adapter` (a LoRA directory, e.g. the SFT step's) the adapted model generates,
    formatting prompts with the adapter's tokenizer (the chat template it was trained with). `batch_size`: rows
    decoded at once (the transformers engine; vLLM schedules its own)."""
    if kind == "transformers":
        return TransformersEngine(model, dtype, load_in_4bit, device_map, adapter, batch_size)
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


def declared_stop_ids(model, tokenizer):
    """stop_ids() of a model by name, read from its generation_config.json without loading the weights."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(resolve(model))
    except OSError:  # no generation_config.json
        config = None
    return stop_ids(tokenizer, SimpleNamespace(generation_config=config))


def finish(tokenizer, row, sampling, looped=False):
    """The result dict of one generated row (token ids, stop token included, padding after it allowed)."""
    ids = [int(t) for t in row]
    stop = first_stop(ids, sampling.stop_token_ids)
    if stop is not None:
        ids = ids[:stop]
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    cut = min((raw.find(s) for s in sampling.stop_strings if s and s in raw), default=-1)
    finished = stop is not None or cut >= 0
    reason = "stop" if finished else ("loop" if looped else "length")
    text = raw[:cut] if cut >= 0 else raw
    return {"text": text.strip(), "finished": finished, "stop_reason": reason,
            "tokens": len(ids) + (stop is not None)}


class TransformersEngine:
    """A Hugging Face model behind `sample()`: the fast path of common/generation/fastgen.py where it runs (a model on
    one device, 4-bit or not, full attention, the transformers internals it was written for), plain batched `generate`
    otherwise, said once. SIT_FAST_GENERATE=0 forces the plain path."""

    def __init__(self, model, dtype="auto", load_in_4bit=False, device_map=None, adapter=None, batch_size=64):
        from common.generation import fastgen

        self.tokenizer = prepare_tokenizer(load_tokenizer(adapter or model))
        self.model = load_causal_lm(model, dtype=dtype, load_in_4bit=load_in_4bit, device_map=device_map,
                                    adapter=adapter)
        self.stop_token_ids = stop_ids(self.tokenizer, self.model)
        self.batch_size = batch_size
        self.fast, why_not = fastgen.make_generator(self.model, self.tokenizer.pad_token_id, slots=batch_size)
        if self.fast is None:
            say_once(f"generation: plain transformers generate ({why_not})")
        self.stop_criteria = {}

    def sample(self, prompts, sampling, seed, processors=()):
        """Results (common.generation.engines.finish) in prompt order; `processors`: more logits processors, after the
        sampling's own (e.g. the judge's answer constraint)."""
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        torch.manual_seed(seed)
        if self.fast is not None:
            rows, looped = self.fast.generate(ids, sampling, extra_processors=processors)
        else:  # batches of similar lengths (less padding), results back in prompt order
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            rows, looped = [None] * len(ids), [None] * len(ids)
            first = 0
            while first < len(order):
                chunk = order[first : first + self.batch_size]
                try:
                    done = self._generate([ids[i] for i in chunk], sampling, processors)
                except torch.cuda.OutOfMemoryError:
                    if self.batch_size == 1:
                        raise
                    self.batch_size //= 2  # a batch too large for the GPU: fewer rows from here on, said once
                    torch.cuda.empty_cache()
                    say_once(f"generation: out of GPU memory at {2 * self.batch_size} rows; {self.batch_size} rows "
                             "at a time from now on (GEN_ROWS / PREF_ROWS set the most)")
                    continue
                for i, row, loop in zip(chunk, *done):
                    rows[i], looped[i] = row, loop
                first += len(chunk)
        return [finish(self.tokenizer, row, sampling, loop) for row, loop in zip(rows, looped)]

    def _generate(self, ids, sampling, extra_processors=()):
        """Plain `generate` on a left-padded batch; every option explicit (a neutral GenerationConfig plus our own
        processors), so the model's generation_config adds nothing."""
        from transformers import GenerationConfig, SuppressTokensAtBeginLogitsProcessor

        tokenizer, model = self.tokenizer, self.model
        tokenizer.padding_side = "left"
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        width = batch["input_ids"].shape[1]
        processors = logits_processors(sampling)
        processors[:0] = extra_processors  # first: a constraint's -inf stays -inf through penalty and warpers
        if sampling.suppress_at_start:
            processors.insert(0, SuppressTokensAtBeginLogitsProcessor(list(sampling.suppress_at_start), width,
                                                                      device=model.device))
        criteria = {}
        if sampling.stop_strings:  # built once per set of strings: building reads the whole vocabulary
            key = tuple(sampling.stop_strings)
            if key not in self.stop_criteria:
                self.stop_criteria[key] = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(key))
            criteria["string"] = self.stop_criteria[key]
        if sampling.loop_window:
            criteria["loop"] = LoopCriterion(sampling.loop_window, width)
        recorder = StopRecorder(criteria, width)
        config = GenerationConfig(do_sample=sampling.temperature > 0, temperature=1.0, top_p=1.0, top_k=0,
                                  repetition_penalty=1.0, max_new_tokens=sampling.max_new_tokens,
                                  eos_token_id=list(sampling.stop_token_ids) or None,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config, logits_processor=processors,
                                    stopping_criteria=StoppingCriteriaList([recorder]))
        return recorder.cut(output[:, width:].cpu(), sampling.stop_token_ids)


class StopRecorder(StoppingCriteria):
    """The stopping criteria of one `generate` call, noting after how many tokens each first fired for each row:
    generate pads a stopped row to the batch's length, and the pad can be a stop token (SmolLM2's <|endoftext|>),
    so a row's end must come from here, not from its tokens."""

    def __init__(self, criteria, width):
        self.criteria, self.width, self.fired = criteria, width, {}

    def __call__(self, input_ids, scores, **kwargs):
        length = input_ids.shape[1] - self.width
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for name, criterion in self.criteria.items():
            hit = criterion(input_ids, scores)
            first = self.fired.setdefault(name, torch.full_like(stop, -1, dtype=torch.long))
            first[(first < 0) & hit] = length
            stop |= hit
        return stop

    def cut(self, rows, stop_token_ids):
        """(each row up to where it ended: its first stop token included, or where a criterion fired), (whether the
        loop rule ended it)."""
        out, looped = [], []
        for r, row in enumerate(rows):
            ids = row.tolist()
            stop = first_stop(ids, stop_token_ids)
            ends = {"token": len(ids) if stop is None else stop + 1}
            ends.update({name: int(first[r]) for name, first in self.fired.items() if first[r] >= 0})
            end = min(ends.values())
            out.append(row[:end])
            looped.append(ends.get("loop") == end and ends["token"] > end)
        return out, looped


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
        self.stop_token_ids = declared_stop_ids(name, self.tokenizer)  # hf_config has no generation_config

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

    def sample_json(self, prompts, sampling, seed, schema):
        """Like sample, each answer held to a JSON schema by vLLM's structured outputs (vLLM >= 0.11:
        StructuredOutputsParams; earlier: GuidedDecodingParams)."""
        from vllm import TokensPrompt

        try:
            from vllm.sampling_params import StructuredOutputsParams

            constraint = {"structured_outputs": StructuredOutputsParams(json=schema)}
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            constraint = {"guided_decoding": GuidedDecodingParams(json=schema)}
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = [self._params(sampling, seed, i, **constraint) for i in range(len(ids))]
        out = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False,
                                lora_request=self.lora)
        return [finish(self.tokenizer, list(o.outputs[0].token_ids), sampling) for o in out]
