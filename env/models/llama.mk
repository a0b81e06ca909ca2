# Llama-3.2-3B base (gated: accept the Llama 3.2 license on the Hub and set HF_TOKEN).
MODEL_ID = meta-llama/Llama-3.2-3B
MODEL_SIZE = 3b
