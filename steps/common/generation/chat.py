"""Chat templates: Magpie's pre-query template, turn boundaries, and templates for base models that lack one.

Everything is derived from the tokenizer's own chat template by rendering a conversation that holds a marker and
cutting at the marker, so any chat model works without a hand-written template per family.
"""

MARKER = "\u2063MAGPIE\u2063"  # invisible separators around a word no template contains

# For base models without a chat template (Mistral-7B-v0.1): a plain-text template whose turns end with the
# tokenizer's EOS, so the trained model learns to stop. The {% generation %} markers let TRL mask non-assistant tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Tokens that tokenizers reserve for padding, in order of preference; EOS is used only when none exists.
PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>"]


def _render(tokenizer, messages, add_generation_prompt=False, system=None):
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def pre_query_template(tokenizer, system=None, history=()):
    """The prompt text up to where the next user message begins (Magpie): the model then writes an instruction.

    `history` holds the earlier turns of a multi-turn conversation; the model then writes the follow-up.
    """
    text = _render(tokenizer, [*history, {"role": "user", "content": MARKER}], system=system)
    return text[: text.index(MARKER)]


def end_of_turn(tokenizer, role):
    """The text a template puts right after a `role` message's content, stripped (e.g. '<|eot_id|>', '[/INST]')."""
    messages = [{"role": "user", "content": MARKER}]
    if role == "assistant":
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": MARKER}]
    text = _render(tokenizer, messages)
    after = text[text.index(MARKER) + len(MARKER) :].strip()
    if not after:  # the template ends the turn with nothing (rare): fall back to EOS
        return tokenizer.eos_token
    # Cut at the first newline or the start of the next turn's header, whichever comes first.
    return after.split("\n")[0].strip() or tokenizer.eos_token


def prompt_text(tokenizer, instruction, system=None, history=()):
    """The full prompt for answering an instruction: template, earlier turns, user turn, assistant header."""
    messages = [*history, {"role": "user", "content": instruction}]
    return _render(tokenizer, messages, add_generation_prompt=True, system=system)


def prepare_tokenizer(tokenizer):
    """Give a base model's tokenizer a chat template and a pad token distinct from EOS where it lacks them."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in PAD_CANDIDATES:
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            # TRL pads labels by position, so an EOS pad no longer hides the EOS label from the loss.
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
