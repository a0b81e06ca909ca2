"""What two or more steps share, in layers: the base here, io/ on it, and generation/, training/ and reporting/ on
those; training and reporting never import the engine, and nothing imports in a cycle (tests/test_layers.py):

- here: the errors a step reports (StepError and kinds), say_once, run_step, installed_versions;
  options.py (the steps' command lines), models.py (loading, with errors that say how to fix them), precision.py
  (the one dtype decision), rubric.py (the judge's prompt, schema and parsing), eval_requests.py (the eval's random
  sample and its time estimate, for the eval step and the plan)
- io/: outputs written atomically, JSONL with resume, the batch loop, shards, the train/test split
- generation/: the generation engine and what it is told (sampling, templates, recipes, engines, reward models)
- training/: TRL's command line, checkpoints and the final adapter, padding-free attention (never the engine)
- reporting/: eval tables, tag counts, the Hub cards, the report's renderer

Every module imports the others absolutely (`from common.io.jsonl import read_jsonl`), found through steps/ on the
path: a step's own directory, or PYTHONPATH for tests and benchmarks (make exports it).
"""

import sys
from importlib import metadata


class StepError(Exception):
    """A failure the user can fix: the message says what is at fault and how to fix it. One subclass per kind."""


class DataError(StepError, ValueError):
    """Bad input data: the message names the file (and line, field)."""


class OptionError(StepError, ValueError):
    """A bad option or option combination: the message names the option(s)."""


class SetupError(StepError, RuntimeError):
    """The environment can't do the job: a package, GPU, model access (token, license), disk or memory is missing."""


def say_once(message, _said=set()):
    """Print a message to stderr once per process (a fallback taken, a setting reduced)."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


def run_step(main):
    """Run a step's main(); a StepError ends it with its message alone, exit status 2 (the one way steps report
    a fault the user can fix)."""
    try:
        main()
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# The packages whose versions decide a run's numbers.
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "lm_eval")


def installed_versions(packages=VERSIONED_PACKAGES):
    """Installed versions of these packages (None where missing): recorded with results, shown in reports."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
