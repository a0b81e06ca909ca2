"""lm-evaluation-harness's HFLM with its generative requests answered by the fast engine (common/generation/fastgen.py)
and its log-likelihood requests by the packed scorer (common/generation/loglik.py).

`EngineHFLM.generate_until` hands greedy requests to `fastgen.make_generator`'s SlotGenerator (continuous batching:
a row that ends frees its slot for the next prompt, where HFLM's batches wait for their longest answer) and gives
each the answer lm-eval's HFLM.generate_until gives at batch size 1:

- the context (already chat-templated by lm-eval when apply_chat_template is on) encoded by HFLM's own
  `tok_batch_encode`, left-truncated to max_length - max_gen_toks;
- `until` and `max_gen_toks` normalised as HFLM does (`normalize_gen_kwargs`, `handle_stop_sequences`: the
  tokenizer's EOS text joins the stop strings);
- a row ends where `generate` ends it: an EOS id of the model's generation_config or the tokenizer's EOS
  (`common.generation.engines.stop_ids`), max_gen_toks, or a stop string in the decoded last len+2 tokens (the check of
  lm-eval's `stop_sequences_criteria`; the engine itself only stops on tokens, so the row is cut afterwards);
- the text decoded without special tokens, `think_end_token` and `postprocess_generated_text` as in HFLM.

One difference, on purpose: the cap is max_gen_toks even where the model's generation_config sets max_new_tokens,
which `generate` lets override the max_length HFLM passes (HFLM's answers can then run past max_gen_toks).

Each answer goes to lm-eval's request cache (`self.cache_hook.add_partial`, as HFLM does) once its engine call
returns; a call takes ENGINE_CALL_SLOTS times the rows' worth of prompts, so a killed eval loses at most one call.
At batch size 1 each request is answered alone, one call each, as HFLM does.

HFLM's own `generate_until` answers what the engine can't: sampled requests (do_sample), options other than the
stop strings and the length (num_beams, repetition_penalty, max_length...), a model whose generation_config changes
greedy decoding (e.g. a repetition penalty), a seq2seq model, mixed precision, and every request where make_generator
returns no generator (SIT_FAST_GENERATE=0, a transformers version or model it does not run on); the reason is said
once. make_generator switches the model's attention to the engine's and may compile its norms and MLPs: the
generator's close() undoes both after each generate_until and drops its KV cache, so log-likelihood requests run on
the model exactly as loaded, whether or not generation ran first.

`EngineHFLM._loglikelihood_tokens` (under loglikelihood and loglikelihood_rolling) gives HFLM's answers, (sum of the
continuation's token log-probs, every token the argmax), from `loglik.score`: each context run once for all its
continuations (a tree mask), groups packed into rows of loglik_row_tokens and forwards of loglik_tokens, logits only
where scored, log_softmax in float32 (HFLM's is in the model's dtype unless softmax_dtype says otherwise: on a bf16
model HFLM's own answers carry bf16 rounding that these don't). Each answer goes to the request cache as its forward
returns, keyed as HFLM keys it (none for loglikelihood_rolling's windows, whose context string is None: HFLM caches
their document's total). HFLM's own `_loglikelihood_tokens` answers what the scorer can't: requests HFLM truncates
(context + continuation over max_length + 1 tokens, or over the model's sliding window), every request of a seq2seq
model, mixed precision, SIT_PACKED_LOGLIK=0, an attention implementation that takes no custom mask (flash
attention), and a model where the scorer's self-check (`loglik.check`) disagrees with plain forwards; said once.

Library internals (lm-eval 0.4.13): HFLM.generate_until's behaviour as described above (re-implemented here,
not called), HFLM's attributes `backend`, `truncation`, `think_end_token`, `mixed_precision_dtype`, `cache_hook`,
`batch_size`, `max_length`, `max_gen_toks`, `tok_batch_encode`, `tok_decode`, and the module functions
`lm_eval.models.utils.normalize_gen_kwargs`, `handle_stop_sequences`, `postprocess_generated_text`; for
log-likelihoods, the requests `_loglikelihood_tokens` gets ((context, continuation) strings, context_enc,
continuation_enc) and HFLM's truncation rule, `rank`, `cache_hook.add_partial("loglikelihood", ...)`, and for the
batched tokenization, `_encode_pair`'s rule (trailing spaces moved to the continuation), HFLM.tok_encode's special
tokens rule (`add_bos_token`, `prefix_token_id`, `lm_eval.models.utils._add_special_kwargs`, `has_bos_prefix`).
tests/test_eval_engine.py and tests/test_loglik.py check the answers against HFLM's own.
"""

import os
import sys
from typing import NamedTuple

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from common import say_once
from common.generation import fastgen, loglik
from common.generation.engines import stop_ids
from common.generation.sampling import Sampling, first_stop

# Prompts per engine call, in slots: more keeps the slots busy (fewer drains at a call's end), fewer gets answers
# into the request cache sooner (a killed eval redoes at most one call).
ENGINE_CALL_SLOTS = 8
# Rows for --batch-size auto (HFLM's batch size detection is for its own batches): at most this many decode at once,
# as the engine's KV pages allow.
AUTO_ROWS = 128
# Generation options that do nothing when decoding greedily (lm-eval's gen_kwargs often carry a temperature).
SAMPLING_ONLY = {"do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}
# generation_config settings that change greedy decoding, with the value at which they do nothing (None: unset).
GREEDY_NEUTRAL = {
    "num_beams": 1, "penalty_alpha": None, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "guidance_scale": 1.0, "watermarking_config": None,
}
# The packed scorer's self-check (loglik.check) against plain forwards: a model that ignores the tree mask or the
# position ids is off by 7-12 nats there; rounding, by about 1e-5 in float32 and up to ~0.5 in bf16 (the probe's
# 17-token continuation, plain bf16 logits against the scorer's: 0.52 measured on a CPU with bf16) or 4-bit.
CHECK_TOLERANCE_FP32 = 1e-3
CHECK_TOLERANCE_HALF = 2.0


class Plan(NamedTuple):
    """How the engine answers a group of requests with the same options."""

    until: tuple  # stop strings, the EOS text included
    max_gen_toks: int
    max_ctx_len: int  # prompts are left-truncated to this many tokens


def neutral(key, value):
    return value is None or value == GREEDY_NEUTRAL.get(key, object())


class EngineHFLM(HFLM):
    """HFLM whose generate_until runs on the fast engine and whose log-likelihood requests run through the packed
    scorer where they can (see the module docstring). `engine_answered` counts the requests the engine answered,
    `engine_off` holds why it did not run (None while it does); `packed_answered` and `packed_off` the same for the
    scorer. loglik_row_tokens / loglik_tokens: the scorer's tokens per row / per forward (None: loglik's defaults)."""

    def __init__(self, *args, gen_rows=None, loglik_row_tokens=None, loglik_tokens=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen_rows = gen_rows
        self.engine_answered = 0
        self.engine_off = None
        self.loglik_tokens = loglik_tokens or loglik.BATCH_TOKENS
        self.loglik_row_tokens = min(loglik_row_tokens or loglik.ROW_TOKENS, self.loglik_tokens)
        self.packed_answered = 0
        self.packed_off = None
        self.packed_check = None  # self_check's finding: None before it runs, "" where the scorer agrees
        self.encoded = {}  # a loglikelihood call's strings, tokenized up front (encode_all)

    @property
    def engine_rows(self):
        """Rows the engine decodes at once: gen_rows where given (the tier's generation rows, EVAL_GEN_ROWS), else
        the eval's batch size (EVAL_BATCH)."""
        if self.gen_rows:
            return self.gen_rows
        return self.batch_size if isinstance(self.batch_size, int) else AUTO_ROWS

    # ---- which requests the engine takes ---------------------------------------------------------------------------
    def model_settings_why_not(self):
        """Why greedy decoding by the model's generation_config is not plain argmax (None where it is)."""
        config = getattr(self.model, "generation_config", None)
        changed = sorted(k for k in GREEDY_NEUTRAL if not neutral(k, getattr(config, k, None)))
        if changed:
            return "the model's generation_config sets " + ", ".join(f"{k}={getattr(config, k)!r}" for k in changed)
        return None

    def plan(self, gen_kwargs):
        """A Plan for a request's gen_kwargs, or why the engine can't answer it (a str)."""
        if self.backend != "causal":
            return f"a {self.backend} model"
        if self.mixed_precision_dtype is not None:
            return "mixed precision"
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample"):
            return "sampling (do_sample)"
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        other = sorted(k for k, v in kwargs.items() if k not in SAMPLING_ONLY and not neutral(k, v))
        if other:
            return "options " + ", ".join(f"{k}={kwargs[k]!r}" for k in other)
        if self.max_length - max_gen_toks <= 0:
            return "max_gen_toks not below the model's max_length"  # HFLM's own says so
        return self.model_settings_why_not() or Plan(tuple(until), max_gen_toks, self.max_length - max_gen_toks)

    # ---- generate_until ------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm=False):
        plans = [self.plan(request.args[1]) for request in requests]
        mine = [i for i, p in enumerate(plans) if isinstance(p, Plan)]
        for why in dict.fromkeys(p for p in plans if not isinstance(p, Plan)):
            say_once(f"eval: generative requests with {why} go through lm-eval's own generate, not the fast engine")
        if not mine:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # PEFT: LoRA in it
        generator, why_not = fastgen.make_generator(model, self.tokenizer.pad_token_id, slots=self.engine_rows)
        if generator is None:  # make_generator left the model as it was
            self.engine_off = why_not
            say_once(f"eval: generative requests through lm-eval's own generate ({why_not})")
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

        answers = [None] * len(requests)
        try:
            self.engine_off = None
            rows = self.engine_rows
            print(f"eval: {len(mine)} generative requests through the fast engine, {rows} row{'s' * (rows > 1)} "
                  "at once", file=sys.stderr, flush=True)
            self.run_engine(generator, requests, plans, mine, answers, disable_tqdm)
        finally:
            generator.close()
        rest = [i for i, p in enumerate(plans) if not isinstance(p, Plan)]
        if rest:
            for i, answer in zip(rest, super().generate_until([requests[i] for i in rest], disable_tqdm=disable_tqdm)):
                answers[i] = answer
        return answers

    def run_engine(self, generator, requests, plans, mine, answers, disable_tqdm):
        """Answer requests[i] for i in `mine` into answers[i]: per Plan, longest prompts first (as HFLM orders
        them), ENGINE_CALL_SLOTS x rows prompts a call (one at batch size 1: each request alone), each answer into
        the request cache as its call returns."""
        stops = stop_ids(self.tokenizer, self.model)
        chunk = 1 if self.engine_rows == 1 else ENGINE_CALL_SLOTS * self.engine_rows
        pbar = tqdm(total=len(mine), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running generate_until requests (fast engine)")
        groups = {}
        for i in mine:
            groups.setdefault(plans[i], []).append(i)
        for plan, members in groups.items():
            sampling = Sampling(max_new_tokens=plan.max_gen_toks, temperature=0.0, stop_token_ids=stops,
                                stop_strings=plan.until)
            prompts = {i: self.encode_context(requests[i].args[0], plan.max_ctx_len) for i in members}
            order = sorted(members, key=lambda i: (-len(prompts[i]), requests[i].args[0]))
            for start in range(0, len(order), chunk):
                part = order[start : start + chunk]
                rows, _ = generator.generate([prompts[i] for i in part], sampling)
                for i, row in zip(part, rows):
                    answers[i] = self.answer_text(row, plan.until, stops)
                    self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
                    pbar.update(1)
                self.engine_answered += len(part)
        pbar.close()

    def encode_context(self, context, max_ctx_len):
        """The prompt's token ids as HFLM.generate_until makes them (special tokens by its rule, left-truncated)."""
        ids, _ = self.tok_batch_encode([context], left_truncate_len=max_ctx_len, truncation=self.truncation)
        return ids[0].tolist()

    def answer_text(self, row, until, stops):
        """HFLM's text for an engine row: the row cut where generate's stopping criteria would have ended it, then
        decoded and post-processed as HFLM.generate_until does."""
        ids = [int(t) for t in row]
        stop = first_stop(ids, stops)  # the engine ends rows there already
        cont_toks = ids[: min(len(ids) if stop is None else stop + 1, self.string_stop(ids, until))]
        if isinstance(self.think_end_token, int):  # from here on, HFLM.generate_until's lines
            think = [k for k, t in enumerate(cont_toks) if t == self.think_end_token]
            if think:
                cont_toks = cont_toks[think[-1] + 1 :]
        s = self.tok_decode(cont_toks)
        if isinstance(self.think_end_token, int):
            s = s.lstrip()
        return postprocess_generated_text(generation=s, stop=list(until),
                                          think_end_token=self.think_end_token
                                          if isinstance(self.think_end_token, str) else None)

    def string_stop(self, ids, until):
        """How many tokens generate keeps before lm-eval's stop-string criteria end the row (len(ids) if never):
        MultiTokenEOSCriteria checks, after each token, whether a stop string is in the decoded last
        len(tokens of the string) + 2 generated tokens."""
        end = len(ids)
        for stop in until:
            width = len(self.tokenizer.encode(stop, add_special_tokens=False)) + 2
            windows = [ids[max(0, k + 1 - width) : k + 1] for k in range(end)]
            if windows:
                hit = next((k + 1 for k, text in enumerate(self.tokenizer.batch_decode(windows)) if stop in text), end)
                end = min(end, hit)
        return end

    # ---- log-likelihood ------------------------------------------------------------------------------------------
    def packed_why_not(self):
        """Why the packed scorer can't answer this model's requests (None where it can)."""
        if self.backend != "causal":
            return f"a {self.backend} model"
        if self.mixed_precision_dtype is not None:
            return "mixed precision"
        if os.environ.get("SIT_PACKED_LOGLIK", "1") == "0":
            return "SIT_PACKED_LOGLIK=0"
        return loglik.refusal(self.model) or self.self_check()

    def self_check(self):
        """Why the scorer disagrees with plain forwards on loglik.check's probe (None where it agrees); run once."""
        if self.packed_check is None:
            exact = self.model.get_input_embeddings().weight.dtype == torch.float32 and not getattr(
                self.model, "is_quantized", False)  # bitsandbytes rounds to 16 bits even at float32 compute
            tolerance = CHECK_TOLERANCE_FP32 if exact else CHECK_TOLERANCE_HALF
            try:
                off = loglik.check(self.model)
                self.packed_check = "" if off <= tolerance else f"its self-check is {off:.3g} off plain forwards"
            except Exception as e:  # a forward that won't take the mask, the position ids or the decoder call
                self.packed_check = f"its self-check failed: {type(e).__name__}: {e}"
        return self.packed_check or None

    def packed_limit(self):
        """The most tokens (context + continuation) of a request the scorer answers: HFLM truncates longer ones to
        max_length + 1, and none may pass a sliding window."""
        window = loglik.longest(self.model)
        return min(self.max_length + 1, window or self.max_length + 1)

    # ---- tokenization: every string of a loglikelihood call encoded up front -----------------------------------------
    def loglikelihood(self, requests, disable_tqdm=False):
        """HFLM's, with the strings its _encode_pair will encode tokenized first, in one batched call per
        special-tokens setting, a context shared by several continuations once (one tokenizer call a string cost
        ~0.2 ms on a CPU core: 2 a request, seconds on MMLU's 56,000 requests). tok_encode then reads them."""
        self.encoded = self.encode_all([request.args for request in requests])
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self.encoded = {}

    def encode_all(self, pairs):
        """{string: token ids} for the strings _encode_pair encodes for these (context, continuation) pairs, each
        with the special tokens tok_encode would give it."""
        strings = set()
        for context, continuation in pairs:
            if context and self.backend == "causal":  # as _encode_pair: trailing spaces go to the continuation
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                strings.update((context, context + continuation))
        by_setting = {}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        for string in strings:
            kwargs = _add_special_kwargs(None, self.add_bos_token)
            if has_bos_prefix(string, prefix):
                kwargs["add_special_tokens"] = False
            by_setting.setdefault(kwargs.get("add_special_tokens"), []).append(string)
        encoded = {}
        for special, group in by_setting.items():
            kwargs = {} if special is None else {"add_special_tokens": special}
            encoded.update(zip(group, self.tokenizer(group, **kwargs)["input_ids"]))
        return encoded

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        encoded = getattr(self, "encoded", None)
        if encoded and add_special_tokens is None and not left_truncate_len and not kwargs and string in encoded:
            return list(encoded[string])
        return super().tok_encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len,
                                  **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        why = self.packed_off = self.packed_why_not()
        if why is not None:
            say_once(f"eval: log-likelihood requests through lm-eval's own HFLM, not the packed scorer ({why})")
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        limit = self.packed_limit()
        mine = [i for i, (_, ctx, cont) in enumerate(requests) if ctx and cont and len(ctx) + len(cont) <= limit]
        rest = sorted(set(range(len(requests))) - set(mine))
        if rest:
            say_once(f"eval: log-likelihood requests over {limit} tokens (context + continuation) go through lm-eval's "
                     "own HFLM, which truncates them")
        answers = [None] * len(requests)
        if mine:
            self.run_packed(requests, mine, answers, disable_tqdm)
        if rest:
            theirs = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm=disable_tqdm,
                                                   override_bs=override_bs)
            for i, answer in zip(rest, theirs):
                answers[i] = answer
        return answers

    def run_packed(self, requests, mine, answers, disable_tqdm):
        """Answer requests[i] for i in `mine` into answers[i] through loglik.score, each answer into the request
        cache as its forward returns (HFLM's key: the (context, continuation) strings; none where they are None)."""
        pbar = tqdm(total=len(mine), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running loglikelihood requests (packed)")

        def done(k, answer):
            request_str = requests[mine[k]][0]
            answers[mine[k]] = answer
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            self.packed_answered += 1
            pbar.update(1)

        loglik.score(self.model, [requests[i][1:] for i in mine], row_tokens=self.loglik_row_tokens,
                     batch_tokens=self.loglik_tokens, progress=done)
        pbar.close()
