"""The KV cache's page table (steps/common/generation/pages.py) on its own: no model, a small PagedCache on the CPU."""

import math

import torch

from common.generation.cache import PagedCache
from common.generation.pages import PAGE, PageTable

CPU = torch.device("cpu")


def table(pages, slots=3, max_pages=4):
    cache = PagedCache(layers=1, pages=pages, slots=slots, max_pages=max_pages, kv_heads=1, head_dim=2,
                       dtype=torch.float32, device=CPU)
    return cache, PageTable(cache, CPU)


def test_shared_pages_are_handed_out_lowest_first_written_to_the_table_and_reused():
    cache, pages = table(pages=6)  # 5 pages (page 0 is scratch) for 3 slots of up to 4 pages: shared
    assert not pages.fixed and pages.room() == 5
    pages.grow({0: PAGE + 1, 2: 1})  # slot 0 needs two pages, slot 2 one
    assert pages.held == [[1, 2], [], [3]] and pages.room() == 2
    assert cache.table[0, :2].tolist() == [1, 2] and cache.table[2, 0] == 3 and cache.table[1].eq(0).all()
    assert pages.missing(2, 3 * PAGE) == 2 and pages.missing(0, PAGE) == 0
    assert pages.pages_for(100 * PAGE) == 4  # never more than a whole row
    cache.positions[0] = 70
    pages.release([0])
    assert pages.held[0] == [] and pages.room() == 4 and cache.table[0].eq(0).all() and cache.positions[0] == 0
    pages.grow({1: 1})
    assert pages.held[1] == [1]  # the lowest free page again: slot 0's first
    assert pages.holders() == [1, 2]


def test_a_moved_row_keeps_its_pages_in_the_shared_layout():
    cache, pages = table(pages=6)
    pages.grow({2: 2 * PAGE})
    before = cache.table[2].clone()
    pages.move([2], [0])
    assert pages.held == [[1, 2], [], []]
    assert torch.equal(cache.table[0], before) and cache.table[2].eq(0).all() and cache.positions[2] == 0


def test_the_fixed_layout_gives_each_slot_its_own_pages_and_moves_the_keys():
    cache, pages = table(pages=3 * 4 + 1)  # every slot's whole row fits
    assert pages.fixed and pages.room() == math.inf
    pages.grow({1: 2 * PAGE, 2: 1})
    assert pages.held == [[], [5, 6], [9]]  # 1 + slot * max_pages + column
    cache.keys[0][5:7] = 1.5  # slot 1's keys
    pages.move([1], [0])
    assert pages.held == [[1, 2], [], [9]]
    assert cache.keys[0][1:3].eq(1.5).all() and cache.table[0, :2].tolist() == [1, 2]
    assert cache.table[1].eq(0).all()
