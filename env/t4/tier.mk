# t4 tier: Colab's free T4 (16 GB, compute capability 7.5: fp16, no bf16). The generator is loaded in 4-bit.
MODEL ?= llama
GENERATOR ?= meta-llama/Llama-3.1-8B-Instruct
REWARD_MODEL ?= OpenAssistant/reward-model-deberta-v3-large-v2
DTYPE ?= float16
LOAD_IN_4BIT ?= --load-in-4bit
NUM_SAMPLES ?= 1000
GEN_BATCH ?= 16
MAX_INSTRUCTION_TOKENS ?= 128
MAX_RESPONSE_TOKENS ?= 512
NUM_RESPONSES ?= 4
PREF_BATCH ?= 4
PREF_MAX_TOKENS ?= 512
TASKS ?= ifeval,mmlu,truthfulqa_mc2,hellaswag
EVAL_BATCH ?= 4
MAX_GEN_TOKS ?= 1280
