# a100 tier: Colab Pro's A100 (40 GB, bf16). The 8B generator fits in bf16.
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= bfloat16
NUM_SAMPLES ?= 1000
# Empty token caps: the generator recipe's (Magpie's 1,024 / 4,096 for Llama-3.1).
GEN_BATCH ?= 1024
GEN_ROWS ?= 64
MAX_INSTRUCTION_TOKENS ?=
MAX_RESPONSE_TOKENS ?=
JUDGE_BATCH ?= 1024
JUDGE_ROWS ?= 64
JUDGE_MAX_TOKENS ?= 128
JUDGE_RESPONSE_TOKENS ?= 1024
FILTER_ARGS ?= --min-input-quality good --drop-unsafe
NUM_RESPONSES ?= 4
PREF_BATCH ?= 256
PREF_ROWS ?= 64
PREF_MAX_TOKENS ?= 512
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
EVAL_BATCH ?= 16
MAX_GEN_TOKS ?= 1280
# Seconds per log-likelihood model pass (mean over the tasks' mix) and per generated token of a request at EVAL_BATCH,
# per MODEL_SIZE: the time the eval step and `make plan` print. The H100's 4-bit measurements plus the A100's
# slower compute and bandwidth (bench/README.md "Eval"); bf16 skips the dequantisation, so an upper bound.
EVAL_COST_3b ?= 0.021,0.0077
EVAL_COST_7b ?= 0.029,0.0081
