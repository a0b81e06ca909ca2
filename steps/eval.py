"""Evaluate a base model and its LoRA adapters with lm-evaluation-harness, from one load of the base model.

    python steps/eval.py --model meta-llama/Llama-3.2-3B --out-dir data/runs/x/eval \
        --adapter sft=data/runs/x/sft --adapter dpo=data/runs/x/dpo --tasks ifeval,mmlu,truthfulqa_mc2,hellaswag
    python steps/eval.py --model meta-llama/Llama-3.2-3B --adapter data/runs/x/sft --out sft.json   # one model

With --out-dir the base model is loaded once and evaluated as it is (base.json), then each adapter is put on it in
turn (PEFT's load_adapter/set_adapter: only the active adapter is applied, so each answers as if loaded alone) and
evaluated into <name>.json. A model whose JSON already holds this evaluation (the same model, adapter weights,
settings and sample: its `key`) is skipped, so make's one recipe for the three redoes only what changed.

--limit draws a seeded random sample of each task (common/eval_sample.py: stratified by subtask, e.g. MMLU's
subjects; `1000,ifeval=all` for per-task sizes), the same documents for every model; the JSON records it, and keeps
each document's metrics ("examples") so the report can compare models paired, example by example.

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
import dataclasses
import difflib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

from common import OptionError, SetupError, installed_versions, run_step
from common.eval_requests import (draw, duration, eval_seconds, generation_cap, parse_cost, parse_limit,
                                  task_limit)
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
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="LoRA adapter directory (SFT or DPO step output); with --out-dir, NAME=DIR, repeatable")
    outs = p.add_mutually_exclusive_group(required=True)
    outs.add_argument("--out", help="results JSON of one model: the base model, or the base with --adapter DIR")
    outs.add_argument("--out-dir", help="results of the base model (base.json) and of each --adapter NAME=DIR "
                                        "(NAME.json), from one load of the base model")
    p.add_argument("--tasks", default="ifeval_local", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=str(REPO / "data" / "tasks"), help="directory of local task YAMLs")
    p.add_argument("--limit", type=eval_limit, default="", metavar="N[,TASK=N|all...]",
                   help="a seeded random sample of N documents of each task (a fraction in (0, 1): that share; "
                        "groups stratified by subtask), TASK=N for one task; default: all")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    p.add_argument("--batch-size", type=eval_batch_size, default="auto",
                   help="requests per model pass: N, auto, or auto:N (lm-eval)")
    p.add_argument("--gen-rows", type=positive_int, default=None,
                   help="rows the generation engine decodes at once for generative tasks (default: --batch-size)")
    p.add_argument("--loglik-tokens", type=positive_int, default=None,
                   help="tokens a forward of the packed log-likelihood scorer (default: common/generation/loglik.py's)")
    p.add_argument("--dtype", default="auto", help="weights' dtype (and the 4-bit compute dtype); auto: per device")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the base model in 4-bit NF4 (bitsandbytes, CUDA only): a 7B model on a 16 GB T4")
    p.add_argument("--max-gen-toks", type=positive_int, default=None, help="cap on generated tokens (generative tasks)")
    p.add_argument("--no-chat-template", action="store_true", help="prompt without the chat template")
    p.add_argument("--cache-dir", default=None,
                   help="lm-eval's request cache (default: a 'cache' folder next to the results)")
    p.add_argument("--cost", default=None, metavar="LL_S,TOKEN_S",
                   help="measured seconds per log-likelihood model pass and per generated token of a request "
                        "(at this batch size), for the time printed before the eval starts")
    args = p.parse_args(argv)
    args.limit_spec = parse_limit(args.limit)
    return args


@dataclasses.dataclass
class Job:
    """One model to evaluate: the base (adapter None) or the base with one adapter, and where its results go."""

    name: str
    adapter: str | None
    out: Path


def jobs_of(args):
    """The models to evaluate, base first (it is evaluated before any adapter is put on the model)."""
    if args.out:
        if len(args.adapter) > 1:
            raise OptionError("--out takes one model: give at most one --adapter, or use --out-dir for several")
        return [Job(Path(args.out).stem, args.adapter[0] if args.adapter else None, Path(args.out))]
    jobs = [Job("base", None, Path(args.out_dir) / "base.json")]
    for item in args.adapter:
        name, sep, adapter = item.partition("=")
        if not sep or not name or not adapter:
            raise OptionError(f"--adapter {item!r}: with --out-dir, give NAME=DIR (e.g. sft=data/runs/x/sft)")
        if name in {j.name for j in jobs}:
            raise OptionError(f"--adapter {item!r}: the name {name!r} is taken (base is the base model's)")
        jobs.append(Job(name, adapter, Path(args.out_dir) / f"{name}.json"))
    return jobs


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


def eval_tokenizer(args, adapter):
    """The tokenizer (and so the chat template) the model is prompted with, and where its template comes from.

    An adapter directory holds the tokenizer its training used. The base model's tokenizer goes through the same
    prepare_tokenizer as training, so a base model without a chat template is prompted with the template its
    adapters were trained with (the project's default), not a different one or none."""
    base = load_tokenizer(args.model)
    own = base.chat_template
    tokenizer = load_tokenizer(adapter) if adapter else prepare_tokenizer(base)
    template = tokenizer.chat_template
    if args.no_chat_template:
        info = {"chat_template": "off", "chat_template_sha256": None}
    elif template is None:  # an adapter saved without a template: lm-eval would fail on every request
        raise SetupError(f"{adapter}: its tokenizer has no chat template; retrain it with this project's "
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


def model_key(args, job, settings):
    """Everything that changes a model's answers besides the requests: the base model, the adapter's weights (not
    its path: retraining in place must not reuse stale answers), the dtype, 4-bit loading, the chat template and
    lm-eval's version."""
    import lm_eval

    return {"model": resolve(args.model), "adapter": adapter_digest(job.adapter) if job.adapter else None,
            "dtype": settings["dtype"], "load_in_4bit": args.load_in_4bit,
            "chat_template": settings["chat_template_sha256"], "lm_eval": lm_eval.__version__}


def run_key(model, args, tasks):
    """A digest of one model's whole evaluation (its model_key, the tasks, the sample and every setting that shapes
    the answers): a results JSON holding the same key is up to date."""
    settings = {"tasks": tasks, "limit": args.limit, "seed": args.seed, "batch_size": args.batch_size,
                "gen_rows": args.gen_rows, "loglik_tokens": args.loglik_tokens, "max_gen_toks": args.max_gen_toks,
                "chat": not args.no_chat_template}
    return sha256(json.dumps({"model": model, **settings}, sort_keys=True))[:16]


def cache_prefix(args, job, model):
    """Where lm-eval's request cache lives for this model: `<cache dir>/<out stem>-<key>` (+ `_rank0.db`).

    lm-eval keys a cached answer by the request alone (the prompt text, continuation and generation options), not by
    the model that answered it. So the model's key (model_key) is hashed into the file name: a changed model or
    setting starts a new cache file; the same one resumes where a killed run stopped."""
    folder = Path(args.cache_dir) if args.cache_dir else job.out.parent / "cache"
    return folder / f"{job.out.stem}-{sha256(json.dumps(model, sort_keys=True))[:16]}"


def cached_keys(db):
    """The request hashes already answered in a cache file (none when there is no file yet)."""
    if not db.exists():
        return set()
    from sqlitedict import SqliteDict

    with SqliteDict(str(db), flag="r") as cache:
        return set(cache.keys())


def task_leaves(task_manager, tasks):
    """The tasks loaded once: ({requested task: [leaf task names]}, {leaf: Task}). A group (MMLU) is its leaves."""
    loaded = task_manager.load(tasks)
    leaf_tasks, group_map = loaded["tasks"], loaded.get("group_map", {})

    def leaves(name):
        if name in leaf_tasks:
            return [name]
        if name in group_map:
            return [leaf for child in group_map[name] for leaf in leaves(child)]
        return list(task_manager.load([name])["tasks"])  # a tag: the tasks it names
    return {t: leaves(t) for t in tasks}, leaf_tasks


def draw_sample(leaves, leaf_tasks, limit_spec, seed):
    """lm-eval's `samples` ({leaf: sorted doc indices}, leaves that run whole left out) and its record
    ({leaf: {n, of, seed}}): each requested task's limit drawn over its leaves (common/eval_sample.py)."""
    samples, record = {}, {}
    for task, names in leaves.items():
        sizes = {leaf: len(leaf_tasks[leaf].eval_docs) for leaf in names}
        picked = draw(sizes, task_limit(limit_spec, task), seed)
        samples.update(picked)
        for leaf in names:
            record[leaf] = {"n": len(picked.get(leaf, range(sizes[leaf]))), "of": sizes[leaf], "seed": seed}
    return samples, record


def count_requests(leaf_tasks, samples, max_gen_toks, tokenizer):
    """What the eval will ask each model, counted from the sampled documents before the model loads.

    A multiple-choice document is one log-likelihood request per choice; the packed path computes its context once
    with every choice beside it, so its tokens are the context's plus each choice's (`loglikelihood_tokens`, with
    the chat template's own tokens). `passes` counts model passes as lm-eval's HF model makes them (one for MMLU's
    single-letter choices, one a choice elsewhere). A generative document is one request of up to max_gen_toks
    tokens (the task's own cap when not given)."""
    empty = [{"role": "user", "content": ""}]
    template = token_count(tokenizer, [tokenizer.apply_chat_template(empty, add_generation_prompt=True, tokenize=False)]
                           ) if tokenizer.chat_template else 0
    counts = {"loglikelihood": 0, "passes": 0, "loglikelihood_tokens": 0, "generate_until": 0, "max_gen_tokens": 0}
    for name, task in leaf_tasks.items():
        docs = list(task.eval_docs)
        if name in samples:
            docs = [docs[i] for i in samples[name]]
        description = task.config.description or ""
        if task.OUTPUT_TYPE == "multiple_choice":
            texts = []
            for doc in docs:
                choices = [str(c) for c in task.doc_to_choice(doc)]
                counts["loglikelihood"] += len(choices)
                counts["passes"] += 1 if all(len(c.strip()) <= 1 for c in choices) else len(choices)
                texts += [description + str(task.doc_to_text(doc)), *(" " + c for c in choices)]
            counts["loglikelihood_tokens"] += template * len(docs) + token_count(tokenizer, texts)
        elif task.OUTPUT_TYPE == "generate_until":
            cap = generation_cap(max_gen_toks, (task.config.generation_kwargs or {}).get("max_gen_toks"))
            counts["generate_until"] += len(docs)
            counts["max_gen_tokens"] += len(docs) * cap
        else:  # loglikelihood, loglikelihood_rolling: one pass per document
            counts["loglikelihood"] += len(docs)
            counts["passes"] += len(docs)
            counts["loglikelihood_tokens"] += token_count(tokenizer, [str(task.doc_to_text(d)) for d in docs])
    return counts


def token_count(tokenizer, texts):
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def expected_seconds(counts, cost):
    """Seconds one model's requests take at the measured cost (--cost; common/eval_requests.py), None without one."""
    if not cost:
        return None
    return eval_seconds(counts["loglikelihood_tokens"], counts["max_gen_tokens"], parse_cost(cost))


def announce(counts, expected, cached, db):
    total = counts["loglikelihood"] + counts["generate_until"]
    line = (f"eval: {counts['loglikelihood']} log-likelihood requests ({counts['loglikelihood_tokens']} tokens) and "
            f"{counts['generate_until']} generative requests (up to {counts['max_gen_tokens']} tokens)")
    if expected is None:
        line += "; no measured cost for this tier and model size (--cost), so no time estimate"
    else:
        left = expected * max(0.0, 1 - cached / total) if total else 0.0
        line += f": expect about {duration(expected)}"
        if cached:
            line += f", about {duration(left)} of it left"
    print(f"{line}. {cached} answers already in the cache {db}.", flush=True)


def load_base(args, dtype):
    """The base model (4-bit NF4 when asked), loaded once for every model evaluated. It is loaded here and handed to
    lm-eval, since lm-eval's own `load_in_4bit` model argument no longer exists in transformers 5."""
    if args.load_in_4bit and device() != "cuda":
        raise SetupError("--load-in-4bit needs a CUDA GPU (bitsandbytes) and torch sees none: drop --load-in-4bit "
                         "(LOAD_IN_4BIT= in make) on a CPU")
    return load_causal_lm(args.model, dtype=dtype, load_in_4bit=args.load_in_4bit).eval()


class Adapters:
    """The model each job evaluates, from one load: the base as loaded, then each job's adapter put on it. Adapters
    are added to one PeftModel by name and switched (only the active one applies). Where the base weights are plain
    floats (not 4-bit or 8-bit) the active adapter is merged into them, so an adapter's model runs at the base model's
    speed (unmerged, LoRA's extra matmuls cost a 3B on an H100 37% more time: bench/README.md "Eval"); merging
    rounds in the weights' dtype, as a merged model someone deploys does. The weights a merge changes are copied to
    the CPU first and put back before the next adapter, so every adapter is merged into the weights as loaded:
    switched on one load or loaded alone, an adapter gives the same answers. With one adapter to evaluate
(`switches` False) nothing is copied."""

    def __init__(self, model, switches=True):
        self.model = model
        self.switches = switches  # whether another adapter may follow: only then are the merged weights' values kept
        self.originals = {}  # base-layer weight -> its values as loaded (a CPU copy), once a merge changed it
        self.merged = False

    def put_on(self, job):
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.unmerge()
        if job.adapter is None:
            if isinstance(self.model, PeftModel):
                raise RuntimeError("eval: the base model is evaluated before any adapter is put on it")
            return self.model
        if not isinstance(self.model, PeftModel):
            base = self.model
            self.model = hub_load(job.adapter, lambda: PeftModel.from_pretrained(base, job.adapter,
                                                                                adapter_name=job.name))
        else:
            hub_load(job.adapter, lambda: self.model.load_adapter(job.adapter, adapter_name=job.name))
            self.model.set_adapter(job.name)
        self.merge()
        return self.model.eval()

    def base_weights(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m.get_base_layer().weight for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def merge(self):
        weights = self.base_weights()
        if not weights or not all(w.is_floating_point() for w in weights):
            return  # quantized: merging would re-quantize, so the adapter stays a separate matmul
        if self.switches and not self.originals:
            self.originals = {w: w.detach().to("cpu", copy=True) for w in weights}
        self.model.merge_adapter()
        self.merged = True

    def unmerge(self):
        if not self.merged:
            return
        import torch

        self.model.unmerge_adapter()  # PEFT's bookkeeping; its subtraction rounds, so the values are put back
        self.merged = False
        with torch.no_grad():
            for weight, original in self.originals.items():
                weight.copy_(original)


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


def per_example(samples):
    """Each leaf task's per-document metrics, as columns {"doc_id": [...], "<metric>,<filter>": [...]} in doc_id
    order: a number per document, or a list of 0/1 (IFEval's instruction-level metrics, one per instruction)."""
    def plain(value):
        if isinstance(value, (bool, int, float)):
            return float(value) if isinstance(value, float) else int(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value):
            return [plain(v) for v in value]
        return None

    examples = {}
    for leaf, rows in samples.items():
        columns = {"doc_id": sorted({row["doc_id"] for row in rows})}
        for row in sorted(rows, key=lambda r: r["doc_id"]):  # a document is logged once per filter
            for metric in row["metrics"]:
                columns.setdefault(f"{metric},{row['filter']}", []).append(plain(row.get(metric)))
        examples[leaf] = {k: v for k, v in columns.items() if None not in v and len(v) == len(columns["doc_id"])}
    return examples


def up_to_date(job, key):
    """Whether job.out already holds this evaluation (the same key); its time is then renewed, so that make, which
    runs one recipe for base, SFT and DPO, sees it as new as the others."""
    if not job.out.exists():
        return False
    try:
        same = json.loads(job.out.read_text()).get("key") == key
    except ValueError:
        return False
    if same:
        os.utime(job.out)
    return same


def main(argv=None):
    args = parse_args(argv)
    jobs = jobs_of(args)
    with contextlib.ExitStack() as locks:  # before loading anything: a second run on the same outputs stops at once
        for job in jobs:
            locks.enter_context(output_lock(job.out))
        evaluate(args, jobs)


def evaluate(args, jobs):
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    task_manager = task_index(tasks, args.include_path)
    check_tasks(tasks, task_manager, args.include_path)
    punkt = ensure_punkt()
    dtype = resolve_dtype(args.dtype)
    leaves, leaf_tasks = task_leaves(task_manager, tasks)
    samples, sample = draw_sample(leaves, leaf_tasks, args.limit_spec, args.seed)

    todo = []
    for job in jobs:
        tokenizer, template = eval_tokenizer(args, job.adapter)
        settings = {"dtype": dtype_name(dtype), "load_in_4bit": args.load_in_4bit, "batch_size": args.batch_size,
                    "gen_rows": args.gen_rows, "max_gen_toks": args.max_gen_toks, **template, "device": device()}
        model = model_key(args, job, settings)
        key = run_key(model, args, tasks)
        if up_to_date(job, key):
            print(f"eval: {job.out} is up to date ({job.name}: the same model, settings and sample)")
        else:
            todo.append((job, tokenizer, settings, key, cache_prefix(args, job, model)))
    if not todo:
        return
    counts = count_requests(leaf_tasks, samples, args.max_gen_toks, todo[0][1])
    expected = expected_seconds(counts, args.cost)
    print(f"eval: {', '.join(job.name for job, *_ in todo)} from one load of {args.model}", flush=True)

    import lm_eval

    from common.generation.eval_engine import EngineHFLM

    started = time.time()
    adapters = Adapters(load_base(args, dtype), switches=sum(job.adapter is not None for job, *_ in todo) > 1)
    load_s = round(time.time() - started, 1)
    for job, tokenizer, settings, key, prefix in todo:
        db = Path(f"{prefix}{CACHE_SUFFIX}")
        before = cached_keys(db)
        announce(counts, expected, len(before), db)
        began = time.time()
        model = adapters.put_on(job)
        lm = EngineHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, gen_rows=args.gen_rows,
                        loglik_tokens=args.loglik_tokens)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            samples=samples or None,
            apply_chat_template=not args.no_chat_template,
            gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None,
            use_cache=str(prefix),  # answers are committed one by one (CacheHook -> SqliteDict autocommit)
            log_samples=True,  # per-example metrics, the log-likelihood checksum and the request counts
        )
        logged, configs = results.pop("samples"), results.get("configs", {})
        requests = request_counts(logged, configs, before)
        print(f"eval: {job.name}: {requests['answered']} requests answered by the model, "
              f"{requests['from_cache']} from the cache")
        write_json(job.out, {
            "model": args.model,
            "adapter": job.adapter,
            "tasks": tasks,
            "limit": args.limit or None,
            "seed": args.seed,
            "sample": sample,
            "leaves": leaves,
            "key": key,
            "results": results["results"],
            "higher_is_better": results.get("higher_is_better", {}),
            "n_samples": results.get("n-samples", {}),
            "loglikelihoods": loglikelihood_checksums(logged, configs),
            "examples": per_example(logged),
            # generative requests the fast engine answered and log-likelihood requests the packed scorer did (the
            # others: lm-eval's own HFLM, for the reason said)
            "requests": {**requests, "by_fast_engine": lm.engine_answered, "by_packed_scorer": lm.packed_answered,
                         "cache": str(db)},
            # wall_s: this model's requests; load_s: the one base model load the run's models shared
            "time": {"requests": counts, "cost": args.cost, "expected_s": expected,
                     "wall_s": round(time.time() - began, 1), "load_s": load_s, "models_this_load": len(todo)},
            "settings": settings,
            "punkt": punkt,
            "versions": installed_versions(),
        })
        print(f"wrote {job.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_step(main)
