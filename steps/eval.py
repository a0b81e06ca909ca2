"""Evaluate one model (a base model, optionally with a LoRA adapter) with lm-evaluation-harness.

    python steps/eval.py --model meta-llama/Llama-3.2-3B --adapter data/runs/x/sft \
        --tasks ifeval,mmlu,truthfulqa_mc2,hellaswag --out data/runs/x/eval/sft.json

Local task YAMLs under --include-path (data/tasks) are registered too, both offline and of our own writing:
`ifeval_local`, instruction-following prompts in IFEval's format scored by lm-eval's own IFEval checks
(generative), and `mc_local`, multiple-choice questions and sentence completions in MMLU/HellaSwag's format
(log-likelihood: acc, acc_norm). Task names are checked before the model is loaded. Generative requests (IFEval) go
through the fast generation engine (continuous batching, --batch-size rows; common/generation/eval_engine.py), which
gives lm-eval's own answers; log-likelihood requests, and any the engine can't run, are answered by lm-eval's HF model.

The chat template is applied the same way for base, SFT and DPO: an adapter's own tokenizer (saved by training)
gives it, and the base model gets its tokenizer prepared exactly as training prepared it (a base model without a
template, such as Mistral-7B-v0.1, gets the project's default template and pad token). Every answer lm-eval computes
is kept in a request cache (sqlite) next to --out, so a killed eval redoes only the requests it had not finished.
Before it starts, the step prints how many requests it will make and, given --cost (measured per tier and model
size, in env/<tier>/tier.mk), about how long they take. Writes the metrics of every task as JSON, with the
settings, the template used, a checksum of the log-likelihoods, request counts and package versions; make skips
models already evaluated.
"""

import contextlib
import difflib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

from common import OptionError, SetupError, installed_versions, run_step
from common.generation.chat import DEFAULT_CHAT_TEMPLATE, prepare_tokenizer
from common.io.files import output_lock, write_json
from common.models import device, hub_load, load_causal_lm, load_tokenizer, resolve
from common.options import eval_batch_size, eval_limit, positive_int, step_parser
from common.precision import dtype_name, resolve_dtype

REPO = Path(__file__).resolve().parents[1]
# lm-eval's CachingLM opens `<use_cache>_rank<rank>.db`; this step runs one process, rank 0.
CACHE_SUFFIX = "_rank0.db"
LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood")


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--model", required=True, help="base model: Hub id, directory or embedded:smollm2")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (SFT or DPO step output)")
    p.add_argument("--tasks", default="ifeval_local", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=str(REPO / "data" / "tasks"), help="directory of local task YAMLs")
    p.add_argument("--limit", type=eval_limit, default=None,
                   help="examples per task, or a fraction (0, 1) of each task; default: all")
    p.add_argument("--batch-size", type=eval_batch_size, default="auto",
                   help="requests per model pass: N, auto, or auto:N (lm-eval)")
    p.add_argument("--dtype", default="auto", help="weights' dtype (and the 4-bit compute dtype); auto: per device")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the base model in 4-bit NF4 (bitsandbytes, CUDA only): a 7B model on a 16 GB T4")
    p.add_argument("--max-gen-toks", type=positive_int, default=None, help="cap on generated tokens (generative tasks)")
    p.add_argument("--no-chat-template", action="store_true", help="prompt without the chat template")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--cache-dir", default=None,
                   help="lm-eval's request cache (default: a 'cache' folder next to --out)")
    p.add_argument("--cost", default=None, metavar="LL_S,TOKEN_S",
                   help="measured seconds per log-likelihood model pass and per generated token of a request "
                        "(at this batch size), for the time printed before the eval starts")
    return p.parse_args(argv)


def task_index(tasks, include_path):
    """lm-eval's TaskManager: include_path's tasks alone where they are all the run asks for (offline runs and the
    tests: indexing lm-eval's own ~14,000 task YAMLs takes ~15 s on a 2-core CPU), else lm-eval's tasks too."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):  # (no tasks: the local index alone)
            return local
    return TaskManager(include_path=include_path)


def check_tasks(tasks, task_manager, include_path):
    """Every requested task must be known to lm-eval (its own tasks or a YAML under include_path); otherwise stop
    before the model is loaded, listing the local tasks and the closest known names."""
    known = task_manager.all_tasks
    unknown = [t for t in tasks if t not in known and not task_manager.match_tasks([t])]
    if not unknown:
        return
    local = sorted(task_index([], include_path).all_tasks) if include_path else []
    lines = [f"unknown lm-eval task(s): {', '.join(unknown)}.",
             f"Offline tasks in {include_path}: {', '.join(local) or 'none'}."]
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
        if close:
            lines.append(f"Known tasks like {name!r}: {', '.join(close)}.")
    lines.append(f"lm-eval knows {len(known)} task, group and tag names; list them with `.venv/bin/lm_eval ls tasks`.")
    raise OptionError(" ".join(lines))


def ensure_punkt():
    """IFEval's checks need nltk's punkt_tab: download it where possible, else use the stand-in in data/nltk_data."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "installed"
    except LookupError:
        pass
    with contextlib.redirect_stdout(io.StringIO()):  # offline, nltk's own 4 lines of urlopen error: said below
        downloaded = nltk.download("punkt_tab", quiet=True, raise_on_error=False, print_error_to=io.StringIO())
    if downloaded:
        return "downloaded"
    nltk.data.path.append(str(REPO / "data" / "nltk_data"))
    print("eval: nltk's punkt_tab is not installed and could not be downloaded; IFEval's sentence checks use the "
          "stand-in in data/nltk_data (`python -m nltk.downloader punkt_tab` installs the real one)", file=sys.stderr)
    return "offline stand-in (data/nltk_data: untrained Punkt with common abbreviations)"


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def eval_tokenizer(args):
    """The tokenizer (and so the chat template) the model is prompted with, and where its template comes from.

    An adapter directory holds the tokenizer its training used. The base model's tokenizer goes through the same
    prepare_tokenizer as training, so a base model without a chat template is prompted with the template its
    adapters were trained with (the project's default), not a different one or none."""
    base = load_tokenizer(args.model)
    own = base.chat_template
    tokenizer = load_tokenizer(args.adapter) if args.adapter else prepare_tokenizer(base)
    template = tokenizer.chat_template
    if args.no_chat_template:
        info = {"chat_template": "off", "chat_template_sha256": None}
    elif template is None:  # an adapter saved without a template: lm-eval would fail on every request
        raise SetupError(f"{args.adapter}: its tokenizer has no chat template; retrain it with this project's "
                         "steps/sft.py (which saves one), or pass --no-chat-template")
    else:
        source = ("project default" if template == DEFAULT_CHAT_TEMPLATE
                  else "model's own" if template == own else "adapter's own")
        info = {"chat_template": source, "chat_template_sha256": sha256(template)[:16]}
    return tokenizer, info


def adapter_digest(adapter):
    """sha256 of an adapter's config and weights: a retrained adapter in the same directory gets a new digest."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = Path(adapter) / name
        if not path.exists():
            raise SetupError(f"{path}: missing; is {adapter} an SFT or DPO step output (a PEFT adapter directory)?")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def cache_prefix(args, settings):
    """Where lm-eval's request cache lives for this model: `<cache dir>/<out stem>-<key>` (+ `_rank0.db`).

    lm-eval keys a cached answer by the request alone (the prompt text, continuation and generation options), not by
    the model that answered it. So everything else that changes an answer is hashed into the file name: the base
    model, the adapter's weights (not its path: retraining in place must not reuse stale answers), the dtype, 4-bit
    loading, the chat template and lm-eval's version. A changed setting starts a new cache file; the same one
    resumes where a killed run stopped."""
    import lm_eval

    key = {"model": resolve(args.model), "adapter": adapter_digest(args.adapter) if args.adapter else None,
           "dtype": settings["dtype"], "load_in_4bit": args.load_in_4bit,
           "chat_template": settings["chat_template_sha256"], "lm_eval": lm_eval.__version__}
    folder = Path(args.cache_dir) if args.cache_dir else Path(args.out).parent / "cache"
    return folder / f"{Path(args.out).stem}-{sha256(json.dumps(key, sort_keys=True))[:16]}"


def cached_keys(db):
    """The request hashes already answered in a cache file (none when there is no file yet)."""
    if not db.exists():
        return set()
    from sqlitedict import SqliteDict

    with SqliteDict(str(db), flag="r") as cache:
        return set(cache.keys())


def count_requests(task_manager, tasks, limit, max_gen_toks):
    """What the eval will ask the model, counted from the tasks' documents before the model loads.

    A multiple-choice document is one log-likelihood request per choice; when every choice is a single letter
    (MMLU's A-D) lm-eval scores them all from one model pass over the shared prompt, so such a document counts one
    pass. A generative document is one request of up to max_gen_toks tokens (the task's own cap when not given)."""
    from lm_eval.evaluator_utils import get_sample_size

    counts = {"loglikelihood": 0, "passes": 0, "generate_until": 0, "max_gen_tokens": 0}
    for task in task_manager.load(tasks)["tasks"].values():
        n = get_sample_size(task, limit)
        docs = list(task.eval_docs)[:n] if n is not None else list(task.eval_docs)
        if task.OUTPUT_TYPE == "multiple_choice":
            for doc in docs:
                choices = task.doc_to_choice(doc)
                counts["loglikelihood"] += len(choices)
                counts["passes"] += 1 if all(len(str(c).strip()) <= 1 for c in choices) else len(choices)
        elif task.OUTPUT_TYPE == "generate_until":
            cap = max_gen_toks or (task.config.generation_kwargs or {}).get("max_gen_toks", 256)
            counts["generate_until"] += len(docs)
            counts["max_gen_tokens"] += len(docs) * cap
        else:  # loglikelihood, loglikelihood_rolling: one pass per document
            counts["loglikelihood"] += len(docs)
            counts["passes"] += len(docs)
    return counts


def expected_seconds(counts, cost):
    """Seconds the requests take at the measured cost: passes x seconds per pass + tokens x seconds per token. The
    token term assumes every generation runs to its cap (base models often do), so it is an upper bound."""
    if not cost:
        return None
    try:
        per_pass, per_token = (float(x) for x in cost.split(","))
    except ValueError:
        raise OptionError(f"--cost {cost!r}: expected two numbers LL_S,TOKEN_S (seconds per log-likelihood pass, "
                          "per generated token), e.g. --cost 0.05,0.004") from None
    return counts["passes"] * per_pass + counts["max_gen_tokens"] * per_token


def hours(seconds):
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def announce(counts, expected, cached, db):
    total = counts["loglikelihood"] + counts["generate_until"]
    line = (f"eval: {counts['loglikelihood']} log-likelihood requests ({counts['passes']} model passes) and "
            f"{counts['generate_until']} generative requests (up to {counts['max_gen_tokens']} tokens)")
    if expected is None:
        line += "; no measured cost for this tier and model size (--cost), so no time estimate"
    else:
        left = expected * max(0.0, 1 - cached / total) if total else 0.0
        line += f": expect about {hours(expected)}"
        if cached:
            line += f", about {hours(left)} of it left"
    print(f"{line}. {cached} answers already in the cache {db}.", flush=True)


def load_model(args, dtype):
    """The base model (4-bit NF4 when asked) with the adapter on top, unmerged as it was trained. It is loaded here
    and handed to lm-eval, since lm-eval's own `load_in_4bit` model argument no longer exists in transformers 5."""
    if args.load_in_4bit and device() != "cuda":
        raise SetupError("--load-in-4bit needs a CUDA GPU (bitsandbytes) and torch sees none: drop --load-in-4bit "
                         "(LOAD_IN_4BIT= in make) on a CPU")
    model = load_causal_lm(args.model, dtype=dtype, load_in_4bit=args.load_in_4bit)
    if args.adapter:
        from peft import PeftModel

        model = hub_load(args.adapter, lambda: PeftModel.from_pretrained(model, args.adapter))
    return model.eval()


def loglikelihood_checksums(samples, configs):
    """Per log-likelihood task: how many per-choice log-likelihoods lm-eval computed and a sha256 of them, rounded
    to 4 decimals, in document order. Two models give the same checksum only if they score every choice alike, so
    it shows whether an adapter changed the model (a base run repeated gives the same one)."""
    sums = {}
    for task, rows in sorted(samples.items()):
        if configs.get(task, {}).get("output_type") not in LOGLIKELIHOOD_TYPES:
            continue
        by_doc = {}
        for row in rows:  # a task logs each document once per filter: keep one
            by_doc.setdefault(row["doc_id"], row)
        values = [f"{float(resp[0][0]):.4f}" for doc_id in sorted(by_doc) for resp in by_doc[doc_id]["resps"]]
        sums[task] = {"count": len(values), "sha256": sha256(",".join(values))}
    return sums


def request_counts(samples, configs, before):
    """How many distinct requests the eval made, and how many of them the cache answered (`before`: the request
    hashes in the cache when the run started), by lm-eval's own request hash."""
    from lm_eval.api.model import hash_args

    kinds = {"multiple_choice": "loglikelihood"}
    keys = set()
    for task, rows in samples.items():
        kind = configs.get(task, {}).get("output_type")
        for row in rows:
            keys.update(hash_args(kinds.get(kind, kind), args) for args in row["arguments"])
    reused = len(keys & before)
    return {"total": len(keys), "from_cache": reused, "answered": len(keys) - reused}


def main(argv=None):
    args = parse_args(argv)
    with output_lock(args.out):  # before loading anything: a second run on the same output stops at once
        evaluate(args)


def evaluate(args):
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    task_manager = task_index(tasks, args.include_path)
    check_tasks(tasks, task_manager, args.include_path)
    punkt = ensure_punkt()
    dtype = resolve_dtype(args.dtype)
    tokenizer, template = eval_tokenizer(args)
    settings = {"dtype": dtype_name(dtype), "load_in_4bit": args.load_in_4bit,
                "batch_size": args.batch_size, "max_gen_toks": args.max_gen_toks, **template, "device": device()}
    prefix = cache_prefix(args, settings)
    db = Path(f"{prefix}{CACHE_SUFFIX}")
    before = cached_keys(db)
    counts = count_requests(task_manager, tasks, args.limit, args.max_gen_toks)
    expected = expected_seconds(counts, args.cost)
    announce(counts, expected, len(before), db)

    import lm_eval

    from common.generation.eval_engine import EngineHFLM

    started = time.time()
    lm = EngineHFLM(pretrained=load_model(args, dtype), tokenizer=tokenizer, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        limit=args.limit,
        apply_chat_template=not args.no_chat_template,
        gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None,
        use_cache=str(prefix),  # answers are committed one by one (CacheHook -> SqliteDict autocommit)
        log_samples=True,  # for the log-likelihood checksum and the request counts; not written out
    )
    samples, configs = results.pop("samples"), results.get("configs", {})
    requests = request_counts(samples, configs, before)
    print(f"eval: {requests['answered']} requests answered by the model, {requests['from_cache']} from the cache")
    write_json(args.out, {
        "model": args.model,
        "adapter": args.adapter,
        "tasks": tasks,
        "limit": args.limit,
        "results": results["results"],
        "higher_is_better": results.get("higher_is_better", {}),
        "n_samples": results.get("n-samples", {}),
        "loglikelihoods": loglikelihood_checksums(samples, configs),
        # generative requests the fast engine answered (the others: lm-eval's generate, for the reason said)
        "requests": {**requests, "by_fast_engine": lm.engine_answered, "cache": str(db)},
        "time": {"requests": counts, "cost": args.cost, "expected_s": expected,
                 "wall_s": round(time.time() - started, 1)},
        "settings": settings,
        "punkt": punkt,
        "versions": installed_versions(),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_step(main)
