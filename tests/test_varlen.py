"""The padding-free attention path (steps/common/training/varlen.py) on the CPU: how it finds sequence boundaries and
hands them to the kernel, with the kernel replaced by per-sequence causal SDPA that takes the same arguments (the real
Flash kernel needs a GPU: tests/test_varlen_gpu.py and bench/varlen_check.py check it there)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from common.training import varlen


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
    """varlen_attn's contract as torch 2.11 has it: (T, H, D) inputs, causal only through window_size=(-1, 0), keys
    with the query's head count, each [cu[i], cu[i+1]) a sequence of its own."""
    assert window_size == (-1, 0) and not kw, (window_size, kw)
    assert k.shape[1] == q.shape[1] and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert max_q == max_k == int(cu_q.diff().max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                  v[a:b].transpose(0, 1), is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.fixture
def tiny_llama(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(varlen, "kernel", lambda: reference_kernel)
    monkeypatch.setattr(varlen, "kernel_parameters", lambda: frozenset({"scale", "window_size"}))  # torch 2.11
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # grouped-query heads
    model = LlamaForCausalLM(config).eval()
    reference = LlamaForCausalLM(copy.deepcopy(config)).eval()  # a config of its own: the attention is set in it
    reference.load_state_dict(model.state_dict())
    reference.set_attn_implementation("sdpa")
    varlen.register()
    model.set_attn_implementation(varlen.NAME)
    assert reference.config._attn_implementation == "sdpa"
    return model, reference


def test_packed_sequences_attend_only_within_themselves(tiny_llama):
    model, reference = tiny_llama
    lengths = [5, 9, 3, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([reference(s[None], use_cache=False).logits[0] for s in seqs])
        from_positions = model(ids, position_ids=positions, use_cache=False).logits[0]
        # as TRL's padding-free collator sends them
        from_collator = model(ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                              max_length_k=9, use_cache=False).logits[0]
        # control: the same packed row without boundaries is one long sequence
        control = model(ids, use_cache=False).logits[0]
    assert (from_positions - alone).abs().max() < 1e-5
    assert (from_collator - alone).abs().max() < 1e-5
    assert (control - alone)[lengths[0]:].abs().max() > 1e-2  # every sequence after the first sees the earlier ones


def test_a_padded_batch_is_unpadded_for_the_kernel(tiny_llama, monkeypatch):
    """Padded on the left, as generation pads: a kernel that took each row whole would let the real tokens attend to
    the padding before them (causal masking alone does not hide it). The kernel gets the real tokens alone, one
    sequence a row, and their outputs match SDPA's with the mask."""
    model, reference = tiny_llama
    seen = []

    def recording_kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        seen.append((cu_q.tolist(), max_q, q.shape[0]))
        return reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(varlen, "kernel", lambda: recording_kernel)
    ids = torch.randint(0, 97, (3, 8))
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5, [0] * 6 + [1] * 2])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=False).logits
        want = reference(ids, attention_mask=mask, use_cache=False).logits
    assert seen == [([0, 8, 13, 15], 8, 15)] * 2  # each layer: the rows' 8, 5 and 2 real tokens, padding left out
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max() < 1e-5


def test_without_the_flash_kernel_each_sequence_goes_through_sdpa(capsys, monkeypatch):
    """No CUDA here: "varlen" becomes "varlen_sdpa" (said once), and a packed row's logits and gradients are those of
    its sequences run one at a time, with real SDPA (no stand-in kernel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(copy.deepcopy(config))
    reference.load_state_dict(model.state_dict())
    model.set_attn_implementation("sdpa")
    reference.set_attn_implementation("sdpa")
    monkeypatch.setattr(varlen.say_once, "__defaults__", (set(),))
    assert varlen.apply(model, "varlen") == varlen.SDPA_NAME
    assert varlen.apply(model, "varlen") == varlen.SDPA_NAME
    err = capsys.readouterr().err
    assert err.count("training: Flash varlen kernel off (") == 1
    assert "no CUDA GPU" in err or "has no torch.nn.attention.varlen" in err
    assert varlen.apply(reference, "sdpa") == "sdpa" and capsys.readouterr().err == ""

    lengths = [5, 9, 3, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, position_ids=positions, use_cache=False).logits[0]
    alone = torch.cat([reference(s[None], use_cache=False).logits[0] for s in seqs])
    assert (packed - alone).abs().max() < 1e-5
    packed.square().mean().backward()
    alone.square().mean().backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        got, want = model.get_parameter(name).grad, reference.get_parameter(name).grad
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
    with torch.no_grad():  # control: without boundaries the row is one sequence
        control = model(ids, use_cache=False).logits[0]
    assert (control - alone)[lengths[0]:].abs().max() > 1e-2


def test_t4_class_gpus_are_refused_before_any_kernel_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    if varlen.kernel() is None:
        pytest.skip("this torch has no varlen kernel")
    assert "compute capability 7.5" in varlen.unavailable(torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert "float32" in varlen.unavailable(torch.float32)


def test_a_sliding_window_longer_than_every_row_changes_nothing(capsys, monkeypatch):
    """Mistral-7B-v0.1's 4,096-token window: with rows dropped above max_length 1,024, attention per whole sequence
    is the model's own; above the window it is not, and SDPA with transformers' masks stays (said once)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, sliding_window=4096)
    assert varlen.unsuited(config, 1024) is None
    assert "window 4096, max_length 8192" in varlen.unsuited(config, 8192)
    assert varlen.unsuited(config, None)  # no bound on the rows: not exact
    model = MistralForCausalLM(config)
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(varlen.say_once, "__defaults__", (set(),))
    assert varlen.apply(model, "varlen", 8192) == "sdpa"
    assert "varlen attention off (sliding-window attention" in capsys.readouterr().err
    assert varlen.apply(model, "varlen", 1024) == varlen.SDPA_NAME  # no CUDA here
