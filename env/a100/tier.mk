# a100 tier: Colab Pro's A100 (40 GB, bf16). The 8B generator fits in bf16.
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= bfloat16
NUM_SAMPLES ?= 1000
# Samples a batch and rows decoded at once at most (the paged KV cache holds what fits); a batch is 16 times the rows,
# as on the h100 tier (each batch ends by draining its longest rows). Empty token caps: the generator recipe's
# (Magpie's 1,024 / 4,096 for Llama-3.1).
GEN_BATCH ?= 1024
GEN_ROWS ?= 64
MAX_INSTRUCTION_TOKENS ?=
MAX_RESPONSE_TOKENS ?=
# The judge (steps/judge.py; JUDGE_MODEL defaults to the generator): records a batch, answers decoded at once, the
# answer's token cap (the JSON is ~60 tokens; a cut-off one is retried once) and the response shown for safety.
# 16 times the rows, as for GEN_BATCH and on the h100 tier (bench/README.md: larger calls, more records/s)
JUDGE_BATCH ?= 1024
JUDGE_ROWS ?= 64
JUDGE_MAX_TOKENS ?= 128
JUDGE_RESPONSE_TOKENS ?= 1024
# Magpie's default filter (magpie-align/magpie data_sft/data_filter.ipynb): input quality good or excellent. Its
# curated releases (e.g. Magpie-Air-300K-Filtered) add --min-difficulty medium. Unsafe responses (the judge's safety
# label) are dropped too, since refusals are kept (steps/filter.py says why).
FILTER_ARGS ?= --min-input-quality good --drop-unsafe
NUM_RESPONSES ?= 4
# Instructions a batch (x NUM_RESPONSES responses: 16 times PREF_ROWS; a batch ends by draining its longest rows)
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
