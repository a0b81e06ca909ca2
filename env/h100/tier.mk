# h100 tier: one H100 or H200 (80 GB or more, bf16).
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= bfloat16
NUM_SAMPLES ?= 1000
# 512 rows at Magpie's 4,096 cap fit in 79 GiB and outrun 256; batches of 8,192 drain half as often as 4,096
# (bench/README.md). Empty token caps: the generator recipe's (Magpie's 1,024 / 4,096 for Llama-3.1).
GEN_BATCH ?= 8192
GEN_ROWS ?= 512
MAX_INSTRUCTION_TOKENS ?=
MAX_RESPONSE_TOKENS ?=
JUDGE_BATCH ?= 4096
JUDGE_ROWS ?= 256
JUDGE_MAX_TOKENS ?= 128
JUDGE_RESPONSE_TOKENS ?= 1024
FILTER_ARGS ?= --min-input-quality good --drop-unsafe
NUM_RESPONSES ?= 4
PREF_BATCH ?= 512
PREF_ROWS ?= 128
PREF_MAX_TOKENS ?= 512
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
EVAL_BATCH ?= 32
MAX_GEN_TOKS ?= 1280
# Seconds per log-likelihood model pass (mean over the tasks' mix) and per generated token of a request at EVAL_BATCH,
# per MODEL_SIZE: the time the eval step and `make plan` print. The H100's 4-bit measurements (bench/results/
# eval-h100.json); bf16 skips the dequantisation, so an upper bound.
EVAL_COST_3b ?= 0.014,0.0032
EVAL_COST_7b ?= 0.013,0.0037
