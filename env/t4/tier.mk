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
# Eval sized for the same session (bench/README.md "Eval"; estimates for a T4 from H100 measurements): the first 100
# examples of each task and MMLU subject (5,700 MMLU questions; 100 IFEval prompts), batch 32 (generation is per-step
# overhead-bound: 32 costs what 16 does), answers capped at 512 tokens (the SFT data's MAX_RESPONSE_TOKENS; IFEval's own
# 1280 at batch 4 was ~8 h a model). Expected per model, generation run to the cap: 3B ~10 min, 7B ~18 min. LIMIT=1000
# (~47 and ~82 min a model) measures finer where the session allows. A killed eval resumes from its request cache.
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
LIMIT ?= 100
EVAL_BATCH ?= 32
MAX_GEN_TOKS ?= 512
# 4-bit NF4 for every size: the t4 SFT/DPO configs train QLoRA, so the adapters are evaluated on the quantised
# weights they were trained on; and a 7B in fp16 (14.5 GB) does not fit 16 GB. Peaks under a 15 GiB cap: generation
# at batch 32, 7B 6.9 GiB, 3B 4.6; log-likelihood at 16, 7B 6.5, 3B 7.8 (Llama's 128k vocabulary: logits), so about
# 12 GiB at 32 for a 3B (not measured): EVAL_BATCH=16 if a T4 runs out of memory.
EVAL_4BIT ?= --load-in-4bit
# Seconds per log-likelihood model pass (mean over the tasks' mix at LIMIT 100) and per generated token of a request at
# EVAL_BATCH, per MODEL_SIZE: the time the eval step and `make plan` print (bench/results/eval-h100.json, scaled).
EVAL_COST_3b ?= 0.053,0.005
EVAL_COST_7b ?= 0.099,0.0078
