"""Plumbing shared by the steps: JSONL I/O with resume, model loading, chat templates, generation.

Each step in steps/ is a standalone script; this package holds only what two or more of them need.
"""

import sys


def run_step(main):
    """Run a step's main(); known input and model errors end it with their message alone, exit status 2."""
    from .jsonl import DataError
    from .models import ModelLoadError

    try:
        main()
    except (DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
