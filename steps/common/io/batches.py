"""The resumable batch loop of the generating steps (generate, preference): work in batches, append each finished
batch to OUT.partial, resume after a crash from the last whole batch, refuse a partial file written with other
settings, show progress, and split the batches over several processes (NPROC) whose shards process 0 merges.

Batch b always holds the same items and gets the same seed, so a resumed or sharded run writes what an
uninterrupted single process writes.
"""

import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import DataError
from common.io.jsonl import ResumableWriter, read_jsonl
from common.io.shards import merge_shards, process_rank, shard_lock, shard_paths


def run_batches(out, ids, batch_size, work, fields, desc, unit, order):
    """Write one record per id to `out`, batch by batch: `work(b, first, n)` returns (the records of items
    first..first+n-1, generated tokens). `fields` maps record fields to the values every record carries (e.g.
    {"settings": ...}), which a resumed partial (or finished) file must match: the check names the file and what
    differs. `order(record)` sorts the merged shards. Returns every record on process 0 (None on the others)."""
    rank, world = process_rank()
    if world > 1 and Path(out).exists():  # finished by an earlier run: process 0 has what it needs
        return read_jsonl(out) if rank == 0 else None
    target = Path(out) if world == 1 else shard_paths(out, world)[rank]
    batches = range(rank, -(-len(ids) // batch_size), world)  # this process's share
    mine = [i for b in batches for i in range(b * batch_size, min(len(ids), (b + 1) * batch_size))]
    with shard_lock(target if world > 1 else None):
        writer = ResumableWriter(target, keep=lambda n: n if n >= len(mine) else n - n % batch_size)
        try:
            check_resume(writer, [ids[i] for i in mine], fields)
        except DataError:
            writer.close()
            raise
        todo = list(batches)[len(writer.done) // batch_size :] if len(writer.done) < len(mine) else []
        if todo:
            bar = tqdm(total=len(mine), initial=len(writer.done), desc=f"{desc}[{rank}]" if world > 1 else desc,
                       unit=unit, position=rank)
            start, tokens = time.time(), 0
            for b in todo:
                first = b * batch_size
                records, used = work(b, first, min(batch_size, len(ids) - first))
                writer.write(records)
                tokens += used
                bar.update(len(records))
                bar.set_postfix(tok_s=f"{tokens / (time.time() - start):.0f}")
            bar.close()
        writer.finish()
    print(f"wrote {target}: {len(writer.done)} {unit}s", file=sys.stderr)
    if world == 1:
        return writer.done
    return merge_shards(out, world, order) if rank == 0 else None


def check_resume(writer, ids, fields):
    """A partial file is resumed only when it holds the same items, written with the same `fields` values."""
    if not writer.done:
        return
    for field, ours in fields.items():
        theirs, ours = writer.done[0].get(field) or {}, ours or {}
        if theirs != ours:
            differ = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
            name = "settings" if field == "settings" else f"{field} settings"
            raise DataError(f"{writer.partial}: left by a run with other {name} ({', '.join(differ)} differ: "
                            f"{ {k: theirs.get(k) for k in differ} }); delete it to start over, or rerun with the "
                            "same settings to resume")
    done_ids = [r.get("id") for r in writer.done]
    if done_ids != ids[: len(done_ids)]:
        raise DataError(f"{writer.partial}: holds other items than this run makes (ids {done_ids[:3]}... against "
                        f"{ids[:3]}...); delete it to start over")
