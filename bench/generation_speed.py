#!/usr/bin/env python3
"""Generation throughput on one GPU at the lengths Magpie really produces: plain `generate`, the static engine the
step used before (bench/static_engine.py) and the fast path (steps/common/generation/fastgen.py), in one run.

A randomly initialised model built from a real config (default: Llama-3.1-8B, bf16, made on the GPU) answers
random prompts. Each request has a prompt length and a response length drawn from the distributions below; a row
ends when the model samples its end token (<|eot_id|>), which a logits processor (EndAt) makes it do once the row
reaches its drawn length, so every engine runs its own stopping path. `useful tok/s` counts the tokens before each
row's end over the wall time of the whole workload; `fixed` rows give every request the mean length instead.

- baseline: `model.generate` (dynamic cache, eager), on the first --baseline-requests requests in one batch;
- static: `StaticGenerator` (static cache, compiled step, CUDA graphs), requests handed over --static-batch at a
  time as the step did; its first call (compile) is timed apart;
- fast: `SlotGenerator` with an eager step, all requests in one call at up to --slots rows at a time (the tier's
  GEN_ROWS) over its paged KV cache; the capture of its CUDA graphs happens in a first warm-up run, timed apart.
  fast-compiled: the same with its norms and MLPs compiled (as the steps run on a GPU), compiled in the warm-up run.
  Each records its steps per slot bucket and each bucket's step time, so the JSON says where the decoding time went;
  --timing adds the prefills' time, --calls the same requests handed over in calls of so many (as a step hands
  over its batches);
- unpaged, unpaged-compiled: the engine before the paged cache (each row reserving the cap), from a copy of its
  steps/common given by --unpaged-from (`git archive 7afa6a5 steps/common | tar -x -C /tmp/unpaged`).

--dtype float16 --load-in-4bit --memory-gib 15 is the t4 tier: the model saved and reloaded in 4-bit NF4 with fp16
compute, the cache sized to a 16 GB T4's memory.

    python bench/generation_speed.py [--requests 4096] [--slots 256] [--cap 1024] [--kernel triton] [--calls 512]

Results: JSON under --out (default $OUT, else bench/results) as generate-realistic-<gpu>.json, a table on stdout.
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from timing import gpu_slug, sync_time
from provenance import provenance

from common.generation import fastgen
from common.generation.patching import uncompile_pointwise
from common.generation.sampling import Sampling

ROOT = Path(__file__).resolve().parents[1]

EOS, PAD = 128009, 128004  # <|eot_id|>, <|finetune_right_pad_id|>: never in the random prompts (ids < 128000)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "bench" / "configs" / "llama-3.1-8b.json"))
    workload_args(p)
    p.add_argument("--static-requests", type=int, default=512,
                   help="the static engine's share (its rate does not depend on how many 128-batches it runs)")
    p.add_argument("--slots", default="256", help="rows decoded at once by the fast path (GEN_ROWS); several: 128,256")
    p.add_argument("--static-batch", type=int, default=128, help="requests per call of the static engine")
    p.add_argument("--baseline-requests", type=int, default=64)
    p.add_argument("--variants", default="fast,fast-fixed,static,static-fixed,baseline")
    p.add_argument("--admit", default="", help="the fast path's ADMIT_FRACTION (free slots wait for this share "
                   "before a prefill); several: 0.004,0.0625 (default: the module's)")
    p.add_argument("--kernel", default="", help="the fast path's decoding attention (triton, flash, sdpa); several: "
                   "triton,flash (default: the first that runs here)")
    p.add_argument("--calls", default="", help="also hand the realistic requests to the fast path in calls of so "
                   "many, as the steps do (GEN_BATCH; PREF_BATCH x NUM_RESPONSES); several: 128,512")
    p.add_argument("--timing", action="store_true", help="time each prefill into the JSON (CUDA events; the unpaged "
                   "engine of --unpaged-from syncs around each instead)")
    p.add_argument("--profile", action="store_true", help="after the fast runs, profile one eager decoding step of "
                   "every slot and one prefill (torch.profiler): the kernel tables go to profile-*.txt under --out")
    p.add_argument("--trace-loop", type=int, default=0, help="profile a window of the fast runs' real loop: 64 "
                   "steps from this one on (kernel table and GPU gaps to profile-*-loop.txt under --out)")
    p.add_argument("--memory-gib", type=float, default=79.1, help="GPU memory the fast path may size itself to "
                   "(default: an 80 GB H100's; the static engine and baseline need far less at these settings)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--load-in-4bit", action="store_true", help="save the random model and reload it in 4-bit NF4")
    p.add_argument("--unpaged-from", default="", help="a directory holding the unpaged engine's steps/common")
    p.add_argument("--tag", default="", help="appended to the JSON's name (generate-realistic-<gpu>-<tag>.json)")
    return p.parse_args()


def workload_args(p):
    """The workload's options (what workload() draws from), shared with bench/schedule_replay.py."""
    p.add_argument("--requests", type=int, default=4096,
                   help="requests in one call, as a step hands over a batch (GEN_BATCH: 8,192 on h100; a run of the "
                        "default NUM_SAMPLES, 1000, is one call of 1,000)")
    p.add_argument("--cap", type=int, default=1024, help="max_new_tokens")
    p.add_argument("--median", type=float, default=300, help="median response length (log-normal)")
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the response lengths")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=320)


class EndAt:
    """Logits processor: a row must end (EOS) once it holds as many tokens as its first prompt token says, and can't
    before; PAD is never sampled. Rows are identified by their own token history, so it works in every engine."""

    def __init__(self, eos=EOS, pad=PAD):
        self.eos, self.pad = eos, pad

    def __call__(self, input_ids, scores):
        first = (input_ids != self.pad).int().argmax(1)  # generate's left padding: the target: first non-pad token
        target = input_ids.gather(1, first[:, None])[:, 0]
        count = (input_ids != self.pad).sum(1)
        scores[:, self.pad] = -math.inf
        end = count >= target
        scores[:, self.eos] = torch.where(end, torch.full_like(scores[:, self.eos], math.inf), -math.inf)
        return scores


def workload(args, fixed=False):
    """(prompt ids, response lengths): prompt lengths uniform, response lengths log-normal, capped."""
    g = torch.Generator().manual_seed(0)
    plens = torch.randint(args.prompt_min, args.prompt_max + 1, (args.requests,), generator=g)
    rlens = torch.exp(math.log(args.median) + args.sigma * torch.randn(args.requests, generator=g)).round().long()
    rlens = rlens.clamp(4, args.cap - 1)
    if fixed:
        rlens = torch.full_like(rlens, int(rlens.float().mean().round()))
    prompts = []
    for n, r in zip(plens.tolist(), rlens.tolist()):
        ids = torch.randint(0, 128000, (n,), generator=g).tolist()
        ids[0] = n + r  # EndAt reads the row's end (in tokens) from its first token
        prompts.append(ids)
    return prompts, rlens.tolist()


def describe(lengths):
    t = torch.tensor(lengths, dtype=torch.float)
    q = lambda x: int(t.quantile(x))  # noqa: E731
    return {"mean": round(float(t.mean()), 1), "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": int(t.max()), "sum": int(t.sum())}


def build_model(config_path, dtype=torch.bfloat16, load_in_4bit=False, device="cuda"):
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    config = AutoConfig.for_model(**json.loads(Path(config_path).read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if load_in_4bit:  # as the steps load a 4-bit generator: from a saved checkpoint, quantized on load
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            del model
            torch.cuda.empty_cache()
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                         device_map={"": 0})
    model.eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = None
    return model


def useful(rows, targets):
    """Tokens before each row's end, and how many rows ended exactly where they were meant to."""
    ok, total = 0, 0
    for row, target in zip(rows, targets):
        row = [int(t) for t in row]
        n = row.index(EOS) if EOS in row else len(row)
        total += n
        ok += n == target
    return total, ok


def result(variant, rows, targets, wall, peak, **extra):
    tokens, exact = useful(rows, targets)
    return {"variant": variant, "requests": len(rows), "useful_tokens": tokens, "rows_ending_on_target": exact,
            "wall_s": round(wall, 2), "useful_tok_s": round(tokens / wall, 1), "peak_gib": round(peak / 2**30, 2),
            **extra}


def run_baseline(model, prompts, targets, cap):
    from transformers import LogitsProcessorList

    ids = torch.full((len(prompts), max(map(len, prompts))), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p):] = torch.tensor(p)
    ids = ids.cuda()
    torch.cuda.reset_peak_memory_stats()
    out, wall = sync_time(lambda: model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=cap,
                                                 do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                                                 logits_processor=LogitsProcessorList([EndAt()])))
    rows = out[:, ids.shape[1]:].tolist()
    return result("baseline", rows, targets, wall, torch.cuda.max_memory_allocated(), batch=len(prompts))


def run_static(model, prompts, targets, cap, batch, variant):
    from static_engine import StaticGenerator
    from transformers import LogitsProcessorList

    engine = StaticGenerator(model)
    call = lambda chunk: engine.generate(chunk, max_new_tokens=cap, pad_token_id=PAD, do_sample=False,  # noqa: E731
                                         eos_token_id=EOS, logits_processor=LogitsProcessorList([EndAt()]))
    _, compile_s = sync_time(lambda: call(prompts[:batch]))
    torch.cuda.reset_peak_memory_stats()
    rows = []

    def everything():
        for first in range(0, len(prompts), batch):
            rows.extend(call(prompts[first : first + batch]))

    _, wall = sync_time(everything)
    return result(variant, rows, targets, wall, torch.cuda.max_memory_allocated(), batch=batch,
                  first_call_s=round(compile_s, 1))


def unpaged_engine(directory):
    """The fastgen module of an older steps/common under `directory`, imported as its own package."""
    import importlib.util

    package = Path(directory) / "steps" / "common"
    spec = importlib.util.spec_from_file_location("unpaged_common", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["unpaged_common"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("unpaged_common.fastgen")


def run_fast(model, prompts, targets, cap, slots, variant, memory_gib, admit=None, timing=False, profile_to=None,
             kernel=None, calls=(), engine=fastgen, trace_to=None, trace_at=0):
    """The fast path's rows: the workload in one call, then (`calls`) handed over in calls of so many requests,
    as a step hands over its batches (GEN_BATCH samples, PREF_BATCH x NUM_RESPONSES responses). `engine`: the
    fastgen module (this one, or the unpaged one)."""
    compiled = "compiled" in variant
    uncompile_pointwise(model)
    generator = engine.SlotGenerator(model, PAD, slots=slots, memory_limit=int(memory_gib * 2**30),
                                     compiled=compiled)
    if admit is not None:
        generator.admit_fraction = admit
    if hasattr(generator.stats, "settle"):  # this engine: prefill timing is switched on its stats object
        generator.stats.timing = timing
    else:  # the unpaged engine
        generator.timing = timing
    if kernel:
        generator.kernel = kernel
    sampling = Sampling(max_new_tokens=cap, temperature=0, stop_token_ids=(EOS,))
    # warm-up on a share of the requests: compile, CUDA graph captures (any left happen, timed, in the measured run)
    _, warm = sync_time(lambda: generator.generate(prompts[: 2 * slots], sampling, extra_processors=[EndAt()]))
    torch.cuda.reset_peak_memory_stats()
    generator.stats.clear()
    watcher = watch_steps(generator, trace_to=trace_to, trace_at=trace_at)
    (rows, _), wall = sync_time(lambda: generator.generate(prompts, sampling, extra_processors=[EndAt()]))
    stats = dict(generator.stats)
    keys, in_run = watcher.keys, in_run_ms(watcher.events)
    unwatch_steps(generator)
    # Where the decoding time went: each slot bucket's step (its CUDA graph replayed alone, every slot holding the
    # keys a step at that bucket held on average in the run, on pages of its own) x the steps run at it.
    step_ms, mean_keys = {}, {}
    for (bucket, length), graph in generator.graphs.items():
        if length == generator.cache.length and stats.get(bucket):
            mean_keys[bucket] = round(float(keys[bucket]) / stats[bucket] / bucket)
            step_ms[bucket] = round(1000 * replay_at(generator, graph, bucket, mean_keys[bucket]), 2)
    forward_ms = step_ms.get(generator.cache.slots)  # one decoding step of every slot
    steps = {str(b): n for b, n in sorted((k, v) for k, v in stats.items() if isinstance(k, int))}
    replay_s = sum(n * step_ms.get(int(b), 0) for b, n in steps.items()) / 1000
    timings = {k: (round(stats[k], 2) if isinstance(stats[k], float) else stats[k])
               for k in ("prefill_rows", "prefill_tokens", "prefill_s") if k in stats}
    chunked = []
    for size in calls:
        def in_calls():
            return [row for first in range(0, len(prompts), size)
                    for row in generator.generate(prompts[first : first + size], sampling,
                                                  extra_processors=[EndAt()])[0]]

        chunk_rows, chunk_wall = sync_time(in_calls)
        chunked.append(result(f"{variant}-calls-{size}", chunk_rows, targets, chunk_wall,
                              torch.cuda.max_memory_allocated(), requested_slots=slots, call_size=size,
                              compiled=generator.compiled, kernel=generator.kernel))
    if profile_to is not None:
        profile(generator, prompts, profile_to)
    uncompile_pointwise(model)  # the other engines run the model as it was
    return [result(variant, rows, targets, wall, torch.cuda.max_memory_allocated(), requested_slots=slots,
                  admit_fraction=generator.admit_fraction, **timings,
                  full_step_forward_ms=forward_ms, compiled=generator.compiled, steps_per_slot_bucket=steps,
                  step_ms_per_slot_bucket={str(k): v for k, v in sorted(step_ms.items())},
                  in_run_step_ms_per_slot_bucket=in_run,
                  in_run_graphs_s=round(sum(steps[b] * in_run[b] for b in in_run) / 1000, 1),
                  mean_keys_per_slot_bucket={str(k): v for k, v in sorted(mean_keys.items())},
                  decode_replay_s=round(replay_s, 1), prefills=stats.get("prefills", 0),
                  slots=generator.cache.slots, most_rows=stats.get("most_rows"),
                  preempted=stats.get("preempted", 0), kv_pages=getattr(generator.cache, "pages", None),
                  cache_length=generator.cache.length, graphs=len(generator.graphs), kernel=generator.kernel,
                  warm_up_run_s=round(warm, 1), check=generator.check()), *chunked]


class StepWatcher:
    """As the decoding steps run: the keys they read per slot bucket (`keys`: GPU scalars, summed without a sync;
    each slot reads its position + 1 keys, a slot without a row sits at 0), and CUDA events around each step's graph
    (`events`; in_run_ms() sums them per bucket). With `trace_to`, the steps from `trace_at` on for `trace_steps`
    steps are profiled (torch.profiler, CPU and CUDA): where a step's time goes between the graphs."""

    def __init__(self, trace_to=None, trace_at=3000, trace_steps=64):
        self.keys, self.events, self.began, self.profiler = {}, [], None, None
        self.trace_to, self.trace_at, self.trace_steps = trace_to, trace_at, trace_steps

    def before(self, slots, runner):
        self.keys[slots] = self.keys.get(slots, 0) + (runner.cache.positions[:slots] + 1).sum()
        n = len(self.events)
        if self.trace_to and n == self.trace_at:
            self.profiler = start_trace()
        elif self.trace_to and n == self.trace_at + self.trace_steps and self.profiler is not None:
            end_trace(self.profiler, self.trace_to, self.trace_steps)
            self.profiler = None
        self.began = torch.cuda.Event(enable_timing=True)
        self.began.record()

    def after(self, slots):
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self.events.append((slots, self.began, ended))


def watch_steps(generator, **trace):
    """A StepWatcher on the generator's steps: through its stats object, or (the unpaged engine, which has none)
    around its step method."""
    watcher = StepWatcher(**trace)
    if hasattr(generator.stats, "step_watcher"):
        generator.stats.step_watcher = watcher
        return watcher
    step = generator.step

    def watched(slots, length):
        watcher.before(slots, generator)
        out = step(slots, length)
        watcher.after(slots)
        return out

    generator.step = watched
    return watcher


def unwatch_steps(generator):
    if hasattr(generator.stats, "step_watcher"):
        generator.stats.step_watcher = None
    else:
        del generator.step


def in_run_ms(events):
    """Per slot bucket, the mean milliseconds its graph took where it ran in the run (synchronises)."""
    torch.cuda.synchronize()
    total, count = {}, {}
    for slots, began, ended in events:
        total[slots] = total.get(slots, 0.0) + began.elapsed_time(ended)
        count[slots] = count.get(slots, 0) + 1
    return {str(b): round(total[b] / count[b], 2) for b in sorted(total)}


def start_trace():
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.__enter__()
    prof.began = time.perf_counter()
    return prof


def end_trace(prof, prefix, steps):
    """Writes the window's kernel table and, from its timeline, how busy the GPU was: the kernels' union against
    the window's span, and the longest gaps, each with the kernel that ended it."""
    torch.cuda.synchronize()
    wall = time.perf_counter() - prof.began
    prof.__exit__(None, None, None)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, gaps, edge = 0.0, [], None
    for start, end, name in kernels:
        if edge is not None and start > edge:
            gaps.append((start - edge, name))
        busy += max(0.0, end - max(start, edge or start))
        edge = max(edge or end, end)
    span = (kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    gaps.sort(reverse=True)
    summary = {"steps": steps, "wall_ms": round(1000 * wall, 1), "kernel_span_ms": round(span / 1000, 1),
               "gpu_busy_ms": round(busy / 1000, 1), "gap_ms": round(sum(g for g, _ in gaps) / 1000, 2),
               "gaps_over_50us": sum(g > 50 for g, _ in gaps),
               "longest_gaps": [(round(g / 1000, 3), name[:80]) for g, name in gaps[:25]]}
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
    Path(f"{prefix}-loop.txt").write_text(json.dumps(summary, indent=1) + "\n" + table)
    print(f"loop trace: {json.dumps(summary)}", flush=True)


def replay_at(generator, graph, slots, keys):
    """Seconds a replay of a decoding step's graph takes with each of its `slots` slots holding `keys` keys, on
    pages of its own where the cache is paged (in the run the rows' keys came from HBM, not from one cached page)."""
    paged = hasattr(generator, "pages")  # the unpaged engine: each slot's keys lie in a region of its own
    if paged:
        keys = min(keys, len(generator.pages.free) // slots * generator.cache.page)
        generator.pages.grow({s: keys for s in range(slots)})
    generator.cache.positions[:slots, 0] = keys - 1
    _, t = sync_time(lambda: [graph.replay() for _ in range(10)])
    generator.cache.positions.zero_()
    if paged:
        generator.pages.release(list(range(slots)))
    return t / 10


def profile(generator, prompts, prefix):
    """Kernel tables (torch.profiler, CUDA time) of one eager decoding step of every slot, each at a mid-run
    position (200-1,300), and of one prefill of 16 prompts: where a step's and a prefill's GPU time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    S, L = generator.cache.slots, generator.cache.length
    generator.cache.positions[:, 0] = torch.randint(200, 1300, (S,), device=generator.device)  # mid-run lengths
    for name, work in (("step", lambda: generator.forward_step(S, L)),
                       ("prefill", lambda: generator.prefill([(s, prompts[s]) for s in range(16)]))):
        with torch.no_grad():
            work()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    work()
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        Path(f"{prefix}-{name}.txt").write_text(table)
        print(f"profile {name}:\n{table[:6000]}", flush=True)


def main():
    args = parse_args()
    import transformers

    name = torch.cuda.get_device_name()
    slug = gpu_slug(name)
    out_path = Path(args.out) / f"generate-realistic-{slug}{'-' + args.tag if args.tag else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prompts, targets = workload(args)
    fixed_prompts, fixed_targets = workload(args, fixed=True)
    report = {
        "gpu": name, "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "config": os.path.relpath(args.config, ROOT), "dtype": args.dtype, "decoding": "greedy",
        "weights": "4-bit NF4 (bitsandbytes)" if args.load_in_4bit else args.dtype, "memory_gib": args.memory_gib,
        "workload": {"requests": args.requests, "cap": args.cap,
                     "prompt_tokens": f"uniform {args.prompt_min}-{args.prompt_max}",
                     "response_tokens": f"log-normal, median {args.median}, sigma {args.sigma}, clamped to 4..cap-1",
                     "response_stats": describe(targets), "prompt_stats": describe([len(p) for p in prompts]),
                     "fixed_length": fixed_targets[0],
                     "ending": "the model samples <|eot_id|> (EndAt logits processor) at each row's drawn length"},
        **provenance(), "results": [],
    }

    def save(row=None):
        if row is not None:
            report["results"].append(row)
            print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n")

    model, build_s = sync_time(lambda: build_model(args.config, getattr(torch, args.dtype), args.load_in_4bit))
    report["weights_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    save()
    variants = args.variants.split(",")
    for variant in variants:
        try:
            if variant == "baseline":
                n = args.baseline_requests
                save(run_baseline(model, prompts[:n], targets[:n], args.cap))
            elif variant in ("static", "static-fixed"):
                p, t = (prompts, targets) if variant == "static" else (fixed_prompts, fixed_targets)
                n = args.static_requests
                save(run_static(model, p[:n], t[:n], args.cap, args.static_batch, variant))
            elif variant in ("fast", "fast-fixed", "fast-compiled", "fast-compiled-fixed", "unpaged",
                             "unpaged-compiled"):
                engine = unpaged_engine(args.unpaged_from) if variant.startswith("unpaged") else fastgen
                p, t = (fixed_prompts, fixed_targets) if variant.endswith("fixed") else (prompts, targets)
                admits = [float(a) for a in args.admit.split(",")] if args.admit else [None]
                kernels = args.kernel.split(",") if args.kernel else [None]
                for slots, admit, kernel in itertools.product(map(int, str(args.slots).split(",")), admits, kernels):
                    last = args.profile and variant == "fast" and (admit, kernel) == (admits[-1], kernels[-1])
                    realistic = not variant.endswith("fixed")
                    calls = [int(c) for c in args.calls.split(",")] if args.calls and realistic else []
                    for row in run_fast(model, p, t, args.cap, slots, variant, args.memory_gib, admit, args.timing,
                                        profile_to=str(Path(args.out) / f"profile-{slug}") if last else None,
                                        kernel=kernel, calls=calls, engine=engine,
                                        trace_to=str(Path(args.out) / f"profile-{slug}-{variant}-{slots}")
                                        if args.trace_loop else None, trace_at=args.trace_loop):
                        save(row)
        except Exception as e:  # one variant must not cost the others
            report.setdefault("errors", {})[variant] = f"{type(e).__name__}: {e}"[:800]
            save()
        torch.cuda.empty_cache()
    rows = {r["variant"]: r for r in report["results"] if r.get("requested_slots") in (None, max(map(int, args.slots.split(","))))}
    for fast in ("fast", "fast-compiled"):
        rate = {v: rows[v]["useful_tok_s"] for v in (fast, f"{fast}-fixed", "static", "baseline") if v in rows}
        if fast in rate and "baseline" in rate:
            report[f"{fast}_vs_baseline"] = round(rate[fast] / rate["baseline"], 2)
        unpaged = fast.replace("fast", "unpaged")
        if fast in rate and unpaged in rows:
            report[f"{fast}_vs_{unpaged}"] = round(rate[fast] / rows[unpaged]["useful_tok_s"], 2)
        if fast in rate and "static" in rate:
            report[f"{fast}_vs_static"] = round(rate[fast] / rate["static"], 2)
        if fast in rate and f"{fast}-fixed" in rate:
            report[f"{fast}_realistic_vs_fixed"] = round(rate[fast] / rate[f"{fast}-fixed"], 3)
    save()
    print(f"\n{name}, torch {torch.__version__}, transformers {transformers.__version__}; wrote {out_path}")
    print(f"{'variant':<14}{'requests':>9}{'useful tok/s':>14}{'wall s':>9}{'peak GiB':>10}{'on target':>11}")
    for r in report["results"]:
        print(f"{r['variant']:<14}{r['requests']:>9}{r['useful_tok_s']:>14.0f}{r['wall_s']:>9.1f}{r['peak_gib']:>10.1f}"
              f"{r['rows_ending_on_target']:>11}")
    print({k: v for k, v in report.items() if "_vs_" in k})


if __name__ == "__main__":
    main()
