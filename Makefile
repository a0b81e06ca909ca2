# Synthetic Instruction Tuner: the whole pipeline as one make DAG; each target is a file or directory that a
# step writes atomically, so finished outputs are skipped and an interrupted run resumes. `make help` for more.
#
#   generate -> judge -> filter -> preference --------> dpo -> eval (base, sft, dpo) -> report
#                               \--> sft ---------------/       \--> dataset (SFT + pairs, train/test, card)

SHELL := bash

# ---- Hardware tier and target model (their numbers live in env/) -------------------------------------------
GPU_NAME := $(shell nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
GPU ?= $(if $(GPU_NAME),$(if $(findstring A100,$(GPU_NAME)),a100,$(if $(or $(findstring H100,$(GPU_NAME)),$(findstring H200,$(GPU_NAME))),h100,t4)),cpu)
TIERS := $(notdir $(patsubst %/,%,$(dir $(wildcard env/*/tier.mk))))
MODELS := $(basename $(notdir $(wildcard env/models/*.mk)))
$(if $(filter $(GPU),$(TIERS)),,$(error GPU=$(GPU) is not a tier; choose one of: $(TIERS)))
include env/$(GPU)/tier.mk
$(if $(filter $(MODEL),$(MODELS)),,$(error MODEL=$(MODEL) is not known; choose one of: $(MODELS)))
include env/models/$(MODEL).mk
# A GPU tier on a machine without one stops here, before installing or loading anything (expanded in the recipes).
CHECK_CUDA = $(if $(filter cpu,$(GPU))$(GPU_NAME),,$(error GPU=$(GPU) needs an NVIDIA GPU and nvidia-smi finds none: \
  use GPU=cpu (the embedded default) or a GPU runtime (Colab: Runtime > Change runtime type > T4 GPU)))
# ... and where nvidia-smi finds one but torch can't use it (a CPU-only torch, a driver too old for torch's CUDA), a
# step stops before loading a model and says why (steps/common/models.py, device()).
export SIT_REQUIRE_CUDA := $(filter-out cpu,$(GPU))
SFT_CONFIG ?= $(firstword $(wildcard env/$(GPU)/sft-$(MODEL_SIZE).yaml) env/$(GPU)/sft.yaml)
DPO_CONFIG ?= $(firstword $(wildcard env/$(GPU)/dpo-$(MODEL_SIZE).yaml) env/$(GPU)/dpo.yaml)

# ---- Where outputs go (point RUN at Google Drive in Colab) ---------------------------------------------------
RUNS_DIR ?= data/runs
RUN ?= $(RUNS_DIR)/$(MODEL)-$(GPU)
# Each output also depends on RUN/.settings/<step>, the settings that shape it (env/settings.mk): changing one (TASKS,
# LIMIT, NUM_SAMPLES, a sampling flag, a tier YAML) redoes that output and what follows from it.
include env/settings.mk
SEED ?= 0
# Share of record ids held out as the test split (common/splits.py: a hash of the id): the dataset step writes it,
# SFT and DPO leave it out of training.
TEST_FRACTION ?= 0.05
LIMIT ?=
ENGINE ?= transformers
EMBEDDER ?= embedded:minilm
# The LLM judge that tags each sample (category, input quality, difficulty, safety): the generator, as Magpie does.
JUDGE_MODEL ?= $(GENERATOR)
# Who writes the responses that the reward model ranks: the generator, or the SFT policy (on-policy pairs).
PREF_POLICY ?= generator
POLICY_ARGS = $(if $(filter sft,$(PREF_POLICY)),--policy $(MODEL_ID) --policy-adapter $(RUN)/sft,--policy $(GENERATOR))
NPROC ?= 1
# Several processes (one per GPU) split generation into shards, merged at the end, and train data-parallel
# (accelerate: DDP, or FSDP/DeepSpeed with ACCELERATE_CONFIG=env/accelerate/fsdp.yaml).
LAUNCH_SHARDED = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY))
ACCELERATE_CONFIG ?=
# (--multi_gpu also makes N CPU processes, gloo; without it accelerate starts one process where it sees no GPUs.)
LAUNCH_TRAINING = $(if $(filter-out 1,$(NPROC)),$(PY) -m accelerate.commands.launch --num_processes $(NPROC) \
  $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG),--multi_gpu),$(PY))
MERGE_FROM ?= dpo
HUB_REPO ?=
HUB_DATASET ?=
# Non-empty: push and push-data create their Hub repository private.
HUB_PRIVATE ?=
include env/embedded.mk
NEEDS_DEFAULT := $(if $(findstring embedded:smollm2,$(GENERATOR) $(MODEL_ID)),$(DEFAULT_MODEL_DIR))

# ---- Python: the notebook's in Colab, else a virtual environment made on first use --------------------------
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
  dataset push-data test clean help
all: $(RUN)/plan.json report dataset
plan:
	@$(PLAN) $(PLAN_ARGS)
$(RUN)/plan.json: $(RUN)/.settings/plan
	-@$(PLAN) --json $@
setup: $(DEPS)
prepare: $(DEFAULT_MODEL_DIR)
generate: $(RUN)/generated.jsonl
judge: $(RUN)/judged.jsonl
filter: $(RUN)/filtered.jsonl
preference: $(RUN)/preference.jsonl
sft: $(RUN)/sft
dpo: $(RUN)/dpo
eval: $(RUN)/eval/base.json $(RUN)/eval/sft.json $(RUN)/eval/dpo.json
report: $(RUN)/report.md $(RUN)/report.html

$(DEFAULT_MODEL_DIR): | $(DEPS)
	$(PY) steps/prepare_default.py --out $@

$(RUN)/generated.jsonl: $(RUN)/.settings/generate | $(DEPS) $(NEEDS_DEFAULT)
	$(CHECK_CUDA)$(LAUNCH_SHARDED) steps/generate.py --model $(GENERATOR) --out $@ --num-samples $(NUM_SAMPLES) --batch-size $(GEN_BATCH) \
	  --decode-rows $(GEN_ROWS) $(if $(MAX_INSTRUCTION_TOKENS),--max-instruction-tokens $(MAX_INSTRUCTION_TOKENS)) \
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

# EVAL_COST_<MODEL_SIZE> (tier.mk): measured seconds per log-likelihood pass and per generated token, for the time
# the step prints before it starts. EVAL_4BIT (tier.mk): --load-in-4bit where the tier evaluates in 4-bit.
EVAL_COST = $(EVAL_COST_$(MODEL_SIZE))
EVAL = $(PY) steps/eval.py --model $(MODEL_ID) --tasks $(TASKS) --batch-size $(EVAL_BATCH) --dtype $(DTYPE) \
  --max-gen-toks $(MAX_GEN_TOKS) $(if $(LIMIT),--limit $(LIMIT)) $(EVAL_4BIT) $(if $(EVAL_COST),--cost $(EVAL_COST)) \
  $(EVAL_ARGS)
$(RUN)/eval/base.json: $(RUN)/.settings/eval | $(DEPS) $(NEEDS_DEFAULT)
	$(CHECK_CUDA)$(EVAL) --out $@
$(RUN)/eval/%.json: $(RUN)/% $(RUN)/.settings/eval
	$(CHECK_CUDA)$(EVAL) --adapter $< --out $@

# One page in two forms: markdown (plots in report_plots/) and self-contained HTML (plots embedded).
$(RUN)/report.md $(RUN)/report.html &: $(RUN)/eval/sft.json $(RUN)/eval/dpo.json $(RUN)/eval/base.json $(RUN)/.settings/report
	$(PY) steps/report.py --run $(RUN) --out $(RUN)/report.md --html $(RUN)/report.html --tier $(GPU) --model-name $(MODEL)

# The HTML report as a full-page PNG, rendered by headless Chromium (apt-get install chromium chromium-driver).
REPORT_PNG_WIDTH ?= 1200
report-png: $(RUN)/report.png
$(RUN)/report.png: $(RUN)/report.html $(RUN)/.settings/report-png
	$(PY) steps/report_png.py $< $@ --width $(REPORT_PNG_WIDTH)

# Several MODELs side by side: each one's run ($(RUNS_DIR)/<model>-$(GPU)) is evaluated where it is not yet (the
# chain runs first for a model not yet trained), then one table of every run's base, SFT and DPO scores.
COMPARE ?= $(MODEL)
COMPARE_OUT ?= $(RUNS_DIR)/compare-$(GPU).md
compare:
	@set -e; for m in $(COMPARE); do $(MAKE) --no-print-directory eval MODEL=$$m RUN=$(RUNS_DIR)/$$m-$(GPU); done
	$(PY) steps/compare.py --out $(COMPARE_OUT) $(foreach m,$(COMPARE),--run $(m)=$(RUNS_DIR)/$(m)-$(GPU))

# ---- After the chain: a standalone merged model, and the adapter on the Hub -----------------------------------
merge: $(RUN)/merged
$(RUN)/merged: $(RUN)/$(MERGE_FROM) $(RUN)/.settings/merge
	$(CHECK_CUDA)$(PY) steps/merge.py --model $(MODEL_ID) --adapter $< --out $@ --dtype $(DTYPE)
# The adapter's model card goes up with the eval table where `make eval` has run (RUN/eval/*.json).
push: $(RUN)/$(MERGE_FROM)
	$(if $(HUB_REPO),,$(error set HUB_REPO=namespace/name (and HF_TOKEN) to push))
	$(PY) steps/push.py --adapter $< --repo-id $(HUB_REPO) --evals $(RUN)/eval $(if $(HUB_DATASET),--dataset $(HUB_DATASET)) \
	  $(if $(HUB_PRIVATE),--private)

# ---- The data as a dataset: SFT conversations (messages) and preference pairs, train/test, with a dataset card ----
dataset: $(RUN)/dataset
$(RUN)/dataset: $(RUN)/filtered.jsonl $(RUN)/preference.jsonl $(RUN)/.settings/dataset
	$(PY) steps/dataset.py --run $(RUN) --out $@ --test-fraction $(TEST_FRACTION) $(DATASET_ARGS)
push-data: $(RUN)/dataset
	$(if $(HUB_DATASET),,$(error set HUB_DATASET=namespace/name (and HF_TOKEN) to push the dataset))
	$(PY) steps/push.py --dataset-dir $< --repo-id $(HUB_DATASET) $(if $(HUB_PRIVATE),--private)

# ---- Housekeeping --------------------------------------------------------------------------------------------
# pytest-xdist workers, one thread each (tests/conftest.py); the test chain runs beside them from the start.
TEST_WORKERS ?= auto
test: | $(DEPS) $(DEFAULT_MODEL_DIR)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests $(PYTEST_ARGS)

clean:
	rm -rf $(RUN)

help:
	@echo "Targets: all (= plan, report, dataset) plan setup prepare generate judge filter preference sft dpo eval report"\
	  "report-png compare merge push dataset push-data test clean help"
	@echo "  each writes under RUN; a finished output is skipped, an interrupted step resumes when rerun;" \
	  "changing a setting that shapes an output (RUN/.settings/<step>) redoes it and what follows"
	@echo "  plan: each step's expected time for GPU, MODEL and the sizes below, and what it rests on (env/costs.json);"\
	  "no GPU or setup needed; make all prints it first, once a run and after a change of its settings (RUN/plan.json)." \
	  "PLAN_ARGS=\"--json FILE\" keeps it"
	@echo "  eval: base, sft and dpo on TASKS (eval/<model>.json; redone when deleted, its adapter changes or" \
	  "TASKS, LIMIT or another eval setting changes)"
	@echo "  report: RUN/report.md and RUN/report.html (funnel, diversity, judge tags, neighbour distances and map," \
	  "rewards, training curves, evals, settings)"
	@echo "  report-png: RUN/report.png, the HTML page rendered by headless Chromium (chromium, chromium-driver)," \
	  "REPORT_PNG_WIDTH=$(REPORT_PNG_WIDTH) px wide"
	@echo "  compare: evaluates each MODEL of COMPARE=\"$(COMPARE)\" in RUNS_DIR/<model>-GPU, tables them in COMPARE_OUT"
	@echo "  dataset: RUN/dataset/ (sft/ in messages format, preference/, train/test by id; README.md dataset card)"
	@echo "  push-data: uploads RUN/dataset to HUB_DATASET; push: the MERGE_FROM adapter to HUB_REPO (token from HF_TOKEN)"
	@echo "Variables (now):"
	@echo "  GPU=$(GPU)  tier, one of: $(TIERS)   (default: detected; cpu without a CUDA device)"
	@echo "  MODEL=$(MODEL)  target ($(MODEL_ID)), one of: $(MODELS)"
	@echo "  RUN=$(RUN)  output directory   SEED=$(SEED)"
	@echo "  RUNS_DIR=$(RUNS_DIR) (default parent of RUN)  COMPARE=$(COMPARE)  COMPARE_OUT=$(COMPARE_OUT)"
	@echo "  ENGINE=$(ENGINE) (transformers or vllm)  NPROC=$(NPROC) processes (GPUs) for generation and training" \
	  "ACCELERATE_CONFIG=$(ACCELERATE_CONFIG)"
	@echo "  MERGE_FROM=$(MERGE_FROM) (adapter that merge/push use)  HUB_REPO=$(HUB_REPO) (push; token from HF_TOKEN)" \
	  "HUB_DATASET=$(HUB_DATASET) (push-data)  HUB_PRIVATE=$(HUB_PRIVATE) (non-empty: private repositories)"
	@echo "  TEST_FRACTION=$(TEST_FRACTION) (ids held out as the test split: dataset, sft, dpo)"
	@echo "  GENERATOR=$(GENERATOR)  REWARD_MODEL=$(REWARD_MODEL)  EMBEDDER=$(EMBEDDER) (dedup)  DTYPE=$(DTYPE)"
	@echo "  JUDGE_MODEL=$(JUDGE_MODEL) (tags: make judge -> RUN/judged.jsonl) JUDGE_BATCH=$(JUDGE_BATCH)" \
	  "JUDGE_ROWS=$(JUDGE_ROWS) JUDGE_MAX_TOKENS=$(JUDGE_MAX_TOKENS) JUDGE_RESPONSE_TOKENS=$(JUDGE_RESPONSE_TOKENS)" \
	  "JUDGE_ARGS=$(JUDGE_ARGS)  FILTER_ARGS=$(FILTER_ARGS) (tag thresholds: $(PY) steps/filter.py -h)"
	@echo "  NUM_SAMPLES=$(NUM_SAMPLES) GEN_BATCH=$(GEN_BATCH) (samples a batch) GEN_ROWS=$(GEN_ROWS) (decoded at once)" \
	  "MAX_INSTRUCTION_TOKENS=$(MAX_INSTRUCTION_TOKENS) (empty: the recipe's)" \
	  "MAX_RESPONSE_TOKENS=$(MAX_RESPONSE_TOKENS)"
	@echo "  NUM_RESPONSES=$(NUM_RESPONSES) PREF_BATCH=$(PREF_BATCH) (instructions a batch) PREF_ROWS=$(PREF_ROWS)" \
	  "PREF_MAX_TOKENS=$(PREF_MAX_TOKENS)" \
	  "PREF_POLICY=$(PREF_POLICY) (generator or sft)"
	@echo "  SFT_CONFIG=$(SFT_CONFIG)  DPO_CONFIG=$(DPO_CONFIG)"
	@echo "  TASKS=$(TASKS) (lm-eval names; offline: ifeval_local, mc_local) EVAL_BATCH=$(EVAL_BATCH)" \
	  "MAX_GEN_TOKS=$(MAX_GEN_TOKS) LIMIT=$(LIMIT) (examples per task; empty = all) EVAL_4BIT=$(EVAL_4BIT)"
	@echo "  Extra flags per step: GENERATE_ARGS FILTER_ARGS PREFERENCE_ARGS SFT_ARGS DPO_ARGS EVAL_ARGS DATASET_ARGS"
	@echo "    e.g. GENERATE_ARGS=\"--response-temperature 0 --system-prompts tasks.yaml\" (generator recipes:" \
	  "env/generators/; every flag: $(PY) steps/generate.py -h)"
	@echo "  test: TEST_WORKERS=$(TEST_WORKERS) (pytest-xdist processes; auto: one a core)  PYTEST_ARGS=$(PYTEST_ARGS)"
	@echo "Tier settings: env/$(GPU)/ (tier.mk, sft*.yaml, dpo*.yaml); models: env/models/."
	@echo "Setup (needs GNU make >= 4.3, Python >= 3.11 with venv; installs at the versions in $(CONSTRAINTS)):"
	@echo "  PY=$(PY) (the Python that runs the steps; Colab: the notebook's)  VENV=$(VENV) (made by PYTHON=$(PYTHON))"
	@echo "  TORCH_VERSION=$(TORCH_VERSION), installed where PY has no torch (a torch PY has is kept) from" \
	  "TORCH_INDEX_URL=$(TORCH_INDEX_URL) (empty: PyPI; an older driver: e.g. https://download.pytorch.org/whl/cu126)"
