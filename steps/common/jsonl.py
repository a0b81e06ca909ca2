"""JSONL and JSON files: validated reads, atomic writes, and append-only output that survives a crash.

A step never writes its final output name until the output is complete: whole files go through a temporary
name and os.replace, long outputs are appended to `<name>.partial` (one fsync per batch) and renamed at the end.
Make therefore never mistakes an unfinished output for a finished one, and a rerun resumes from the partial file.
"""

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import StepError


class DataError(StepError, ValueError):
    """Bad input data; the message names the file and line."""


def read_jsonl(path, required=()):
    """Read every record of a JSONL file; stop at the first bad line, naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file (did the step that writes it run?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for field, kind in dict(required).items():
                if field not in record:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
                if not isinstance(record[field], kind):
                    raise DataError(
                        f"{path}:{lineno}: field '{field}' should be {kind.__name__}, "
                        f"got {type(record[field]).__name__}"
                    )
            records.append(record)
    return records


def _dump(record):
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path, records):
    """Write all records at once, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_dump(r) for r in records)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def staging_path(path):
    """Where atomic_path builds `path` before it takes the final name."""
    return Path(path).with_name(Path(path).name + ".tmp")


@contextmanager
def atomic_path(path):
    """Yield a temporary sibling path (file or directory); it becomes `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    _remove(tmp)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class ResumableWriter:
    """Append records to `<path>.partial`; `finish()` renames it to `path`.

    Opening reads back what an earlier run left (an interrupted run's partial file, or a finished output): complete lines are kept (`self.done`), a torn last line is cut
    off. `keep` trims the kept records (e.g. to a whole number of batches, so that sampling stays deterministic).
    """

    def __init__(self, path, keep=None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.partial.exists():
            os.replace(self.path, self.partial)  # a finished output is resumed like a partial one: nothing is redone
        self.done = self._recover()
        if keep is not None:
            self.done = self.done[: keep(len(self.done))]
        # Rewrite the survivors so that the file holds exactly `self.done`, then append from there.
        with open(self.partial, "w", encoding="utf-8") as f:
            f.writelines(_dump(r) for r in self.done)
            f.flush()
            os.fsync(f.fileno())
        self._file = open(self.partial, "a", encoding="utf-8")
        if self.done:
            print(f"resuming {self.path}: {len(self.done)} records already written", file=sys.stderr)

    def _recover(self):
        if not self.partial.exists():
            return []
        records = []
        with open(self.partial, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write from a crash
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return records

    def write(self, records):
        self._file.writelines(_dump(r) for r in records)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.extend(records)

    def finish(self):
        self._file.close()
        os.replace(self.partial, self.path)

    def close(self):
        if not self._file.closed:
            self._file.close()


# ---- Several processes (NPROC, torchrun) each write a shard; process 0 merges them ----------------------------

def process_rank():
    """(rank, world size) of this process under torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_paths(out, world):
    out = Path(out)
    return [out.with_name(f"{out.name}.shard{rank}of{world}") for rank in range(world)]


def merge_shards(out, world, order):
    """Wait for every process's shard, then write OUT sorted by `order(record)` (so the result doesn't depend on
    the number of processes) and delete the shards. Returns the records."""
    shards = shard_paths(out, world)
    while not all(s.exists() for s in shards):
        time.sleep(2)
    records = sorted((r for s in shards for r in read_jsonl(s)), key=order)
    write_jsonl(out, records)
    for s in shards:
        s.unlink()
    return records
