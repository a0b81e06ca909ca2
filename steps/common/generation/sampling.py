"""How an engine call samples: `Sampling` (every setting, explicit), the loop rule, and transformers' logits
processors for a Sampling. Light to import (torch and transformers load inside the functions that need them), so
that recipes and the steps' option handling can use `Sampling` without loading an engine.
"""

import dataclasses
from dataclasses import dataclass


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


def first_stop(ids, stop_token_ids):
    """Where a row of token ids ends: the index of its first stop token, None where it has none. (Every engine's
    rows are cut here: engines.finish, StopRecorder.cut, the eval's answer_text.)"""
    return next((k for k, t in enumerate(ids) if t in stop_token_ids), None)


def looping(window, min_repeats=3, min_span=None):
    """Which rows of `window` (rows x the last W generated tokens, -1 where a row has fewer) end in a loop: a block
    of p <= W/min_repeats tokens repeated back to back, covering at least min_span (default W/2) tokens and at
    least min_repeats periods. Greedy decoding of a small model falls into such loops and stays there to the cap,
    so stopping them early only saves the tokens; the filter drops them either way."""
    import torch

    rows, width = window.shape
    min_span = width // 2 if min_span is None else min_span
    found = torch.zeros(rows, dtype=torch.bool, device=window.device)
    for period in range(1, width // min_repeats + 1):
        same = (window[:, period:] == window[:, :-period]) & (window[:, period:] >= 0)
        # length of the run of matches that ends at the last token
        run = torch.cumprod(same.flip(1).to(torch.int32), dim=1).sum(1) + period
        found |= run >= max(min_span, min_repeats * period)
    return found


class PenaltySparingStops:
    """transformers' repetition penalty, except on the stop tokens: the prompt holds the template's end-of-turn
    token, and penalising it would make every answer run longer (into the length cap)."""

    def __init__(self, penalty, stop_token_ids):
        from transformers import RepetitionPenaltyLogitsProcessor

        self.penalty = RepetitionPenaltyLogitsProcessor(penalty)
        self.stops = list(stop_token_ids)

    def __call__(self, input_ids, scores):
        penalised = self.penalty(input_ids, scores)
        if self.stops:
            penalised[:, self.stops] = scores[:, self.stops]
        return penalised


def logits_processors(sampling):
    """transformers' processors for a Sampling, in generate's order, first-token suppression excepted (its index
    depends on the prompt's length: engines apply it themselves)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(PenaltySparingStops(sampling.repetition_penalty, sampling.stop_token_ids))
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors
