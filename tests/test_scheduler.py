"""The engine's scheduler (steps/common/generation/scheduler.py) on its own: no model and no engine, a page table over
a small cache on the CPU, and a stand-in for the device's rows that records what the scheduler asks of it."""

import torch

from common.generation.cache import PagedCache
from common.generation.pages import PageTable
from common.generation.scheduler import Scheduler
from common.generation.slots import Request
from common.generation.stats import Stats


class Rows:
    """What the scheduler asks of the device, recorded. A row giving way goes on later (its progress: 130 tokens),
    except the requests in `ended_meanwhile`, whose rows ended in the step in flight."""

    def __init__(self, ended_meanwhile=()):
        self.started, self.finished, self.moved, self.gave_way = [], [], [], []
        self.ended_meanwhile = set(ended_meanwhile)

    def start(self, batch):
        self.started.append([(slot, request.index, len(request.ids)) for slot, request in batch])

    def finish(self, ended):
        self.finished.append([request.index for _, request in ended])

    def move(self, movers, holes):
        self.moved.append((movers, holes))

    def give_way(self, slot, request):
        self.gave_way.append(request.index)
        if request.index in self.ended_meanwhile:
            return False
        request.progress = (list(range(130)), 100, 30, False)
        return True


def scheduler(pages, slots, prompt_lengths, admit_fraction=1 / 16, prefill_tokens=4096):
    cache = PagedCache(layers=1, pages=pages, slots=slots, max_pages=4, kv_heads=1, head_dim=1,
                       dtype=torch.float32, device=torch.device("cpu"))  # rows of up to 4 pages of 64 tokens
    table = PageTable(cache, torch.device("cpu"))
    stats = Stats()
    scheduler = Scheduler(table, slots, stats, prefill_tokens, admit_fraction)
    scheduler.submit([Request(i, [5] * n) for i, n in enumerate(prompt_lengths)])
    return scheduler, table, stats


def test_admission_waits_for_pages_preemption_takes_the_last_admitted_and_freed_pages_are_reused():
    # 6 pages to hand out (page 0 is scratch) for 4 slots; prompts A, B of 100 tokens (2 pages with their next
    # CHECK_EVERY tokens), C of 50 and D of 30 (1 page each); steps run on 4 slots at least (MIN_SLOT_BUCKET)
    sched, pages, stats = scheduler(pages=7, slots=4, prompt_lengths=[100, 100, 50, 30])
    A, B, C, D = range(4)
    rows = Rows(ended_meanwhile={D})

    # A and B take 4 pages; C would leave less than a page of growth for each of the three rows: it waits
    assert sched.look([0] * 4, [0] * 4, rows) == (4, 100)
    assert rows.started == [[(0, A, 100), (1, B, 100)]]
    assert pages.held[:2] == [[1, 2], [3, 4]] and pages.room() == 2
    assert [r.index for r in reversed(sched.pending)] == [C, D]

    # A ends: its pages go back, and C and D start on them (C on A's first page)
    assert sched.look([0, 1, 0, 0], [0, 110, 0, 0], rows) == (4, 110)
    assert rows.finished == [[A]]
    assert rows.started[1] == [(0, C, 50), (2, D, 30)]
    assert pages.held == [[1], [3, 4], [2], []] and not sched.pending
    assert sched.positions == [50, 110, 30, 0]  # where their next tokens go

    # B and C outgrow the free pages: the rows admitted last give theirs back, D (which ended in the step in
    # flight: finished, not requeued), then C (requeued at the front, its tokens so far to be prefilled again)
    assert sched.look([1, 1, 1, 0], [120, 250, 30, 0], rows) == (4, 250)
    assert rows.gave_way == [D, C]
    assert stats["preempted"] == 1 and stats["ended_when_preempted"] == 1
    assert [r.index for r in sched.pending] == [C] and sched.pending[0].ids == list(range(129))
    assert pages.held == [[], [3, 4, 1, 2], [], []] and pages.room() == 2  # B's row grew onto C's and D's pages
    assert sched.request[0] is None and sched.request[2] is None

    # C's 129 tokens need 3 pages beside B's growth: it waits until B ends, then takes B's pages
    assert sched.look([0, 1, 0, 0], [0, 255, 0, 0], rows) == (4, 255)
    assert len(rows.started) == 2
    assert sched.look([0, 0, 0, 0], [0, 0, 0, 0], rows) == (4, 129)
    assert rows.finished[-1] == [B] and rows.started[-1] == [(0, C, 129)]
    assert pages.held[0] == [3, 4, 1]  # B's freed pages
    assert sched.look([0, 0, 0, 0], [0, 0, 0, 0], rows) is None
    assert rows.finished[-1] == [C] and pages.room() == 6 and stats["admitted"] == 5


def test_once_nothing_waits_live_rows_move_to_the_lowest_slots_with_their_pages():
    sched, pages, stats = scheduler(pages=33, slots=16, prompt_lengths=[10] * 13)
    rows = Rows()
    assert sched.look([0] * 16, [0] * 16, rows) == (16, 10)
    assert [slot for slot, _, _ in rows.started[0]] == list(range(13))
    held = list(pages.held[12])
    live = [0] * 16
    live[3] = live[12] = 1  # every other row ended
    positions = [0] * 16
    positions[3], positions[12] = 40, 60
    # two rows in flight: steps run on 8 slots once the row in slot 12 moves to slot 0
    assert sched.look(live, positions, rows) == (8, 60)
    assert rows.moved == [([12], [0])]
    assert sched.request[0].index == 12 and sched.request[12] is None and sched.positions[0] == 60
    assert pages.held[0][:1] == held and pages.held[12] == []  # (and a page more for its next tokens)
    assert stats["most_rows"] == 13


def test_a_prefill_holds_at_most_prefill_tokens_and_a_queue_short_of_admit_fraction_waits():
    sched, _, _ = scheduler(pages=65, slots=16, prompt_lengths=[100] * 3, prefill_tokens=150)  # a prompt fits once
    rows = Rows()
    sched.look([0] * 16, [0] * 16, rows)
    assert [len(batch) for batch in rows.started] == [1, 1, 1]  # three prefills of one prompt each
    sched, _, _ = scheduler(pages=65, slots=16, prompt_lengths=[10] * 30, admit_fraction=0.5)
    rows = Rows()
    sched.look([0] * 16, [0] * 16, rows)
    assert sum(map(len, rows.started)) == 16 and len(sched.pending) == 14
    sched.look([0] * 6 + [1] * 10, [0] * 6 + [20] * 10, rows)
    assert sum(map(len, rows.started)) == 16  # six free slots wait for two more (half of the slots)
    sched.look([0] * 8 + [1] * 8, [0] * 8 + [20] * 8, rows)
    assert [slot for slot, _, _ in rows.started[-1]] == list(range(8))  # eight: the lowest free slots first
