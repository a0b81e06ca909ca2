"""Preference pairs: sample several responses per instruction, score them with a reward model, keep best vs worst.

    python steps/preference.py --in filtered.jsonl --policy MODEL --reward-model RM \
        --scored scored.jsonl --out preference.jsonl

Reward models (steps/common/generation/reward.py): a sequence classifier (any Hub id or directory, e.g.
OpenAssistant/reward-model-deberta-v3-large-v2) or a sentence-transformers embedder such as `embedded:minilm`,
whose cosine score measures only whether a response is on the instruction's topic.

Outputs: --scored holds every instruction with all its responses and scores (appended in batches, resumable);
--out holds the pairs whose margin reaches --min-margin (ties only with --ties keep), in TRL's conversational
preference format; <out stem>_summary.json beside it (preference_summary.json) counts the instructions without a
pair by cause (NO_PAIR_CAUSES).
With --policy-adapter (the SFT adapter) the responses are on-policy for DPO.

Sampling: the policy's generator recipe (env/generators/, matched to --policy as the generate step matches its model):
its response settings with its `preference` section on top; each sampling flag overrides one value.
"""

import sys
from pathlib import Path

from common import DataError, run_step
from common.generation import recipes
from common.generation.chat import prepare_tokenizer, prompt_text
from common.generation.engines import ENGINES, declared_stop_ids, load_engine, process_device_map
from common.generation.reward import load_reward, score_in_batches
from common.io.batches import run_batches
from common.io.files import output_lock, write_json
from common.io.jsonl import read_jsonl, write_jsonl
from common.io.shards import process_rank
from common.models import load_tokenizer
from common.options import (at_least, non_negative_float, non_negative_int, positive_float, positive_int, probability,
                            step_parser)
from common.precision import dtype_name


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--in", dest="inp", required=True, help="filtered JSONL (id, instruction)")
    p.add_argument("--policy", required=True, help="model that samples the responses (Hub id or directory)")
    p.add_argument("--policy-adapter", default=None,
                   help="LoRA adapter on --policy (e.g. the SFT step's output: on-policy pairs for DPO)")
    p.add_argument("--reward-model", required=True, help="sequence classifier or sentence-transformers directory")
    p.add_argument("--scored", required=True, help="all responses and scores (JSONL)")
    p.add_argument("--out", required=True, help="preference pairs (JSONL)")
    p.add_argument("--num-responses", type=at_least(2), default=4,
                   help="responses sampled per instruction (a pair needs two)")
    p.add_argument("--max-response-tokens", type=positive_int, default=512)
    g = p.add_argument_group("sampling", "each defaults to the policy's generator recipe (env/generators/: its "
                             "response settings, its preference section on top)")
    g.add_argument("--recipe", default=None, help="recipe name (e.g. llama-3.1, smollm2, generic); default: matched "
                   "to --policy")
    g.add_argument("--temperature", type=non_negative_float, default=None, help="0: greedy")
    g.add_argument("--top-p", type=probability, default=None, help="1: off")
    g.add_argument("--top-k", type=non_negative_int, default=None, help="0: off")
    g.add_argument("--repetition-penalty", type=positive_float, default=None, help="1: off")
    g.add_argument("--loop-window", type=non_negative_int, default=None,
                   help="N > 0: stop a response that loops in its last N tokens")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="instructions per batch (each batch's records are appended to --scored's partial file)")
    p.add_argument("--decode-rows", type=positive_int, default=32,
                   help="responses the engine decodes at once (on a GPU reduced to what free memory holds)")
    p.add_argument("--reward-batch-size", type=positive_int, default=16)
    p.add_argument("--min-margin", type=non_negative_float, default=0.0,
                   help="drop pairs whose chosen-rejected margin is below")
    p.add_argument("--ties", choices=["drop", "keep"], default="drop",
                   help="pairs whose chosen and rejected score the same (margin 0): drop them, or keep them")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--engine", default="transformers", choices=ENGINES)
    p.add_argument("--dtype", default="auto", help="auto (see common/precision.py), bfloat16, float16 or float32")
    p.add_argument("--load-in-4bit", action="store_true")
    return p.parse_args(argv)


def pair(record, responses, scores, finished):
    """Best vs worst finished response of one instruction, in TRL's conversational preference format.

    Only responses that ended on their own take part. A chosen response cut at the token cap would teach the model
    not to stop; a rejected one would be trained with the end-of-turn token the chat template appends, i.e. as if it
    had finished, so the pair would teach "finished beats cut off" rather than which answer is better (TRL's
    `mask_truncated_completions` leaves cut completions out of the loss for the same reason). Returns None when
    fewer than two finished. Among tied scores the earliest response is taken: the first of the highest score, the
    first of the lowest.
    """
    candidates = [i for i in range(len(scores)) if finished[i]]
    if len(candidates) < 2:
        return None
    best = max(candidates, key=scores.__getitem__)
    worst = min(candidates, key=scores.__getitem__)
    return {
        "id": record["id"],
        "prompt": [{"role": "user", "content": record["instruction"]}],
        "chosen": [{"role": "assistant", "content": responses[best]}],
        "rejected": [{"role": "assistant", "content": responses[worst]}],
        "score_chosen": scores[best],
        "score_rejected": scores[worst],
        "margin": scores[best] - scores[worst],
    }


def worst_was_cut(record, candidate):
    """Whether the pair's rejected answer replaced a lower-scored response that was cut at the cap."""
    return candidate is not None and min(record["scores"]) < candidate["score_rejected"]


# Why an instruction gives no pair, checked in this order (no_pair_cause): the summary's keys are these texts.
NO_PAIR_CAUSES = {
    "responses": "fewer than 2 responses",
    "unfinished": "fewer than 2 finished responses (one cut at the token cap is neither chosen nor rejected)",
    "tie": "tie: the best finished response scores no higher than the worst",
    "margin": "margin under --min-margin",
}


def no_pair_cause(record, candidate, min_margin, ties):
    """The NO_PAIR_CAUSES key of why `record` (a scored instruction) gives no pair, None when it gives one;
    `candidate`: pair()'s result for it."""
    if len(record["scores"]) < 2:
        return "responses"
    if candidate is None:
        return "unfinished"
    if candidate["margin"] <= 0 and ties == "drop":
        return "tie"
    if candidate["margin"] < min_margin:
        return "margin"
    return None


def summary_path(out):
    """preference_summary.json for preference.jsonl: the counts beside the pairs."""
    out = Path(out)
    return out.with_name(out.stem + "_summary.json")


def settings_of(args, sampling):
    """What every scored record was made with (a resumed --scored partial file must match)."""
    return {"policy": args.policy, "policy_adapter": args.policy_adapter, "reward_model": args.reward_model,
            "num_responses": args.num_responses, "seed": args.seed, "dtype": dtype_name(args.dtype),
            "sampling": sampling.record()}


def sampling_of(args):
    """(the policy's tokenizer, how its responses are sampled): needs no weights, so a partial file written with
    other settings is refused before the models load."""
    tokenizer = prepare_tokenizer(load_tokenizer(args.policy_adapter or args.policy))
    spec = recipes.find(args.policy, tokenizer, args.recipe)
    flags = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "repetition_penalty": args.repetition_penalty, "loop_window": args.loop_window,
             "max_new_tokens": args.max_response_tokens}
    return tokenizer, recipes.preference_sampling(spec, tokenizer, declared_stop_ids(args.policy, tokenizer), flags)


def score(args, records):
    """Sample and score every instruction into --scored (resuming what an earlier run wrote); returns the scored
    records on process 0, None on the others."""
    k = args.num_responses
    tokenizer, sampling = sampling_of(args)
    settings = settings_of(args, sampling)
    models = {}

    def work(b, first, n):
        if not models:  # loaded only when there is work left
            models["policy"] = load_engine(args.engine, args.policy, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                           adapter=args.policy_adapter, device_map=process_device_map(*process_rank()),
                                           batch_size=args.decode_rows)
            models["reward"] = load_reward(args.reward_model, args.dtype)
        batch = records[first : first + n]
        prompts = [prompt_text(tokenizer, r["instruction"]) for r in batch for _ in range(k)]
        samples = models["policy"].sample(prompts, sampling, args.seed * 1_000_003 + b)
        texts = [s["text"] for s in samples]
        scores = score_in_batches(models["reward"], [r["instruction"] for r in batch for _ in range(k)], texts,
                                  args.reward_batch_size)
        return [{"id": r["id"], "instruction": r["instruction"], "responses": texts[j * k : (j + 1) * k],
                 "finished": [s["finished"] for s in samples[j * k : (j + 1) * k]],
                 "scores": scores[j * k : (j + 1) * k], "reward_model": args.reward_model,
                 "dtype": dtype_name(args.dtype), "settings": settings}
                for j, r in enumerate(batch)], sum(s["tokens"] for s in samples)

    position = {r["id"]: i for i, r in enumerate(records)}
    return run_batches(args.scored, [r["id"] for r in records], args.batch_size, work, {"settings": settings},
                       desc="preference", unit="instruction", order=lambda r: position[r["id"]])


def main(argv=None):
    args = parse_args(argv)
    records = read_jsonl(args.inp, required={"id": str, "instruction": str})
    if not records:
        raise DataError(f"{args.inp}: no instructions")
    with output_lock(args.out):  # a second run stops here, at once
        scored = score(args, records)
        if scored is not None:  # process 0 makes the pairs
            write_pairs(args, scored)


def write_pairs(args, scored):
    kept, causes, passed_over = [], dict.fromkeys(NO_PAIR_CAUSES, 0), 0
    for r in scored:
        candidate = pair(r, r["responses"], r["scores"], r["finished"])
        cause = no_pair_cause(r, candidate, args.min_margin, args.ties)
        if cause is None:
            kept.append(candidate)
            passed_over += worst_was_cut(r, candidate)
        else:
            causes[cause] += 1
    # the summary first: a finished preference.jsonl always has its summary beside it
    write_json(summary_path(args.out), {
        "instructions": len(scored), "pairs": len(kept),
        "no_pair": {NO_PAIR_CAUSES[k]: n for k, n in causes.items()},
        "rejected_instead_of_a_cut_response": passed_over,
        "min_margin": args.min_margin, "ties": args.ties})
    write_jsonl(args.out, kept)
    print(f"wrote {args.out}: {len(kept)} pairs of {len(scored)} instructions ({passed_over} rejecting the lowest "
          "finished response where a lower one was cut at the cap); no pair: " + (", ".join(
              f"{n} {NO_PAIR_CAUSES[k]}" for k, n in causes.items() if n) or "none"), file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
