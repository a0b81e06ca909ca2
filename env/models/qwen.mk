# Qwen2.5-3B base (public).
MODEL_ID = Qwen/Qwen2.5-3B
MODEL_SIZE = 3b
