"""Batched sampling with transformers' generate: stop strings, finish reasons, deterministic per batch."""

import torch


def sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop, seed):
    """Continue each prompt text; return one dict per prompt: text (cut at the first stop), finished, tokens.

    `finished` is False when the model ran into max_new_tokens without producing a stop (a truncated text).
    The result depends only on (prompts, settings, seed), so a resumed run reproduces an uninterrupted one.
    """
    stops = [s for s in dict.fromkeys([*stop, tokenizer.eos_token]) if s]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with torch.inference_mode():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            stop_strings=stops,
            tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    results = []
    for row in new_tokens:
        raw = tokenizer.decode(row, skip_special_tokens=False)
        cut = min((raw.find(s) for s in stops if s in raw), default=-1)
        text = raw[:cut] if cut >= 0 else raw
        n_tokens = int((row != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else len(row)
        results.append({"text": text.strip(), "finished": cut >= 0, "tokens": n_tokens})
    return results
