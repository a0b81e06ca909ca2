"""Shared test helpers. Steps and the shared package are imported from steps/ (on PYTHONPATH), as the scripts import
each other."""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests reach the shared package as everything outside steps/ does: steps/ on PYTHONPATH; and the bench scripts as they
# reach each other: bench/ on it too (`make test` sets both).
if importlib.util.find_spec("common") is None or importlib.util.find_spec("provenance") is None:
    raise pytest.UsageError("steps/ and bench/ should be on PYTHONPATH: run `make test`, or "
                            "`PYTHONPATH=steps:bench python -m pytest tests`")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread a process: the test chain runs in the background beside the tests (BackgroundChain), one core each, and
# every run of a step does the same arithmetic, so outputs compared across runs match exactly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def run_here(script, *args):
    """steps/<script>.py's main() in this process, its stdout and stderr captured: for a reference run, which needs no
    process of its own (a step's process spends ~8 s importing torch, transformers and the rest on these CPUs). A run
    that a test kills, or whose exit status or environment it checks, goes through run_step."""
    import contextlib
    import importlib
    import io
    from types import SimpleNamespace

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        importlib.import_module(script).main([str(a) for a in args])
    return SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue(), returncode=0)


def stand_in_hub_env(record_dir):
    """Environment for a step run in a subprocess against the stand-in Hub (tests/fixtures/stand_in_hub): what the
    step asks of the Hub is recorded under `record_dir` (hub_calls) instead of sent."""
    path = [str(REPO / "tests" / "fixtures" / "stand_in_hub"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(filter(None, path)), "SIT_STAND_IN_HUB": str(record_dir)}


def hub_calls(record_dir):
    """[(call, details)] the stand-in Hub recorded under `record_dir`, in order; [] where none came."""
    calls = Path(record_dir) / "calls.jsonl"
    return [(c.pop("call"), c) for c in read_lines(calls)] if calls.exists() else []


def whole_lines(path):
    """How many complete lines (ending in a newline) a file holds: a torn last line does not count."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


# Only for a step that hangs: far above any run of these tests, which wait on the process and its files.
HUNG_STEP_SECONDS = 1800


def kill_midway(script, args, partial, lines, torn=True):
    """Start steps/<script>.py, SIGKILL it once `partial` holds `lines` whole lines, then (torn=True) append a torn
    line as a crash in the middle of a write leaves. Returns how many whole lines the killed run had written.

    Fails, showing the step's stderr, when the step ends before the kill (it never wrote those lines, or finished
    first: the kill would not land mid-run)."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "steps" / f"{script}.py"), *map(str, args)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)

        def fail(why):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr.seek(0)
            pytest.fail(f"{script} {why}; its stderr ends:\n{stderr.read().decode(errors='replace')[-4000:]}")

        started = time.monotonic()
        while whole_lines(partial) < lines:
            if proc.poll() is not None:
                fail(f"exited with status {proc.returncode} before {partial} held {lines} whole lines")
            if time.monotonic() - started > HUNG_STEP_SECONDS:
                fail(f"wrote fewer than {lines} whole lines to {partial} in {HUNG_STEP_SECONDS} s (hung?)")
            time.sleep(0.02)
        if proc.poll() is not None:
            fail(f"had already exited (status {proc.returncode}) when {partial} held {lines} lines: nothing to kill")
        proc.send_signal(signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:  # it exited by itself between the check and the signal
            fail(f"ended by itself (status {proc.returncode}) before the kill landed")
    written = whole_lines(partial)
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


# A whole run of the chain through make, at toy sizes; later tests read its outputs. Conversations of two turns: the
# fixture recipe ends a turn at its first sentence, so that at these caps most conversations reach the second.
CHAIN_VARS = dict(
    GPU="cpu", MODEL="smol", SEED="0", NUM_SAMPLES="12", GEN_BATCH="6", MAX_INSTRUCTION_TOKENS="40",
    MAX_RESPONSE_TOKENS="40", TURNS="2", GENERATE_ARGS="--recipe tests/fixtures/smollm2-sentences.yaml",
    NUM_RESPONSES="2", PREF_BATCH="6", PREF_MAX_TOKENS="40", LIMIT="4",
    MAX_GEN_TOKS="24", EVAL_BATCH="4",
    FILTER_ARGS="--keep-truncated --min-instruction-tokens 1 --min-response-tokens 1 --language any",
    PREFERENCE_ARGS="--recipe tests/fixtures/smollm2-sentences.yaml --temperature 1.0",  # two finished answers that differ
    SFT_ARGS="--max_steps 2 --save_steps 1", DPO_ARGS="--max_steps 2 --save_steps 1",
)


# The chain runs with this token set: test_faults.py greps every file and log of the run for it.
SENTINEL_TOKEN = "hf_SENTINEL0secret0token0do0not0write"


def make_command(target, run_dir, **overrides):
    """`make TARGET` in the repository with the test chain's variables (CHAIN_VARS), RUN and this Python."""
    variables = {**CHAIN_VARS, "RUN": str(run_dir), "PY": sys.executable, **overrides}
    return ["make", "-C", str(REPO), target, *[f"{k}={v}" for k, v in variables.items()]]


def make(target, run_dir, env=None, **overrides):
    return subprocess.run(make_command(target, run_dir, **overrides), capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


class BackgroundChain:
    """`make all` at toy sizes, started once a session, by the first pytest process (or xdist worker) that collects a
    test needing it, so that it runs beside the tests that don't (those run first: pytest_collection_modifyitems).
    Every worker shares it through `root`; chain_run waits for the exit status that the shell writes at the end."""

    def __init__(self, root):
        self.root, self.proc = root, None
        self.run_dir, self.log, self.status = root / "run", root / "make-all.log", root / "make-all.status"

    def start_once(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / "start.lock"):
            if (self.root / "started").exists():
                return
            (self.root / "started").write_text(str(os.getpid()))
            command = shlex.join(make_command("all", self.run_dir))
            status = shlex.quote(str(self.status))
            self.proc = subprocess.Popen(["sh", "-c", f"{command}; echo $? > {status}.tmp; mv {status}.tmp {status}"],
                                         stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "HF_TOKEN": SENTINEL_TOKEN})
            (self.root / "pid").write_text(str(self.proc.pid))

    def running(self):
        """Whether the chain's shell is alive (it writes the status last)."""
        try:
            os.kill(int((self.root / "pid").read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def wait(self):
        started = time.monotonic()
        while not self.status.exists():
            if not self.running() and not self.status.exists():
                pytest.fail(f"the test chain ended without an exit status (killed?); see {self.log}:\n"
                            f"{self.log.read_text()[-3000:]}")
            if time.monotonic() - started > HUNG_STEP_SECONDS:
                pytest.fail(f"the test chain wrote no exit status in {HUNG_STEP_SECONDS} s; see {self.log}")
            time.sleep(0.5)
        if self.status.read_text().strip() != "0":
            pytest.fail(f"make all (the test chain) failed with status {self.status.read_text().strip()}:\n"
                        f"{self.log.read_text()[-6000:]}")
        return self.run_dir

    def stop(self, interrupted):
        """At the end of the process that started it: stopped if the session was cut short (-x, Ctrl-C); else left
        to finish, since another xdist worker may still be waiting for it (xdist ends a worker once it has no more
        tests to give it)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if interrupted:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=HUNG_STEP_SECONDS if not interrupted else 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def needs_chain(item):
    return "chain_run" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k/-m have deselected: start the chain only if a selected test needs it
def pytest_collection_modifyitems(session, config, items):
    """Tests that don't read the chain's outputs first, while the chain runs in the background; stable otherwise
    (every xdist worker must collect the same order)."""
    items.sort(key=needs_chain)
    if any(needs_chain(item) for item in items) and (EMBEDDED_DEFAULT / "config.json").exists():
        # Under pytest's base temp directory (kept for the last few sessions), which xdist's workers share the parent of.
        base = Path(config._tmp_path_factory.getbasetemp())
        config.background_chain = BackgroundChain((base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "chain")
        config.background_chain.start_once()


def pytest_unconfigure(config):
    if getattr(config, "background_chain", None):
        config.background_chain.stop(interrupted=getattr(config, "sit_interrupted", True))


@pytest.fixture(scope="session")
def chain_run(request, smol):
    chain = getattr(request.config, "background_chain", None)
    if chain is None:
        pytest.fail("the test chain was not started (is the embedded model missing? run `make prepare`)")
    return chain.wait()


class NearTie(UserWarning):
    """A greedy row that departs from its reference where the two tokens' logits are closer than the stated margin."""


def assert_same_greedy_rows(model, prompts, rows, expected, margin):
    """Greedy rows (token ids) equal their reference rows (plain `generate`), or depart only at a near-tie: where a
    row departs, a plain forward of the prompt and the tokens both share must put both tokens' logits within `margin`
    of the best, as another summation order (batch, padding, kernel) may flip; such a row is reported (NearTie warning)
    and not compared further. Any other difference fails. Returns the near-ties: (row, position, got, expected, gap)."""
    import warnings

    import torch

    ties, wrong = [], []
    for i, (prompt, got, want) in enumerate(zip(prompts, rows, expected, strict=True)):
        at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if at is None:
            if len(got) != len(want):  # one row is the other cut short: no two tokens to tie
                wrong.append(f"row {i}: {len(got)} tokens where generate wrote {len(want)}, equal as far as both go")
            continue
        with torch.no_grad():
            ids = torch.tensor([list(prompt) + list(want[:at])], device=model.device)
            logits = model(input_ids=ids).logits[0, -1].float()
        gap = float(logits.max() - logits[[got[at], want[at]]].min())
        if gap < margin:
            ties.append((i, at, got[at], want[at], gap))
            warnings.warn(NearTie(f"row {i} departs from generate at token {at} ({got[at]} for {want[at]}) on a "
                                  f"near-tie: {gap:.3g} < {margin} below the best logit"), stacklevel=2)
        else:
            wrong.append(f"row {i} departs from generate at token {at}: {got[at]} for {want[at]}, {gap:.3g} below "
                         f"the best logit (not a near-tie: margin {margin})")
    assert not wrong, "\n".join(wrong)
    return ties


# ---- skips: the ones a machine may have, and why; `make test` fails on any other ------------------------------------
def no_cuda():
    import torch

    return not torch.cuda.is_available()


def no_browser():
    import shutil

    return not (shutil.which("chromium") and shutil.which("chromedriver"))


# (what the machine lacks or has, whether this one does, the tests that skip for it: fnmatch patterns of node ids).
# A skip outside this list (a missing package, a torch without a kernel) fails the session instead of passing quietly.
EXPECTED_SKIPS = (
    ("no CUDA GPU", no_cuda, ("tests/test_gpu.py::*", "tests/test_varlen_gpu.py::*")),
    ("a CUDA GPU (the test is of a machine without one)", lambda: not no_cuda(),
     ("tests/test_setup.py::test_a_gpu_tier_step_on_this_machine_stops_with_the_cause",)),
    ("no chromium and chromedriver (Debian's; `make test` installs them where it runs as root with apt-get)",
     no_browser, ("tests/test_report.py::test_report_png_renders_the_whole_page",)),
)


def expected_skip(nodeid):
    """Why this machine may skip the test (None: it may not)."""
    import fnmatch

    for why, applies, patterns in EXPECTED_SKIPS:
        if any(fnmatch.fnmatch(nodeid, p) for p in patterns) and applies():
            return why
    return None


def unexpected_skips(config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    return [(r.nodeid, r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr))
            for r in skipped if expected_skip(r.nodeid) is None]


def pytest_sessionfinish(session, exitstatus):
    # cut short (-x, --maxfail, Ctrl-C): the background chain is stopped rather than waited for
    session.config.sit_interrupted = bool(session.shouldstop or session.shouldfail
                                          or exitstatus == pytest.ExitCode.INTERRUPTED)
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller sees every report
        return
    if unexpected_skips(session.config) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput"):
        return
    unexpected = unexpected_skips(config)
    if unexpected:
        terminalreporter.section("skips not declared in tests/conftest.py EXPECTED_SKIPS (the session fails)", red=True)
        for nodeid, reason in unexpected:
            terminalreporter.write_line(f"{nodeid}: {reason}")
