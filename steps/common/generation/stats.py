"""What a generation run did (Stats): decoding steps per slot bucket (int keys), prefills and their rows and tokens,
admissions, preemptions, the most rows in flight; with `timing`, each prefill's GPU time (CUDA events, read once the
run is over: "prefill_s"). The one place benches read the engine's counts and hook into it:

    generator.stats = Stats(timing=True)
    generator.stats.step_watcher = watcher  # watcher.before(slots, runner) and .after(slots) around each step
    ... generator.generate(...) ...
    dict(generator.stats)
"""

from collections import Counter

import torch


class Stats(Counter):
    def __init__(self, timing=False):
        super().__init__()
        self.timing = timing
        self.prefill_events = []  # (began, ended) CUDA events of the prefills not yet added to "prefill_s"
        self.step_watcher = None  # a bench's: before(slots, runner) and after(slots) run around each decoding step

    def prefill_began(self, device):
        """An event recorded before a prefill where prefills are timed (events, not a sync: the host keeps running
        ahead of the GPU), else None."""
        if not (self.timing and device.type == "cuda"):
            return None
        began = torch.cuda.Event(enable_timing=True)
        began.record()
        return began

    def prefill_ended(self, began, rows, tokens):
        self["prefills"] += 1
        self["prefill_rows"] += rows
        self["prefill_tokens"] += tokens
        if began is not None:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.prefill_events.append((began, ended))

    def settle(self):
        """Adds the timed prefills' seconds to "prefill_s" (waits for them)."""
        for began, ended in self.prefill_events:
            ended.synchronize()
            self["prefill_s"] += began.elapsed_time(ended) / 1000
        self.prefill_events = []
