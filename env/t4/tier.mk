# t4 tier: Colab's free T4 (16 GB, compute capability 7.5: fp16, no bf16). The generator is loaded in 4-bit.
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
# fp16 everywhere: also the 4-bit compute dtype; LoRA weights stay fp32 for fp16's GradScaler
DTYPE ?= float16
LOAD_IN_4BIT ?= --load-in-4bit
# Sized so that `make all` fits one Colab session: `make plan` estimates each step on a T4 (2.4 h in all for llama;
# bench/README.md "make plan"). Training and eval are most of it, so the sample count is what the session allows,
# not Magpie's scale.
NUM_SAMPLES ?= 300
# Batches of two waves of rows, so a disconnect loses minutes, not the run; caps below Magpie's 1,024 / 4,096, for
# time, not memory.
GEN_BATCH ?= 128
GEN_ROWS ?= 64
MAX_INSTRUCTION_TOKENS ?= 256
MAX_RESPONSE_TOKENS ?= 1024
JUDGE_BATCH ?= 128
JUDGE_ROWS ?= 64
JUDGE_MAX_TOKENS ?= 128
JUDGE_RESPONSE_TOKENS ?= 512
FILTER_ARGS ?= --min-input-quality good --drop-unsafe
NUM_RESPONSES ?= 4
PREF_BATCH ?= 32
PREF_ROWS ?= 64
PREF_MAX_TOKENS ?= 512
# Eval sized for the same session (bench/README.md "Eval"; estimates for a T4 from H100 measurements): all of IFEval
# (541 prompts) and a seeded random sample of 1,000 documents of each log-likelihood task (MMLU stratified by subject;
# TruthfulQA-MC2's 817 whole), the same for base, SFT and DPO; answers capped at 512 tokens (the SFT data's
# MAX_RESPONSE_TOKENS). A killed eval resumes from its request cache.
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
LIMIT ?= 1000,ifeval=all
EVAL_BATCH ?= 32
MAX_GEN_TOKS ?= 512
# 4-bit NF4 for every size: the t4 SFT/DPO configs train QLoRA, so the adapters are evaluated on the quantised
# weights they were trained on; and a 7B in fp16 (14.5 GB) does not fit 16 GB. Peaks under a 15 GiB cap: generation
# at batch 32, 7B 6.9 GiB, 3B 4.6; log-likelihood at 16, 7B 6.5, 3B 7.8 (Llama's 128k vocabulary: logits), so about
# 12 GiB at 32 for a 3B (not measured): EVAL_BATCH=16 if a T4 runs out of memory.
EVAL_4BIT ?= --load-in-4bit
# Seconds per log-likelihood token and per generated token, per MODEL_SIZE: estimates for a T4, not measured on one.
# Scoring: the packed scorer on an H100 in 4-bit (bench/results/eval-paths-h100-llama-3.2-3b-4bit.json: 44k tokens/s,
# x1.36 for two of the three models carrying an adapter) scaled by fp16 FLOP/s (65 / 989); 7B x2.3. Generating: the
# 8B generator's t4 rate in make plan (183 tokens/s at 64 rows) x2.4 for a 3B's smaller 4-bit weights (x1.1 for 7B);
# the eval's own path agrees: IFEval through the engine at these settings ran 4,588 tokens/s on an H100, ~440 on a T4
# by bandwidth (bench/results/eval-paths-h100-llama-3.2-3b-4bit-ifeval-t4.json).
EVAL_COST_3b ?= 4.7e-4,2.3e-3
EVAL_COST_7b ?= 1.1e-3,5.0e-3
