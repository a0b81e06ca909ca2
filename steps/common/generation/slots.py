"""A request's state on the host (Request) and the decoding rows' state on the device (SlotState).

A slot holds at most one request's row. What the decoding step reads and writes each step lives on the device, one
entry per slot: the row's tokens so far (`history`, prompt included, read by the logits processors), how many it
holds, how long its prompt is, how many it generated, whether it is live and whether it stopped as a loop; beside
them the cache's `positions` and the step's input `tokens`, which the runner owns. The host reads them only in a
snapshot taken every few steps (`snapshot()`) and when a row gives its pages back (`take()`).
"""

from dataclasses import dataclass

import torch

from common.generation.sampling import looping
from common.generation.transfers import on_device, to_host


@dataclass
class Request:
    """One prompt of a generate() call. `progress`: (tokens so far, prompt length, generated, looped) of a row that
    gave its pages back to rows admitted before it; it is prefilled again (all its tokens but the last, which the
    next decoding step takes as input) and goes on where it stood."""

    index: int  # the prompt's place in the call
    prompt: list
    progress: tuple | None = None

    @property
    def ids(self):
        """The tokens a prefill takes for this request."""
        return self.progress[0][:-1] if self.progress else self.prompt


class SlotState:
    """Each slot's row on the device (see the module's docstring); `length`: the longest row a slot holds."""

    def __init__(self, slots, length, pad, positions, tokens):
        device = tokens.device
        self.length, self.pad = length, pad
        self.history = torch.full((slots, length + 1), pad, dtype=torch.long, device=device)
        self.hist_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.generated = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.looped = torch.zeros(slots, dtype=torch.bool, device=device)
        self.positions, self.tokens = positions, tokens  # the cache's (slots, 1) positions, the step's input
        self.rows = torch.arange(slots, device=device)

    def start(self, slots, prompts, choose_first, stops, max_new):
        """New rows in `slots` (a list): their prompts, then their first tokens, `choose_first(histories)` (the
        histories of these slots once their prompts are written)."""
        device = self.history.device
        index = on_device(slots, device)
        padded = torch.full((len(prompts), self.length + 1), self.pad, dtype=torch.long)
        for k, p in enumerate(prompts):
            padded[k, : len(p)] = torch.tensor(p)
        self.history[index] = on_device(padded, device)  # one copy to the GPU, not one per row
        lengths = on_device([len(p) for p in prompts], device)
        first = choose_first(self.history[index])
        self.history[index, lengths] = first
        self.hist_len[index], self.prompt_len[index] = lengths + 1, lengths
        self.generated[index] = 1
        self.positions[index, 0] = lengths
        self.tokens[index, 0] = first
        self.looped[index] = False
        self.active[index] = ~stops(first) & (max_new > 1)

    def resume(self, slot, progress):
        """A row back where it gave its pages up (Request.progress): its tokens, no new first token."""
        ids, prompt_len, generated, looped = progress
        row = torch.full((self.length + 1,), self.pad, dtype=torch.long)  # the whole row: nothing of the slot's
        row[: len(ids)] = torch.tensor(ids)  # last row stays for the processors to read
        self.history[slot] = on_device(row, self.history.device)
        self.hist_len[slot], self.prompt_len[slot], self.generated[slot], self.looped[slot] = (
            len(ids), prompt_len, generated, looped)
        self.positions[slot, 0], self.tokens[slot, 0], self.active[slot] = len(ids) - 1, ids[-1], True

    def take(self, slot):
        """(tokens so far, prompt length, generated, live, looped) of the row in `slot`, read now (a sync), and the
        slot no longer live."""
        n = int(self.hist_len[slot])
        row = (self.history[slot, :n].tolist(), int(self.prompt_len[slot]), int(self.generated[slot]),
               bool(self.active[slot]), bool(self.looped[slot]))
        self.active[slot] = False
        return row

    def append(self, slots, token, stops, max_new):
        """The decoding step's `token` for each of the first `slots` slots, added to the live rows; a row that ends
        (a stop token or max_new tokens) stops being live."""
        live = self.active[:slots]  # a view: it follows the update of `active` below
        at = (self.rows[:slots], self.hist_len[:slots].clamp(max=self.length))
        self.history[at] = torch.where(live, token, self.history[at])
        self.hist_len[:slots] += live
        self.generated[:slots] += live
        ended = live & (stops(token) | (self.generated[:slots] >= max_new))
        self.active[:slots] &= ~ended
        # a row that ends goes to position 0 at once, as release() puts a slot without a row: decoding attention
        # reads each slot's keys up to its position, so it reads one key there, not the ended row's
        self.positions[:slots, 0] = (self.positions[:slots, 0] + 1) * (live & ~ended)
        self.tokens[:slots, 0] = torch.where(live, token, self.tokens[:slots, 0])

    def stop_loops(self, window):
        """Rows whose last `window` generated tokens loop (sampling.looping) stop, marked looped."""
        index = (self.hist_len[:, None] - window + torch.arange(window, device=self.history.device)).clamp(min=0)
        tail = self.history.gather(1, index).masked_fill(index < self.prompt_len[:, None], -1)
        stuck = looping(tail) & self.active & (self.generated >= window)
        self.looped |= stuck
        self.active &= ~stuck

    def snapshot(self):
        """(live, position, tokens held, prompt length, looped) per slot, on its way to the host, and the event that
        says it arrived (None on a CPU)."""
        return to_host(torch.stack([self.active.long(), self.positions[:, 0], self.hist_len, self.prompt_len,
                                    self.looped.long()]))

    def rows_of(self, slots):
        """The token histories of `slots` (a list), on their way to the host, and the event that says they arrived."""
        return to_host(self.history[on_device(slots, self.history.device)])

    def move(self, movers, holes):
        """The rows of slots `movers` into slots `holes` (compaction)."""
        device = self.history.device
        src, dst = on_device(movers, device), on_device(holes, device)
        for t in (self.history, self.hist_len, self.prompt_len, self.generated, self.active, self.looped,
                  self.positions, self.tokens):
            t[dst] = t[src]
        self.active[src] = False
