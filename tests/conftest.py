"""Shared test helpers. Steps are imported from steps/ as the scripts import each other."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "steps"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common.models import EMBEDDED_DEFAULT  # noqa: E402


def run_step(script, *args, check=True, env=None):
    """Run steps/<script>.py in a subprocess, as make does; return the CompletedProcess."""
    result = subprocess.run(
        [sys.executable, str(REPO / "steps" / f"{script}.py"), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def kill_midway(script, args, partial, lines, torn=True):
    """Start steps/<script>.py, SIGKILL it once `partial` holds `lines` lines, then (torn=True) append a torn line as
    a crash in the middle of a write leaves. Returns how many whole lines the killed run had written."""
    proc = subprocess.Popen([sys.executable, str(REPO / "steps" / f"{script}.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (partial.exists() and len(partial.read_text().splitlines()) >= lines):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(partial.read_text().splitlines())
    if torn:
        with open(partial, "a") as f:
            f.write('{"id": "torn')
    return written


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def smol():
    if not (EMBEDDED_DEFAULT / "config.json").exists():
        pytest.fail(f"{EMBEDDED_DEFAULT} is missing: run `make prepare` (make test does it first)")
    return EMBEDDED_DEFAULT


# A whole run of the chain through make, at toy sizes; later tests read its outputs.
CHAIN_VARS = dict(
    GPU="cpu", MODEL="smol", SEED="0", NUM_SAMPLES="12", GEN_BATCH="6", MAX_INSTRUCTION_TOKENS="40",
    MAX_RESPONSE_TOKENS="40", NUM_RESPONSES="2", PREF_BATCH="6", PREF_MAX_TOKENS="24", LIMIT="4",
    MAX_GEN_TOKS="24", EVAL_BATCH="4",
    FILTER_ARGS="--keep-truncated --min-instruction-tokens 1 --min-response-tokens 1 --language any",
    PREFERENCE_ARGS="--allow-truncated-chosen", SFT_ARGS="--max_steps 2 --save_steps 1", DPO_ARGS="--max_steps 2 --save_steps 1",
)


# The chain runs with this token set: test_faults.py greps every file and log of the run for it.
SENTINEL_TOKEN = "hf_SENTINEL0secret0token0do0not0write"


def make(target, run_dir, env=None, **overrides):
    variables = {**CHAIN_VARS, "RUN": str(run_dir), "PY": sys.executable, **overrides}
    return subprocess.run(
        ["make", "-C", str(REPO), target, *[f"{k}={v}" for k, v in variables.items()]],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def chain_run(tmp_path_factory, smol):
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    result = make("all", run_dir, env={"HF_TOKEN": SENTINEL_TOKEN})
    (run_dir.parent / "make-all.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir
