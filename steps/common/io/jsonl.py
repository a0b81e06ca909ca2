"""JSONL files through the `jsonlines` package: reads that name the file, line and field at fault, atomic writes,
and append-only output that survives a crash.

Long outputs are appended to `<name>.partial` (one fsync per batch) and renamed at the end; a rerun resumes from the
partial file. Whole files go through common.io.files.atomic_path.
"""

import json
import os
import sys
from itertools import takewhile
from pathlib import Path

import jsonlines

from common import DataError
from common.io.files import atomic_path


def read_jsonl(path, required=()):
    """Read every record of a JSONL file; stop at the first bad line, naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file (did the step that writes it run?)")
    records, lineno = [], 0
    with open(path, encoding="utf-8") as f:
        def lines():  # numbered as jsonlines reads them (it tells the number only in its own errors)
            nonlocal lineno
            for lineno, line in enumerate(f, 1):
                yield line

        reader = jsonlines.Reader(lines(), loads=json.loads)  # json.loads: the stdlib's rules, not orjson's if present
        try:
            for record in reader.iter(skip_empty=True, allow_none=True):
                check_record(path, lineno, record, required)
                records.append(record)
        except jsonlines.InvalidLineError as e:
            cause = e.__cause__
            where = f" ({cause.msg} at column {cause.colno})" if isinstance(cause, json.JSONDecodeError) else ""
            raise DataError(f"{path}:{e.lineno}: not valid JSON{where}") from None
    return records


def check_record(path, lineno, record, required):
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    for field, kind in dict(required).items():
        if field not in record:
            raise DataError(f"{path}:{lineno}: missing field '{field}'")
        if not isinstance(record[field], kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{path}:{lineno}: field '{field}' should be {names}, got {type(record[field]).__name__}")


def write_jsonl(path, records):
    """Write all records at once, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            jsonlines.Writer(f).write_all(records)


class ResumableWriter:
    """Append records to `<path>.partial`; `finish()` renames it to `path`.

    Opening reads back what an earlier run left (an interrupted run's partial file, or a finished output): whole
    lines are kept (`self.done`), a torn last line (a crash in the middle of a write) is cut off. `keep` trims the
    kept records (e.g. to a whole number of batches, so that sampling stays deterministic).
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
        self._file = open(self.partial, "w", encoding="utf-8")
        self._writer = jsonlines.Writer(self._file)
        self._append(self.done)
        if self.done:
            print(f"resuming {self.path}: {len(self.done)} records already written", file=sys.stderr)

    def _recover(self):
        """The records of the partial file's whole lines, up to the first that does not parse."""
        if not self.partial.exists():
            return []
        records = []
        with open(self.partial, encoding="utf-8") as f:
            whole_lines = takewhile(lambda line: line.endswith("\n"), f)  # only the last line can be torn
            try:
                for record in jsonlines.Reader(whole_lines, loads=json.loads):
                    records.append(record)
            except jsonlines.InvalidLineError as e:
                print(f"{self.partial}:{e.lineno}: not valid JSON; resuming from the {len(records)} records before "
                      "it", file=sys.stderr)
        return records

    def _append(self, records):
        self._writer.write_all(records)
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, records):
        self._append(records)
        self.done.extend(records)

    def finish(self):
        self._file.close()
        os.replace(self.partial, self.path)

    def close(self):
        if not self._file.closed:
            self._file.close()
