"""Magpie: an aligned chat model writes instructions from its own pre-query template, then answers them.

The model gets only its chat template up to the start of the user's message, so what it samples next is a user
instruction; sampling stops at the end of the user turn. The instruction is then answered with the full template.

    python steps/generate.py --model meta-llama/Llama-3.1-8B-Instruct --out data/runs/x/generated.jsonl \
        --num-samples 1000 --batch-size 32

Output: one JSON line per sample (id, instruction, response, finish flags, generator and settings). Records are
appended in whole batches to OUT.partial and the file is renamed to OUT when complete; rerunning the same command
after a crash continues from the last whole batch, and per-batch seeds make the result identical to an
uninterrupted run.
"""

import argparse
import sys
import time

from tqdm import tqdm

from common import run_step
from common.chat import end_of_turn, pre_query_template, prompt_text
from common.generation import ENGINES, load_engine
from common.jsonl import DataError, ResumableWriter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="instruct model: Hub id or local directory")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="optional system prompt placed before the user turn")
    # Magpie's defaults: instructions sampled at temperature 1.0 / top-p 1.0, responses greedy.
    p.add_argument("--instruction-temperature", type=float, default=1.0)
    p.add_argument("--instruction-top-p", type=float, default=1.0)
    p.add_argument("--max-instruction-tokens", type=int, default=128)
    p.add_argument("--response-temperature", type=float, default=0.0)
    p.add_argument("--response-top-p", type=float, default=1.0)
    p.add_argument("--max-response-tokens", type=int, default=512)
    p.add_argument("--engine", default="transformers", choices=ENGINES)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4-quantize the generator (bitsandbytes, GPU)")
    return p.parse_args(argv)


def settings_of(args):
    keys = ["model", "seed", "system", "instruction_temperature", "instruction_top_p", "max_instruction_tokens",
            "response_temperature", "response_top_p", "max_response_tokens"]
    return {k: getattr(args, k) for k in keys}


def main(argv=None):
    args = parse_args(argv)
    settings = settings_of(args)
    # Keep only whole batches of an interrupted run: batch b always gets the same prompts and seed.
    whole_batches = lambda n: args.num_samples if n >= args.num_samples else n - n % args.batch_size  # noqa: E731
    writer = ResumableWriter(args.out, keep=whole_batches)
    if writer.done and writer.done[0].get("settings") != settings:
        writer.close()
        raise DataError(
            f"{writer.partial}: left by a run with other settings ({writer.done[0].get('settings')}); "
            "delete it to start over, or rerun with the same settings to resume"
        )
    if len(writer.done) >= args.num_samples:
        writer.finish()
        return

    engine = load_engine(args.engine, args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit)
    tokenizer = engine.tokenizer
    pre_query = pre_query_template(tokenizer, system=args.system)
    user_end, assistant_end = end_of_turn(tokenizer, "user"), end_of_turn(tokenizer, "assistant")
    print(f"pre-query template: {pre_query!r}; user turn ends with {user_end!r}", file=sys.stderr)

    bar = tqdm(total=args.num_samples, initial=len(writer.done), desc="generate", unit="sample")
    start, tokens = time.time(), 0
    for first in range(len(writer.done), args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - first)
        seed = args.seed * 1_000_003 + first // args.batch_size
        instructions = engine.sample([pre_query] * n, args.max_instruction_tokens, args.instruction_temperature,
                                     args.instruction_top_p, [user_end], seed)
        # An instruction cut off by the token limit is dropped by the filter anyway: don't spend time answering it.
        answer = [k for k, i in enumerate(instructions) if i["finished"] and i["text"]]
        responses = [{"text": "", "finished": False, "tokens": 0}] * n
        if answer:
            prompts = [prompt_text(tokenizer, instructions[k]["text"], system=args.system) for k in answer]
            answered = engine.sample(prompts, args.max_response_tokens, args.response_temperature,
                                     args.response_top_p, [assistant_end], seed)
            for k, response in zip(answer, answered):
                responses[k] = response
        records = [
            {
                "id": f"s{args.seed}-{first + k:07d}",
                "instruction": ins["text"],
                "response": res["text"],
                "instruction_finished": ins["finished"],
                "response_finished": res["finished"],
                "response_tokens": res["tokens"],
                "settings": settings,
            }
            for k, (ins, res) in enumerate(zip(instructions, responses))
        ]
        writer.write(records)
        tokens += sum(i["tokens"] + r["tokens"] for i, r in zip(instructions, responses))
        bar.update(n)
        bar.set_postfix(tok_s=f"{tokens / (time.time() - start):.0f}")
    bar.close()
    writer.finish()
    print(f"wrote {args.out}: {len(writer.done)} samples", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
