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
# Seconds per log-likelihood token (the packed scorer) and per generated token (IFEval through the engine at
# EVAL_GEN_ROWS = GEN_ROWS, 512), per MODEL_SIZE: the time the eval step and `make plan` print. 3B: measured on an
# H100 in bf16, base and a LoRA adapter on the full tasks' counts (bench/results/eval-paths-h100-llama-3.2-3b-three.json:
# 48k log-likelihood tokens/s base, 31k with an adapter; 11.5k and 10.0k generated tokens/s), the mean over base and
# two adapters. 7B: the 3B's scaled by parameters (x2.5 per token scored, x2 per token generated), not measured.
EVAL_COST_3b ?= 2.8e-5,9.6e-5
# 16,384 tokens a scorer forward: 1.26x 8,192's on MMLU-shaped requests (bench/results/eval-paths-h100-llama-3.2-3b.json)
EVAL_LOGLIK_TOKENS ?= 16384
EVAL_COST_7b ?= 7.0e-5,1.9e-4
