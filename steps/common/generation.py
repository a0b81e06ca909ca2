"""Generation engines behind one interface: `engine.sample(prompts, ...)` -> one dict per prompt.

- `transformers` (default): batched `generate` on a Hugging Face model.
- `vllm`: used when installed and asked for (ENGINE=vllm); produces the same records.

Each result is {"text": continuation cut at the first stop string, "finished": whether a stop (or EOS) was reached
before max_new_tokens, "tokens": generated tokens}. For a given engine and hardware the result depends only on
(prompts, settings, seed), so a resumed run reproduces an uninterrupted one.
"""

import torch

from .chat import prepare_tokenizer
from .models import load_causal_lm, load_tokenizer, resolve, resolve_dtype, trust_remote_code

ENGINES = ("transformers", "vllm")


def load_engine(kind, model, dtype="auto", load_in_4bit=False, device_map=None):
    if kind == "transformers":
        return TransformersEngine(model, dtype, load_in_4bit, device_map)
    if kind == "vllm":
        return VLLMEngine(model, dtype, load_in_4bit)
    raise ValueError(f"unknown engine {kind!r}; choose one of: {', '.join(ENGINES)}")


def cut_at_stop(raw, stops):
    """(text before the first stop string, whether one was found)."""
    cut = min((raw.find(s) for s in stops if s in raw), default=-1)
    return (raw[:cut] if cut >= 0 else raw).strip(), cut >= 0


class TransformersEngine:
    def __init__(self, model, dtype="auto", load_in_4bit=False, device_map=None):
        self.tokenizer = prepare_tokenizer(load_tokenizer(model))
        self.model = load_causal_lm(model, dtype=dtype, load_in_4bit=load_in_4bit, device_map=device_map)

    def sample(self, prompts, max_new_tokens, temperature, top_p, stop, seed):
        tokenizer, model = self.tokenizer, self.model
        stops = [s for s in dict.fromkeys([*stop, tokenizer.eos_token]) if s]
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(seed)
        if temperature > 0:
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            sampling = dict(do_sample=False)
        with torch.inference_mode():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                stop_strings=stops,
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        results = []
        for row in output[:, batch["input_ids"].shape[1] :]:
            text, finished = cut_at_stop(tokenizer.decode(row, skip_special_tokens=False), stops)
            results.append({"text": text, "finished": finished, "tokens": int((row != tokenizer.pad_token_id).sum())})
        return results


class VLLMEngine:
    """vLLM's offline LLM; per-prompt seeds keep results independent of how vLLM schedules the batch."""

    def __init__(self, model, dtype="auto", load_in_4bit=False):
        from vllm import LLM

        name = resolve(model)
        self.tokenizer = prepare_tokenizer(load_tokenizer(name))
        dtype = str(resolve_dtype(dtype)).replace("torch.", "")
        self.llm = LLM(model=name, dtype=dtype, trust_remote_code=trust_remote_code(), seed=0,
                       quantization="bitsandbytes" if load_in_4bit else None)

    def sample(self, prompts, max_new_tokens, temperature, top_p, stop, seed):
        from vllm import SamplingParams, TokensPrompt

        stops = [s for s in dict.fromkeys([*stop, self.tokenizer.eos_token]) if s]
        params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 max_tokens=max_new_tokens, stop=stops, seed=seed * 100_003 + i)
                  for i in range(len(prompts))]
        inputs = [TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False)["input_ids"])
                  for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [{"text": o.outputs[0].text.strip(), "finished": o.outputs[0].finish_reason == "stop",
                 "tokens": len(o.outputs[0].token_ids)} for o in outputs]
