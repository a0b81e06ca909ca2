"""Tag each generated sample as Magpie does: task category, input quality (with a one-line reason), difficulty and
safety, from an LLM judge.

    python steps/judge.py --in generated.jsonl --out judged.jsonl --model JUDGE_MODEL

The judge is any chat model (default in the Makefile: the generator itself, as Magpie tags with the model that
generated), run through the generation engine of the other steps, batch by batch, greedy by default. One prompt
asks for every tag of one user turn (steps/common/rubric.py: Magpie's categories and scales) as a JSON object:
- with ENGINE=vllm, decoding is constrained to the answer's JSON schema (vLLM structured outputs);
- with the transformers engine, its start is prefilled and a logits processor (common/rubric.py AnswerConstraint)
  holds every later token to the schema: values from their lists, a quote-free reason, the keys in order, then the
  end. Answers are parsed and validated either way.
An answer that does not parse or holds a value outside its list (malformed, cut off at --max-new-tokens, in
another language, an unknown category), or whose reason only repeats the prompt's wording or the query
(common/rubric.py copied_reason), is asked again once, with what was wrong; a tag still without a valid value
is "unparsed", and the answers are kept in the record's `judge_unparsed`.

Output: every input record, with
- `tags`: {"category", "input_quality", "quality_reason", "difficulty", "safety"} of its (first) instruction;
- `turn_tags`: the same for each user turn, in order, where the record has a `conversation` (generate --turns N);
- `judge`: the judge's settings (model, engine, constrained decoding, sampling), the same in every record;
- `judge_unparsed` (only where some tag is "unparsed"): [{"turn", "answers", "faults"}].
Records are appended to OUT.partial batch by batch; a rerun after a crash continues from the last whole batch and
refuses a partial file written with other judge settings.
"""

import sys

from common import DataError, run_step
from common.generation.chat import end_of_turn, prepare_tokenizer, prompt_text
from common.generation.engines import ENGINES, declared_stop_ids, load_engine, process_device_map
from common.generation.sampling import Sampling
from common.io.batches import run_batches
from common.io.files import output_lock
from common.io.jsonl import read_jsonl
from common.io.shards import process_rank
from common.models import load_tokenizer
from common.options import non_negative_float, non_negative_int, positive_int, step_parser
from common.precision import dtype_name
from common.reporting.tag_stats import COPIED_REASON, reason_status
from common.rubric import PREFILL, SCHEMA, AnswerConstraint, judge_message, merge, parse_answer, user_turns


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--in", dest="inp", required=True, help="generated JSONL (id, instruction, response)")
    p.add_argument("--out", required=True, help="the same records with their tags (JSONL)")
    p.add_argument("--model", required=True, help="judge: any chat model (Hub id, directory or embedded:smollm2)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="records per batch (each batch is appended to OUT.partial: the unit a rerun resumes from)")
    p.add_argument("--decode-rows", type=positive_int, default=32, help="answers the engine decodes at once")
    p.add_argument("--max-new-tokens", type=positive_int, default=96,
                   help="cap on one answer (the JSON object is ~50-70 tokens; a cut-off answer is retried once)")
    p.add_argument("--max-response-tokens", type=positive_int, default=256,
                   help="the response is shown to the judge (for the safety label) cut to this many tokens")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0: greedy, as Magpie's tagging (unitag.py)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--engine", default="transformers", choices=ENGINES)
    p.add_argument("--dtype", default="auto", help="auto (see common/precision.py), bfloat16, float16 or float32")
    p.add_argument("--load-in-4bit", action="store_true")
    return p.parse_args(argv)


def sampling_of(args, tokenizer, constrained):
    """How answers are sampled. Unconstrained, a '}' ends the answer (as Magpie's stop=["}"]); constrained, the
    schema ends it (a '}' inside the reason must not)."""
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
                    stop_token_ids=declared_stop_ids(args.model, tokenizer),
                    stop_strings=(end_of_turn(tokenizer, "assistant"),) + (() if constrained else ("}",)))


def settings_of(args, sampling, constrained):
    """The `judge` field of every record; a resumed partial file must hold the same."""
    return {"model": args.model, "engine": args.engine,
            "constrained": "json schema (vLLM)" if constrained else "logits processor (common/rubric.py AnswerConstraint)",
            "dtype": dtype_name(args.dtype),
            "load_in_4bit": args.load_in_4bit, "max_response_tokens": args.max_response_tokens, "seed": args.seed,
            "retries": 1, "sampling": sampling.record()}


def clip(tokenizer, text, n):
    """`text` cut to its first n tokens (marked), so that a long response costs the judge a bounded prefill."""
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n]).rstrip() + " [...]"


class Judge:
    """Prompts, samples and parses; `engine` is any object with `tokenizer` and `sample(prompts, sampling, seed)`
    (a fake one in the tests)."""

    def __init__(self, engine, tokenizer, sampling, constrained, max_response_tokens, token_constraint=False):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.constrained, self.max_response_tokens = constrained, max_response_tokens
        self.token_constraint = token_constraint  # AnswerConstraint on the transformers engine
        self.constraint = None

    def prompt(self, instruction, response, follow_up, why=None):
        message = judge_message(instruction, clip(self.tokenizer, response, self.max_response_tokens), follow_up, why)
        text = prompt_text(self.tokenizer, message)
        return text if self.constrained else text + PREFILL

    def sample(self, prompts, seed):
        if self.constrained:
            return self.engine.sample_json(prompts, self.sampling, seed, SCHEMA)
        if self.token_constraint:
            if self.constraint is None:
                self.constraint = AnswerConstraint(self.tokenizer, prompts[0][: -len(PREFILL)],
                                                   self.sampling.stop_token_ids[0], self.sampling.max_new_tokens)
            return self.engine.sample(prompts, self.sampling, seed, processors=[self.constraint])
        return self.engine.sample(prompts, self.sampling, seed)

    def answer_text(self, result):
        """The whole answer: the prefill, and the '}' that the stop string cut off where the answer ended."""
        if self.constrained:
            return result["text"]
        return PREFILL + result["text"] + ("}" if result["finished"] else "")

    def tag(self, turns, seed):
        """[(tags, None or the answers and faults of a turn left with "unparsed" tags)] for each (instruction,
        response, follow_up), and the tokens generated. One engine call for all turns, one more for those to retry."""
        results = self.sample([self.prompt(*t) for t in turns], seed)
        tokens = sum(r["tokens"] for r in results)
        answers = [self.answer_text(r) for r in results]
        parsed = [parse_answer(a, turn[0]) for a, turn in zip(answers, turns)]
        retry = [i for i, (_, faults) in enumerate(parsed) if faults]
        out = [(tags, None) for tags, _ in parsed]
        if retry:
            again = self.sample([self.prompt(*turns[i], why="; ".join(parsed[i][1])) for i in retry], seed + 1)
            tokens += sum(r["tokens"] for r in again)
            for i, result in zip(retry, again):
                second = self.answer_text(result)
                tags2, faults2 = parse_answer(second, turns[i][0])
                tags = merge(parsed[i][0], tags2)
                failed = None
                if "unparsed" in tags.values():
                    failed = {"answers": [answers[i], second], "faults": [parsed[i][1], faults2]}
                out[i] = (tags, failed)
        return out, tokens


def judged_records(judge, records, settings, seed):
    """The records of one batch with their tags; returns (records, tokens generated)."""
    turns, owners = [], []
    for k, record in enumerate(records):
        for t, (instruction, response) in enumerate(user_turns(record)):
            turns.append((instruction, response, t > 0))
            owners.append(k)
    tagged, tokens = judge.tag(turns, seed)
    per_record = [[] for _ in records]
    for k, result in zip(owners, tagged):
        per_record[k].append(result)
    out = []
    for record, results in zip(records, per_record):
        judged = {**record, "tags": results[0][0], "judge": settings}
        if record.get("conversation"):
            judged["turn_tags"] = [tags for tags, _ in results]
        failed = [{"turn": t + 1, **f} for t, (_, f) in enumerate(results) if f]
        if failed:
            judged["judge_unparsed"] = failed
        out.append(judged)
    return out, tokens


def main(argv=None):
    args = parse_args(argv)
    records = read_jsonl(args.inp, required={"id": str, "instruction": str})
    if not records:
        raise DataError(f"{args.inp}: no records to judge")
    with output_lock(args.out):  # a second run stops here, at once
        write_judged(args, records)


def write_judged(args, records):
    constrained = args.engine == "vllm"
    tokenizer = prepare_tokenizer(load_tokenizer(args.model))  # settings need no weights: refused before loading
    sampling = sampling_of(args, tokenizer, constrained)
    settings = settings_of(args, sampling, constrained)
    rank, world = process_rank()
    state = {}

    def work(b, first, n):
        if not state:  # loaded only when there is work left
            engine = load_engine(args.engine, args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                 device_map=process_device_map(rank, world), batch_size=args.decode_rows)
            state["judge"] = Judge(engine, engine.tokenizer, sampling, constrained, args.max_response_tokens,
                                   token_constraint=not constrained)
            how = "constrained to the JSON schema" if constrained else "answers held to the schema token by token"
            print(f"judge {args.model}: {how}"
                  f"; sampling {sampling.record()}", file=sys.stderr)
        return judged_records(state["judge"], records[first : first + n], settings, args.seed * 1_000_003 + b)

    position = {r["id"]: i for i, r in enumerate(records)}
    # generate's settings (the records judged) and the judge's own: a file left by either other run is refused
    fields = {"settings": records[0].get("settings"), "judge": settings}
    done = run_batches(args.out, [r["id"] for r in records], args.batch_size, work, fields, desc="judge",
                       unit="record", order=lambda r: position[r["id"]])
    if done is not None:
        unparsed = sum("unparsed" in r["tags"].values() for r in done)
        copied = sum(reason_status(r) == COPIED_REASON for r in done)
        print(f"judged {len(done)} records; {unparsed} with an \"unparsed\" tag, {copied} of them an unparsed reason "
              "that only repeated the prompt's wording", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
