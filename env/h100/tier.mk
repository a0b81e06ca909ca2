# h100 tier: one H100 or H200 (80 GB or more, bf16).
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= bfloat16
NUM_SAMPLES ?= 1000
# Samples a batch (the unit a resumed run restarts from) and rows decoded at once. The fast path refills a row's
# slot when it ends and sizes its KV cache from free memory (fewer rows, said, where 4,096-token responses don't fit).
# Empty token caps: the generator recipe's (Magpie's 1,024 / 4,096 for Llama-3.1).
GEN_BATCH ?= 512
GEN_ROWS ?= 256
MAX_INSTRUCTION_TOKENS ?=
MAX_RESPONSE_TOKENS ?=
NUM_RESPONSES ?= 4
PREF_BATCH ?= 32
PREF_ROWS ?= 128
PREF_MAX_TOKENS ?= 512
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
EVAL_BATCH ?= 32
MAX_GEN_TOKS ?= 1280
