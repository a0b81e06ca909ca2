"""Padding-free attention for training: PyTorch's Flash varlen kernel behind transformers' attention interface.

A packed micro-batch (TRL's padding-free / BFD packing) is one long row of several sequences whose `position_ids`
restart at 0. With SDPA, transformers turns that into a block-diagonal mask, which SDPA cannot hand to its flash
kernel: attention then runs over the whole packed length (8k x 8k for 8 bins of 1024). Here each layer's attention
is `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, no extra package) over the sequence boundaries
instead: `cu_seq_lens_q` from TRL's collator when it sends them, else from the restarting position ids, else from a
2D padding mask (padded rows are unpadded first) or the plain batch shape.

    asked = requested(model_args)          # before loading: the model loads with SDPA
    model = load_for_training(model_args)
    apply(model, asked)                    # then switches to "varlen" where the kernel runs here

"varlen" is the name the tier YAMLs use (`attn_implementation: varlen`). Where the kernel can't run (no CUDA, a GPU
below compute capability 8.0 such as the T4, float32, a torch without the module, a model with sliding windows or
attention dropout) `apply` says so once and leaves SDPA: today's path, where transformers builds the block-diagonal
mask from the position ids (correct, slower).

On torch 2.11 the kernel has no `is_causal`: causal is `window_size=(-1, 0)`; and keys/values need the query's head
count, so grouped-query heads are repeated (torch 2.12 takes `enable_gqa`, used where it exists).

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests): `config._attn_implementation` (the
attention in use), the mask registry `AttentionMaskInterface` of `transformers.masking_utils` and
`transformers.integrations.sdpa_attention`'s function for what the kernel does not take.
"""

import functools
import inspect

import torch

from common import say_once
from common.models import full_attention_only

NAME = "varlen"
MIN_CAPABILITY = (8, 0)  # PyTorch's flash kernels: Ampere and newer; a T4 is 7.5


def kernel():
    """torch.nn.attention.varlen.varlen_attn, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def kernel_parameters():
    fn = kernel()
    return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()


def takes_gqa():
    return "enable_gqa" in kernel_parameters()


def attend(q, k, v, cu, max_len, scale=None, **extra):
    """The kernel, causal, on (T, H, D) tensors: `window_size=(-1, 0)` where it takes a window (torch 2.11),
    `is_causal` where that is how it says it; a scale it can't take goes into the queries."""
    params = kernel_parameters()
    kw = dict(extra)
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)
    return kernel()(q, k, v, cu, cu, max_len, max_len, **kw)


def unavailable(dtype, config=None):
    """Why the varlen kernel can't train this model here, or None when it can."""
    if kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}; its flash "
                f"kernel needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {str(dtype).removeprefix('torch.')} (the flash kernel takes bfloat16 and float16)"
    if config is not None:
        if not full_attention_only(config):
            return "sliding-window attention"
        if getattr(config, "attention_dropout", 0.0):
            return "attention dropout"
    try:  # the kernel itself, on a few tokens: a build without it fails here, not inside the first step
        q = torch.randn(6, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, 2, 6], device="cuda", dtype=torch.int32)
        attend(q, q, q, cu, 4).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: not here
        return f"the kernel failed on this GPU ({type(e).__name__}: {str(e)[:200]})"
    return None


def requested(model_args):
    """Take "varlen" out of TRL's ModelConfig before loading (transformers knows the name only once registered, and
    only where the kernel runs): the model loads with SDPA and `apply` switches it. Returns what was asked for."""
    asked = model_args.attn_implementation
    if asked == NAME:
        model_args.attn_implementation = "sdpa"
    return asked


def apply(model, asked):
    """Switch a loaded model to the varlen kernel where `asked` is "varlen" and it runs here; else say once why not
    (SDPA stays). Returns the attention implementation the model trains with."""
    if asked == NAME:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32),
                     model.dtype)
        why = unavailable(dtype, model.config.get_text_config(decoder=True))
        if why:
            say_once(f"training: varlen attention off ({why}); SDPA instead (packed sequences get a block-diagonal "
                     "mask: correct, slower)")
        else:
            register()
            model.set_attn_implementation(NAME)
    return model.config._attn_implementation


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention)
    # As for flash attention: no 4D mask is built; a 2D padding mask (or None) comes through as it is.
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def boundaries(batch, length, attention_mask, position_ids, cu_seq_lens, max_length, device):
    """(cu_seqlens int32, max length, token indices or None): where each sequence starts in the flattened batch.

    Indices (of the non-padding tokens) are returned only for a padded batch, which is unpadded before the kernel."""
    if attention_mask is not None:
        mask = attention_mask.bool().reshape(batch, -1)[:, -length:]
        lengths = mask.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cu, int(lengths.max()), mask.reshape(-1).nonzero().squeeze(-1)
    if cu_seq_lens is not None and batch == 1:
        cu = cu_seq_lens.to(device=device, dtype=torch.int32)
        return cu, int(max_length) if max_length is not None else int(cu.diff().max()), None
    if position_ids is not None and batch == 1:
        starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(-1)
        if starts.numel() and starts[0] == 0:
            cu = torch.cat([starts, torch.tensor([length], device=starts.device)]).to(device=device,
                                                                                      dtype=torch.int32)
            return cu, int(cu.diff().max()), None
    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    return cu, length, None


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query (B, H, S, D), key/value (B, KV, S, D) -> (B, S, H, D)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if attention_mask is not None and attention_mask.dim() != 2 or dropout or kwargs.get("softcap") \
            or key.shape[2] != length:
        # A prepared 4D mask, attention dropout, a KV cache (generation): not what this path is for.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu, max_len, indices = boundaries(batch, length, attention_mask, kwargs.get("position_ids"),
                                      kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"), query.device)
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    gqa = {}
    if kv_heads != heads:
        if takes_gqa():
            gqa = {"enable_gqa": True}
        else:  # torch 2.11: keys and values need the query's head count (transformers' repeat_kv order)
            groups = heads // kv_heads
            k = k[:, :, :, None].expand(batch, length, kv_heads, groups, dim).reshape(batch, length, heads, dim)
            v = v[:, :, :, None].expand(batch, length, kv_heads, groups, dim).reshape(batch, length, heads, dim)
    k = k.reshape(batch * length, -1, dim)
    v = v.reshape(batch * length, -1, dim)
    if indices is not None:
        q, k, v = q[indices], k[indices], v[indices]
    out = attend(q, k, v, cu, max_len, scale=scaling, **gqa)
    if indices is not None:
        out = out.new_zeros(batch * length, heads, dim).index_copy(0, indices, out)
    return out.reshape(batch, length, heads, dim), None
