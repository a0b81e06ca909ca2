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

# A reason that only repeats what the judge was shown says nothing about the query (the 135M judge copied the reason's
# description above into most answers): it counts as unparsed, and is asked again. What counts as copied, words
# compared lower-cased:
# - no word at all ("[...]", "..."), or a value from one of the lists ("Math", "very easy");
# - two words or more found word for word, in a row, in the prompt's own wording (a retry's message included) or in
#   the query it was shown.
COPIED = "the reason only repeats the prompt's wording"


def judge_message(instruction, response, follow_up=False, why=None):
    """The user message that asks for one turn's tags; `why` (the previous answer's fault) makes it the retry."""
    text = PROMPT.format(instruction=instruction, response=response if response is not None else "(none)",
                         follow_up=" (a follow-up turn of a conversation)" if follow_up else "",
                         categories=", ".join(CATEGORIES))
    return text + (RETRY.format(why=why) if why else "")


def words(text):
    """Lower-cased runs of letters, digits and apostrophes (also the report's word counts)."""
    return re.findall(r"[a-z0-9']+", str(text or "").lower())


def _fixed_wording():
    """The prompt's words without the query and response, with everything else a judge may be shown."""
    text = PROMPT.format(instruction="", response="", follow_up=" (a follow-up turn of a conversation)",
                         categories=", ".join(CATEGORIES))
    return " ".join(words(text + RETRY.format(why=COPIED)))


FIXED_WORDING = _fixed_wording()
LISTED_VALUES = {" ".join(words(v)) for scale in SCALES.values() for v in scale}


def copied_reason(reason, query=None):
    """Whether `reason` only repeats the judge's prompt (the rule at COPIED); `query`: the query it was shown."""
    said = " ".join(words(reason))
    if not said or said in LISTED_VALUES:
        return True
    if len(said.split()) < 2:
        return False
    return any(f" {said} " in f" {source} " for source in (FIXED_WORDING, " ".join(words(query or ""))))


def _canonical(value, allowed):
    """`value` as spelled in `allowed` (case, spaces, '_' and '-' ignored), or None."""
    if not isinstance(value, str):
        return None
    key = re.sub(r"[\s_-]+", " ", value).strip().lower()
    return next((a for a in allowed if a.lower() == key), None)


def parse_answer(text, query=None):
    """(tags, faults) from one judge answer (the prefill included): every tag in TAG_KEYS, "unparsed" where the
    answer did not give a valid value (a reason copied from the prompt or from `query`, the query the judge was
    shown, is not one); `faults` says what was wrong (empty when every tag parsed)."""
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
    if not isinstance(reason, str) or not reason.strip():
        faults.append("no reason")
    elif copied_reason(reason, query):
        faults.append(COPIED)
    else:
        tags["quality_reason"] = " ".join(reason.split())  # one line
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


class AnswerConstraint:
    """A logits processor that holds the transformers engine's answer to the schema, token by token: the category,
    ratings and safety label can only be one of their values, the reason is free text without quotes, braces or line
    breaks (as many tokens as the rest leaves of `max_new_tokens`), the keys come in ANSWER_KEYS order, and the
    answer ends (a stop token) after its closing brace. vLLM constrains with the JSON schema itself; this is the
    same guarantee for the other engine.

    Each row's answer is found after the last occurrence of PREFILL's tokens (as tokenized at the end of a prompt), so
    it works on any row layout either engine hands over; a row without it is left alone. Values are forced in one
    tokenization of ours (the model picks among the values' first tokens, then follows the chosen value)."""

    def __init__(self, tokenizer, sample_prompt, stop_token_id, max_new_tokens):
        def ids(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        full, head = ids(sample_prompt + PREFILL), ids(sample_prompt)
        self.marker = full[len(head):] if full[: len(head)] == head else ids(PREFILL)
        follow = {"category": '", "reason": "', "input_quality": '", "difficulty": "', "difficulty": '", "safety": "',
                  "safety": '"}'}
        # segments: a choice among token sequences, or ("reason", the sequence that closes it)
        self.segments = [[ids(v + follow["category"]) for v in CATEGORIES],
                         ("reason", ids('", "input_quality": "')),
                         [ids(v + follow["input_quality"]) for v in QUALITY],
                         [ids(v + follow["difficulty"]) for v in DIFFICULTY],
                         [ids(v + follow["safety"]) for v in SAFETY]]
        # the reason gets what the longest values, the keys and the end token leave of the answer's cap
        fixed = sum(len(seg[1]) if isinstance(seg, tuple) else max(map(len, seg)) for seg in self.segments) + 1
        self.stop, self.reason_tokens, self.pad = stop_token_id, max(1, max_new_tokens - fixed), tokenizer.pad_token_id
        self.cap = max_new_tokens
        self.free = None  # vocabulary mask of the reason's tokens, built on first use (reads the vocabulary)
        self.starts = {}  # row -> where its answer starts
        self.tokenizer = tokenizer

    def free_mask(self, size, device):
        import torch

        if self.free is None or self.free.shape[0] != size or self.free.device != device:
            special = set(self.tokenizer.all_special_ids)
            texts = self.tokenizer.convert_ids_to_tokens(list(range(min(size, len(self.tokenizer)))))
            ok = [t is not None and i not in special and not any(c in self.tokenizer.convert_tokens_to_string([t])
                                                                 for c in '"{}\n\r\\')
                  for i, t in enumerate(texts)]
            ok += [False] * (size - len(ok))
            self.free = torch.tensor(ok, device=device)
        return self.free

    def allowed(self, answer):
        """(token ids allowed next after `answer`, the tokens after the marker; whether free text is allowed too)."""
        k = 0
        for segment in self.segments:
            if isinstance(segment, tuple):  # the reason: free tokens until the closing sequence starts
                close = segment[1]
                start = next((j for j in range(k, len(answer)) if answer[j] == close[0]), None)
                if start is None:  # free text (one token at least), closed by the first token of `close`
                    written = len(answer) - k
                    return ([close[0]] if written else []), written < self.reason_tokens
                done = answer[start : start + len(close)]
                if done != close[: len(done)]:
                    return [], False  # off the schema (can't happen under this processor): leave the row alone
                if len(done) < len(close):
                    return [close[len(done)]], False
                k = start + len(close)
                continue
            taken = answer[k:]
            matches = [s for s in segment if s[: len(taken)] == taken[: len(s)]]
            whole = [s for s in matches if len(taken) >= len(s)]
            if whole:
                k += len(whole[0])
                continue
            return sorted({s[len(taken)] for s in matches}), False
        return [self.stop], False

    def answer_start(self, r, row):
        """Where row r's answer starts (just after its last marker), None where it has none. Remembered per row and
        checked again each step (a refilled slot's new prompt moves it), so a row is searched once per prompt."""
        n, start = len(self.marker), self.starts.get(r)
        if start is None or start > len(row) or row[start - n : start].tolist() != self.marker:
            hits = [j for j in (row[: len(row) - n + 1] == self.marker[0]).nonzero()[0][::-1]
                    if row[j : j + n].tolist() == self.marker]
            start = self.starts[r] = int(hits[0]) + n if hits else None
        return start

    def __call__(self, input_ids, scores):
        import torch

        ids = input_ids.cpu().numpy()  # one copy to the host for the walk; the masking happens where the scores are
        rows, tokens, free_rows, held = [], [], [], []
        for r, row in enumerate(ids):
            start = self.answer_start(r, row)
            if start is None:
                continue
            answer = row[start : start + self.cap + 1].tolist()
            if self.pad in answer:  # the fast path's token history is padded after the row's end
                answer = answer[: answer.index(self.pad)]
            allowed, free = self.allowed(answer)
            if not allowed and not free:
                continue
            held.append(r)
            rows += [r] * len(allowed)
            tokens += allowed
            if free:
                free_rows.append(r)
        if held:
            mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            if free_rows:
                mask[free_rows] = self.free_mask(scores.shape[1], scores.device)
            if rows:
                mask[rows, tokens] = True
            outside = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
            outside[held] = False
            scores = scores.masked_fill(~(mask | outside[:, None]), -float("inf"))
        return scores
