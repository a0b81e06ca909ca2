"""Instruction sanitizing as Magpie's `--sanitize` does it for Llama-3.x (exp/str_utils.py, instruction_post_process,
"llama-3" branch, in github.com/magpie-align/magpie), written afresh from its rules.

Llama-3.x instructions often carry a label ("Task:", "**Question**", "1."), or run on past the question into an
answer, steps or a second question. The rules keep the first question or first line, cut at answer and step markers,
and drop labels and bold markers. `sanitize()` returns the kept text, the rule that applied (Magpie's class numbers,
so records can be compared with Magpie's `instruction_sanitize_class_num`) and whether text was cut off the end: an
instruction the model had not finished is whole if the rule cut it before where the model stopped.

Two of Magpie's slips are read by their evident intent: its answer-marker pattern appends "s?:" to markers that
already end in ":" (so "Answer:" alone never matched), and it removes "**" only when it first occurs at index 1;
here a marker is followed by an optional "s" and one colon, and bold is removed when the text starts with it.
"""

import re
from dataclasses import dataclass

LABELS = ["Task", "Prompt", "Original Prompt", "Question", "The Problem", "Problem", "Scenario", "The senario",
          "Situation", "The situation", "Context", "Challenge", "Query", "Request", "Instructions", "Instruction",
          "Descriptions", "Description"]
_LABEL = "|".join(re.escape(w) for w in LABELS)
ENUMERATOR = re.compile(r"^(?:\d+\.|\w+\))\s*")
PREFIX = re.compile(rf"^(?:(?:{_LABEL}):|\*\*(?:{_LABEL})\*\*|## (?:{_LABEL}):|Question \d+[:.]|Part \d+:|Q\d+[:.])\s*",
                    re.IGNORECASE)
ANSWER = re.compile(r"(?:Answer|The answer is|Correct answer|The correct answer|Answer is|Explanation|Here are some"
                    r"|Solution Approach|Solution)s?:")  # case-sensitive, as Magpie's
STEP = re.compile(r"#{1,3} Step 1:?")


@dataclass(frozen=True)
class Sanitized:
    text: str
    rule: str  # Magpie's class number
    cut: bool  # text was dropped from the end


def strip_label(text):
    text = ENUMERATOR.sub("", text, count=1).strip()
    match = PREFIX.match(text)
    return text[match.end():].strip() if match else text


def _unbold(text):
    text = text.strip()
    return text.replace("**", "").strip() if text.startswith("**") else text


def _upto_question(text, clean=lambda t: t):
    head, _, tail = text.partition("?")
    return clean(head).strip() + "?", bool(tail.strip())


def _first_line(text):
    head, _, tail = text.strip().partition("\n")
    return head.strip(), bool(tail.strip())


def _before(text, start):
    return _unbold(text[:start]), bool(text[start:].strip())


def sanitize(text):
    """Magpie's Llama-3 rules: -> Sanitized(text, rule, cut)."""
    text = strip_label(text)
    if text.startswith("*") and "?" in text:
        kept, cut = _upto_question(text, lambda t: t.replace("*", ""))
        return Sanitized(strip_label(kept), "1", cut)
    text = strip_label(text)
    if text.startswith('"'):
        if "?" in text:
            (kept, cut), rule = _upto_question(text, lambda t: t.replace('"', "")), "2.1"
        else:
            (kept, cut), rule = _first_line(text), "2.2"
            kept = kept.replace('"', "").replace("*", "").strip()
    elif text.startswith("<b>"):
        kept, cut, rule = text.replace("*", "").strip(), False, "3"
    elif answer := ANSWER.search(text):
        (kept, cut), rule = _before(text, answer.start()), "4"
    elif step := STEP.search(text):
        (kept, cut), rule = _before(text, step.start()), "5"
    elif _first_line(text)[0].endswith(":"):
        if "#" in text:
            (kept, cut), rule = _before(text, text.index("#")), "6.1"
        elif "?" in text:
            (kept, cut), rule = _upto_question(text, _unbold), "6.2"
        else:
            (kept, cut), rule = _first_line(text), "6.3"
            kept = kept.replace("*", "").strip()
    elif "?" in text:
        (kept, cut), rule = _upto_question(text, _unbold), "99.1"
    else:
        (kept, cut), rule = _first_line(text), "99.2"
        kept = kept.replace("*", "").strip()
    return Sanitized(strip_label(kept), rule, cut)
