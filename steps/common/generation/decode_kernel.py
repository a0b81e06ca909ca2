"""Decoding attention over the paged KV cache as a Triton kernel: one query token per slot, grouped-query heads, each
slot reading only the keys it holds, page by page through its block table, the keys split over several programs
when few slots decode (flash decoding), the slots with the most keys started first (a row of 4,000 keys among rows
of 500 otherwise ran on alone at the end of a layer: at 512 rows of the bench's mix, 1.25 ms a step more than rows
of even length, 0.7 ms with the order; bench/README.md).

Why not flash attention's varlen kernel (whose torch 2.11 form takes no block table): its tile is 128 query rows,
and a decoding step has only a KV head's query heads to put in it (4 for Llama-3.1-8B), so it computes 32 times the
useful products and is bound by that, not by reading the cache. Profiled on an H200
(bench/results/profile-step-flash-h200.txt): half of a 256-slot step of the 8B model, 350 us a layer for ~750 keys a
slot, where reading those keys takes ~85 us. Here a program holds one slot's KV head with its query heads padded to
16 rows (tl.dot's least), so the work stays bound by the reads.

    out = attend(query, key_pages, value_pages, lengths, table, scale)
    # (S, H, 1, D); (pages, PAGE, KV, D) pools; (S,) int32 key counts; (S, max_pages) int32 page ids

`available()` says whether it can run here (triton and a CUDA GPU; on a T4, sm75, triton computes `tl.dot` in fp16
without bf16); fastgen checks its output against a plain forward before it is used, and decodes with SDPA where it
is not. Against flash attention it is 1.9x faster at 256 slots and 3.7x at 8, at ~4 TB/s
(bench/results/decode-attention-h200.json); bench/decode_attention.py times the longest-first order against slot
order (decode-attention-h200-order.json).
"""

import functools
import importlib.util

import torch

BLOCK_N = 64  # keys a loop iteration reads
MIN_ROWS = 16  # tl.dot's smallest M: the query heads of a KV head are padded up to this
PROGRAMS_PER_SM = 4  # split the keys until about this many programs run per multiprocessor


def available():
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial(Q, K, V, Lens, Table, Order, Out, Acc, Stats, scale, stride_qs, stride_qh, stride_kp, stride_kl,
                stride_kh, stride_vp, stride_vl, stride_vh, stride_t, stride_os, stride_oh,
                G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr,
                SPLITS: tl.constexpr):
        # programs start in grid order, KV heads fastest: the slots with the most keys first (`Order`), so that no
        # long row is left running alone at the end while the GPU idles around it
        h, j = tl.program_id(0), tl.program_id(2)
        s = tl.load(Order + tl.program_id(1)).to(tl.int64)  # s x stride: past 2**31
        length = tl.load(Lens + s)
        share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        start = j * share
        end = tl.minimum(start + share, length)
        g, d, n = tl.arange(0, ROWS), tl.arange(0, D), tl.arange(0, BLOCK)
        q = tl.load(Q + s * stride_qs + (h * G + g)[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None],
                    other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        for first in range(start, end, BLOCK):  # BLOCK keys, all on one page (PAGE is a multiple of BLOCK)
            page = tl.load(Table + s * stride_t + first // PAGE).to(tl.int64)
            pos = first + n
            valid = pos < end
            within = (first % PAGE + n)[:, None]
            k = tl.load(K + page * stride_kp + within * stride_kl + h * stride_kh + d[None, :], mask=valid[:, None],
                        other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(V + page * stride_vp + within * stride_vl + h * stride_vh + d[None, :], mask=valid[:, None],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if SPLITS == 1:  # the whole row here: normalise and write the output
            out = acc / total[:, None]
            tl.store(Out + s * stride_os + (h * G + g)[:, None] * stride_oh + d[None, :],
                     out.to(Out.dtype.element_ty), mask=(g < G)[:, None])
        else:  # a share of the keys: its unnormalised sum, maximum and total, for `combine`
            row = ((s * tl.num_programs(0) + h) * SPLITS + j) * ROWS + g
            tl.store(Acc + row[:, None] * D + d[None, :], acc)
            tl.store(Stats + row * 2, m)
            tl.store(Stats + row * 2 + 1, total)

    @triton.jit
    def combine(Acc, Stats, Out, stride_os, stride_oh,
                G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
        s, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        g, d = tl.arange(0, ROWS), tl.arange(0, D)
        first = (s * tl.num_programs(1) + h) * SPLITS * ROWS
        top = tl.full([ROWS], float("-inf"), tl.float32)
        for j in tl.static_range(SPLITS):
            top = tl.maximum(top, tl.load(Stats + (first + j * ROWS + g) * 2))
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        for j in tl.static_range(SPLITS):
            row = first + j * ROWS + g
            weight = tl.exp(tl.load(Stats + row * 2) - top)  # an empty share: exp(-inf) = 0
            total += tl.load(Stats + row * 2 + 1) * weight
            acc += tl.load(Acc + row[:, None] * D + d[None, :]) * weight[:, None]
        tl.store(Out + s * stride_os + (h * G + g)[:, None] * stride_oh + d[None, :],
                 (acc / total[:, None]).to(Out.dtype.element_ty), mask=(g < G)[:, None])

    return partial, combine


@functools.cache
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def splits_for(slots, kv_heads, device):
    """Key shares per (slot, KV head): 1 while slots x KV heads fill the GPU, up to 16 as the batch drains."""
    programs = PROGRAMS_PER_SM * _multiprocessors(device.index or 0)
    splits = 1
    while splits < 16 and slots * kv_heads * splits * 2 <= programs:
        splits *= 2
    return splits


def longest_first(lengths):
    """The slots in the order their programs should start: the most keys first (int32)."""
    return torch.argsort(lengths, descending=True).to(torch.int32)


def attend(query, key, value, lengths, table, scale, order=None):
    """query (S, H, 1, D); key, value (pages, PAGE, KV, D) pools with unit stride on D; lengths (S,) int32: the keys
    slot s holds; table (S, max_pages) int32: slot s's pages in order; order (S,) int32: the slots, most keys first
    (longest_first(lengths); worked out here where not given). Returns (S, 1, H, D), as transformers' attention
    functions do."""
    partial, combine = _kernels()
    slots, heads, _, dim = query.shape
    page_size, kv_heads = key.shape[1], key.shape[2]
    assert page_size % BLOCK_N == 0, f"a page ({page_size} tokens) must hold whole blocks of {BLOCK_N}"
    groups = heads // kv_heads
    q = query[:, :, 0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    rows = max(MIN_ROWS, 1 << (groups - 1).bit_length())
    splits = splits_for(slots, kv_heads, query.device)
    out = torch.empty(slots, heads, dim, dtype=query.dtype, device=query.device)
    if splits > 1:
        acc = torch.empty(slots * kv_heads * splits * rows, dim, dtype=torch.float32, device=query.device)
        stats = torch.empty(slots * kv_heads * splits * rows * 2, dtype=torch.float32, device=query.device)
    else:
        acc = stats = out  # unused
    scale = dim ** -0.5 if scale is None else scale
    if order is None:
        order = longest_first(lengths)
    partial[(kv_heads, slots, splits)](
        q, key, value, lengths, table, order, out, acc, stats, scale, q.stride(0), q.stride(1), key.stride(0),
        key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2), table.stride(0),
        out.stride(0), out.stride(1),
        G=groups, ROWS=rows, D=dim, BLOCK=BLOCK_N, PAGE=page_size, SPLITS=splits, num_warps=4, num_stages=2)
    if splits > 1:
        combine[(slots, kv_heads)](acc, stats, out, out.stride(0), out.stride(1), G=groups, ROWS=rows, D=dim,
                                   SPLITS=splits, num_warps=4)
    return out.view(slots, 1, heads, dim)
