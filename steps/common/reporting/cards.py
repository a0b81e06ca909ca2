"""Hub cards: the dataset card (README.md with the Hub's YAML metadata) that the dataset step writes next to the data,
and the adapters' model cards, written when training ends and completed with the eval table when pushed.

Cards are built with huggingface_hub's DatasetCardData/ModelCardData (the YAML header) and plain markdown (the body).
"""

import json
import re
from pathlib import Path

from common.models import hub_id
from common.reporting.eval_tables import EVAL_HEADER, MARK, eval_rows, eval_tasks, headline, limit_text, table
from common.reporting.paired import RULE

MAGPIE_BIBTEX = """@article{xu2024magpie,
  title   = {Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned {LLMs} with Nothing},
  author  = {Zhangchen Xu and Fengqing Jiang and Luyao Niu and Yuntian Deng and Radha Poovendran and Yejin Choi and
             Bill Yuchen Lin},
  journal = {arXiv preprint arXiv:2406.08464},
  year    = {2024},
  note    = {ICLR 2025}
}"""

_LLAMA_OUTPUTS = ("{name} applies to the outputs: they may be used to train other models, but a model trained on "
                  "them and distributed must have \"Llama\" at the beginning of its name, redistributing comes with "
                  "a copy of the license and a \"Built with Llama\" notice, and Meta's Acceptable Use Policy "
                  "applies.")
_APACHE_OUTPUTS = ("The generator's license (Apache-2.0) puts no terms on its outputs; this card marks the data "
                   "Apache-2.0 to match.")
# The licenses of the models this project names (env/models/*.mk, env/generators/*.yaml), matched on the Hub id:
# Hub license id, its name and link, and what it says about outputs (for a generator). Not legal advice: each card
# links the license itself.
LICENSES = [
    (r"llama-?3\.1", {"license": "llama3.1", "name": "Llama 3.1 Community License",
                      "link": "https://www.llama.com/llama3_1/license/"}),
    (r"llama-?3\.2", {"license": "llama3.2", "name": "Llama 3.2 Community License",
                      "link": "https://www.llama.com/llama3_2/license/"}),
    (r"llama-?3\.3", {"license": "llama3.3", "name": "Llama 3.3 Community License",
                      "link": "https://www.llama.com/llama3_3/license/"}),
    (r"llama-?3", {"license": "llama3", "name": "Meta Llama 3 Community License",
                   "link": "https://www.llama.com/llama3/license/"}),
    (r"qwen2\.5-3b", {"license": "other", "license_name": "qwen-research", "name": "Qwen Research License",
                      "link": "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE",
                      "outputs": "The Qwen Research License allows non-commercial use only; read it for its terms on "
                                 "outputs and on models trained with them before publishing."}),
    (r"qwen2\.5-72b", {"license": "other", "license_name": "qwen", "name": "Qwen License",
                       "link": "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
                       "outputs": "The Qwen License asks that a model trained with Qwen's outputs and distributed "
                                  "display \"Built with Qwen\" or \"Improved using Qwen\"; read it before "
                                  "publishing."}),
    (r"qwen2\.5", {"license": "apache-2.0", "name": "Apache-2.0", "link": "https://www.apache.org/licenses/LICENSE-2.0",
                   "outputs": _APACHE_OUTPUTS}),
    (r"mi[sx]tral", {"license": "apache-2.0", "name": "Apache-2.0",
                     "link": "https://www.apache.org/licenses/LICENSE-2.0", "outputs": _APACHE_OUTPUTS}),
    (r"smollm2", {"license": "apache-2.0", "name": "Apache-2.0", "link": "https://www.apache.org/licenses/LICENSE-2.0",
                  "outputs": _APACHE_OUTPUTS}),
    (r"minilm", {"license": "apache-2.0", "name": "Apache-2.0", "link": "https://www.apache.org/licenses/LICENSE-2.0",
                 "outputs": _APACHE_OUTPUTS}),
]
UNKNOWN_LICENSE = {"license": "other", "license_name": "unknown", "name": "unknown",
                   "link": None, "outputs": "The generator's license is not known to this tool: check what it says "
                                            "about its outputs before publishing this data."}


def model_license(name):
    """The license entry (LICENSES) of a model, by its Hub id (an embedded model counts as its Hub original)."""
    model = hub_id(name or "").lower()
    for pattern, entry in LICENSES:
        if re.search(pattern, model):
            entry = dict(entry)
            entry.setdefault("outputs", _LLAMA_OUTPUTS.format(name=f"The {entry['name']}"))
            return entry
    return dict(UNKNOWN_LICENSE)


def size_category(n):
    """The Hub's size_categories bucket for n rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>10M"


def flat(settings, prefix=""):
    """A settings dict as (key, value) rows, nested dicts as dotted keys."""
    rows = []
    for key, value in (settings or {}).items():
        if isinstance(value, dict):
            rows += flat(value, f"{prefix}{key}.")
        else:
            # JSON for what is not plain text: lists, booleans, null, and strings with newlines (templates)
            plain = isinstance(value, (int, float)) or (isinstance(value, str) and value.isprintable())
            rows.append((f"{prefix}{key}", value if plain and not isinstance(value, bool) else json.dumps(value)))
    return rows


def license_link(entry):
    return f"[{entry['name']}]({entry['link']})" if entry.get("link") else entry["name"]


# ---- The dataset card -------------------------------------------------------------------------------------------

def dataset_card(info):
    """The README.md of the dataset directory (a string): YAML metadata the Hub reads (subsets and splits, license,
    task, language, tags, size), then what the data is, how it was made with every setting, the filter funnel, the
    tag distributions, the license terms and the Magpie citation.

    `info` (the dataset step builds it): name, generator, recipe, generation (settings dict), judge (settings or
    None), preference (settings or None), summary (filter_summary.json), files ({subset: {split: (path, rows)}}),
    test_fraction, tag_tables ([(title, header, rows)]), multi_turn (records with several turns), turns (how many
    records have each number of turns, as text), judge_note."""
    from huggingface_hub import DatasetCard, DatasetCardData

    generator = info["generator"]
    terms = model_license(generator)
    files = info["files"]
    configs = [{"config_name": subset, **({"default": True} if subset == "sft" else {}),
                "data_files": [{"split": split, "path": path} for split, (path, rows) in splits.items() if rows]}
               for subset, splits in files.items() if any(rows for _, rows in splits.values())]
    rows = {subset: sum(n for _, n in splits.values()) for subset, splits in files.items()}
    data = DatasetCardData(
        pretty_name=info["name"], license=terms["license"], language=["en"], task_categories=["text-generation"],
        size_categories=[size_category(max(rows.values(), default=0))], configs=configs,
        tags=["synthetic", "magpie", "sft", "dpo", "preference"],
        **({"license_name": terms["license_name"]} if "license_name" in terms else {}),
        **({"license_link": terms["link"]} if terms["license"] == "other" and terms.get("link") else {}),
    )
    summary = info["summary"]
    body = [f"# {info['name']}", (
        f"Synthetic instruction data made without human-written examples, as Magpie does: the aligned chat model "
        f"`{hub_id(generator)}` was given only its chat template up to the start of a user message, wrote an "
        f"instruction, then answered it. {summary['kept']} of {summary['input']} samples passed the filters; "
        f"they are here as SFT conversations (`sft`, {rows.get('sft', 0)} rows) and, where two sampled answers "
        f"were ranked by a reward model, as preference pairs (`preference`, {rows.get('preference', 0)} rows). "
        "Made with Synthetic Instruction Tuner (`make dataset`).")]
    body += ["## Loading", "```python\nfrom datasets import load_dataset\n\n"
             'sft = load_dataset("NAMESPACE/NAME", "sft")          # messages: user/assistant turns\n'
             'pairs = load_dataset("NAMESPACE/NAME", "preference")  # prompt, chosen, rejected\n\n'
             "# the files of this directory, without the Hub:\n"
             'load_dataset("json", data_files={"train": "sft/train.jsonl"' +
             (', "test": "sft/test.jsonl"' if files.get("sft", {}).get("test", (None, 0))[1] else "") + "})\n```",
             "`sft` is in TRL's conversational format (`messages`), which `trl sft`, the alignment-handbook and "
             "LLaMA-Factory read; `preference` in TRL's conversational preference format (`prompt`, `chosen`, "
             "`rejected`), for DPO."]
    body += ["## Subsets and splits", table(["subset", "split", "file", "rows"], [
        (subset, split, path if n else "none", n) for subset, splits in files.items()
        for split, (path, n) in splits.items()]), (
        f"Each record's split is decided by a hash of its id alone (sha256; about {info['test_fraction']:.0%} of ids "
        "go to `test`), so a preference pair is in the same split as the SFT conversation of its instruction, and "
        "a rerun puts every id on the same side. The training steps of this tool hold the same test split out "
        "of training." + (" A split with no rows has no file." if any(not n for s in files.values()
                                                                      for _, n in s.values()) else ""))]
    if info.get("turns"):
        body.append(f"Turns: {info['turns']}" + ("; `messages` holds every turn." if info.get("multi_turn") else "."))
    body += ["## Generator and license", table(["", ""], [
        ("generator", f"`{generator}`" + (f" (the Hub's `{hub_id(generator)}`)" if hub_id(generator) != generator
                                          else "")),
        ("generator recipe", info.get("recipe") or "not recorded"),
        ("generator license", license_link(terms)),
        ("data license (card metadata)", terms.get("license_name", terms["license"])),
    ]), terms["outputs"] + " This is a summary, not legal advice: the license itself decides."]
    if "embedded:smollm2" in str(generator):
        body.append("The generator is SmolLM2-135M-Instruct de-quantized from a 4-bit GGUF file (the cpu tier's "
                    "embedded default): a 135M model's instructions and answers are often wrong or incoherent. "
                    "Data from this tier shows the pipeline works; it is not meant to train a useful model.")
    body += ["## How it was made", "### Generation", table(["setting", "value"], flat(info["generation"]))]
    if info.get("judge"):
        body += ["### Judge", table(["setting", "value"], flat(info["judge"]))]
        if info.get("judge_note"):
            body.append(info["judge_note"])
    if info.get("preference"):
        body += ["### Preference pairs", table(["setting", "value"], flat(info["preference"]))]
    extra = {k: v for k, v in summary.items() if k not in ("input", "kept", "dropped")}
    if extra:
        body += ["### Filter", table(["setting", "value"], flat(extra))]
    body += ["## Filter funnel", table(["stage", "samples"], [
        ("generated", summary["input"]), *[(f"dropped: {rule}", n) for rule, n in summary["dropped"].items()],
        ("kept (sft)", summary["kept"]), ("preference pairs", rows.get("preference", 0))]),
        "Rules apply in this order; a sample counts under the first rule that drops it (`dropped.jsonl` of the run "
        "names it)."]
    if info.get("tag_tables"):
        body += ["## Tag distributions", "The judge's tags of every judged sample and of the kept ones (the rows "
                 "here carry them as `category`, `input_quality`, `quality_reason`, `difficulty`, `safety`)."]
        for title, header, rows_ in info["tag_tables"]:
            body += [f"### {title}", table(header, rows_)]
    body += ["## Fields", table(["subset", "field", "meaning"], [
        ("sft", "id", "the sample's id in the run (`s<seed>-<index>`)"),
        ("sft", "messages", "the conversation: user and assistant turns"),
        ("sft", "category, input_quality, quality_reason, difficulty, safety", "the judge's tags (where judged)"),
        ("sft", "nn_distance", "cosine distance of the instruction's embedding to its nearest kept neighbour"),
        ("preference", "prompt, chosen, rejected", "the instruction and the best and worst scored answers"),
        ("preference", "score_chosen, score_rejected, margin", "the reward model's scores and their difference"),
    ]), "## Limitations", "Every instruction and answer was written by a model and checked by rules and models "
        "only: no human has read them. Answers can be wrong, and the judge's tags and the reward model's scores "
        "are themselves model outputs.", "## Citation", "The method is Magpie's:", f"```bibtex\n{MAGPIE_BIBTEX}\n```"]
    return str(DatasetCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n\n".join(body) + "\n"))


# ---- The adapters' model cards -------------------------------------------------------------------------------

def _read(path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def model_card(adapter_dir, train_examples=None, eval_examples=None):
    """The model card of an adapter directory (a string), from the files training wrote: adapter_config.json
    (base model, LoRA), training_config.json (settings), log_history.json (losses)."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter_dir = Path(adapter_dir)
    lora = _read(adapter_dir / "adapter_config.json", {})
    config = _read(adapter_dir / "training_config.json", {})
    history = _read(adapter_dir / "log_history.json", [])
    base = hub_id(lora.get("base_model_name_or_path") or "unknown")
    stage = "dpo" if "beta" in config else "sft"
    terms = model_license(base)
    data = ModelCardData(
        base_model=base, library_name="peft", pipeline_tag="text-generation",
        tags=["lora", "peft", "trl", stage, "synthetic-data", "magpie"],
        **({"license": terms["license"]} if terms["license"] != "other" or "license_name" in terms else {}),
        **({"license_name": terms["license_name"]} if "license_name" in terms else {}),
    )
    what = ("supervised fine-tuning (TRL's SFTTrainer) on synthetic instruction/response conversations" if stage == "sft"
            else "direct preference optimisation (TRL's DPOTrainer, continuing the SFT adapter, with the SFT model as "
                 "reference) on synthetic preference pairs")
    unit = "packed sequences" if config.get("packing") else "examples"
    counts = ", ".join(f"{n} {what_}" for n, what_ in ((train_examples, f"training {unit}"),
                                                      (eval_examples, f"held-out test {unit}")) if n is not None)
    steps = (f"max_steps {config['max_steps']}" if (config.get("max_steps") or -1) > 0
             else f"epochs {config.get('num_train_epochs')}")
    settings = [
        ("base model", f"`{base}`"), ("method", stage.upper()), ("data", counts or "not recorded"),
        ("LoRA", f"r {lora.get('r')}, alpha {lora.get('lora_alpha')}, dropout {lora.get('lora_dropout')}, "
                 f"modules {', '.join(sorted(lora.get('target_modules') or []))}"),
        ("optimisation", f"lr {config.get('learning_rate')}, {steps}, batch {config.get('per_device_train_batch_size')}"
                         f" x {config.get('gradient_accumulation_steps')} accumulation, seed {config.get('seed')}"),
        ("precision", "bf16" if config.get("bf16") else "fp16" if config.get("fp16") else "fp32"),
        ("max length", config.get("max_length")),
    ]
    if stage == "dpo":
        settings.append(("DPO beta", config.get("beta")))
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if losses:
        settings.append(("training loss, first / last logged", f"{losses[0]:.4f} / {losses[-1]:.4f}"))
    if evals:
        settings.append(("eval loss (test split), last", f"{evals[-1]:.4f}"))
    body = [f"# {stage.upper()} LoRA adapter for {base}",
            f"A LoRA adapter trained by {what}, made with Synthetic Instruction Tuner (Magpie-style data, no "
            "human-written examples). It is not a standalone model: load it onto its base model.",
            "## Use", "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("NAMESPACE/NAME")  # loads the base model too\n'
            'tokenizer = AutoTokenizer.from_pretrained("NAMESPACE/NAME")  # with the chat template it was trained '
            "with\n```",
            "## Training", table(["setting", "value"], settings),
            "Every option is in `training_config.json`, every logged step in `log_history.json` and `curves.csv`.",
            "## Evaluation", "Not evaluated when this card was written (the eval step runs after training; `make push` "
            "adds the table).",
            "## License", f"The base model's license applies: {license_link(terms)}. If the training data came from a "
            "Llama generator, its license asks that a model trained on it and distributed has \"Llama\" at the "
            "beginning of its name.",
            "## Citation", f"```bibtex\n{MAGPIE_BIBTEX}\n```"]
    if "HuggingFaceTB/SmolLM2-135M-Instruct" in base:
        body.insert(2, "Trained on the cpu tier's embedded default, SmolLM2-135M-Instruct de-quantized from a 4-bit "
                       "GGUF file, whose weights differ slightly from the Hub's: on the Hub's model the adapter "
                       "behaves nearly, not exactly, as it did here.")
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n\n".join(body) + "\n"))


def with_evaluation(card_text, evals, stage, dataset=None):
    """The card with its Evaluation section replaced by the eval table of base, SFT and DPO (those evaluated) and,
    with `dataset` (a Hub id), the dataset in its metadata. `evals`: {stage: eval JSON}, base among them."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    if dataset:
        card.data.datasets = [dataset]
    text = card.text
    if evals.get("base"):
        rows, comparisons = eval_rows(evals)
        base = evals["base"]
        paired = any(c.paired is not None for c in comparisons)
        deltas = (f"differences ± their paired standard error over the same examples, {MARK} where beyond noise "
                  f"({RULE})" if paired else "differences ± both standard errors combined as if independent (no "
                                             "per-example results recorded)")
        section = ("## Evaluation\n\n" + (headline(comparisons) + "\n\n" if paired else "")
                   + table(EVAL_HEADER, rows) + "\n\n"
                   + f"lm-evaluation-harness with the chat template, on {', '.join(eval_tasks(base))} (examples per "
                   f"task: {limit_text(base.get('limit'))}); value ± lm-eval's standard error, {deltas}. This adapter "
                   f"is the `{stage}` column." + (
                       " The cpu tier's tasks are small local stand-ins (ifeval_local, mc_local): a check that the "
                       "chain runs, not a benchmark." if any(t.endswith("_local") for t in eval_tasks(base)) else ""))
        text = re.sub(r"## Evaluation\n.*?(?=\n## |\Z)", lambda _: section + "\n", text, count=1, flags=re.S)
    return "---\n" + card.data.to_yaml() + "\n---\n" + text
