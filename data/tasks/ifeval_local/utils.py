"""Helpers for the offline ``ifeval_local`` task.

Scoring is lm-eval's own IFEval code, re-exported unchanged.  ``DATA_FILE`` is the
absolute path of the bundled jsonl, computed from this file's location so the task
loads from any working directory (the yaml pulls it in with ``!function``, which
lm-eval resolves against the yaml's own directory).

Note: importing lm-eval's IFEval module calls ``nltk.download("punkt_tab")`` when
punkt_tab is not installed; offline, point ``NLTK_DATA`` at ``data/nltk_data``.
"""

import os

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ifeval_local.jsonl")

__all__ = ["DATA_FILE", "agg_inst_level_acc", "process_results"]
