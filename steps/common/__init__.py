"""Plumbing shared by the steps: JSONL I/O with resume, model loading, chat templates, generation.

Each step in steps/ is a standalone script; this package holds only what two or more of them need.
"""

import sys


class StepError(Exception):
    """A failure the user can fix (bad input, a model that won't load, no memory or disk): the message says how."""


def run_step(main):
    """Run a step's main(); a StepError ends it with its message alone, exit status 2."""
    try:
        main()
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
