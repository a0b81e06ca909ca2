"""Helpers for the offline ``mc_local`` task.

``DATA_FILE`` is the absolute path of the bundled jsonl, computed from this file's location so the task loads
from any working directory (the yaml pulls it in with ``!function``, which lm-eval resolves against the yaml's
own directory).
"""

import os

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mc_local.jsonl")

__all__ = ["DATA_FILE"]
