"""Padding-free attention for training: each packed sequence attends to itself alone, behind transformers' attention
interface, on every device.

A packed micro-batch (TRL's padding-free / BFD packing; DPO's packed pairs, common/training/pair_packing.py) is one
long row of several sequences whose `position_ids` restart at 0. With plain SDPA, transformers turns that into a
block-diagonal mask over the whole row (8k x 8k for 8 bins of 1024), which SDPA cannot hand to a fast kernel. Here
each layer's attention gets the sequences' boundaries instead (`cu_seq_lens_q` from TRL's collator when it sends
them, else the restarting position ids, else a 2D padding mask (padded rows are unpadded first) or the batch shape)
and runs one of two kernels, both exact:

- "varlen": `torch.nn.attention.varlen.varlen_attn`, PyTorch's Flash kernel over the boundaries (PyTorch >= 2.10, no
  extra package; compute capability >= 8.0, bf16/fp16);
- "varlen_sdpa", everywhere else (a T4, a CPU, float32): the sequences scattered into a (sequences, longest) batch
  padded on the right and run through SDPA with `is_causal`, which its memory-efficient and flash kernels take
  without a mask; causal masking alone keeps every real query away from the padding after it. Projections and MLPs
  still see the packed row (no padding); attention pays for the padding to the longest sequence, not for the row.

    model, attention = load(model_args, max_length)   # loads with SDPA, then "varlen" where the Flash kernel runs
                                                      # here, else "varlen_sdpa"

A DPO micro-batch packed by pair_packing also passes `tree_index`, `tree_cu_seq_lens`, `tree_max_length` and
`tree_keep`: the row's tokens gathered into virtual sequences (a pair's shared prompt followed by each of its
answers), attended as above, and scattered back from the positions listed in `tree_keep`, so each prompt's
projections and MLPs are computed once for both answers.

On torch 2.11 the Flash kernel has no `is_causal`: causal is `window_size=(-1, 0)`; and keys/values need the query's
head count, so grouped-query heads are repeated (torch 2.12 takes `enable_gqa`, used where it exists).

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests): `config._attn_implementation` (the
attention in use), the mask registry `AttentionMaskInterface` of `transformers.masking_utils` and
`transformers.integrations.sdpa_attention`'s function for what the kernels do not take.
"""

import functools
import inspect

import torch

from common import say_once
from common.models import full_attention_only, load_for_training

NAME = "varlen"
SDPA_NAME = "varlen_sdpa"
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


def flash_attend(q, k, v, cu, max_len, scale=None, **extra):
    """The Flash kernel, causal, on (T, H, D) tensors: `window_size=(-1, 0)` where it takes a window (torch 2.11),
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


def sdpa_attend(q, k, v, cu, max_len, scale=None):
    """The sequences of (T, H, D) tensors between the `cu` boundaries, each causal, through SDPA: scattered into a
    batch padded on the right to `max_len`, where `is_causal` alone is exact (a real query sees only the real keys
    before it), so SDPA's mask-free kernels run. Keys and values have the query's head count."""
    total, heads, dim = q.shape
    lengths = cu.diff().long()
    count = lengths.numel()
    sequence = torch.repeat_interleave(torch.arange(count, device=q.device), lengths, output_size=total)
    slot = sequence * max_len + torch.arange(total, device=q.device) - cu[:-1].long()[sequence]

    def padded(x):
        return x.new_zeros(count * max_len, heads, dim).index_copy(0, slot, x).view(count, max_len, heads,
                                                                                  dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True,
                                                           scale=scale)
    return out.transpose(1, 2).reshape(count * max_len, heads, dim)[slot]


def unsuited(config, max_length):
    """Why attention per whole sequence would not be this model's attention (None: it is). A sliding window changes
    nothing where no sequence is longer than it, and the steps drop every row longer than max_length."""
    window = getattr(config, "sliding_window", None)
    if not full_attention_only(config) and (max_length is None or not window or window < max_length):
        return f"sliding-window attention (window {window}, max_length {max_length})"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    return None


def unavailable(dtype):
    """Why the Flash varlen kernel can't run here, or None when it can."""
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
    try:  # the kernel itself, on a few tokens: a build without it fails here, not inside the first step
        q = torch.randn(6, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, 2, 6], device="cuda", dtype=torch.int32)
        flash_attend(q, q, q, cu, 4).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: not here
        return f"the kernel failed on this GPU ({type(e).__name__}: {str(e)[:200]})"
    return None


def load(model_args, max_length):
    """(the model for training, the attention it trains with). transformers knows "varlen" only once registered, so
    the model loads with SDPA and `apply` switches it; TRL's ModelConfig is left as it was given."""
    asked = model_args.attn_implementation
    if asked == NAME:
        model_args.attn_implementation = "sdpa"
    try:
        model = load_for_training(model_args)
    finally:
        model_args.attn_implementation = asked
    return model, apply(model, asked, max_length)


def apply(model, asked, max_length=None):
    """Where `asked` is "varlen", switch a loaded model to the Flash varlen kernel where it runs here, else (saying
    once why) to "varlen_sdpa", the same boundaries through SDPA; where attention per sequence is not this model's
    (`unsuited`: a sliding window shorter than max_length) SDPA stays, with transformers' own masks. Returns the
    attention implementation the model trains with."""
    if asked == NAME:
        misfit = unsuited(model.config.get_text_config(decoder=True), max_length)
        if misfit:
            say_once(f"training: varlen attention off ({misfit}); SDPA with transformers' masks")
            return model.config._attn_implementation
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32),
                     model.dtype)
        why = unavailable(dtype)
        if why:
            say_once(f"training: Flash varlen kernel off ({why}); each packed sequence goes through SDPA instead "
                     "(exact; attention padded to the micro-batch's longest sequence)")
        register()
        model.set_attn_implementation(SDPA_NAME if why else NAME)
    return model.config._attn_implementation


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, functools.partial(varlen_attention, flash=True))
    AttentionInterface.register(SDPA_NAME, functools.partial(varlen_attention, flash=False))
    # As for flash attention: no 4D mask is built; a 2D padding mask (or None) comes through as it is.
    for name in (NAME, SDPA_NAME):
        AttentionMaskInterface.register(name, flash_attention_mask)


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


TREE_KEYS = ("tree_index", "tree_cu_seq_lens", "tree_max_length", "tree_keep")


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, flash=True, **kwargs):
    """transformers' attention-function signature: query (B, H, S, D), key/value (B, KV, S, D) -> (B, S, H, D)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if attention_mask is not None and attention_mask.dim() != 2 or dropout or kwargs.get("softcap") \
            or key.shape[2] != length:
        # A prepared 4D mask, attention dropout, a KV cache (generation): not what this path is for.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    gqa = {}
    if kv_heads != heads:
        if flash and takes_gqa():
            gqa = {"enable_gqa": True}
        else:  # keys and values with the query's head count (transformers' repeat_kv order)
            groups = heads // kv_heads
            k = k[:, :, :, None].expand(batch, length, kv_heads, groups, dim).reshape(batch, length, heads, dim)
            v = v[:, :, :, None].expand(batch, length, kv_heads, groups, dim).reshape(batch, length, heads, dim)
    k = k.reshape(batch * length, -1, dim)
    v = v.reshape(batch * length, -1, dim)
    if kwargs.get("tree_index") is not None:  # packed DPO pairs: a prompt shared by two virtual sequences
        indices, keep = kwargs["tree_index"], kwargs["tree_keep"]
        cu, max_len = kwargs["tree_cu_seq_lens"].to(torch.int32), int(kwargs["tree_max_length"])
    else:
        cu, max_len, indices = boundaries(batch, length, attention_mask, kwargs.get("position_ids"),
                                          kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"), query.device)
        keep = None
    if indices is not None:
        q, k, v = q[indices], k[indices], v[indices]
    if flash:
        out = flash_attend(q, k, v, cu, max_len, scale=scaling, **gqa)
    else:
        out = sdpa_attend(q, k, v, cu, max_len, scale=scaling)
    if indices is not None:
        if keep is not None:
            indices, out = indices[keep], out[keep]
        out = out.new_zeros(batch * length, heads, dim).index_copy(0, indices, out)
    return out.reshape(batch, length, heads, dim), None
