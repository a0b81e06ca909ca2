"""The KV cache the model's forward writes during fast generation (PagedCache): per layer one pool of pages and the
block table naming each slot's pages. Which slot holds which page is pages.PageTable's business; this file only
stores keys and values where it is told and hands attention what it reads.

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests): transformers calls `update(key_states, value_states, layer_idx)` on the object passed to forward
as its cache (keyword `cache` from transformers 5.2x on, `past_key_values` before: cache_argument) and reads
`is_compileable` and `get_seq_length`.
"""

import contextlib
import inspect

import torch

from common.generation.pages import PAGE


def cache_argument(model):
    """The keyword under which this transformers version's forward takes the KV cache."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


class PagedCache:
    """Per layer one pool of pages, (pages, page, kv_heads, head_dim), and a block table, (slots, max_pages) int32,
    naming slot s's pages in order. Page 0 is scratch: every table entry a row does not own points there, so a slot
    without a row (or past its pages) writes there and nobody reads it.

    Decoding (`decoding()`): every slot writes its one new token at its own position (`positions`) into its page;
    attention gets the pools with `block_table` (the Triton kernel reads each slot's pages in place) or, with `gather`
    (SDPA), a contiguous copy of the first `view` = (slots, length) of every slot's pages. Prefilling
    (`with prefilling(...)`): the new prompts' keys and values go to the flat page indices given, and their attention
    sees only themselves."""

    is_compileable = False

    def __init__(self, layers, pages, slots, max_pages, kv_heads, head_dim, dtype, device, page=PAGE):
        shape = (pages, page, kv_heads, head_dim)
        # every slot's whole row fits: slot s keeps pages 1 + s * max_pages + j, so its positions lie in one piece
        # and SDPA reads them in place (a view) instead of a gathered copy
        self.fixed = pages >= slots * max_pages + 1
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pages, self.slots, self.max_pages = pages, slots, max_pages
        self.page = page  # tokens a page holds (PageTable reads it here)
        self.length = max_pages * page  # the longest row a slot can hold
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.table = torch.zeros(slots, max_pages, dtype=torch.int32, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.heads = torch.arange(kv_heads, device=device)
        self.view = (slots, self.length)
        self.gather = True  # SDPA: attention gets a contiguous copy of the pages (set per step by decoding())
        self.write_index = None  # decoding: where each slot's new keys go (flat page rows x heads)
        self.prefill = None  # prefilling: (which packed tokens each written block comes from, where it goes)

    def decoding(self, slots, length, gather):
        """Set up a decoding step of the first `slots` slots: where each writes its new token's keys and values,
        worked out once here rather than again in every layer's update() (seven small kernels a layer)."""
        self.view, self.gather = (slots, length), gather
        position = self.positions[:slots]
        page = self.table[:slots].gather(1, position // self.page).long()
        self.write_index = ((page * self.page + position % self.page) * self.kv_heads + self.heads).reshape(-1)

    @contextlib.contextmanager
    def prefilling(self, source, flat_index):
        """Within: update() scatters the packed row's tokens `source` to the flat (page row, head) indices
        `flat_index` (flat_rows()), and returns the row's own keys and values."""
        self.prefill = (source, flat_index)
        try:
            yield
        finally:
            self.prefill = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        flat_k, flat_v = keys.view(-1, self.head_dim), values.view(-1, self.head_dim)
        if self.prefill is not None:
            # the packed row (1, kv_heads, tokens, dim) -> one (kv_heads, dim) block per token a slot takes
            tokens, flat_index = self.prefill
            flat_k.index_copy_(0, flat_index, key_states[0].transpose(0, 1)[tokens].reshape(-1, self.head_dim))
            flat_v.index_copy_(0, flat_index, value_states[0].transpose(0, 1)[tokens].reshape(-1, self.head_dim))
            return key_states, value_states
        slots, length = self.view
        flat_k.index_copy_(0, self.write_index, key_states.reshape(-1, self.head_dim))
        flat_v.index_copy_(0, self.write_index, value_states.reshape(-1, self.head_dim))
        if not self.gather:
            return keys, values
        if self.fixed:
            rows = (self.slots, self.length, self.kv_heads, self.head_dim)
            return (keys[1:].view(rows)[:slots, :length].transpose(1, 2),
                    values[1:].view(rows)[:slots, :length].transpose(1, 2))
        pages = self.table[:slots, : length // self.page].long()
        shape = (slots, length, self.kv_heads, self.head_dim)
        return keys[pages].view(shape).transpose(1, 2), values[pages].view(shape).transpose(1, 2)

    def flat_rows(self, pages, n):
        """The flat (page row, head) indices of positions 0..n-1 of a row on `pages`, in the order update() takes a
        prefilled prompt's tokens."""
        position = torch.arange(n)
        rows = torch.tensor(pages, dtype=torch.long)[position // self.page] * self.page + position % self.page
        return (rows[:, None] * self.kv_heads + torch.arange(self.kv_heads)[None, :]).reshape(-1)

    def get_seq_length(self, layer_idx=0):
        return 0
