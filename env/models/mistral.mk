# Mistral-7B-v0.1 base (public; no chat template and no pad token: the steps add them).
MODEL_ID = mistralai/Mistral-7B-v0.1
MODEL_SIZE = 7b
