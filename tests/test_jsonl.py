import json

import pytest

from common import DataError, SetupError
from common.io.files import atomic_path
from common.io.jsonl import ResumableWriter, read_jsonl, write_jsonl
from common.io.shards import merge_shards, shard_paths


def test_read_names_file_line_and_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "instruction": "hi"}\n{"id": "b"\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"id": "a", "instruction": "hi"}\n\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: missing field 'instruction'"):
        read_jsonl(path, required={"id": str, "instruction": str})
    path.write_text('{"id": 7, "instruction": "hi"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: field 'id' should be str, got int"):
        read_jsonl(path, required={"id": str})
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert read_jsonl(path) == [{"a": 1}]  # the old file survives, no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_resumable_writer_drops_torn_line_and_keeps_whole_batches(tmp_path):
    path = tmp_path / "gen.jsonl"
    writer = ResumableWriter(path)
    writer.write([{"i": i} for i in range(5)])
    writer.close()
    with open(writer.partial, "a") as f:
        f.write('{"i": 5, "trunc')  # a crash in the middle of a line
    assert not path.exists()

    resumed = ResumableWriter(path, keep=lambda n: n - n % 2)  # batches of 2: keep 4 of 5
    assert [r["i"] for r in resumed.done] == [0, 1, 2, 3]
    resumed.write([{"i": 4}, {"i": 5}])
    resumed.finish()
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == list(range(6))
    assert not resumed.partial.exists()


def test_merge_names_the_missing_shard_when_no_process_makes_progress(tmp_path):
    out = tmp_path / "gen.jsonl"
    first, second = shard_paths(out, 2)
    write_jsonl(first, [{"i": 0}])
    (second.with_name(second.name + ".partial")).write_text('{"i": 1}\n')  # its process died after one batch
    with pytest.raises(SetupError, match=r"waited 0 s without progress for .*gen\.jsonl\.shard1of2: .*SHARD_TIMEOUT"):
        merge_shards(out, 2, order=lambda r: r["i"], timeout=0.3, poll=0.05)
    assert not out.exists() and first.exists()


class SlowProcess:
    """The other process and the clock, in step with the merge's polls (no thread, no real waiting): each poll's
    sleep advances a fake clock by its length, and every `every` polls the other process writes its next record to
    its shard's .partial; after `records` it finishes the shard. What the merge sees depends only on its polls."""

    def __init__(self, shard, records, every):
        self.writer, self.left, self.every = ResumableWriter(shard), list(records), every
        self.now, self.polls = 0.0, 0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.polls += 1
        if self.polls % self.every == 0:
            if self.left:
                self.writer.write([self.left.pop(0)])
            else:
                self.writer.finish()


@pytest.mark.parametrize("every,stalls", [(3, False), (6, True)])
def test_merge_waits_as_long_as_the_other_shards_grow(tmp_path, monkeypatch, every, stalls):
    """No fixed end: a slow process that keeps writing (a record every 0.75 s against a 1 s stall timeout) is waited
    for far beyond the stall timeout (30 s on the merge's clock); one whose records come further apart than the
    timeout (1.5 s) is given up on, naming its shard."""
    from types import SimpleNamespace

    from common.io import shards

    out = tmp_path / "gen.jsonl"
    first, second = shard_paths(out, 2)
    write_jsonl(first, [{"i": 0}])
    other = SlowProcess(second, [{"i": 2 * i - 1} for i in range(1, 40)], every)
    monkeypatch.setattr(shards, "time", SimpleNamespace(monotonic=other.monotonic, sleep=other.sleep))
    if stalls:
        with pytest.raises(SetupError, match=r"waited 1 s without progress for .*gen\.jsonl\.shard1of2"):
            merge_shards(out, 2, order=lambda r: r["i"], timeout=1.0, poll=0.25)
        assert not out.exists() and first.exists() and other.now < 2  # after its first stall, not at the end
        return
    records = merge_shards(out, 2, order=lambda r: r["i"], timeout=1.0, poll=0.25)
    assert [r["i"] for r in records] == [0] + [2 * i - 1 for i in range(1, 40)] == [r["i"] for r in read_jsonl(out)]
    assert not first.exists() and not second.exists()
    assert other.now >= 29, other.now  # 40 writes x 0.75 s: waited ~30 times the stall timeout
