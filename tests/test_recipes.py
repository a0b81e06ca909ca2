"""Generator recipes (env/generators/, steps/common/generation/recipes.py) on tiny models that carry the real tokenizer
configs of Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct and Mistral-7B-Instruct-v0.3: their special tokens at their real
ids, their chat templates, vocabulary sizes and generation_config end tokens (tests/fixtures/tokenizers, chat_templates).

The tiny models are bigram machines, so that what they write is known: every layer adds nothing to the residual
stream (o_proj and down_proj are zero), so the next token depends only on the current one, and the embeddings and
output rows are set so that after the end of a prompt the model writes "<Name|List|#|##> <three|five>
<primes|colours>?" and then its end token. Records then show whole instructions and responses.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_lines, run_step

from common import DataError
from common.generation import recipes
from common.generation.sanitize import sanitize

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("llama-3.1-instruct", "qwen2.5-instruct", "mistral-instruct")
# The directory names carry the Hub names, as a local copy of the model would.
DIRECTORY = {"llama-3.1-instruct": "Llama-3.1-8B-Instruct", "qwen2.5-instruct": "Qwen2.5-7B-Instruct",
             "mistral-instruct": "Mistral-7B-Instruct-v0.3"}
CHAIN = [["Name", "List", "#", "##"], ["Ġthree", "Ġfive"], ["Ġprimes", "Ġcolours"], ["?"]]
CHAIN_IDS = range(5000, 5010)  # where the chain's words sit in the vocabulary (clear of bytes and special tokens)
LOGIT = 30.0  # the chosen next tokens' logit; every other token's is about 0


def byte_alphabet():
    """GPT-2's byte-level alphabet in its id order (the order of the first 256 ids of Llama-3's and Qwen2's vocab)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


def build_tokenizer(spec, template):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: spec["byte_offset"] + i for i, c in enumerate(byte_alphabet())}
    words = [w for step in CHAIN for w in step if w not in vocab and w not in spec["vocab"]]
    assert len(words) <= len(CHAIN_IDS)
    vocab.update({w: i for w, i in zip(words, CHAIN_IDS)}, **spec["vocab"])
    merges = [(a, b) for a, b in (("#", "#"), ("##", "#"), ("##", "##")) if a + b in vocab]
    special = {int(i): t for i, t in spec["added_tokens"].items()}
    reserved = spec.get("reserved")
    if reserved:
        for k, i in enumerate(range(reserved["first_id"], reserved["end_id"])):
            special[i] = reserved["name"].format(reserved["first_index"] + k)
    plain = {int(i): t for i, t in spec.get("added_tokens_not_special", {}).items()}
    vocab.update({t: i for i, t in {**special, **plain}.items()})
    assert len(set(vocab.values())) == len(vocab), "two tokens at one id"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(special.items())])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in sorted(plain.items())])
    names = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if spec[k]}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    tokenizer.chat_template = template
    for i, t in special.items():  # the real ids, as the recipes' stop tokens resolve them
        assert tokenizer.convert_tokens_to_ids(t) == i
    return tokenizer


def build_model(family, directory):
    """The tiny bigram model of `family` (see the module docstring), saved with its tokenizer to `directory`."""
    import torch
    import transformers

    spec = json.loads((FIXTURES / "tokenizers" / f"{family}.json").read_text())
    tokenizer = build_tokenizer(spec, (FIXTURES / "chat_templates" / f"{family}.jinja").read_text())
    config = getattr(transformers, spec["architecture"].replace("ForCausalLM", "Config"))(
        vocab_size=spec["vocab_size"], hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
        tie_word_embeddings=False, **{k: v for k, v in spec["generation_config"].items() if k.endswith("token_id")})
    torch.manual_seed(0)
    model = getattr(transformers, spec["architecture"])(config).float().eval()
    def ids(tokens):
        found = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        assert None not in found and tokenizer.unk_token_id not in found, tokens
        return found

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 7] = 1.0  # any other token: near-uniform next token
        scale = LOGIT / 8 ** 0.5  # the final RMSNorm scales a one-hot embedding by sqrt(hidden size)
        # After the end of a prompt ("\n", " " or [/INST]): the chain's first words.
        starts = ids(["Ċ", "Ġ"] + (["[/INST]"] if "[/INST]" in spec["added_tokens"].values() else []))
        end = tokenizer.eos_token_id  # Llama-3.1: <|eot_id|>; Qwen2.5: <|im_end|>; Mistral: </s>
        for i in starts:
            embed[i] = 0.0
            embed[i, 0] = 1.0
        for step, words in enumerate(CHAIN):
            for i in ids(words):
                head[i] = 0.0
                head[i, step] = scale
                embed[i] = 0.0
                embed[i, step + 1] = 1.0
        head[end] = 0.0
        head[end, len(CHAIN)] = scale
    model.save_pretrained(directory)
    transformers.GenerationConfig(**spec["generation_config"]).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_model(family, tmp_path_factory.mktemp("models") / DIRECTORY[family])
        return built[family]
    return get


def generate(model, out, *args, check=True):
    return run_step("generate", "--model", model, "--out", out, "--seed", "1", "--dtype", "float32", *args,
                    check=check)


# What each family's record must show: Magpie's published settings (env/generators/*.yaml says where each is from),
# the stop tokens as the real ids.
EXPECTED = {
    "llama-3.1-instruct": dict(
        recipe="llama-3.1", sanitize="magpie-llama-3",
        pre_query_template="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        instruction_sampling=dict(max_new_tokens=1024, temperature=0.8, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                  stop_token_ids=[128009, 128008, 128001, 128006, 128007], stop_strings=["<|eot_id|>"],
                                  suppress_at_start=[2, 567, 14711, 827], loop_window=0),
        response_sampling=dict(max_new_tokens=4096, temperature=0.6, top_p=0.9, top_k=0, repetition_penalty=1.0,
                               stop_token_ids=[128009, 128008, 128001, 128006, 128007], stop_strings=["<|eot_id|>"],
                               suppress_at_start=[], loop_window=0)),
    "qwen2.5-instruct": dict(
        recipe="qwen2.5", sanitize=None,
        # configs/model_configs.json's template for Qwen2.5, which the chat template also renders
        pre_query_template="<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                           "<|im_end|>\n<|im_start|>user\n",
        instruction_sampling=dict(max_new_tokens=2048, temperature=0.7, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                  stop_token_ids=[151645, 151643, 151644], stop_strings=["<|im_end|>", "\n"],
                                  suppress_at_start=[], loop_window=0),
        response_sampling=dict(max_new_tokens=4096, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                               stop_token_ids=[151645, 151643, 151644], stop_strings=["<|im_end|>"],
                               suppress_at_start=[], loop_window=0)),
    "mistral-instruct": dict(
        recipe="mistral-instruct", sanitize=None, pre_query_template="<s> [INST] ",
        instruction_sampling=dict(max_new_tokens=2048, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                  stop_token_ids=[2, 4, 3, 1], stop_strings=["[/INST]", "\n"],
                                  suppress_at_start=[], loop_window=0),
        response_sampling=dict(max_new_tokens=4096, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                               stop_token_ids=[2, 4, 3, 1], stop_strings=["</s>"], suppress_at_start=[],
                               loop_window=0)),
}
WORDS = r"(Name|List|#|##) (three|five) (primes|colours)\?"


@pytest.mark.parametrize("family", FAMILIES)
def test_record_shows_the_recipe_prompt_and_every_sampling_setting(family, tiny, tmp_path):
    import re

    out = tmp_path / "gen.jsonl"
    generate(tiny(family), out, "--num-samples", "8", "--batch-size", "8")
    records = read_lines(out)
    print(f"\n{family}:\n{json.dumps(records[0], indent=2)}")
    settings = records[0]["settings"]
    assert {k: settings[k] for k in EXPECTED[family]} == EXPECTED[family]
    assert settings["system"] is None and settings["model"] == str(tiny(family))
    assert "Cutting Knowledge Date" not in settings["pre_query_template"]
    for r in records:
        assert r["settings"] == settings
        assert re.fullmatch(WORDS, r["instruction"]) and r["instruction_finished"] and not r["rejected"]
        assert re.fullmatch(WORDS, r["response"]) and r["response_finished"]
    if family == "llama-3.1-instruct":  # Magpie's de-markdown processor: no instruction starts with "#"
        assert not any(r["instruction"].startswith("#") for r in records)
        assert {r["sanitize_rule"] for r in records} == {"99.1"}
        assert all(r["raw_instruction"] == r["instruction"] for r in records)
    else:
        assert "raw_instruction" not in records[0]


def test_flags_override_every_recipe_value(tiny, tmp_path):
    out = tmp_path / "gen.jsonl"
    generate(tiny("llama-3.1-instruct"), out, "--num-samples", "8", "--batch-size", "8",
             "--instruction-temperature", "1.0", "--instruction-top-p", "0.95", "--instruction-top-k", "50",
             "--instruction-repetition-penalty", "1.05", "--instruction-loop-window", "30",
             "--max-instruction-tokens", "12", "--suppress-at-start", "", "--stop-at-newline", "--no-sanitize",
             "--response-temperature", "0", "--response-top-p", "0.5", "--response-top-k", "3",
             "--response-repetition-penalty", "1.2", "--response-loop-window", "60", "--max-response-tokens", "9")
    records = read_lines(out)
    settings = records[0]["settings"]
    stops = [128009, 128008, 128001, 128006, 128007]
    assert settings["recipe"] == "llama-3.1" and settings["sanitize"] is None
    assert settings["instruction_sampling"] == dict(
        max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.05, stop_token_ids=stops,
        stop_strings=["<|eot_id|>", "\n"], suppress_at_start=[], loop_window=30)
    assert settings["response_sampling"] == dict(
        max_new_tokens=9, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.2, stop_token_ids=stops,
        stop_strings=["<|eot_id|>"], suppress_at_start=[], loop_window=60)
    # Without the first-token suppression the model's favourite openers come back.
    assert any(r["instruction"].startswith("#") for r in records)
    assert "raw_instruction" not in records[0]

    forced = tmp_path / "forced.jsonl"
    generate(tiny("llama-3.1-instruct"), forced, "--num-samples", "1", "--recipe", "llama-3.3",
             "--instruction-only")
    settings = read_lines(forced)[0]["settings"]
    assert settings["recipe"] == "llama-3.3" and settings["response_sampling"] is None
    assert settings["instruction_sampling"]["temperature"] == 1.0
    assert settings["instruction_sampling"]["suppress_at_start"] == []


def test_steering_draws_a_system_prompt_per_record_the_same_on_every_run(tiny, tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("You write maths problems.: 3\nYou write poems.: 1\n")
    out = tmp_path / "gen.jsonl"
    args = ["--num-samples", "6", "--batch-size", "3", "--system-prompts", prompts]
    generate(tiny("llama-3.1-instruct"), out, *args)
    records = read_lines(out)
    drawn = [r["system"] for r in records]
    assert drawn == [recipes.system_for({"You write maths problems.": 3, "You write poems.": 1}, 1, i)
                     for i in range(6)]
    for r in records:  # Magpie's system-prompt form of the Llama-3 template, with the record's prompt
        assert r["pre_query_template"] == (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + r["system"]
            + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
        assert r["settings"]["system_prompts"] == {"You write maths problems.": 3.0, "You write poems.": 1.0}
    again = tmp_path / "again.jsonl"
    generate(tiny("llama-3.1-instruct"), again, *args)
    assert read_lines(again) == records
    rerun = generate(tiny("llama-3.1-instruct"), out, *args)  # a finished output with per-record prompts: no-op
    assert "already written" in rerun.stderr and read_lines(out) == records

    weights = {"a": 3.0, "b": 1.0}
    counts = Counter(recipes.system_for(weights, 7, i) for i in range(4000))
    assert abs(counts["a"] / 4000 - 0.75) < 0.03
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["x", "y"]))
    assert recipes.load_system_prompts(listed) == {"x": 1.0, "y": 1.0}


def test_partial_output_from_other_settings_is_refused(tiny, tmp_path):
    out = tmp_path / "gen.jsonl"
    args = ["--num-samples", "2", "--batch-size", "2"]
    generate(tiny("qwen2.5-instruct"), out, *args)
    result = generate(tiny("qwen2.5-instruct"), out, *args, "--instruction-temperature", "0.9", check=False)
    assert result.returncode == 2 and "other settings" in result.stderr and "Traceback" not in result.stderr
    result = generate(tiny("qwen2.5-instruct"), out, *args, "--recipe", "generic", check=False)
    assert result.returncode == 2 and "other settings" in result.stderr
    result = generate(tiny("qwen2.5-instruct"), out, *args, "--system", "a", "--system-prompts", out, check=False)
    assert result.returncode == 2 and "--system and --system-prompts" in result.stderr


def test_recipe_is_found_by_name_then_by_template(tiny, capsys):
    from common.models import load_tokenizer

    llama = load_tokenizer(str(tiny("llama-3.1-instruct")))
    assert recipes.find("meta-llama/Llama-3.3-70B-Instruct", llama)["name"] == "llama-3.3"
    assert recipes.find("/models/unnamed", llama)["name"] == "llama-3.1"  # by its template's markers
    # Responses are asked with the same head as the instructions (Magpie's gen_res.py: no system block either).
    recipe = recipes.resolve(recipes.find("/models/unnamed", llama), llama)
    assert recipe.prompt(llama, "Hi?") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    history = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]
    assert recipe.pre_query(llama, history=history) == (
        recipe.prompt(llama, "Hi?") + "Yes.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    llama.chat_template = llama.chat_template.replace("Cutting Knowledge Date", "")  # as Llama-3's template
    assert recipes.find("meta-llama/Meta-Llama-3-8B-Instruct", llama)["name"] == "llama-3"
    qwen = load_tokenizer(str(tiny("qwen2.5-instruct")))
    assert recipes.find("/models/unnamed", qwen)["name"] == "qwen2.5"
    assert recipes.find("embedded:smollm2", qwen)["name"] == "smollm2"
    qwen.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert recipes.find("/models/unnamed", qwen)["name"] == "generic"
    assert "no generator recipe" in capsys.readouterr().err
    # A recipe's stop tokens must be single tokens of the model's tokenizer.
    with pytest.raises(DataError, match="'<\\|eot_id\\|>' is not a single token"):
        recipes.resolve(recipes.find("x", qwen, "llama-3.1"), qwen)


class WriteACycle:
    """A logits processor that makes every row write `cycle` over and over, as a looping model does."""

    def __init__(self, cycle):
        self.cycle = cycle

    def __call__(self, input_ids, scores):
        import torch

        cycle = torch.tensor(self.cycle, device=input_ids.device)
        following = cycle[torch.isin(input_ids, cycle).sum(1) % len(cycle)]
        return torch.full_like(scores, -torch.inf).scatter_(1, following[:, None], 0.0)


def test_smollm2_recipe_stops_loops(smol, tmp_path):
    """The cpu tier's generator recipe, resolved as the generate step resolves it, stops a looping row: its windows
    fit under the tier's token caps, and a response stuck in a cycle, sampled with the recipe's own response settings
    (temperature, top-p, penalty) through the engine, ends as a loop once the window fills, not at the cap."""
    import re

    from conftest import REPO

    from common.generation.engines import TransformersEngine
    from common.generation.chat import prompt_text

    # SmolLM2 shrunk to one narrow layer, its tokenizer and generation config as they are: the row's tokens are forced
    # (WriteACycle), so the weights don't matter and the engine decodes in a blink
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smol)
    config.update(dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8))
    tiny = tmp_path / "smollm2-one-layer"
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, tiny / name)
    engine = TransformersEngine(str(tiny), dtype="float32", batch_size=2)
    tokenizer = engine.tokenizer
    recipe = recipes.resolve(recipes.find("embedded:smollm2", tokenizer), tokenizer, engine.stop_token_ids)
    assert recipe.name == "smollm2"
    assert 1.0 < recipe.response.repetition_penalty <= 1.2 and recipe.response.temperature > 0
    caps = dict(re.findall(r"^MAX_(\w+)_TOKENS \?= (\d+)$", (REPO / "env/cpu/tier.mk").read_text(), flags=re.M))
    # a window as long as the cap could never end a row before the cap
    assert 0 < recipe.instruction.loop_window < int(caps["INSTRUCTION"])
    assert 0 < recipe.response.loop_window < int(caps["RESPONSE"])
    window = recipe.response.loop_window
    sampling = recipe.response.replace(max_new_tokens=int(caps["RESPONSE"]))
    cycle = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" apple", " pear", " plum")]
    (row,) = engine.sample([prompt_text(tokenizer, "Name three fruits.")], sampling, seed=0,
                           processors=[WriteACycle(cycle)])
    assert row["stop_reason"] == "loop" and not row["finished"], row
    assert window <= row["tokens"] < 2 * window, row  # stopped once the window was full of the loop
    assert row["text"] == tokenizer.decode((cycle * window)[: row["tokens"]]).strip()


@pytest.mark.parametrize("raw,text,rule,cut", [
    ("What is the capital of France? The capital is Paris.", "What is the capital of France?", "99.1", True),
    ("Task: Write a haiku about rain.\nRain falls softly", "Write a haiku about rain.", "99.2", True),
    ("*Why is the sky blue?* Because of scattering.", "Why is the sky blue?", "1", True),
    ("1. Explain recursion", "Explain recursion", "99.2", False),
    ('"How do magnets work?" asked the child', "How do magnets work?", "2.1", True),
    ("Solve 2x + 3 = 7.\n\n## Step 1: Subtract 3", "Solve 2x + 3 = 7.", "5", True),
    ("Compute 17 * 3. Answer: 51", "Compute 17 * 3.", "4", True),
    ("Summarize the following text:\nThe quick brown fox", "Summarize the following text:", "6.3", True),
])
def test_sanitizing_follows_magpie_llama3_rules(raw, text, rule, cut):
    clean = sanitize(raw)
    assert (clean.text, clean.rule, clean.cut) == (text, rule, cut)


def test_a_recipe_file_of_ones_own_is_read_checked_and_used(tmp_path, smol):
    """--recipe FILE.yaml: a recipe in env/generators' format, checked as those are (the test chain uses one)."""
    from common import OptionError
    from common.models import load_tokenizer

    tokenizer = load_tokenizer("embedded:smollm2")
    fixture = Path(__file__).parent / "fixtures" / "smollm2-sentences.yaml"
    spec = recipes.find("any-model", tokenizer, str(fixture))
    resolved = recipes.resolve(spec, tokenizer)
    assert spec["name"] == "smollm2-sentences" and tokenizer.convert_tokens_to_ids(".") in resolved.response.stop_token_ids
    with pytest.raises(OptionError, match="--recipe .*missing.yaml: no such file"):
        recipes.find("any-model", tokenizer, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(fixture.read_text().replace("top_p: 0.95", "top_pp: 0.95"))
    with pytest.raises(DataError, match=r"bad.yaml: unknown recipe keys \['instruction.top_pp'\]"):
        recipes.find("any-model", tokenizer, str(bad))
