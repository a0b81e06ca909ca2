"""What a run will cost, before it starts: each step's expected time for the tier, model and sizes make passes.

    python steps/plan.py --tier t4 --model-size 3b --num-samples 180 ...   (make plan passes every option)

For each step: its work (tokens to generate, records to judge, training tokens x epochs, eval passes and generated
tokens), the cost per unit used, the expected time, and what that cost rests on. The per-unit costs are data,
env/costs.json: figures measured on the device (each names its bench JSON), scaled to the tier's GPU by stated factors
(memory bandwidth for decoding, FLOP/s for training) and to the tier's rows by the measured step times; eval's are
EVAL_COST_<size> from the tier file, the figure the eval step prints its own estimate from. Eval requests are
estimated from the tasks' sizes and LIMIT (the eval step counts the real ones from the datasets, which this script
does not load). The workload assumptions (instruction and response lengths, the filter's yield) are printed with
the plan.

Standard library only, so that `make plan` runs on the system Python before setup, with no GPU: it loads no model,
imports no torch, and reads the tier's training YAMLs (flat `key: value` files) itself.
"""

import json
import math
import textwrap
from pathlib import Path

from common import OptionError, run_step
from common.eval_requests import (allocate, duration, eval_seconds, generation_cap, parse_cost, parse_limit,
                                  sample_count, task_limit)
from common.io.files import write_json
from common.options import at_least, eval_limit, fraction, optional, positive_int, step_parser

REPO = Path(__file__).resolve().parents[1]
MODELS_EVALUATED = ("base", "sft", "dpo")


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--costs", default=str(REPO / "env" / "costs.json"), help="per-unit costs (JSON)")
    p.add_argument("--tier", required=True, help="GPU tier: a key of the costs file's tiers")
    p.add_argument("--model", default="", help="MODEL (for the heading)")
    p.add_argument("--model-id", default="", help="MODEL_ID (for the heading)")
    p.add_argument("--model-size", required=True, help="MODEL_SIZE: picks the training and eval costs")
    p.add_argument("--generator", default="", help="GENERATOR (for the heading)")
    p.add_argument("--num-samples", type=positive_int, required=True)
    p.add_argument("--gen-rows", type=positive_int, required=True, help="GEN_ROWS: rows decoded at once")
    p.add_argument("--max-instruction-tokens", type=optional(positive_int), default="",
                   help="empty: the generator recipe's cap")
    p.add_argument("--max-response-tokens", type=optional(positive_int), default="",
                   help="empty: the generator recipe's cap")
    p.add_argument("--judge-rows", type=positive_int, required=True)
    p.add_argument("--num-responses", type=at_least(2), required=True)
    p.add_argument("--pref-rows", type=positive_int, required=True)
    p.add_argument("--pref-max-tokens", type=positive_int, required=True)
    p.add_argument("--sft-config", required=True, help="the tier's SFT YAML (epochs, max_length, batch)")
    p.add_argument("--dpo-config", required=True, help="the tier's DPO YAML")
    p.add_argument("--test-fraction", type=fraction, default=0.0, help="TEST_FRACTION: held out of training")
    p.add_argument("--tasks", required=True, help="TASKS, comma-separated")
    p.add_argument("--limit", type=optional(eval_limit), default="",
                   help="LIMIT: a random sample of N documents of each task (N,TASK=N|all: per task; a fraction in "
                        "(0, 1): a share); empty: all")
    p.add_argument("--max-gen-toks", type=optional(positive_int), default="",
                   help="MAX_GEN_TOKS: cap on an eval answer; empty: the task's")
    p.add_argument("--eval-cost", default="", metavar="LL_S,TOKEN_S",
                   help="EVAL_COST: seconds per log-likelihood pass and per generated token of a request")
    p.add_argument("--nproc", type=positive_int, default=1)
    p.add_argument("--engine", default="transformers")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    return p.parse_args(argv)


# ---- Reading the inputs -----------------------------------------------------------------------------------------

def read_flat_yaml(path):
    """A tier's training YAML: flat `key: value` lines, `#` comments. Values are numbers, booleans or strings, which
    is all these files hold; anything else (nesting, lists, quotes) is refused rather than misread."""
    values = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        text = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not text:
            continue
        key, sep, value = text.partition(":")
        value = value.strip()
        if not sep or line[0].isspace() or not value or value[0] in "[{'\"|>&*!":
            raise OptionError(f"{path}:{number}: the plan reads flat `key: value` YAML only, not {line.strip()!r}")
        values[key.strip()] = scalar(value)
    return values


def scalar(text):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_costs(path, tier, size, model=""):
    """The costs file and this tier's part of it; an unknown tier or model size stops here, naming the option."""
    costs = json.loads(Path(path).read_text(encoding="utf-8"))
    path = Path(path).resolve().relative_to(REPO) if Path(path).resolve().is_relative_to(REPO) else path
    if tier not in costs["tiers"]:
        raise OptionError(f"GPU={tier}: no costs for this tier in {path}; it has: {', '.join(costs['tiers'])}")
    tier_costs = costs["tiers"][tier]
    for step in ("sft", "dpo"):
        if size not in tier_costs[step]:
            raise OptionError(f"MODEL_SIZE={size}{f' (MODEL={model})' if model else ''}: no {step} cost on tier {tier} "
                              f"in {path}; it has sizes {', '.join(tier_costs[step])}")
    return costs, tier_costs


def optional_int(text, name):
    if text in ("", None):
        return None
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"{name}={text!r}: expected a whole number or nothing") from None


# ---- The workload -----------------------------------------------------------------------------------------------

def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def mean_length(median, sigma, cap):
    """Mean of a log-normal length (median, sigma) cut at cap: E[min(L, cap)]."""
    mu = math.log(median)
    below = math.exp(mu + sigma ** 2 / 2) * normal_cdf((math.log(cap) - mu - sigma ** 2) / sigma)
    return below + cap * (1 - normal_cdf((math.log(cap) - mu) / sigma))


class Workload:
    """Lengths and yield from the costs file's assumptions."""

    def __init__(self, spec):
        self.spec = spec
        self.instruction = spec["instruction_tokens"]
        self.template = spec["template_tokens"]
        self.kept = spec["kept_fraction"]

    def response(self, cap):
        return mean_length(self.spec["response_median"], self.spec["response_sigma"], cap)


# ---- Costs: a measured figure, scaled -----------------------------------------------------------------------------

class Rate:
    """A cost entry turned into this tier's units per second, with the factors it took, each with its reason."""

    def __init__(self, costs, name, gpu, rows=None):
        entries = costs["entries"]
        entry = entries[name]
        self.entry, self.unit, self.costs_entries = entry, entry["unit"], entries
        base = entries[entry["value_from"]] if "value_from" in entry else entry
        self.measured = base["value"]  # value_from: another entry's figure, converted by this one's factor
        self.factors = []  # (factor, why)
        if "factor" in entry:  # a value_from entry's source is where its factor comes from
            why = entry["factor_why"] + (f" ({entry['source']})" if "value_from" in entry else "")
            self.factors.append((entry["factor"], "for " + why))
        self.factors.append(gpu_factor(costs["gpus"], entry, gpu))
        if rows and entry.get("rows_table"):
            self.factors.append(rows_factor(costs["rows_tables"][entry["rows_table"]], entry["rows"], rows))
        self.value = self.measured * math.prod(f for f, _ in self.factors)

    def basis(self):
        """What the rate rests on, as lines: the measured figure and its source, then each factor other than 1."""
        entry = self.entry
        base = self.costs_entries[entry["value_from"]] if "value_from" in entry else entry
        lines = [f"{self.measured:,.6g} {base['unit']} on {article(base['measured_on'])}: {base['source']}"]
        lines += [f"x {factor:.3g} {why}" for factor, why in self.factors if abs(factor - 1) > 1e-9]
        if "anchor" in entry:
            lines.append(f"anchor: {entry['anchor']}")
        return lines


def gpu_factor(gpus, entry, gpu):
    """The tier's GPU against the measuring one, by the resource the work is bound by."""
    measured_on, scale = entry["measured_on"], entry["scale"]
    if scale == "none" or measured_on == gpu:
        return 1.0, ""
    there, here = gpus[measured_on], gpus[gpu]
    if scale == "bandwidth":
        return (here["bandwidth_tb_s"] / there["bandwidth_tb_s"],
                f"for memory bandwidth, {gpu} / {measured_on}: {here['bandwidth_tb_s']} / {there['bandwidth_tb_s']} "
                "TB/s (decoding reads every weight each step)")
    if scale == "flops":
        return (here["tflops"] / there["tflops"],
                f"for fp16/bf16 tensor FLOP/s, {gpu} / {measured_on}: {here['tflops']} / {there['tflops']} TFLOP/s "
                "(training and scoring whole sequences are compute-bound)")
    raise OptionError(f"costs entry measured on {measured_on}: unknown scale {scale!r} (bandwidth, flops or none)")


def rows_factor(table, measured_rows, rows):
    """Tokens a second at `rows` rows against the measured rows, from the measured step time by rows (linear
    between the measured points). Rows beyond the measured ones are not counted as faster: the cache may not fit
    them."""
    points = sorted((int(r), ms) for r, ms in table["step_ms"].items())
    used = min(rows, measured_rows)

    def step_ms(r):
        if r <= points[0][0]:
            return points[0][1]
        for (r0, m0), (r1, m1) in zip(points, points[1:]):
            if r <= r1:
                return m0 + (m1 - m0) * (r - r0) / (r1 - r0)
        return points[-1][1]

    factor = (used / step_ms(used)) / (measured_rows / step_ms(measured_rows))
    why = (f"for {rows} rows at once, not {measured_rows}: step time by rows, {table['source']}"
           if rows < measured_rows else "")
    return factor, why


def decode_entry(costs, tier_costs, cap):
    """The decoding figure measured at the smallest cap that covers this one (else the largest measured)."""
    entries = sorted(tier_costs["decode"], key=lambda name: costs["entries"][name]["cap"])
    for name in entries:
        if costs["entries"][name]["cap"] >= cap:
            return name
    return entries[-1]


# ---- Eval requests, from the tasks' sizes -------------------------------------------------------------------------

def count_eval(tasks_spec, tasks, limit, max_gen_toks):
    """Log-likelihood tokens and generated tokens (every answer to its cap) per evaluated model, for the documents
    LIMIT samples (common/eval_requests.py, as steps/eval.py draws them; a group stratified by subtask); `tokens` in
    env/costs.json is a document's mean (its context once, each choice, the chat template's tokens). Tasks whose
    sizes the costs file lacks are returned as unknown."""
    limits = parse_limit(limit)
    counts = {"documents": 0, "loglikelihood_tokens": 0, "generate_until": 0, "max_gen_tokens": 0}
    unknown = []
    for task in tasks:
        spec = tasks_spec.get(task)
        if spec is None or task == "about":
            unknown.append(task)
            continue
        sizes = spec.get("subtasks") or {task: spec["docs"]}
        docs = sum(allocate(sizes, sample_count(sum(sizes.values()), task_limit(limits, task))).values())
        counts["documents"] += docs
        if spec["kind"] == "multiple_choice":
            counts["loglikelihood_tokens"] += round(docs * spec["tokens"])
        else:
            counts["generate_until"] += docs
            counts["max_gen_tokens"] += docs * generation_cap(max_gen_toks, spec.get("max_gen_toks"))
    return counts, unknown


# ---- The plan -----------------------------------------------------------------------------------------------------

def row(name, work, seconds, startup, basis, **extra):
    """One step of the plan: what it does, its seconds of work and of start-up, and what the estimate rests on."""
    return {"step": name, "work": work, "work_s": round(seconds, 1), "startup_s": startup,
            "seconds": round(seconds + startup, 1), "basis": basis, **extra}


def at_rate(name, units, unit, rate, work, startup, basis=()):
    return row(name, f"{work}; at {number(rate.value)} {rate.unit}", units / rate.value, startup,
               rate.basis() + list(basis), units=round(units, 1), unit=unit, rate=round(rate.value, 4),
               rate_unit=rate.unit)


def plan(args):
    costs, tier = load_costs(args.costs, args.tier, args.model_size, args.model)
    gpu, size, start, n = tier["gpu"], args.model_size, tier["startup_s"], args.num_samples
    w = Workload(costs["workload"])
    caps = costs["workload"]["recipe_caps"]
    cap_i = optional_int(args.max_instruction_tokens, "MAX_INSTRUCTION_TOKENS") or caps["instruction"]
    cap_r = optional_int(args.max_response_tokens, "MAX_RESPONSE_TOKENS") or caps["response"]
    instruction, response = min(w.instruction, cap_i), w.response(cap_r)
    kept = n * w.kept
    train = kept * (1 - args.test_fraction)
    steps = []

    # generate: an instruction, then its response, for every sample
    rate = Rate(costs, decode_entry(costs, tier, cap_r), gpu, args.gen_rows)
    tokens = n * (instruction + response)
    steps.append(at_rate("generate", tokens, "tokens", rate,
                         f"{n:,} samples x {instruction + response:,.0f} tokens (instruction ~{instruction:.0f}, "
                         f"response ~{response:.0f} at cap {cap_r:,}) = {tokens:,.0f} tokens, {args.gen_rows} rows",
                         start["generator"]))

    # judge: one record a sample
    rate = Rate(costs, tier["judge"], gpu, args.judge_rows)
    steps.append(at_rate("judge", n, "records", rate, f"{n:,} records, {args.judge_rows} rows", start["generator"]))

    # filter: every instruction embedded for the near-duplicate check; the rest is counting
    rate = Rate(costs, tier["filter"], gpu)
    steps.append(at_rate("filter", n, "instructions", rate, f"{n:,} instructions embedded", start["filter"]))

    # preference: NUM_RESPONSES answers for each kept instruction, each then scored by the reward model
    answer, texts = w.response(args.pref_max_tokens), kept * args.num_responses
    rate = Rate(costs, decode_entry(costs, tier, args.pref_max_tokens), gpu, args.pref_rows)
    reward = Rate(costs, tier["reward"], gpu)
    sampled = at_rate("preference", texts * answer, "tokens", rate,
                      f"{kept:,.0f} kept x {args.num_responses} responses x ~{answer:.0f} tokens (cap "
                      f"{args.pref_max_tokens}) = {texts * answer:,.0f} tokens, {args.pref_rows} rows",
                      start["generator"] + start["reward"])
    scoring = texts / reward.value
    sampled.update(work=f"{sampled['work']}; then {texts:,.0f} texts scored at {number(reward.value)} {reward.unit}",
                   work_s=round(sampled["work_s"] + scoring, 1), seconds=round(sampled["seconds"] + scoring, 1),
                   basis=sampled["basis"] + ["scoring: " + line for line in reward.basis()])
    steps.append(sampled)

    # sft, dpo: the kept records less the test split, each epoch
    prompt = w.template + instruction
    for name, config_path in (("sft", args.sft_config), ("dpo", args.dpo_config)):
        config = read_flat_yaml(config_path)
        epochs, max_length = config.get("num_train_epochs", 1), config.get("max_length", 1024)
        batch = config.get("per_device_train_batch_size", 8) * config.get("gradient_accumulation_steps", 1)
        if name == "sft":
            tokens, what = prompt + w.response(min(cap_r, max_length - prompt)), "records"
        else:  # a pair trains on the prompt with the chosen answer and with the rejected one
            tokens, what = 2 * (prompt + w.response(min(args.pref_max_tokens, max_length - prompt))), "pairs"
        rate = Rate(costs, tier[name][size], gpu)
        steps.append(at_rate(name, train * tokens * epochs, "tokens", rate,
                             f"{train:,.0f} {what} x ~{tokens:.0f} tokens x {epochs:g} epoch{'s' * (epochs != 1)} "
                             f"= {train * tokens * epochs:,.0f} tokens ({math.ceil(train / batch) * epochs:,} steps of "
                             f"{batch}, {Path(config_path).name})", start[name]))

    steps.append(evaluation(args, costs, tier))
    for name, what in (("report", "plots and pages"), ("dataset", "splits and card")):
        steps.append(row(name, what, 0.0, start[name], ["not measured: seconds to a minute on every tier"]))

    spec = costs["workload"]
    notes = [
        f"Start-up (loading, compiling) is in each step's time: {tier['startup_note']}.",
        f"Assumed: instructions ~{spec['instruction_tokens']} tokens ({spec['instruction_note']}); responses "
        f"log-normal, median {spec['response_median']}, sigma {spec['response_sigma']}, cut at the cap "
        f"({spec['response_note']}); {spec['kept_fraction']:.0%} of the samples kept by the filter "
        f"({spec['kept_note']}); {spec['template_tokens']} chat-template tokens a training row "
        f"({spec['template_note']}).",
        "Not counted: the install (`make setup`, ~2 min), model downloads from the Hub (the generator's, the target's "
        "and the reward model's weights), work redone after a disconnect (at most a batch or a checkpoint).",
    ]
    if "check" in tier:
        notes.append(f"Check: {tier['check']}.")
    if "gpu_note" in tier:
        notes.append(tier["gpu_note"][0].upper() + tier["gpu_note"][1:] + ".")
    if args.nproc != 1:
        notes.append(f"NPROC={args.nproc}: the times are one GPU's; generation and training split over "
                     f"{args.nproc} take less (not modelled).")
    if args.engine != "transformers":
        notes.append(f"ENGINE={args.engine}: the costs are the transformers engine's.")
    return {"tier": args.tier, "gpu": costs["gpus"][gpu]["name"], "model": args.model, "model_id": args.model_id,
            "model_size": size, "generator": args.generator, "num_samples": n, "steps": steps,
            "total_s": round(sum(s["seconds"] for s in steps), 1), "notes": notes}


def evaluation(args, costs, tier):
    """Base, SFT and DPO from one load of the base model, the same requests each, at the tier's EVAL_COST (the eval
    step's own figure)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    max_gen_toks = optional_int(args.max_gen_toks, "MAX_GEN_TOKS")
    counts, unknown = count_eval(costs["eval_tasks"], tasks, args.limit, max_gen_toks)
    sample = f"LIMIT={args.limit} (a seeded random sample, the same for the three)" if args.limit else "every document"
    basis = [f"documents counted from the tasks' sizes (env/costs.json), {sample}; the eval step counts the real ones "
             "from the datasets before it starts"]
    if unknown:
        basis.append(f"not counted (sizes not in env/costs.json): {', '.join(unknown)}")
    if args.eval_cost:
        per_model = eval_seconds(counts["loglikelihood_tokens"], counts["max_gen_tokens"],
                                 parse_cost(args.eval_cost, "EVAL_COST"))
        basis.append(f"EVAL_COST={args.eval_cost} from env/{args.tier}/tier.mk (EVAL_COST_{args.model_size}: s a "
                     "log-likelihood token, s a generated token; every answer to its cap, an upper bound): "
                     f"{tier['eval_source']}")
    else:
        per_model = 0.0
        basis.append(f"no EVAL_COST_{args.model_size} on this tier: eval's work not estimated")
    models = len(MODELS_EVALUATED)
    work = (f"{models} models (base, sft, dpo) x ({counts['loglikelihood_tokens']:,} log-likelihood tokens + "
            f"{counts['generate_until']:,} answers of up to {counts['max_gen_tokens']:,} tokens) = {models} x "
            f"{duration(per_model)}, one model load; {args.tasks}")
    return row("eval", work, models * per_model, tier["startup_s"]["eval"], basis, requests=counts)


def number(value):
    """A rate as people write it: whole above 100, three significant figures below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def article(name):
    """'an H200', 'an A100', 'a T4', 'a CPU': by how the first letter is spoken."""
    return ("an " if name[0] in "AEFHILMNORSX" else "a ") + name


WIDTH = 118  # the project's line length
STEP, TIME = 11, 9


def render(result):
    """The plan as a table, one block a step: its expected time and work, then what the estimate rests on."""
    indent = " " * (STEP + TIME + 3)
    fill = lambda text, first, rest: textwrap.fill(text, WIDTH, initial_indent=first,  # noqa: E731
                                                   subsequent_indent=rest, break_on_hyphens=False)
    lines = [fill(f"make plan: GPU={result['tier']} on {article(result['gpu'])}, MODEL={result['model']} "
                  f"({result['model_id']}, {result['model_size']}), generator {result['generator']}, "
                  f"NUM_SAMPLES={result['num_samples']:,}", "", "  "),
             "", f"{'step':<{STEP}} {'expected':>{TIME}}  work, and what the estimate rests on"]
    for s in result["steps"]:
        startup = f", + {duration(s['startup_s'])} start-up" if s["startup_s"] and s["work_s"] else ""
        lines.append(fill(s["work"] + startup, f"{s['step']:<{STEP}} {duration(s['seconds']):>{TIME}}  ", indent))
        lines += [fill(text, indent + "- ", indent + "  ") for text in s["basis"]]
    lines += [f"{'total':<{STEP}} {duration(result['total_s']):>{TIME}}", ""]
    lines += [fill(note, "", "  ") for note in result["notes"]]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    result = plan(args)
    if args.json:
        write_json(args.json, result)
    print(render(result), flush=True)


if __name__ == "__main__":
    run_step(main)
