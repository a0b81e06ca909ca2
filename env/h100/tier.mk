# h100 tier: one H100 or H200 (80 GB or more, bf16).
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= bfloat16
NUM_SAMPLES ?= 1000
# Samples a batch (the unit a resumed run restarts from) and rows decoded at once at most. The fast path refills a
# row's slot when it ends; its paged KV cache, sized from free memory, holds the rows' tokens as they grow.
# Each batch ends by draining its longest rows on a few slots (up to a cap's worth of steps), so a batch is many
# times the rows; 512 rows at Magpie's 4,096 cap fit in 79 GiB and outrun 256 (bench/README.md).
# A crash loses at most the batch under way (a few minutes here). Empty token caps: the generator recipe's (Magpie's
# 1,024 / 4,096 for Llama-3.1).
GEN_BATCH ?= 4096
GEN_ROWS ?= 512
MAX_INSTRUCTION_TOKENS ?=
MAX_RESPONSE_TOKENS ?=
# The judge (steps/judge.py; JUDGE_MODEL defaults to the generator): records a batch, answers decoded at once, the
# answer's token cap (the JSON is ~60 tokens; a cut-off one is retried once) and the response shown for safety.
# 16 times the rows, as for GEN_BATCH: 4,096 records in one call made 39.4 records/s, 512 made 36.2 (bench/README.md)
JUDGE_BATCH ?= 4096
JUDGE_ROWS ?= 256
JUDGE_MAX_TOKENS ?= 128
JUDGE_RESPONSE_TOKENS ?= 1024
# Magpie's default filter (magpie-align/magpie data_sft/data_filter.ipynb): input quality good or excellent. Its
# curated releases (e.g. Magpie-Air-300K-Filtered) add --min-difficulty medium. Unsafe responses (the judge's safety
# label) are dropped too, since refusals are kept (steps/filter.py says why).
FILTER_ARGS ?= --min-input-quality good --drop-unsafe
NUM_RESPONSES ?= 4
# Instructions a batch (x NUM_RESPONSES responses: 16 times PREF_ROWS, as for GEN_BATCH)
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
