"""One run per output at a time: a second process that would write the same output stops at once, naming the first;
a lock left by a killed run does not block the rerun."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import HUNG_STEP_SECONDS, REPO, run_step

from common import SetupError
from common.io.files import lock_path, output_lock

HOLD = """
import sys
from common.io.files import output_lock
with output_lock(sys.argv[1]):
    sys.stdin.read()  # hold the lock until the test closes stdin or kills this process
"""


def wait_for_holder(proc, lock, stderr=None):
    """Wait until process `proc` holds `lock` (its pid is in the lock file); fail, showing its stderr, if it exits."""
    started = time.monotonic()
    while True:
        try:
            if json.loads(lock.read_text())["pid"] == proc.pid:
                return
        except (OSError, ValueError, KeyError):  # not there yet, or being written
            pass
        if proc.poll() is not None or time.monotonic() - started > HUNG_STEP_SECONDS:
            if stderr:
                stderr.seek(0)
            pytest.fail(f"process {proc.pid} (status {proc.poll()}) never held {lock}: "
                        f"{stderr.read().decode(errors='replace')[-3000:] if stderr else ''}")
        time.sleep(0.01)


def test_the_lock_names_its_holder_and_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "out.jsonl"
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        with pytest.raises(SetupError, match=rf"out.jsonl is being written by another run \(pid {os.getpid()}, "):
            with output_lock(out):
                pass
    assert not lock_path(out).exists()  # deleted on a clean exit

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO / "steps", stdin=subprocess.PIPE)
    try:
        wait_for_holder(holder, lock_path(out))
        with pytest.raises(SetupError, match=rf"\(pid {holder.pid}, started [0-9: -]+: -c {re.escape(str(out))}\)"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
    assert holder.wait() == -signal.SIGKILL
    assert lock_path(out).exists()  # the killed holder's file is left behind, naming a dead process...
    with output_lock(out):  # ...and does not block
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    with output_lock(out):
        monkeypatch.setenv("RANK", "1")  # another process of the same torchrun/accelerate run
        with output_lock(out):
            pass
        with pytest.raises(SetupError):  # a file that each rank writes alone (its shard) is locked by every rank
            with output_lock(out, every_rank=True):
                pass


def test_a_second_run_on_the_same_output_stops_at_once_and_the_rerun_after_a_kill_works(tmp_path, smol):
    src, out = tmp_path / "gen.jsonl", tmp_path / "run"
    src.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Name {i + 2} colours of the rainbow.",
                                       "response": "Red, orange, yellow, green and blue are five of them.",
                                       "instruction_finished": True, "response_finished": True}) + "\n"
                           for i in range(4)))
    args = ["--in", src, "--out", out / "filtered.jsonl", "--dropped", out / "dropped.jsonl", "--summary",
            out / "summary.json", "--embedder", "none", "--language", "any"]
    with tempfile.TemporaryFile() as stderr:
        first = subprocess.Popen([sys.executable, str(REPO / "steps" / "filter.py"), *map(str, args)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_holder(first, lock_path(out / "filtered.jsonl"), stderr)
            first.send_signal(signal.SIGSTOP)  # frozen while holding the lock: whatever changes now is the second's
            before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
            second = run_step("filter", *args, check=False)
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"is being written by another run (pid {first.pid}, " in second.stderr
            assert "filter.py --in" in second.stderr  # the holder's command
            assert "loading the tokenizer" not in second.stderr  # stopped before any work
            assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # and wrote nothing
        finally:
            first.kill()
        assert first.wait() == -signal.SIGKILL
    assert lock_path(out / "filtered.jsonl").exists()  # left by the killed run
    run_step("filter", *args)
    assert sorted(p.name for p in out.iterdir()) == ["dropped.jsonl", "filtered.jsonl", "summary.json", "summary.md",
                                                     "summary.png"]  # written, and no lock file left
