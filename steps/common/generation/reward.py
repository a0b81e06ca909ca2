"""Reward models behind one call: `reward(instructions, responses)` -> one score per pair.

- ClassifierReward: a sequence classifier with one logit (e.g. OpenAssistant/reward-model-deberta-v3-large-v2),
  fed (instruction, response) as a text pair, the way that model was trained.
- EmbeddingReward: a sentence-transformers model (a directory with modules.json, e.g. `embedded:minilm`); the
  score is the cosine similarity of instruction and response. It measures topical relevance only.
"""

from pathlib import Path

import torch

from common.models import device, hub_load, load_tokenizer, resolve, trust_remote_code
from common.precision import resolve_dtype


class ClassifierReward:
    """A reward model with a single-logit classification head, scoring (instruction, response) text pairs."""

    def __init__(self, name, dtype="auto"):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(name)
        self.model = hub_load(name, lambda: AutoModelForSequenceClassification.from_pretrained(
            name, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code(), use_safetensors=True))
        self.model.to(device()).eval()

    def __call__(self, instructions, responses):
        batch = self.tokenizer(instructions, responses, padding=True, truncation=True, max_length=1024,
                               return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            return self.model(**batch).logits[:, 0].float().tolist()


class EmbeddingReward:
    """Cosine similarity of instruction and response embeddings (sentence-transformers)."""

    def __init__(self, name):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(name, device=device())

    def __call__(self, instructions, responses):
        a = self.model.encode(instructions, convert_to_tensor=True, normalize_embeddings=True)
        b = self.model.encode(responses, convert_to_tensor=True, normalize_embeddings=True)
        return (a * b).sum(-1).float().tolist()


def load_reward(name, dtype="auto"):
    path = Path(resolve(name))
    if (path / "modules.json").exists():
        return EmbeddingReward(str(path))
    return ClassifierReward(str(path) if path.exists() else name, dtype)


def score_in_batches(reward, instructions, responses, batch_size):
    scores = []
    for i in range(0, len(responses), batch_size):
        scores += reward(instructions[i : i + batch_size], responses[i : i + batch_size])
    return scores
