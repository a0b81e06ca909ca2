# h100 tier: one H100 or H200 (80 GB or more, bf16).
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= bfloat16
NUM_SAMPLES ?= 1000
GEN_BATCH ?= 128
MAX_INSTRUCTION_TOKENS ?= 128
MAX_RESPONSE_TOKENS ?= 512
NUM_RESPONSES ?= 4
PREF_BATCH ?= 32
PREF_MAX_TOKENS ?= 512
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
EVAL_BATCH ?= 32
MAX_GEN_TOKS ?= 1280
