"""Which request decodes in which slot, and when (Scheduler): admission, preemption and compaction, on the host.

It holds no tensors and runs no model: it decides, the page table (pages.PageTable) gives and takes pages, and the
device work each decision implies is done by the `rows` object handed to look() (the engine's, or a replay's):

    rows.start(batch)              prefill [(slot, Request)] and start their rows
    rows.finish(ended)             the rows [(slot, Request)] that ended: collect their tokens
    rows.move(movers, holes)       move rows to lower slots (their per-slot device state)
    rows.give_way(slot, request)   a row gives its pages back: True where it goes on later (its progress saved in
                                   the request), False where it had ended meanwhile

Every CHECK_EVERY decoding steps the engine takes a snapshot of the slots and calls look() with it, while the device
runs one more step; look() says which slots the next steps run on. SlotGenerator.generate, in short:

    bucket = look(snapshot)                      # the first prompts admitted
    while bucket is not None:
        CHECK_EVERY decoding steps at bucket     # (CHECK_EVERY - 1 after the first look: the next runs during it)
        snapshot; one more step; bucket = look(snapshot)
"""

CHECK_EVERY = 8  # decoding steps between looks at which rows ended (each look reads a snapshot of the slots)
# Free slots wait until this share of them (or every pending prompt) can be prefilled together: each prefill is a
# forward of its own between decoding steps, so a few large ones cost less than many of a row or two each
ADMIT_FRACTION = 1 / 16
MIN_SLOT_BUCKET = 8


def slot_bucket(n, top):
    """The slots a step runs on for `n` in use: a power of two, at least MIN_SLOT_BUCKET, at most `top`."""
    return min(top, max(MIN_SLOT_BUCKET, 1 << max(0, n - 1).bit_length()))


class Scheduler:
    """One generate() call's scheduling over `slots` slots and the pages of `pages` (a PageTable), at most
    `prefill_tokens` prompt tokens a prefill; `stats` (a Counter) gains "admitted", "preempted",
    "ended_when_preempted" and "most_rows"."""

    def __init__(self, pages, slots, stats, prefill_tokens, admit_fraction=ADMIT_FRACTION):
        self.pages, self.slots, self.stats = pages, slots, stats
        self.prefill_tokens = prefill_tokens
        self.admit_min = max(1, int(slots * admit_fraction))
        self.request = [None] * slots  # the request each slot's row belongs to
        self.admitted = [0] * slots  # when each slot's row was admitted: the last admitted give their pages back first
        self.positions = [0] * slots  # where each slot stood at the last snapshot, or at its admission since
        self.pending = []  # requests waiting for a slot, the next one last

    def submit(self, requests):
        self.pending = list(reversed(requests))  # pop() takes them in order

    def live(self):
        return [s for s in range(self.slots) if self.request[s] is not None]

    def free(self):
        return [s for s in range(self.slots) if self.request[s] is None]

    def look(self, live, positions, rows):
        """One look at a snapshot (`live`, `positions`: per slot, as the device stood): free the slots whose rows
        ended, admit waiting requests or compact the live rows, make room for the next CHECK_EVERY + 1 tokens of
        every row. (slots, longest) for the next steps: the slot bucket and the longest live row's position; None
        once every request is done."""
        self.positions[:] = positions
        ended = [s for s in range(self.slots) if self.request[s] is not None and not live[s]]
        if ended:
            rows.finish([(s, self.request[s]) for s in ended])
            for s in ended:
                self.request[s] = None
            self.pages.release(ended)
        free = self.free()
        if self.pending and len(free) >= min(self.admit_min, len(self.pending)):
            self.admit(free, rows)
        elif not self.pending and len(free) < self.slots:
            self.compact(rows)
        self.make_room(rows)
        if self.pending and not self.live():
            self.admit(list(range(self.slots)), rows)  # make_room gave every page back: the queue starts again
        in_flight = self.live()
        if not in_flight:
            return None
        self.stats["most_rows"] = max(self.stats["most_rows"], len(in_flight))
        slots = slot_bucket(in_flight[-1] + 1, self.slots)
        return slots, max(self.positions[s] for s in in_flight)

    def admit(self, free, rows):
        """Start waiting requests in the free slots (lowest first), `prefill_tokens` prompt tokens a prefill, while
        the free pages hold each prompt and its next CHECK_EVERY tokens beside a page of growth for every row in
        flight; the rest wait for rows to end."""
        in_flight = len(self.live())
        while self.pending and free:
            batch, budget, wanted, claimed = [], self.prefill_tokens, {}, 0
            while self.pending and free and budget > 0:
                request = self.pending[-1]
                tokens = len(request.ids)
                pages = self.pages.pages_for(tokens + CHECK_EVERY + 1)
                if claimed + pages + in_flight > self.pages.room() or (batch and tokens > budget):
                    break
                self.pending.pop()
                slot = free.pop(0)
                wanted[slot], claimed = tokens + CHECK_EVERY + 1, claimed + pages
                batch.append((slot, request))
                budget -= tokens
                self.request[slot], self.admitted[slot] = request, self.stats["admitted"]
                self.positions[slot] = tokens  # where its next token goes
                self.stats["admitted"] += 1
                in_flight += 1
            if not batch:
                return
            self.pages.grow(wanted)  # one block-table write for the prefill's rows
            rows.start(batch)

    def make_room(self, rows):
        """Pages for every row in flight to decode its next CHECK_EVERY + 1 tokens, from `positions` (one step behind
        by the time this takes effect). Where the free pages fall short, the rows admitted last give theirs back and
        wait at the front of the queue (rows.give_way saves where they stood). The row admitted first always keeps
        going (the cache holds at least one whole row), so every row ends, none cut short."""
        live = self.live()
        if not live:
            return
        wanted = {s: self.positions[s] + CHECK_EVERY + 1 for s in live}
        missing = {s: self.pages.missing(s, t) for s, t in wanted.items()}
        need = sum(missing.values())
        while need > self.pages.room():
            victim = max(wanted, key=lambda s: self.admitted[s])
            request = self.request[victim]
            if rows.give_way(victim, request):
                self.pending.append(request)
                self.stats["preempted"] += 1
            else:  # it ended in the step in flight: done, not preempted
                self.stats["ended_when_preempted"] += 1
            self.request[victim] = None
            self.pages.release([victim])
            del wanted[victim]
            need -= missing.pop(victim)
        self.pages.grow(wanted)

    def compact(self, rows):
        """Move the live rows into the lowest slots, so that the steps run on fewer (nothing is waiting)."""
        used = self.live()
        target = slot_bucket(len(used), self.slots)
        movers = [s for s in used if s >= target]
        holes = [s for s in range(target) if self.request[s] is None][: len(movers)]
        if not movers:
            return
        rows.move(movers, holes)
        for a, b in zip(movers, holes):
            self.request[b], self.request[a] = self.request[a], None
            self.admitted[b], self.positions[b] = self.admitted[a], self.positions[a]
        self.pages.move(movers, holes)

