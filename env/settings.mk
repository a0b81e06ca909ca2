# Settings stamps: RUN/.settings/<step> holds the settings that shape that step's output (NAME=value, and a checksum
# of each file it reads), and the output depends on it. The stamp is rewritten only when that text changes (never
# under make -n or -q), so a changed setting redoes that output and what follows, and an unchanged rerun nothing.
# A stamp written where none was (a new run, or one made before stamps) is dated 1970: it makes nothing stale.

# What each step is passed, less where (RUN), how it is launched (PY; NPROC for sharded steps, whose merged output
# is the same) and EVAL_COST (the eval's time estimate only). tests/test_chain.py checks these against the recipes.
SETTINGS.plan = GPU MODEL MODEL_ID MODEL_SIZE GENERATOR NUM_SAMPLES GEN_ROWS MAX_INSTRUCTION_TOKENS \
  MAX_RESPONSE_TOKENS JUDGE_ROWS NUM_RESPONSES PREF_ROWS PREF_MAX_TOKENS SFT_CONFIG DPO_CONFIG TEST_FRACTION TASKS \
  LIMIT MAX_GEN_TOKS EVAL_COST NPROC ENGINE
SETTINGS.generate = GENERATOR NUM_SAMPLES GEN_BATCH GEN_ROWS MAX_INSTRUCTION_TOKENS MAX_RESPONSE_TOKENS DTYPE ENGINE \
  SEED TURNS LOAD_IN_4BIT GENERATE_ARGS
SETTINGS.judge = JUDGE_MODEL JUDGE_BATCH JUDGE_ROWS JUDGE_MAX_TOKENS JUDGE_RESPONSE_TOKENS DTYPE ENGINE SEED \
  LOAD_IN_4BIT JUDGE_ARGS
SETTINGS.filter = GENERATOR EMBEDDER FILTER_ARGS
SETTINGS.preference = PREF_POLICY GENERATOR $(if $(filter sft,$(PREF_POLICY)),MODEL_ID) REWARD_MODEL NUM_RESPONSES \
  PREF_BATCH PREF_ROWS PREF_MAX_TOKENS DTYPE ENGINE SEED LOAD_IN_4BIT PREFERENCE_ARGS
SETTINGS.sft = SFT_CONFIG MODEL_ID DTYPE SEED TEST_FRACTION SFT_ARGS NPROC ACCELERATE_CONFIG
SETTINGS.dpo = DPO_CONFIG MODEL_ID DTYPE SEED TEST_FRACTION DPO_ARGS NPROC ACCELERATE_CONFIG
SETTINGS.eval = MODEL_ID TASKS EVAL_BATCH EVAL_GEN_ROWS EVAL_LOGLIK_TOKENS DTYPE MAX_GEN_TOKS LIMIT SEED EVAL_4BIT EVAL_ARGS
SETTINGS.report = GPU MODEL
SETTINGS.report-png = REPORT_PNG_WIDTH
SETTINGS.dataset = TEST_FRACTION DATASET_ARGS
SETTINGS.merge = MODEL_ID DTYPE MERGE_FROM
# The files a step reads besides its input: the tier's YAMLs, the LoRA recipe, an accelerate config.
FILES.plan = $(SFT_CONFIG) $(DPO_CONFIG) env/lora.yaml env/costs.json
FILES.sft = $(SFT_CONFIG) env/lora.yaml $(ACCELERATE_CONFIG)
FILES.dpo = $(DPO_CONFIG) env/lora.yaml $(ACCELERATE_CONFIG)

# The steps that stop on a GPU tier without a GPU (CHECK_CUDA in their recipe) do so before writing their stamp.
CUDA_STEPS = generate judge preference sft dpo eval merge

# Step $(1)'s settings, one line a variable or file, each through function $(2): quote (for the shell) or plain.
# A file's checksum leaves out its comment and blank lines: a reworded comment redoes nothing.
settings = $(foreach v,$(SETTINGS.$(1)),$(call $(2),$(v)=$($(v)))) \
  $(foreach f,$(FILES.$(1)),$(call $(2),$(f) cksum=$(if $(wildcard $(f)),$(shell grep -v '^[[:space:]]*\(\#\|$$\)' $(f) | cksum),missing)))
quote = '$(subst ','\'',$(1))'
plain = $(1)
define newline


endef
# The settings stamp $(1) holds, and whether two texts are equal.
stamped = $(strip $(subst $(newline), ,$(file <$(RUN)/.settings/$(1))))
same = $(and $(findstring x$(1),x$(2)),$(findstring x$(2),x$(1)))
# FORCE where the stamp of step $(1) is missing or holds other settings.
settings_changed = $(if $(call same,$(strip $(call settings,$(1),plain)),$(call stamped,$(1))),,FORCE)

.PHONY: FORCE
.SECONDEXPANSION:
$(RUN)/.settings/%: $$(call settings_changed,$$*)
	$(if $(filter $(CUDA_STEPS),$*),$(CHECK_CUDA))@mkdir -p $(@D) && \
	  printf '%s\n' $(call settings,$*,quote) > $@.$$$$ && \
	  { test -e $@ && echo "settings of $* changed: $$(grep -vxFf $@ $@.$$$$ | paste -sd ' ')" || \
	  TZ=UTC0 touch -t 197001010000 $@.$$$$; } && mv $@.$$$$ $@
