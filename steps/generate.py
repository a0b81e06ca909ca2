"""Magpie: an aligned chat model writes instructions from its own pre-query template, then answers them.

The model gets only its chat template up to the start of the user's message, so what it samples next is a user
instruction; sampling stops at the end of the user turn. The instruction is then answered with the full template.
With --turns N the model writes the follow-up user turns the same way, from the conversation so far.

    python steps/generate.py --model meta-llama/Llama-3.1-8B-Instruct --out data/runs/x/generated.jsonl \
        --num-samples 1000 --batch-size 32

Output: one JSON line per sample: id, instruction and response (the first turn), conversation (all turns, with
--turns > 1), finish flags, why an instruction was rejected (if it was), and the settings. Records are appended
in whole batches to OUT.partial (flushed every --checkpoint-every samples) and the file is renamed to OUT when
complete; rerunning the same command after a crash continues from the last whole batch, and per-batch seeds make
the result identical to an uninterrupted run.

Several processes (`torchrun --nproc_per_node N steps/generate.py ...`, or `make generate NPROC=N`) each take every
N-th batch on their own GPU and write a shard; process 0 merges the shards into OUT when all are done, so the records
are the same as with one process.
"""

import argparse
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import DataError, run_step
from common.chat import end_of_turn, pre_query_template, prompt_text
from common.files import output_lock
from common.generation import ENGINES, Sampling, load_engine, process_device_map
from common.jsonl import ResumableWriter
from common.precision import dtype_name
from common.shards import merge_shards, process_rank, shard_lock, shard_paths

# An "instruction" that opens like an answer means the model skipped the user turn.
ANSWER_OPENING = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|great question|here (is|are)|i('d| would) be (happy|glad))\b", re.I
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="instruct model: Hub id or local directory")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=100, help="flush written samples to disk this often")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="optional system prompt placed before the user turn")
    p.add_argument("--turns", type=int, default=1, help="user/assistant turns per conversation")
    p.add_argument("--instruction-only", action="store_true", help="write instructions without responses")
    # Magpie's defaults: instructions sampled at temperature 1.0 / top-p 1.0, responses greedy.
    p.add_argument("--instruction-temperature", type=float, default=1.0)
    p.add_argument("--instruction-top-p", type=float, default=1.0)
    p.add_argument("--max-instruction-tokens", type=int, default=128)
    p.add_argument("--response-temperature", type=float, default=0.0)
    p.add_argument("--response-top-p", type=float, default=1.0)
    p.add_argument("--max-response-tokens", type=int, default=512)
    p.add_argument("--engine", default="transformers", choices=ENGINES)
    p.add_argument("--dtype", default="auto", help="auto (see common/precision.py), bfloat16, float16 or float32")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4-quantize the generator (bitsandbytes, GPU)")
    return p.parse_args(argv)


def settings_of(args):
    keys = ["model", "seed", "system", "turns", "instruction_only", "instruction_temperature", "instruction_top_p",
            "max_instruction_tokens", "response_temperature", "response_top_p", "max_response_tokens"]
    return {**{k: getattr(args, k) for k in keys}, "dtype": dtype_name(args.dtype)}


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


def generate_batch(engine, args, n, seed, markers):
    """n conversations of up to args.turns turns. The first turn is always kept (the filter judges it); a later
    turn is kept only if its instruction and response both came out whole, else the conversation ends before it."""
    tokenizer = engine.tokenizer
    user_end, assistant_end = end_of_turn(tokenizer, "user"), end_of_turn(tokenizer, "assistant")
    conversations = [[] for _ in range(n)]
    status = [{"instruction_finished": False, "response_finished": False, "rejected": None} for _ in range(n)]
    tokens, active = 0, list(range(n))
    for turn in range(args.turns):
        if not active:
            break
        queries = [pre_query_template(tokenizer, args.system, conversations[k]) for k in active]
        instructions = engine.sample(queries, Sampling(
            args.max_instruction_tokens, args.instruction_temperature, args.instruction_top_p,
            stop_token_ids=engine.stop_token_ids, stop_strings=(user_end,)), seed * 1009 + turn)
        tokens += sum(i["tokens"] for i in instructions)
        asked = {}
        for k, ins in zip(active, instructions):
            reason = reject_reason(ins["text"], markers)
            if turn == 0:
                conversations[k].append({"role": "user", "content": ins["text"]})
                status[k].update(instruction_finished=ins["finished"], rejected=reason)
            if ins["finished"] and not reason:  # a cut-off or rejected instruction is not worth answering
                asked[k] = ins["text"]
        if args.instruction_only:
            break
        prompts = [prompt_text(tokenizer, text, args.system, history=conversations[k][: 2 * turn])
                   for k, text in asked.items()]
        responses = engine.sample(prompts, Sampling(
            args.max_response_tokens, args.response_temperature, args.response_top_p,
            stop_token_ids=engine.stop_token_ids, stop_strings=(assistant_end,)), seed * 1009 + turn) if prompts else []
        tokens += sum(r["tokens"] for r in responses)
        active = []
        for (k, text), res in zip(asked.items(), responses):
            if turn == 0:
                conversations[k].append({"role": "assistant", "content": res["text"]})
                status[k]["response_finished"] = res["finished"]
            elif res["finished"]:
                conversations[k] += [{"role": "user", "content": text}, {"role": "assistant", "content": res["text"]}]
            if res["finished"]:
                active.append(k)
    return conversations, status, tokens


def to_record(index, conversation, status, args, settings):
    record = {
        "id": f"s{args.seed}-{index:07d}",
        "instruction": conversation[0]["content"],
        "response": None if args.instruction_only else (conversation[1]["content"] if len(conversation) > 1 else ""),
        **status,
        "settings": settings,
    }
    if args.instruction_only:
        record["response_finished"] = None
    if args.turns > 1:
        record["conversation"] = conversation
    return record


def main(argv=None):
    args = parse_args(argv)
    rank, world = process_rank()
    target = Path(args.out) if world == 1 else shard_paths(args.out, world)[rank]
    with output_lock(args.out), shard_lock(target if world > 1 else None):  # a second run stops here, at once
        write_samples(args, rank, world, target)


def write_samples(args, rank, world, target):
    settings = settings_of(args)
    batches = range(rank, -(-args.num_samples // args.batch_size), world)  # this process's share of the batches
    total = sum(min(args.batch_size, args.num_samples - b * args.batch_size) for b in batches)

    # Keep only whole batches of an interrupted run: batch b always gets the same prompts and seed.
    whole_batches = lambda n: total if n >= total else n - n % args.batch_size  # noqa: E731
    writer = ResumableWriter(target, keep=whole_batches)
    if writer.done and writer.done[0].get("settings") != settings:
        writer.close()
        raise DataError(f"{writer.partial}: left by a run with other settings ({writer.done[0].get('settings')}); "
                        "delete it to start over, or rerun with the same settings to resume")
    todo = list(batches)[len(writer.done) // args.batch_size :] if len(writer.done) < total else []
    if todo:
        engine = load_engine(args.engine, args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                             device_map=process_device_map(rank, world))
        markers = template_markers(engine.tokenizer)
        print(f"pre-query template: {pre_query_template(engine.tokenizer, args.system)!r}", file=sys.stderr)
        bar = tqdm(total=total, initial=len(writer.done), desc=f"generate[{rank}]" if world > 1 else "generate",
                   unit="sample", position=rank)
        start, tokens, pending = time.time(), 0, []
        for b in todo:
            first = b * args.batch_size
            n = min(args.batch_size, args.num_samples - first)
            conversations, status, batch_tokens = generate_batch(engine, args, n, args.seed * 1_000_003 + b, markers)
            pending += [to_record(first + k, conversations[k], status[k], args, settings) for k in range(n)]
            if len(pending) >= args.checkpoint_every or b == todo[-1]:
                writer.write(pending)
                pending = []
            tokens += batch_tokens
            bar.update(n)
            bar.set_postfix(tok_s=f"{tokens / (time.time() - start):.0f}")
        bar.close()
    writer.finish()
    if world > 1 and rank == 0:
        merge_shards(args.out, world, order=lambda r: int(r["id"].rsplit("-", 1)[1]))
    print(f"wrote {target}: {len(writer.done)} samples", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
