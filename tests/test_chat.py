from pathlib import Path

import pytest

from common.generation import chat
from common.models import load_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# family: (template file or None for the tokenizer's own, bos, eos, pre-query ending, end of user turn)
FAMILIES = {
    "llama-3.1-instruct": ("<|begin_of_text|>", "<|eot_id|>",
                           "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2.5-instruct": (None, "<|im_end|>", "<|im_end|>\n<|im_start|>user\n", "<|im_end|>"),
    "mistral-instruct": ("<s>", "</s>", "<s> [INST] ", "[/INST]"),
    "smollm2": (None, None, "trained by Hugging Face<|im_end|>\n<|im_start|>user\n", "<|im_end|>"),
}


def tokenizer_for(family):
    tokenizer = load_tokenizer("embedded:smollm2")
    bos, eos = FAMILIES[family][:2]
    if family != "smollm2":
        tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    if bos:
        tokenizer.bos_token = bos
    if eos:
        tokenizer.eos_token = eos
    return tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_query_template_stops_where_the_user_message_starts(family, smol):
    tokenizer = tokenizer_for(family)
    pre_query_end, user_end = FAMILIES[family][2:]
    pre_query = chat.pre_query_template(tokenizer)
    assert pre_query.endswith(pre_query_end)
    assert chat.end_of_turn(tokenizer, "user") == user_end
    # The pre-query template is exactly the head of a real conversation's rendering.
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False)
    assert full.startswith(pre_query) and full[len(pre_query):].startswith("Name a colour.")
    # ... and the response prompt continues that conversation with the assistant header.
    prompt = chat.prompt_text(tokenizer, "Name a colour.")
    assert prompt.startswith(pre_query + "Name a colour.")


def test_system_prompt_goes_before_the_user_turn(smol):
    tokenizer = tokenizer_for("llama-3.1-instruct")
    pre_query = chat.pre_query_template(tokenizer, system="You write maths problems.")
    assert "You write maths problems.<|eot_id|>" in pre_query
    assert pre_query.endswith("<|start_header_id|>user<|end_header_id|>\n\n")


def test_base_tokenizer_gets_template_and_distinct_pad_that_round_trip(smol):
    tokenizer = load_tokenizer("embedded:smollm2")
    tokenizer.chat_template = None
    tokenizer.pad_token = tokenizer.eos_token
    chat.prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert "What is 2+2?" in text and text.rstrip().endswith("4." + tokenizer.eos_token)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert chat.end_of_turn(tokenizer, "assistant") == tokenizer.eos_token
    # TRL's assistant-only masking needs generation markers.
    rendered = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "4." + tokenizer.eos_token
