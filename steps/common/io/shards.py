"""Several processes (NPROC, torchrun) each write a shard of one JSONL output; process 0 merges them."""

import os
import time
from contextlib import nullcontext
from pathlib import Path

from common import SetupError
from common.io.files import output_lock
from common.io.jsonl import read_jsonl, write_jsonl

# How long process 0 waits while no other process's shard makes progress (SHARD_TIMEOUT seconds in the environment).
STALL_TIMEOUT = 3600


def process_rank():
    """(rank, world size) of this process under torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_paths(out, world):
    out = Path(out)
    return [out.with_name(f"{out.name}.shard{rank}of{world}") for rank in range(world)]


def shard_lock(shard):
    """Each process writes its shard alone, so every rank locks its own (output_lock(OUT) is rank 0's alone);
    nothing to lock for None (one process)."""
    return output_lock(shard, every_rank=True) if shard else nullcontext()


def merge_shards(out, world, order, timeout=None, poll=2.0):
    """Wait for every process's shard, then write OUT sorted by `order(record)` (so the result doesn't depend on
    the number of processes) and delete the shards. Returns the records.

    The others may take long, so the wait has no fixed end: it fails (a SetupError naming the missing shards) only
    when for `timeout` seconds no shard has appeared and none of their .partial files has grown, as when a process
    died.
    """
    timeout = float(os.environ.get("SHARD_TIMEOUT", STALL_TIMEOUT)) if timeout is None else timeout
    shards = shard_paths(out, world)
    seen, since = None, time.monotonic()
    while missing := [s for s in shards if not s.exists()]:
        progress = [(s.exists(), _size(s.with_name(s.name + ".partial"))) for s in shards]
        if progress != seen:
            seen, since = progress, time.monotonic()
        elif time.monotonic() - since > timeout:
            raise SetupError(f"waited {timeout:.0f} s without progress for {', '.join(map(str, missing))}: the "
                             "process writing it has likely died (see its error above); rerun the same command to "
                             "resume, or raise SHARD_TIMEOUT (seconds) if it is only slow")
        time.sleep(poll)
    records = sorted((r for s in shards for r in read_jsonl(s)), key=order)
    write_jsonl(out, records)
    for s in shards:
        s.unlink()
    return records


def _size(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
