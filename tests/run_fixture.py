"""A small run directory written by hand, shaped like the steps' outputs (judge tags, nearest-neighbour distances,
eval entries in the trainers' log history included): the report and dataset tests read it without running the
chain or loading a language model."""

import csv
import json
from pathlib import Path

CATEGORIES = ["Information seeking", "Coding & Debugging", "Math", "Creative writing"]
QUALITIES = ["very poor", "poor", "average", "good", "excellent"]
DIFFICULTIES = ["very easy", "easy", "medium", "hard", "very hard"]
TOPICS = ["the water cycle", "a Python list", "prime numbers", "a short poem about rain", "binary search",
          "photosynthesis", "a haiku about autumn", "compound interest", "a SQL join", "the French revolution",
          "a limerick about cats", "integrals", "a bash loop", "volcanoes", "a story opening", "matrix products",
          "recursion", "tides", "a sonnet", "fractions"]
SAMPLING = {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0,
            "stop_token_ids": [2], "stop_strings": [], "suppress_at_start": [], "loop_window": 32}
SETTINGS = {"model": "embedded:smollm2", "seed": 0, "turns": 1, "instruction_only": False, "dtype": "float32",
            "recipe": "smollm2", "system": None, "system_prompts": None, "pre_query_template": "<|im_start|>user\n",
            "sanitize": None, "instruction_sampling": SAMPLING,
            "response_sampling": {**SAMPLING, "temperature": 0.3, "top_p": 0.9}}


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def tags(i):
    return {"category": CATEGORIES[i % 4] if i % 7 else "unparsed", "input_quality": QUALITIES[i % 5],
            "quality_reason": "clear enough", "difficulty": DIFFICULTIES[(i * 3) % 5],
            "safety": "safe" if i % 9 else "unparsed"}


def make_run(run, n=20, with_tags=True, multi_turn_every=5):
    """Write the run directory `run`: n generated samples, three in four kept, a pair for each kept one."""
    run = Path(run)
    (run / "eval").mkdir(parents=True, exist_ok=True)
    generated = []
    for i in range(n):
        r = {"id": f"s0-{i:07d}", "instruction": f"Explain {TOPICS[i % len(TOPICS)]} in simple words.",
             "response": f"Here is an explanation of {TOPICS[i % len(TOPICS)]}: it is simple.",
             "instruction_finished": True, "response_finished": i % 6 != 5, "rejected": None,
             "instruction_stop": "stop", "response_stop": "length" if i % 6 == 5 else "stop", "settings": SETTINGS}
        if multi_turn_every and i % multi_turn_every == 1:
            r["conversation"] = [{"role": "user", "content": r["instruction"]},
                                 {"role": "assistant", "content": r["response"]},
                                 {"role": "user", "content": "And in one sentence?"},
                                 {"role": "assistant", "content": "It is simple."}]
        if with_tags:
            r["tags"] = tags(i)
        generated.append(r)
    kept = [{**r, "nn_distance": 0.1 + 0.04 * (i % 10)} if with_tags else r
            for i, r in enumerate(generated) if i % 4 != 3]
    dropped = [{**r, "dropped_by": "response_length"} for i, r in enumerate(generated) if i % 4 == 3]
    write_jsonl(run / "generated.jsonl", generated)
    write_jsonl(run / "filtered.jsonl", kept)
    write_jsonl(run / "dropped.jsonl", dropped)
    summary = {"input": n, "kept": len(kept), "dropped": {"truncated": 0, "response_length": len(dropped),
                                                          "near_duplicate": 0}}
    if with_tags:  # the filter's 2-D map of the kept instructions (steps/filter.py map_2d)
        summary["near_duplicate"] = {"embedder": "embedded:minilm", "threshold": 0.9}
        summary["map"] = {"xy": [[i % 5 / 5, i / len(kept)] for i in range(len(kept))], "explained": 0.31}
    (run / "filter_summary.json").write_text(json.dumps(summary))
    pref_settings = {"policy": "embedded:smollm2", "policy_adapter": None, "reward_model": "embedded:minilm",
                     "num_responses": 2, "seed": 0, "dtype": "float32", "sampling": SAMPLING}
    scored = [{"id": r["id"], "instruction": r["instruction"], "responses": ["a", "b"], "finished": [True, True],
               "scores": [0.5 + 0.01 * i, 0.2], "reward_model": "embedded:minilm", "dtype": "float32",
               "settings": pref_settings} for i, r in enumerate(kept)]
    write_jsonl(run / "scored.jsonl", scored)
    write_jsonl(run / "preference.jsonl", [
        {"id": s["id"], "prompt": [{"role": "user", "content": s["instruction"]}],
         "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}],
         "score_chosen": s["scores"][0], "score_rejected": 0.2, "margin": s["scores"][0] - 0.2} for s in scored])
    for stage in ("sft", "dpo"):
        make_adapter(run / stage, stage)
    for stage, acc in (("base", 0.25), ("sft", 0.5), ("dpo", 0.75)):
        (run / "eval" / f"{stage}.json").write_text(json.dumps(eval_result(stage, acc)))
    return run


def make_adapter(out, stage):
    """An adapter directory's files, without weights."""
    out.mkdir(parents=True, exist_ok=True)
    history = [{"step": 1, "loss": 2.0, "learning_rate": 1e-4}, {"step": 2, "loss": 1.5, "learning_rate": 1e-4},
               {"step": 2, "eval_loss": 1.8}, {"step": 3, "loss": 1.2, "learning_rate": 1e-4},
               {"step": 4, "loss": 1.0, "learning_rate": 1e-4}, {"step": 4, "eval_loss": 1.6}]
    if stage == "dpo":
        for h in history:
            if "loss" in h:
                h.update({"rewards/margins": 0.1 * h["step"], "rewards/accuracies": 0.25 * h["step"]})
            else:
                h.update({"eval_rewards/accuracies": 0.1 * h["step"], "eval_rewards/margins": 0.05 * h["step"]})
    (out / "log_history.json").write_text(json.dumps(history))
    columns = ["loss", "rewards/margins", "rewards/accuracies", "learning_rate"] if stage == "dpo" else \
        ["loss", "learning_rate"]
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *columns])
        writer.writerows([h["step"], *(h.get(c, "") for c in columns)] for h in history if "loss" in h)
    config = {"learning_rate": 1e-4, "max_steps": 4, "num_train_epochs": 1, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 1, "seed": 0, "bf16": False, "fp16": False, "max_length": 512}
    if stage == "dpo":
        config["beta"] = 0.1
    (out / "training_config.json").write_text(json.dumps(config))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))


def eval_result(stage, acc):
    return {"model": "embedded:smollm2", "adapter": None if stage == "base" else f"run/{stage}",
            "tasks": ["mc_local"], "limit": 4.0,
            "results": {"mc_local": {"alias": "mc_local", "acc,none": acc, "acc_stderr,none": 0.2}},
            "n_samples": {"mc_local": {"original": 8, "effective": 4}},
            "settings": {"chat_template": "model's own", "chat_template_sha256": "abc"}, "punkt": None,
            "versions": {"torch": "2", "transformers": "5", "trl": "1", "peft": "0.21", "lm_eval": "0.4"}}


def mc_eval(stage, correct, n=40, of=48):
    """An eval JSON in the eval step's format with per-example results: mc_local's acc is 1 for the doc ids in
    `correct` of a seeded sample of n of its `of` examples (the same sample for every model)."""
    acc = [int(i in correct) for i in range(n)]
    p = sum(acc) / n
    result = {**eval_result(stage, p), "limit": n}
    result["results"]["mc_local"]["acc_stderr,none"] = (p * (1 - p) / (n - 1)) ** 0.5  # lm-eval's, over n
    result["n_samples"]["mc_local"] = {"original": of, "effective": n}
    result.update(examples={"mc_local": {"doc_id": list(range(n)), "acc,none": acc}}, leaves={"mc_local": ["mc_local"]},
                  sample={"mc_local": {"n": n, "of": of, "seed": 1234}},
                  time={"requests": {}, "cost": "0.05,0.004", "expected_s": 120.0, "wall_s": 98.5, "load_s": 12.0,
                        "models_this_load": 3},
                  requests={"total": n, "from_cache": 0, "answered": n})
    return result


# mc_local's right answers: SFT gains 12 over base (every one up: beyond noise); DPO gains 2 and loses 1 over SFT
# (within noise), 14 and 1 over base (beyond noise).
MC_CORRECT = {"base": set(range(10)), "sft": set(range(22)), "dpo": set(range(1, 24))}
