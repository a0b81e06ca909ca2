"""The engine's attention (`slot_attention`), registered with transformers under SLOT_ATTENTION while a generator
lives. The runner tells it which phase it serves through the forward's keyword `slot_phase`:

- "prefill": the new prompts packed into one row, `attention_mask` the int32 offsets where each starts
  (packed_attention: Flash varlen on Ampere or newer, else SDPA per prompt);
- "decode": one token a slot; with `decode_kernel="triton"` the Triton kernel reads each slot's pages in place
  through `block_table`, `attention_mask` holding each slot's key count (decode_kernel.py); with "sdpa" a boolean
  mask over a contiguous copy of the pages (grouped_sdpa_attention);
- no phase (a plain forward, as the runner's check runs one): grouped_sdpa_attention.

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests, torch 2.11 and 2.13): transformers'
attention and mask registries (`AttentionInterface`, `AttentionMaskInterface`, `transformers.masking_utils`'s
`sdpa_mask`), its SDPA function (`transformers.integrations.sdpa_attention`), extra forward keywords passed through to
the attention function unchanged; `torch.ops.aten._flash_attention_forward` (packed prefills).
"""

import torch

from common.generation import decode_kernel

SLOT_ATTENTION = "sit_slots"


def flash_varlen_available():
    """PyTorch's flash kernel: built in, switched on, and a GPU it runs on (Ampere or newer; not a T4)."""
    return (hasattr(torch.ops.aten, "_flash_attention_forward") and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


def decode_kernels(device):
    """The decoding attentions that may run here, best first: the Triton kernel over the pages in place
    (common/generation/decode_kernel.py; fp16 and bf16, any CUDA GPU triton supports, a T4 included), then SDPA over a
    contiguous copy of each slot's pages under a mask (always)."""
    if device.type != "cuda":
        return ["sdpa"]
    return (["triton"] if decode_kernel.available() else []) + ["sdpa"]


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   slot_phase=None, **kwargs):
    """Attention for the paged cache, by `slot_phase` (see the module's docstring)."""
    if slot_phase == "prefill":
        return packed_attention(query, key, value, attention_mask.reshape(-1), kwargs["max_length_q"], scaling)
    if slot_phase == "decode" and kwargs.get("decode_kernel") == "triton":
        return decode_kernel.attend(query, key, value, attention_mask.reshape(-1), kwargs["block_table"],
                                    scaling, kwargs.get("slot_order")), None
    return grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def packed_attention(query, key, value, bounds, max_length, scaling=None):
    """Causal attention within each of the sequences packed into one row (prefill): (1, H, T, D) queries, keys and
    values, `bounds` the int32 offsets where each starts (and T), `max_length` the longest. Flash attention's varlen
    kernel on a GPU that has it (grouped-query heads native); elsewhere SDPA on each sequence in turn."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if q.is_cuda and flash_varlen_available() and q.dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.aten._flash_attention_forward(q, k, v, bounds, bounds, max_length, max_length, 0.0, True,
                                                      False, scale=scaling)[0]
    else:
        groups = q.shape[1] // k.shape[1]
        edges = bounds.tolist()
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(groups, 0),
                v[a:b].transpose(0, 1).repeat_interleave(groups, 0), is_causal=True, scale=scaling,
            ).transpose(0, 1)
            for a, b in zip(edges, edges[1:])
        ])
    return out[None], None


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' SDPA attention, except that one decoding token of a grouped-query model attends per KV head.

    Stock SDPA attention with a mask expands the keys and values to every query head (`repeat_kv`): at decoding,
    where attention is bound by reading the cache, that moves the cache several times over. Here the query heads of
    one KV head become its query rows instead: (B, H, 1, D) -> (B, KV, H/KV, D), the same arithmetic with the cache
    read once. Everything else goes to transformers' own function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and query.shape[2] == 1 and key.shape[1] * groups == query.shape[1]
            and (attention_mask is None or (attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1))
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)):
        batch, heads, _, dim = query.shape
        output = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, key.shape[1], groups, dim), key, value, attn_mask=attention_mask,
            dropout_p=dropout, scale=scaling, is_causal=False,
        )
        return output.reshape(batch, 1, heads, dim), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_slot_attention(model):
    """Switch the model's attention to `slot_attention` (masks made as for SDPA where transformers makes them)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SLOT_ATTENTION)
