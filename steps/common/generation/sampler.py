"""How the engine picks each row's next token (Sampler): transformers' own logits processors for the call's Sampling
on each slot's token history (common.generation.sampling.logits_processors), so the settings mean what they mean in
`generate`, then greedy or nucleus sampling. Runs outside the CUDA graphs, on the logits the step left."""

import math

import torch

from common.generation.sampling import logits_processors


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


class Sampler:
    """One call's token choice. `first()`: a new row's first token (suppress_at_start applies); `next()`: one token
    for each of a decoding step's slots (the pad token where a slot holds no live row)."""

    def __init__(self, sampling, extra_processors, vocab, pad, device):
        self.temperature, self.top_p, self.pad = sampling.temperature, sampling.top_p, pad
        # top-p is applied in choose() (nucleus_sample): the same rule, without sorting the whole vocabulary;
        # the caller's processors first: a constraint's -inf stays -inf through the penalty and temperature
        self.processors = logits_processors(sampling.replace(top_p=1.0))
        self.processors[:0] = extra_processors
        self.stop_ids = torch.tensor(sorted(sampling.stop_token_ids) or [-1], device=device)
        self.suppress = torch.tensor(sorted(sampling.suppress_at_start), dtype=torch.long, device=device)
        self.idle = torch.full((vocab,), -math.inf, device=device)
        self.idle[pad] = 0.0

    def choose(self, scores):
        if self.temperature > 0:
            return nucleus_sample(torch.softmax(scores, dim=-1), self.top_p)
        return scores.argmax(-1)

    def first(self, history, logits):
        """`history`: the new rows' token histories (their prompts), `logits`: their prompts' last logits."""
        scores = self.processors(history, logits)
        if len(self.suppress):
            scores[:, self.suppress] = -math.inf
        return self.choose(scores)

    def next(self, history, logits, live):
        scores = self.processors(history, logits)
        if self.temperature > 0:
            # a slot without a live row holds stale logits: it samples the pad token, so that nothing it holds
            # changes how the live rows are sampled (nucleus_sample's path, multinomial's draws)
            scores = torch.where(live[:, None], scores, self.idle)
        return torch.where(live, self.choose(scores), self.pad)

    def stops(self, token):
        return torch.isin(token, self.stop_ids)
