"""The LLM judge's prompt, answer schema and parsing (steps/judge.py runs it; steps/filter.py reads its tags).

Magpie tags each instruction with four separate prompts (exp/str_utils.py in magpie-align/magpie: task category,
input quality with an explanation, difficulty with intent and knowledge) and a safety label from Llama-Guard-2 on
the instruction and its response (exp/unitag.py). Here one prompt asks for all of them at once, with Magpie's
categories, rating scales and rubric wording in short: one prefill instead of four, which is what keeps the cpu tier's
judge inside its time budget. Safety is a label from a fixed set ("safe"/"unsafe") judged on the response, as
Llama Guard judges the assistant's turn: a refusal of a harmful request is safe.
"""

import json
import re

UNPARSED = "unparsed"  # the value of a tag the judge did not give in a usable form, after its retry

# Magpie's task tags (exp/str_utils.py, input_classification), in its order and spelling.
CATEGORIES = ("Information seeking", "Reasoning", "Planning", "Editing", "Coding & Debugging", "Math",
              "Role playing", "Data analysis", "Creative writing", "Advice seeking", "Brainstorming", "Others")
# Magpie's scales (input_quality_rating, input_difficulty_rating), worst/easiest first: thresholds compare positions.
QUALITY = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY = ("very easy", "easy", "medium", "hard", "very hard")
SAFETY = ("safe", "unsafe")
SCALES = {"category": CATEGORIES, "input_quality": QUALITY, "difficulty": DIFFICULTY, "safety": SAFETY}
TAG_KEYS = ("category", "input_quality", "quality_reason", "difficulty", "safety")  # what each record's tags hold

# The JSON the judge answers, in this key order ("reason" before the rating, as Magpie asks for the explanation
# first). vLLM constrains decoding to it; the transformers engine only prompts for it and parses.
ANSWER_KEYS = ("category", "reason", "input_quality", "difficulty", "safety")
SCHEMA = {
    "type": "object",
    "properties": {"category": {"enum": list(CATEGORIES)}, "reason": {"type": "string", "maxLength": 300},
                   "input_quality": {"enum": list(QUALITY)}, "difficulty": {"enum": list(DIFFICULTY)},
                   "safety": {"enum": list(SAFETY)}},
    "required": list(ANSWER_KEYS),
    "additionalProperties": False,
}
PREFILL = '{"category": "'  # the answer's start, written for the model (Magpie prefills "{")

PROMPT = """Label the user query below. Reply with only a JSON object.

## User query{follow_up}
{instruction}

## Assistant response
{response}

## Fields
- category, the one most relevant task tag: {categories}
- reason: one sentence on the query's clarity, specificity and coherence
- input_quality: very poor (unclear, vague or incoherent), poor (lacks important details), average (moderately \
clear, needs some more information), good (clear, specific, mostly well-formed) or excellent (very clear, specific, \
with all the context needed)
- difficulty, from the knowledge and reasoning it needs: very easy, easy, medium, hard or very hard
- safety: unsafe if the response helps with violence, crime, weapons, self-harm, hate or other serious harm, \
else safe (a refusal is safe)

Fill in the placeholders, in English, each value from its list:
{{"category": "[...]", "reason": "[...]", "input_quality": "[...]", "difficulty": "[...]", "safety": "[...]"}}"""

RETRY = "\n\nYour previous answer could not be used ({why}). Answer again with only the JSON object."


def judge_message(instruction, response, follow_up=False, why=None):
    """The user message that asks for one turn's tags; `why` (the previous answer's fault) makes it the retry."""
    text = PROMPT.format(instruction=instruction, response=response if response is not None else "(none)",
                         follow_up=" (a follow-up turn of a conversation)" if follow_up else "",
                         categories=", ".join(CATEGORIES))
    return text + (RETRY.format(why=why) if why else "")


def _canonical(value, allowed):
    """`value` as spelled in `allowed` (case, spaces, '_' and '-' ignored), or None."""
    if not isinstance(value, str):
        return None
    key = re.sub(r"[\s_-]+", " ", value).strip().lower()
    return next((a for a in allowed if a.lower() == key), None)


def parse_answer(text):
    """(tags, faults) from one judge answer (the prefill included): every tag in TAG_KEYS, "unparsed" where the
    answer did not give a valid value; `faults` says what was wrong (empty when every tag parsed)."""
    tags = {key: UNPARSED for key in TAG_KEYS}
    start, end = text.find("{"), text.rfind("}")
    try:
        answer = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        return tags, ["not a whole JSON object" + (" (cut off)" if end < start or start < 0 else "")]
    faults = []
    for key, allowed in SCALES.items():
        value = _canonical(answer.get(key), allowed)
        if value is None:
            faults.append(f"{key} {answer.get(key)!r} is not one of the allowed values")
        else:
            tags[key] = value
    reason = answer.get("reason")
    if isinstance(reason, str) and reason.strip():
        tags["quality_reason"] = " ".join(reason.split())  # one line
    else:
        faults.append("no reason")
    return tags, faults


def merge(first, second):
    """Each tag's first valid value of the two attempts (the retry fills only what the first answer lacked)."""
    return {key: first[key] if first[key] != UNPARSED else second[key] for key in TAG_KEYS}


def user_turns(record):
    """[(instruction, response or None)] of each user turn: the record's `conversation` when it has one (generate
    --turns > 1), else its instruction and response."""
    conversation = record.get("conversation")
    if not conversation:
        return [(record["instruction"], record.get("response"))]
    turns = []
    for i, message in enumerate(conversation):
        if message.get("role") == "user":
            following = conversation[i + 1] if i + 1 < len(conversation) else None
            answer = following["content"] if following and following.get("role") == "assistant" else None
            turns.append((message["content"], answer))
    return turns


def rank(scale, value):
    """Position of a tag value on its scale (higher is better/harder); None for "unparsed" or an unknown value."""
    return scale.index(value) if value in scale else None
