#!/usr/bin/env python3
"""Each step's wall time and peak resident memory in a `make all`: make runs every step through this wrapper, which
samples the resident memory of the step's whole process tree every 0.1 s and appends one JSON line per step to LOG.

    make all PY="$PWD/.venv/bin/python bench/step_memory.py --log LOG -- $PWD/.venv/bin/python"
    python bench/step_memory.py --summary LOG --out bench/results/make-all-cpu.json   # one JSON, the CPU named

(`make setup` first: PY is only the steps' Python here, the install keeps its own.)
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from provenance import provenance


def tree_rss(root):
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(command, log):
    start = time.time()
    child = subprocess.Popen(command)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(root))
            except psutil.Error:
                pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    status = child.wait()
    done.set()
    sampler.join()
    script = next((a for a in command if a.endswith(".py")), command[0])
    record = {"step": Path(script).stem, "out": next((command[i + 1] for i, a in enumerate(command[:-1])
                                                      if a in ("--out", "--output_dir")), None),
              "status": status, "wall_s": round(time.time() - start, 1), "peak_rss_gib": round(peak / 2**30, 3),
              "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)}
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")
    return status


def cpu():
    """The processor, as the steps' dtype decision sees it (common/precision.py: native bf16 or not)."""
    from common.precision import cpu_bf16

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    native, why = cpu_bf16()
    return {"model": model or platform.processor(), "cores": psutil.cpu_count(), "native_bf16": native,
            "why": why, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}


def summary(log, out):
    steps = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    result = {"cpu": cpu(), "steps": steps, "total_wall_s": round(sum(s["wall_s"] for s in steps), 1),
              "largest_peak_rss_gib": max(s["peak_rss_gib"] for s in steps), **provenance()}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", help="JSONL that each wrapped step appends to")
    p.add_argument("--summary", help="a LOG to summarise into --out")
    p.add_argument("--out")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the step's command")
    args = p.parse_args()
    if args.summary:
        return summary(args.summary, args.out)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not (args.log and command):
        p.error("give --log LOG -- COMMAND, or --summary LOG --out JSON")
    sys.exit(run(command, args.log))


if __name__ == "__main__":
    main()
