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
# IFEval's answers through the engine at 256 rows (generation's GEN_ROWS is 64; the paged KV cache holds what fits).
EVAL_GEN_ROWS ?= 256
# Seconds per log-likelihood token and per generated token, per MODEL_SIZE: the h100 tier's (env/h100/tier.mk)
# scaled to an A100 40GB by dense bf16 FLOP/s for scoring (312 / 989) and by bandwidth for generating (1.56 / 3.35 TB/s);
# not measured on an A100.
EVAL_COST_3b ?= 8.9e-5,2.1e-4
EVAL_COST_7b ?= 2.2e-4,4.1e-4
