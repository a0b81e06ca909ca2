"""Magpie: an aligned chat model writes instructions from its own pre-query template, then answers them.

The model gets only its chat template up to the start of the user's message, so what it samples next is a user
instruction; sampling stops at the end of the user turn. The instruction is then answered with the full template.
With --turns N the model writes the follow-up user turns the same way, from the conversation so far.

How a model family is sampled is its generator recipe (env/generators/*.yaml, common/generation/recipes.py): the
pre-query template, stop tokens, instruction and response sampling, first-token suppression and instruction sanitizing
of Magpie's published settings for that generator. Each flag below that defaults to the recipe overrides one value;
every value used is written into each record. --system-prompts steers the tasks: a system prompt drawn per record.

    python steps/generate.py --model meta-llama/Llama-3.1-8B-Instruct --out data/runs/x/generated.jsonl \
        --num-samples 1000 --batch-size 32

Output: one JSON line per sample: id, instruction and response (the first turn), conversation (all turns, with
--turns > 1), finish flags, why an instruction was rejected (if it was), and the settings. Records are appended
in whole batches to OUT.partial (common/io/batches.py) and the file is renamed to OUT when
complete; rerunning the same command after a crash continues from the last whole batch, and per-batch seeds make
the result identical to an uninterrupted run.

Several processes (`torchrun --nproc_per_node N steps/generate.py ...`, or `make generate NPROC=N`) each take every
N-th batch on their own GPU and write a shard; process 0 merges the shards into OUT when all are done, so the records
are the same as with one process.
"""

import argparse
import re
import sys

from common import OptionError, run_step
from common.generation import recipes
from common.generation.chat import end_of_turn, prepare_tokenizer
from common.generation.engines import ENGINES, declared_stop_ids, load_engine, process_device_map
from common.generation.sanitize import sanitize
from common.io.batches import run_batches
from common.io.files import output_lock
from common.io.shards import process_rank
from common.models import load_tokenizer
from common.options import non_negative_float, non_negative_int, positive_float, positive_int, probability, step_parser
from common.precision import dtype_name

# An "instruction" that opens like an answer means the model skipped the user turn.
ANSWER_OPENING = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|great question|here (is|are)|i('d| would) be (happy|glad))\b", re.I
)


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--model", required=True, help="instruct model: Hub id or local directory")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="records to write")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="samples handed to the engine at once, each batch appended to OUT.partial when done (the "
                        "unit a resumed run restarts from); larger batches leave the engine fewer idle rows")
    p.add_argument("--decode-rows", type=positive_int, default=16,
                   help="rows the engine decodes at once (on a GPU reduced to what free memory holds)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--turns", type=positive_int, default=1, help="user/assistant turns per conversation")
    p.add_argument("--instruction-only", action="store_true", help="write instructions without responses")
    g = p.add_argument_group("recipe", "each of these defaults to the generator recipe's value (env/generators/)")
    g.add_argument("--recipe", default=None, help="recipe name (e.g. llama-3.1, qwen2.5, generic) or a YAML file in "
                   "env/generators' format; default: matched from the model's name, then its chat template")
    g.add_argument("--system", default=None, help="a system prompt placed before every user turn")
    g.add_argument("--system-prompts", default=None, metavar="FILE",
                   help="task steering: a JSON/YAML list of system prompts, or a mapping prompt -> weight; one is "
                        "drawn per record (by seed and record number) and written into the record")
    for side in ("instruction", "response"):
        g.add_argument(f"--{side}-temperature", type=non_negative_float, default=None, help="0: greedy")
        g.add_argument(f"--{side}-top-p", type=probability, default=None, help="1: off")
        g.add_argument(f"--{side}-top-k", type=non_negative_int, default=None, help="0: off")
        g.add_argument(f"--{side}-repetition-penalty", type=positive_float, default=None, help="1: off")
        g.add_argument(f"--{side}-loop-window", type=non_negative_int, default=None,
                       help="0: off; N: stop a row that loops in its last N tokens")
    g.add_argument("--max-instruction-tokens", type=positive_int, default=None, help="cap on an instruction's tokens")
    g.add_argument("--max-response-tokens", type=positive_int, default=None, help="cap on a response's tokens")
    g.add_argument("--suppress-at-start", default=None, metavar="TOKENS",
                   help="comma-separated token strings never sampled as an instruction's first token ('' for none)")
    g.add_argument("--stop-at-newline", action=argparse.BooleanOptionalAction, default=None,
                   help="end an instruction at its first newline (Magpie's early stopping)")
    g.add_argument("--sanitize", action=argparse.BooleanOptionalAction, default=None,
                   help="clean up instructions by Magpie's Llama-3 rules (common/generation/sanitize.py)")
    p.add_argument("--engine", default="transformers", choices=ENGINES)
    p.add_argument("--dtype", default="auto", help="auto (see common/precision.py), bfloat16, float16 or float32")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4-quantize the generator (bitsandbytes, GPU)")
    args = p.parse_args(argv)
    if args.system is not None and args.system_prompts:
        raise OptionError("--system and --system-prompts: give one (a fixed system prompt, or one drawn per record)")
    return args


def overrides_of(args):
    """The flags that override the recipe's sampling values (None: the recipe's)."""
    sides = {side: {key: getattr(args, f"{side}_{key}") for key in
                    ("temperature", "top_p", "top_k", "repetition_penalty", "loop_window")}
             for side in ("instruction", "response")}
    sides["instruction"]["max_new_tokens"] = args.max_instruction_tokens
    sides["response"]["max_new_tokens"] = args.max_response_tokens
    if args.suppress_at_start is not None:
        sides["instruction"]["suppress_at_start"] = [t for t in args.suppress_at_start.split(",") if t]
    sides["instruction"]["stop_at_newline"] = args.stop_at_newline
    return sides


def recipe_for(args, tokenizer, default_stop_ids):
    spec = recipes.find(args.model, tokenizer, args.recipe)
    return recipes.resolve(spec, tokenizer, default_stop_ids, overrides_of(args), args.sanitize,
                           responses=not args.instruction_only)


def settings_of(args, recipe, tokenizer, steering):
    """What every record of the run was generated with: the run's options, the recipe and every sampling value
    used. With steering the pre-query template is the one without a system prompt; each record names its own."""
    return {
        "model": args.model, "seed": args.seed, "turns": args.turns, "instruction_only": args.instruction_only,
        "dtype": dtype_name(args.dtype), "recipe": recipe.name, "system": args.system, "system_prompts": steering,
        "pre_query_template": recipe.pre_query(tokenizer, args.system), "sanitize": recipe.sanitize,
        "instruction_sampling": recipe.instruction.record(),
        "response_sampling": recipe.response.record() if recipe.response else None,
    }


def reject_reason(text, template_markers):
    """Why a sampled instruction is unusable, or None."""
    if not text.strip():
        return "empty"
    if any(marker in text for marker in template_markers):
        return "template_tokens"
    if ANSWER_OPENING.match(text):
        return "answers_instead_of_asking"
    return None


def template_markers(tokenizer):
    """Strings that never belong in an instruction: special tokens and the template's turn delimiters."""
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    markers = special | set(tokenizer.all_special_tokens) | {end_of_turn(tokenizer, "user"),
                                                             end_of_turn(tokenizer, "assistant")}
    return sorted(m for m in markers if m and m.strip())


def clean_instruction(recipe, text, finished):
    """(instruction, finished, sanitize info or None): Magpie's sanitizing where the recipe asks for it. A cut-off
    instruction counts as finished when sanitizing kept only a part before where the model stopped."""
    if not recipe.sanitize:
        return text, finished, None
    clean = sanitize(text)
    return clean.text, finished or clean.cut, {"raw_instruction": text, "sanitize_rule": clean.rule}


def generate_batch(engine, args, recipe, n, seed, markers, systems=None):
    """n conversations of up to args.turns turns; systems[k] is conversation k's system prompt (None: none). The
    first turn is always kept (the filter judges it); a later turn is kept only if its instruction and response both
    came out whole, else the conversation ends before it."""
    tokenizer = engine.tokenizer
    systems = systems or [None] * n
    conversations = [[] for _ in range(n)]
    # *_stop: how the engine ended the first turn's text ("stop", "length": the cap, "loop": the loop rule)
    status = [{"instruction_finished": False, "response_finished": False, "rejected": None, "instruction_stop": None,
               "response_stop": None} for _ in range(n)]
    tokens, active = 0, list(range(n))
    for turn in range(args.turns):
        if not active:
            break
        queries = [recipe.pre_query(tokenizer, systems[k], conversations[k]) for k in active]
        instructions = engine.sample(queries, recipe.instruction, seed * 1009 + turn)
        tokens += sum(i["tokens"] for i in instructions)
        asked = {}
        for k, ins in zip(active, instructions):
            text, finished, sanitized = clean_instruction(recipe, ins["text"], ins["finished"])
            reason = reject_reason(text, markers)
            if turn == 0:
                conversations[k].append({"role": "user", "content": text})
                status[k].update(instruction_finished=finished, rejected=reason, instruction_stop=ins["stop_reason"],
                                 **(sanitized or {}))
            if finished and not reason:  # a cut-off or rejected instruction is not worth answering
                asked[k] = text
        if args.instruction_only:
            break
        prompts = [recipe.prompt(tokenizer, text, systems[k], history=conversations[k][: 2 * turn])
                   for k, text in asked.items()]
        responses = engine.sample(prompts, recipe.response, seed * 1009 + turn) if prompts else []
        tokens += sum(r["tokens"] for r in responses)
        active = []
        for (k, text), res in zip(asked.items(), responses):
            if turn == 0:
                conversations[k].append({"role": "assistant", "content": res["text"]})
                status[k].update(response_finished=res["finished"], response_stop=res["stop_reason"])
            elif res["finished"]:
                conversations[k] += [{"role": "user", "content": text}, {"role": "assistant", "content": res["text"]}]
            if res["finished"]:
                active.append(k)
    return conversations, status, tokens


def record_id(seed, index):
    return f"s{seed}-{index:07d}"


def to_record(index, conversation, status, args, settings, system=None, pre_query=None):
    record = {
        "id": record_id(args.seed, index),
        "instruction": conversation[0]["content"],
        "response": None if args.instruction_only else (conversation[1]["content"] if len(conversation) > 1 else ""),
        **status,
        "settings": settings,
    }
    if settings["system_prompts"]:  # steering: the system prompt drawn for this record, and the template it made
        record["system"], record["pre_query_template"] = system, pre_query
    if args.instruction_only:
        record["response_finished"] = None
    if args.turns > 1:
        record["conversation"] = conversation
    return record


def main(argv=None):
    args = parse_args(argv)
    with output_lock(args.out):  # a second run stops here, at once
        write_samples(args)


def write_samples(args):
    steering = recipes.load_system_prompts(args.system_prompts) if args.system_prompts else None

    def system_of(index):  # the record's system prompt: drawn per record when steering, else --system
        return recipes.system_for(steering, args.seed, index) if steering else args.system

    # The recipe, and so the settings a partial output must match, need only the tokenizer: refused before loading.
    tokenizer = prepare_tokenizer(load_tokenizer(args.model))
    recipe = recipe_for(args, tokenizer, declared_stop_ids(args.model, tokenizer))
    settings = settings_of(args, recipe, tokenizer, steering)
    engine = markers = None

    def work(b, first, n):
        nonlocal engine, markers
        if engine is None:  # loaded only when there is work left
            engine = load_engine(args.engine, args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                 device_map=process_device_map(*process_rank()), batch_size=args.decode_rows)
            markers = template_markers(engine.tokenizer)
            print(f"recipe {recipe.name}; pre-query template: {recipe.pre_query(tokenizer, system_of(0))!r}\n"
                  f"instructions: {recipe.instruction.record()}\nresponses: "
                  f"{recipe.response.record() if recipe.response else None}", file=sys.stderr)
        systems = [system_of(first + k) for k in range(n)]
        conversations, status, tokens = generate_batch(engine, args, recipe, n, args.seed * 1_000_003 + b, markers,
                                                       systems)
        return [to_record(first + k, conversations[k], status[k], args, settings, systems[k],
                          recipe.pre_query(tokenizer, systems[k]) if steering else None)
                for k in range(n)], tokens

    ids = [record_id(args.seed, i) for i in range(args.num_samples)]
    run_batches(args.out, ids, args.batch_size, work, {"settings": settings}, desc="generate", unit="sample",
                order=lambda r: int(r["id"].rsplit("-", 1)[1]))


if __name__ == "__main__":
    run_step(main)
