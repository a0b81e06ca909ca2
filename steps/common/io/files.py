"""Whole outputs, written atomically, and the lock that lets one run at a time write an output.

A step never writes its final output name until the output is complete: files and directories are built under a
temporary sibling name and renamed with os.replace. Make therefore never mistakes an unfinished output for a
finished one.
"""

import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import SetupError


def staging_path(path):
    """Where atomic_path builds `path` before it takes the final name."""
    return Path(path).with_name(Path(path).name + ".tmp")


@contextmanager
def atomic_path(path):
    """Yield a temporary sibling path (file or directory); it becomes `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    remove(tmp)
    try:
        yield tmp
        remove(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def remove(path):
    """Delete a file, link or directory tree; nothing if it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path, obj):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# ---- One run per output -----------------------------------------------------------------------------------------

def lock_path(path):
    return Path(path).with_name(Path(path).name + ".lock")


@contextmanager
def output_lock(path, every_rank=False):
    """Hold `<path>.lock` while this block writes `path`: a second process that would write the same output stops at
    once with a SetupError naming the process that holds it.

    The lock is a flock on the file, which the kernel releases when its holder dies, however it dies: a lock file
    left by a killed run is stale and the rerun takes it over (its pid and command are only for the message). The
    file is deleted when the block ends. Under several processes (torchrun, accelerate) only rank 0 takes it, as the
    ranks of one run write one output together; `every_rank` is for a file each rank writes alone (its shard).
    """
    if not every_rank and (int(os.environ.get("RANK", 0)) or int(os.environ.get("LOCAL_RANK", 0))):
        yield
        return
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": shlex.join(sys.argv)}).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: whoever opens the path next makes a new file
        os.close(fd)


def _acquire(lock, path):
    """An open descriptor of `lock`, flock-ed by this process."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text(errors="replace")
            os.close(fd)
            raise SetupError(f"{path} is being written by another run ({_describe(holder)}); wait for it to end or "
                             f"stop it, then rerun. (A lock file left by a killed run never blocks: {lock} is held "
                             "by a live process.)") from None
        except OSError as e:  # a filesystem without flock (some network mounts): run unguarded rather than not at all
            print(f"warning: cannot lock {lock} ({e.strerror}); nothing stops a second run writing {path}",
                  file=sys.stderr)
            return fd
        # The holder deletes the file as it lets go: if this descriptor's file was deleted meanwhile, another
        # process may already hold a new one under the same name; lock that one instead.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _describe(holder):
    """The lock file's text as 'pid N, started T: command'."""
    try:
        info = json.loads(holder)
        return f"pid {info['pid']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"
