"""What each tier's length limits do to Magpie-shaped data, through the steps' own code (no model, no GPU).

Synthetic records with Magpie's length mix (responses log-normal, median 300 tokens, sigma 0.8; instructions median
40, sigma 0.7) are cut at the tier's generation caps (env/<tier>/tier.mk, else the Llama-3 recipe's), and then:
- the filter's truncated rule drops those that reached a cap;
- SFT tokenises the rest with its chat template (steps/sft.py to_dataset) and drops those longer than the tier's
  sft.yaml max_length (common/training/trainers.py drop_too_long);
- the preference step samples NUM_RESPONSES answers of the same mix cut at PREF_MAX_TOKENS, scores them at random
  and pairs them (steps/preference.py write_pairs: cut answers take no part);
- DPO measures each pair as TRL tokenises it (prompt with the generation header, each answer after it) and drops
  those over dpo.yaml's max_length.
The chat template is the embedded SmolLM2's (its default system turn: ~30 tokens of template a one-turn record,
about what Llama-3's adds); texts are a repeated one-token word, so a text of n tokens is n tokens.

    python bench/training_lengths.py --records 3000 --out bench/results/training-lengths-magpie-mix.json
"""

import argparse
import json
import random
import re
import tempfile
from pathlib import Path

import yaml

from provenance import REPO, provenance

TIERS = ("cpu", "t4", "a100", "h100")


def tier_settings(tier):
    """The tier's generation caps and training lengths, as make and the trainers read them."""
    mk = (REPO / "env" / tier / "tier.mk").read_text()

    def var(name):
        found = re.search(rf"^{name} \?=[ \t]*(\S*)", mk, re.M)
        return int(found[1]) if found and found[1] else None

    recipe = yaml.safe_load((REPO / "env" / "generators" / ("smollm2.yaml" if tier == "cpu" else "llama-3.yaml"))
                            .read_text())
    max_length = {step: yaml.safe_load((REPO / "env" / tier / f"{step}.yaml").read_text())["max_length"]
                  for step in ("sft", "dpo")}
    return {"instruction_cap": var("MAX_INSTRUCTION_TOKENS") or recipe["instruction"]["max_new_tokens"],
            "response_cap": var("MAX_RESPONSE_TOKENS") or recipe["response"]["max_new_tokens"],
            "preference_cap": var("PREF_MAX_TOKENS"), "num_responses": var("NUM_RESPONSES") or 4,
            "sft_max_length": max_length["sft"], "dpo_max_length": max_length["dpo"]}


def lognormal_tokens(rng, median, sigma, cap):
    """(tokens, finished): a length from the mix, cut at the cap (a text that reaches the cap did not end)."""
    n = max(1, round(median * rng.lognormvariate(0, sigma)))
    return (cap, False) if n >= cap else (n, True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import preference
    from datasets import Dataset
    from dpo import pair_lengths
    from sft import to_dataset

    from common.generation.chat import prepare_tokenizer
    from common.models import load_tokenizer
    from common.training.trainers import drop_too_long

    tokenizer = prepare_tokenizer(load_tokenizer("embedded:smollm2"))
    word = " the"
    assert len(tokenizer(word * 50, add_special_tokens=False)["input_ids"]) == 50

    def text(n):
        return (word * n).strip()

    results = {}
    for tier in TIERS:
        s = tier_settings(tier)
        rng = random.Random(args.seed)
        generated = []
        for i in range(args.records):
            q, q_done = lognormal_tokens(rng, 40, 0.7, s["instruction_cap"])
            a, a_done = lognormal_tokens(rng, 300, 0.8, s["response_cap"])
            generated.append((f"r{i}", q, a, q_done and a_done))
        kept = [{"id": i, "instruction": text(q), "response": text(a)} for i, q, a, done in generated if done]
        rows = to_dataset(kept, tokenizer)
        lengths = [len(ids) for ids in rows["input_ids"]]
        _, trained = drop_too_long(rows, lengths, s["sft_max_length"], f"{tier} SFT rows")

        # Preference: NUM_RESPONSES answers of the mix each, cut at the preference cap, scored at random.
        scored = []
        for r in kept:
            answers = [lognormal_tokens(rng, 300, 0.8, s["preference_cap"]) for _ in range(s["num_responses"])]
            scored.append({"id": r["id"], "instruction": r["instruction"], "responses": [text(n) for n, _ in answers],
                           "finished": [done for _, done in answers],
                           "scores": [rng.gauss(0, 1) for _ in answers]})
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "preference.jsonl"
            pref_args = preference.parse_args(["--in", "x", "--policy", "p", "--reward-model", "r", "--scored", "s",
                                               "--out", str(out)])
            preference.write_pairs(pref_args, scored)
            pairs = [json.loads(line) for line in out.read_text().splitlines()]
            summary = json.loads((Path(tmp) / "preference_summary.json").read_text())

        def ids(messages, **kw):
            return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

        tokenized = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for pr in pairs:  # as TRL's DPO tokenises a conversational pair: the answer is what follows the prompt
            prompt = ids(pr["prompt"], add_generation_prompt=True)
            tokenized["prompt_ids"].append(prompt)
            for side in ("chosen", "rejected"):
                tokenized[f"{side}_ids"].append(ids(pr["prompt"] + pr[side])[len(prompt):])
        tokenized = Dataset.from_dict(tokenized)
        _, dpo_trained = drop_too_long(tokenized, pair_lengths(tokenized), s["dpo_max_length"], f"{tier} DPO pairs")

        results[tier] = {
            **s,
            "generated": args.records,
            "dropped_as_truncated": args.records - len(kept),
            "kept": len(kept),
            "sft_rows_p50_p90_p99_max": [sorted(lengths)[int(q * (len(lengths) - 1))] for q in (0.5, 0.9, 0.99, 1)],
            "sft_dropped_too_long": len(kept) - len(trained),
            "sft_dropped_share_of_kept": round((len(kept) - len(trained)) / len(kept), 4),
            "pairs": len(pairs),
            "no_pair": summary["no_pair"],
            "pairs_rejecting_a_finished_answer_over_a_lower_cut_one": summary["rejected_instead_of_a_cut_response"],
            "dpo_dropped_too_long": len(pairs) - len(dpo_trained),
        }
        print(tier, json.dumps(results[tier]), flush=True)

    report = {"what": __doc__.split("\n\n")[0], "records": args.records, "seed": args.seed,
              "mix": {"response": "log-normal median 300 sigma 0.8", "instruction": "log-normal median 40 sigma 0.7"},
              "tiers": results, **provenance()}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
