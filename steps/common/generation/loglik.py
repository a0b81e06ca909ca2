"""Log-likelihood of lm-eval's (context, continuation) requests, each context run once for all its continuations.

This module owns the packed scorer behind EngineHFLM._loglikelihood_tokens (common/generation/eval_engine.py). It is
not part of the generation engine (fastgen.py): the engine's prefill is causal-only over a paged KV cache and has no
tree mask; this is a prefill-only scorer that runs the model's own forward, with a 4D attention mask of its own.

HFLM runs (context + continuation)[:-1] once per request, padded to its batch's longest, and takes log_softmax over
every position and the whole vocabulary. Here:

- Requests with the same context form a group: the context once, then each continuation but its last token (scored,
  never input, as in HFLM). A tree mask lets a continuation's tokens see the whole context and their own earlier
  tokens only, and their position ids restart at len(context), so every token gets the hidden state it gets in
  HFLM's sequence. A continuation's first token is scored at the context's last token (shared by the group: computed
  once), each later one at the token before it.
- Groups are packed into rows of at most `row_tokens` (best-fit decreasing; a group longer than that is split into
  pieces that each repeat the context), rows into forwards of at most `batch_tokens` padded tokens, longest first.
- Only the scored positions go through the LM head: the decoder's hidden states (`get_decoder()`) are gathered at
  them and `get_output_embeddings()` applied to those alone, log_softmax in float32 a chunk at a time. (Transformers'
  `logits_to_keep` keeps the same positions in every row before 5.24: the union of a forward's rows, 4x the LM head
  work and logits memory at 4 rows; on an H100 the HellaSwag-shaped requests ran 2x HFLM with it.) A model whose
  causal-LM forward does more than `lm_head(hidden)` (logit soft-capping, scaling) fails the self-check (`check`).

Same answers as HFLM up to float summation order: the sum of the continuation's token log-probs, and whether each
token is the argmax. Not for requests HFLM truncates (len(context + continuation) > max_length + 1): the caller
sends those to HFLM. `refusal` says where the path can't run (an attention implementation that takes no custom mask,
a model without a decoder and output embeddings to call, PEFT prompt learning); `check` compares it with plain
forwards on a probe, which catches a model that ignores the mask or the position ids, or computes its logits
otherwise; `longest` bounds requests where a sliding window would apply (the custom mask is given to every layer as
it is, so the window would not be).

Memory per forward: the mask is rows x T^2 booleans (T: the longest row, row_tokens unless one group is longer;
SDPA makes it an additive mask in the model's dtype, eager attention takes a float one from us), activations are
rows x T <= batch_tokens tokens, the kept logits one per scored token in the model's dtype, the float32
log_softmax LOGSOFTMAX_ROWS x vocab.

Library internals (transformers 5.17 and torch 2.11 on the GPU, 5.24 and 2.13 in the CPU tests): the model config's
`_attn_implementation` says which attention runs (refusal, model_mask); a 4D attention_mask
is returned as it is by transformers.masking_utils (`_preprocess_mask_arguments`) for every attention implementation,
also to sliding-window layers. SDPA takes our boolean mask (True = attend) and then never sets is_causal; with a mask
transformers repeats GQA's key/value heads (no enable_gqa); on an H100 (torch 2.11) SDPA ran a bool or float mask
through cuDNN's attention in bf16/fp16 and the memory-efficient kernel in fp32 (flash refuses any mask). Eager
attention adds the mask to its scores, so it gets a float one (0 / dtype min).
"""

import bisect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Defaults for the token budgets (the eval step passes its own). A row's mask is ROW_TOKENS^2 booleans (4 MiB); a
# forward holds BATCH_TOKENS padded tokens, and at most that many positions' logits (8192 x 128k vocab x 2 bytes =
# 2 GiB in bf16).
ROW_TOKENS = 2048
BATCH_TOKENS = 8192
LOGSOFTMAX_ROWS = 1024  # positions a float32 log_softmax takes at once (512 MiB at a 128k vocabulary)
PAD_TO = 16  # rows are padded to a multiple of this: SDPA's memory-efficient kernel wants an aligned mask
MASK_IMPLEMENTATIONS = ("sdpa", "eager")  # attention that takes a custom 4D mask as it is


@dataclass
class Piece:
    """A context and continuations of it, laid out as the context then each continuation less its last token."""

    ctx: tuple
    conts: list = field(default_factory=list)  # (continuation, [indices of the requests that ask for it])
    length: int = 0


# ---- what the path runs on ---------------------------------------------------------------------------------------
def base_model(model):
    """The transformers model under a PeftModel (LoRA layers are in it), else the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def refusal(model):
    """Why the packed path can't run on this model (None where it can)."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in MASK_IMPLEMENTATIONS:
        return f"{attention} attention takes no custom 4D mask"
    lm = base_model(model)
    if not hasattr(lm, "get_decoder") or lm.get_output_embeddings() is None:
        return f"{type(lm).__name__} has no decoder and output embeddings to call apart"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return "PEFT prompt learning (virtual tokens)"
    return None


def longest(model):
    """The most tokens (context + continuation) a request may have here: a sliding or chunked attention window would
    not be applied (the custom mask replaces the model's), so requests must fit in it (None: no bound)."""
    config = model.config
    windows = [getattr(config, k, None) for k in ("sliding_window", "attention_chunk_size")]
    windows = [w for w in windows if isinstance(w, int) and w > 0]
    return min(windows) if windows else None


def check(model):
    """Largest |log-prob difference| between this path and plain causal forwards (HFLM's way) on a probe: a context
    with continuations of different lengths, one of them a single token. A model that ignores the tree mask or the
    position ids is off by nats; rounding by far less."""
    ids = torch.randint(model.config.vocab_size, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    ctx, conts = ids[:12], [ids[12:30], ids[30:31], ids[31:43], ids[43:60]]
    requests = [(ctx, c) for c in conts] + [(ids[5:9], ids[50:56])]
    device = model.get_input_embeddings().weight.device
    packed = score(model, requests, row_tokens=ROW_TOKENS, batch_tokens=BATCH_TOKENS)
    with torch.inference_mode():
        worst = 0.0
        for (c, cont), (logprob, _) in zip(requests, packed):
            logits = model(input_ids=torch.tensor([(c + cont)[:-1]], device=device), use_cache=False).logits
            lp = F.log_softmax(logits[0, len(c) - 1 :].float(), dim=-1)
            plain = float(lp.gather(1, torch.tensor(cont, device=device)[:, None]).sum())
            worst = max(worst, abs(plain - logprob))
    return worst


# ---- packing -----------------------------------------------------------------------------------------------------
def pieces(requests, row_tokens):
    """Requests grouped by context (identical continuations of a context asked once); a group longer than row_tokens
    is cut into pieces that each repeat the context."""
    groups = {}
    for i, (ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
    out = []
    for ctx, conts in groups.items():
        piece = Piece(ctx, length=len(ctx))
        for cont, owners in conts.items():
            if piece.conts and piece.length + len(cont) - 1 > row_tokens:
                out.append(piece)
                piece = Piece(ctx, length=len(ctx))
            piece.conts.append((cont, owners))
            piece.length += len(cont) - 1
        out.append(piece)
    return out


def pack(pieces, row_tokens):
    """Rows of pieces, each at most row_tokens long (a longer piece alone): best-fit decreasing, through a sorted list
    of the rows' free room, so it stays fast for many thousands of pieces."""
    rows, free = [], []  # free: sorted (room, row index)
    for piece in sorted(pieces, key=lambda p: -p.length):
        k = bisect.bisect_left(free, (piece.length, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = row_tokens, len(rows)
            rows.append([])
        rows[r].append(piece)
        if room - piece.length > 0:
            bisect.insort(free, (room - piece.length, r))
    return rows


def row_length(row):
    return sum(piece.length for piece in row)


def padded(n):
    return -(-n // PAD_TO) * PAD_TO


def batches(rows, batch_tokens):
    """Rows grouped into forwards of at most batch_tokens padded tokens (one row at least), longest rows first (as
    HFLM orders its requests: a forward too big for memory fails at once)."""
    batch = []
    for row in sorted(rows, key=row_length, reverse=True):
        if batch and (len(batch) + 1) * padded(row_length(batch[0])) > batch_tokens:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


# ---- one forward -------------------------------------------------------------------------------------------------
def layout(rows):
    """The forward's inputs as [rows, T] lists (token ids, position ids, group of each token in its row, branch: 0 for
    a context, k for its k-th continuation; padding is group -1) and what to score: per continuation, its requests,
    the (row, position) of each of its tokens' logits and the tokens."""
    T = padded(max(row_length(row) for row in rows))
    ids, pos, doc, branch, scored = [], [], [], [], []
    for b, row in enumerate(rows):
        r_ids, r_pos, r_doc, r_branch = [], [], [], []
        for d, piece in enumerate(row):
            n, last = len(piece.ctx), len(r_ids) + len(piece.ctx) - 1
            r_ids += piece.ctx
            r_pos += range(n)
            r_doc += [d] * n
            r_branch += [0] * n
            for k, (cont, owners) in enumerate(piece.conts, 1):
                start, m = len(r_ids), len(cont) - 1
                scored.append((owners, [(b, last)] + [(b, start + j) for j in range(m)], cont))
                r_ids += cont[:-1]
                r_pos += range(n, n + m)
                r_doc += [d] * m
                r_branch += [k] * m
        pad = T - len(r_ids)
        ids.append(r_ids + [0] * pad)
        pos.append(r_pos + [0] * pad)
        doc.append(r_doc + [-1] * pad)
        branch.append(r_branch + [0] * pad)
    return ids, pos, doc, branch, scored


def tree_mask(doc, branch):
    """[rows, 1, T, T] boolean, True = attend: a token sees the earlier tokens of its own group that are context or
    on its own branch (and itself). Padding is a group of its own, so no real token sees it and no row of the mask is
    empty (an empty one would give NaN, and NaN times a zero weight is still NaN)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    same_group = doc[:, :, None] == doc[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal & same_group & visible)[:, None]


def model_mask(model, mask):
    """The mask as the model's attention takes it: boolean for SDPA, additive float (0 / dtype min) for eager."""
    if model.config._attn_implementation == "sdpa":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def kept_logits(model, ids, pos, mask, at):
    """The logits at the (row, position) pairs `at` ([n, 2]): the decoder's last hidden states there, through the
    LM head; no other position's logits are computed."""
    lm = base_model(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return lm.get_output_embeddings()(hidden[at[:, 0], at[:, 1]])


def token_scores(logits, targets):
    """Per scored token (a row of logits each): log p(target) and whether target is the argmax there (HFLM's
    log_softmax and argmax, in float32, LOGSOFTMAX_ROWS rows at a time)."""
    logprobs = torch.empty(len(targets), device=logits.device)
    greedy = torch.empty(len(targets), dtype=torch.bool, device=logits.device)
    for start in range(0, len(targets), LOGSOFTMAX_ROWS):
        part = F.log_softmax(logits[start : start + LOGSOFTMAX_ROWS].float(), dim=-1)
        wanted = targets[start : start + len(part)]
        logprobs[start : start + len(part)] = part.gather(1, wanted[:, None]).squeeze(1)
        greedy[start : start + len(part)] = part.argmax(-1) == wanted
    return logprobs, greedy


def run_forward(model, rows, device):
    """[(request index, (logprob, is_greedy))] for every request in these rows, from one forward."""
    ids, pos, doc, branch, scored = layout(rows)
    ids, pos, doc, branch = (torch.tensor(x, device=device) for x in (ids, pos, doc, branch))
    at = torch.tensor([p for _, where, _ in scored for p in where], device=device)
    targets = torch.tensor([t for _, _, cont in scored for t in cont], device=device)
    owner = torch.tensor([c for c, (_, _, cont) in enumerate(scored) for _ in cont], device=device)
    logits = kept_logits(model, ids, pos, model_mask(model, tree_mask(doc, branch)), at)
    logprobs, greedy = token_scores(logits, targets)
    sums = torch.zeros(len(scored), device=device).index_add_(0, owner, logprobs).tolist()
    misses = torch.zeros(len(scored), device=device).index_add_(0, owner, (~greedy).float()).tolist()
    return [(i, (s, miss == 0)) for (owners, _, _), s, miss in zip(scored, sums, misses) for i in owners]


def score(model, requests, *, row_tokens=ROW_TOKENS, batch_tokens=BATCH_TOKENS, progress=None):
    """[(logprob, is_greedy)] for requests [(context_enc, continuation_enc)] (token ids as HFLM's _encode_pair makes
    them; both non-empty, none that HFLM would truncate), in their order. progress(i, answer) is called for each
    request as its forward returns."""
    answers = [None] * len(requests)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        for rows in batches(pack(pieces(requests, row_tokens), row_tokens), batch_tokens):
            for i, answer in run_forward(model, rows, device):
                answers[i] = answer
                if progress is not None:
                    progress(i, answer)
    return answers
