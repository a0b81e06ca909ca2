"""Evaluate one model (a base model, optionally with a LoRA adapter) with lm-evaluation-harness.

    python steps/eval.py --model meta-llama/Llama-3.2-3B --adapter data/runs/x/sft \
        --tasks ifeval,mmlu,truthfulqa_mc2,hellaswag --out data/runs/x/eval/sft.json

Local task YAMLs under --include-path (data/tasks) are registered too, both offline and of our own writing:
`ifeval_local`, instruction-following prompts in IFEval's format scored by lm-eval's own IFEval checks
(generative), and `mc_local`, multiple-choice questions and sentence completions in MMLU/HellaSwag's format
(log-likelihood: acc, acc_norm). Task names are checked before the model is loaded.
The chat template is applied (from the adapter's tokenizer when there is one, so the model is prompted the
way it was trained). Writes the metrics of every task as JSON, with the settings and package versions used;
make skips models already evaluated.
"""

import argparse
import difflib
import os
from pathlib import Path

from common import installed_versions, run_step
from common.jsonl import DataError, write_json
from common.models import device, resolve, trust_remote_code

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: Hub id, directory or embedded:smollm2")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (SFT or DPO step output)")
    p.add_argument("--tasks", default="ifeval_local", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=str(REPO / "data" / "tasks"), help="directory of local task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens (generative tasks)")
    p.add_argument("--no-chat-template", action="store_true", help="prompt without the chat template")
    p.add_argument("--out", required=True, help="results JSON")
    return p.parse_args(argv)


def check_tasks(tasks, task_manager, include_path):
    """Every requested task must be known to lm-eval (its own tasks or a YAML under include_path); otherwise stop
    before the model is loaded, listing the local tasks and the closest known names."""
    known = task_manager.all_tasks
    unknown = [t for t in tasks if t not in known and not task_manager.match_tasks([t])]
    if not unknown:
        return
    local = sorted({p.stem for p in Path(include_path).glob("*/*.yaml")} & set(known))
    lines = [f"unknown lm-eval task(s): {', '.join(unknown)}.",
             f"Offline tasks in {include_path}: {', '.join(local) or 'none'}."]
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
        if close:
            lines.append(f"Known tasks like {name!r}: {', '.join(close)}.")
    lines.append(f"lm-eval knows {len(known)} task, group and tag names; list them with `.venv/bin/lm_eval ls tasks`.")
    raise DataError(" ".join(lines))


def ensure_punkt():
    """IFEval's checks need nltk's punkt_tab: download it where possible, else use the stand-in in data/nltk_data."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "installed"
    except LookupError:
        pass
    if nltk.download("punkt_tab", quiet=True, raise_on_error=False):
        return "downloaded"
    nltk.data.path.append(str(REPO / "data" / "nltk_data"))
    return "offline stand-in (data/nltk_data: untrained Punkt with common abbreviations)"


def main(argv=None):
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=args.include_path)
    check_tasks(tasks, task_manager, args.include_path)
    punkt = ensure_punkt()
    import lm_eval

    # Weights from safetensors only (a pickle can run code); remote code only when TRUST_REMOTE_CODE=1.
    model_args = {"pretrained": resolve(args.model), "dtype": args.dtype, "use_safetensors": True,
                  "trust_remote_code": trust_remote_code()}
    if args.adapter:
        model_args |= {"peft": args.adapter, "tokenizer": args.adapter}
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        device=device(),
        tasks=tasks,
        task_manager=task_manager,
        batch_size=args.batch_size,
        limit=args.limit,
        apply_chat_template=not args.no_chat_template,
        gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None,
        log_samples=False,
    )
    write_json(args.out, {
        "model": args.model,
        "adapter": args.adapter,
        "tasks": tasks,
        "limit": args.limit,
        "results": results["results"],
        "higher_is_better": results.get("higher_is_better", {}),
        "n_samples": results.get("n-samples", {}),
        "settings": {"dtype": args.dtype, "batch_size": args.batch_size, "max_gen_toks": args.max_gen_toks,
                     "chat_template": not args.no_chat_template, "device": device()},
        "punkt": punkt,
        "versions": installed_versions(),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_step(main)
