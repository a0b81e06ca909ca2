"""What code a bench result came from: every bench script merges provenance() into the JSON it writes.

- `commit`: `git rev-parse HEAD` of this checkout;
- `dirty`: whether `git diff HEAD -- steps bench env` is non-empty or files there are untracked (bench/results
  aside), with `diff_sha256` (of that diff) and `untracked` (their paths) when it is;
- `command`: the Python executable's name and sys.argv.

A copy of the tree that is not a git checkout (the device machines get the working tree without .git) has no
commit to read: `commit` and `dirty` are then None and `provenance_note` says why, unless whoever launched the run
named the commit in BENCH_COMMIT (`BENCH_COMMIT=$(git rev-parse HEAD)` where the command is composed), which is
recorded as given. Never raises.
"""

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACKED = ("steps", "bench", "env")  # the code a bench run depends on


def _git(*args):
    """stdout of a git command in the repository, or None where git is missing or fails."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def provenance():
    """{"commit", "dirty", "diff_sha256", "command"} (+ "untracked", "provenance_note" where they apply)."""
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    head = _git("rev-parse", "HEAD")
    if head is None or not head.strip():
        given = os.environ.get("BENCH_COMMIT") or None
        how = ("commit as given in BENCH_COMMIT by whoever launched the run; the tree could not be checked against it"
               if given else "commit unknown: set BENCH_COMMIT where the command is composed to record it")
        return {"commit": given, "dirty": None, "diff_sha256": None, "command": command,
                "provenance_note": f"not a git checkout ({REPO}: git rev-parse HEAD failed): {how}"}
    diff = _git("diff", "HEAD", "--", *TRACKED) or ""
    listed = _git("ls-files", "--others", "--exclude-standard", "--", *TRACKED) or ""
    untracked = [p for p in listed.splitlines() if p and not p.startswith("bench/results/")]
    record = {"commit": head.strip(), "dirty": bool(diff or untracked),
              "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None, "command": command}
    if untracked:
        record["untracked"] = untracked
    return record


if __name__ == "__main__":
    import json

    print(json.dumps(provenance(), indent=1))
