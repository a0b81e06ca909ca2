"""The KV cache's pages (PageTable): which pages each slot holds, in order, the free ones, and the block table that
names them on the device (PagedCache.table). Page 0 is scratch: every table entry a slot does not hold points there.

Two layouts, fixed for a cache's life (PagedCache.fixed):
- fixed, where every slot's whole row fits: slot s holds pages 1 + s * max_pages + j, so a slot's positions lie in
  one piece and SDPA reads them in place; nothing is ever short of pages;
- shared, where they do not: pages come from one free list as rows grow and go back when rows end or give way.

    pages = PageTable(cache, device)
    pages.grow({slot: tokens})         # pages for that many tokens of each slot's row, written into the table
    pages.room()                       # pages that can still be handed out (infinite in the fixed layout)
    pages.missing(slot, tokens)        # pages a slot lacks for that many tokens
    pages.move(movers, holes)          # rows moved to lower slots (compaction)
    pages.release(slots)               # their pages back; their table rows and positions to the scratch page
"""

import math

import torch

from common.generation.transfers import on_device

PAGE = 64  # tokens a KV page holds: a multiple of the Triton kernel's BLOCK_N, which reads a page at a time


class PageTable:
    """The pages of one PagedCache and who holds them (see the module's docstring)."""

    def __init__(self, cache, device):
        self.cache, self.device = cache, device
        self.fixed, self.max_pages, self.page = cache.fixed, cache.max_pages, cache.page
        self.free = list(range(cache.pages - 1, 0, -1))  # pop() hands out the lowest; page 0 is scratch
        self.held = [[] for _ in range(cache.slots)]

    def pages_for(self, tokens):
        """Pages that hold `tokens` tokens of a row (at most a whole row's)."""
        return min(self.max_pages, -(-tokens // self.page))

    def room(self):
        return math.inf if self.fixed else len(self.free)

    def missing(self, slot, tokens):
        return max(0, self.pages_for(tokens) - len(self.held[slot]))

    def holders(self):
        return [s for s, pages in enumerate(self.held) if pages]

    def grow(self, wanted):
        """Give each slot of `wanted` {slot: tokens} the pages that hold that many tokens (from the free ones, which
        must suffice) and write them into the block table."""
        rows, cols, pages = [], [], []
        for slot, tokens in wanted.items():
            held = self.held[slot]
            for col in range(len(held), self.pages_for(tokens)):
                held.append(1 + slot * self.max_pages + col if self.fixed else self.free.pop())
                rows.append(slot), cols.append(col), pages.append(held[-1])
        if pages:
            dev = self.device
            self.cache.table[on_device(rows, dev), on_device(cols, dev)] = on_device(pages, dev, torch.int32)

    def release(self, slots):
        """The pages of `slots` back to the free list; their table rows point at the scratch page again and they sit
        at position 0 (decoding attention reads one key there)."""
        for slot in slots:
            if not self.fixed:
                self.free.extend(reversed(self.held[slot]))
            self.held[slot] = []
        if slots:
            index = on_device(slots, self.device)
            self.cache.table[index] = 0
            self.cache.positions[index] = 0

    def move(self, movers, holes):
        """The rows of slots `movers` now live in slots `holes` (their other per-slot state moved by the caller). In
        the shared layout the table rows move and the pages stay; in the fixed layout the keys and values move to
        the new slot's own pages, as many as the row held."""
        cache = self.cache
        src, dst = on_device(movers, self.device), on_device(holes, self.device)
        if self.fixed:
            for pool in (*cache.keys, *cache.values):
                by_slot = pool[1:].view(cache.slots, self.max_pages, *pool.shape[1:])
                by_slot[dst] = by_slot[src]
            held = {b: len(self.held[a]) for a, b in zip(movers, holes)}
            self.release(movers)
            self.grow({b: n * self.page for b, n in held.items()})
        else:
            cache.table[dst] = cache.table[src]
            for a, b in zip(movers, holes):
                self.held[b], self.held[a] = self.held[a], []
            cache.table[src], cache.positions[src] = 0, 0
