"""Padding-free training attention (steps/common/training/varlen.py) against per-sequence SDPA on a CUDA GPU, forward
and backward, with the real Flash varlen kernel (bench/varlen_check.py, at the full Llama-3.2-3B shape, records the
figures); skipped elsewhere, as in CI."""

import importlib.util

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                reason="needs a CUDA GPU of compute capability >= 8.0")


def test_packed_varlen_training_matches_each_sequence_alone():
    from transformers import LlamaConfig

    from common.training import varlen

    if varlen.unavailable(torch.bfloat16):
        pytest.skip(varlen.unavailable(torch.bfloat16))
    spec = importlib.util.spec_from_file_location("varlen_check", REPO / "bench" / "varlen_check.py")
    varlen_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(varlen_check)

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)  # grouped-query heads
    result = varlen_check.check(config, lengths=[37, 300, 5, 129, 64, 511, 2, 200])
    assert result["passed"], result
