"""Generator recipes: per model family, how Magpie samples from it (env/generators/*.yaml, one file a family).

A recipe holds the pre-query template (an explicit string, or "derive" from the chat template as
chat.pre_query_template does), the stop tokens (token strings, resolved to ids through the tokenizer), the instruction
and response sampling settings (and, for the preference step's several responses, what differs from the response
settings), first-token suppression and instruction sanitizing. `find()` picks the recipe for a
model, `resolve()` turns it into what the generate step runs with: two `Sampling`s, every value explicit, flags
applied on top. A model no recipe matches gets GENERIC (template derived, the model's own end tokens).
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from common import DataError, OptionError
from common.generation.chat import end_of_turn, pre_query_template, prompt_text
from common.generation.sampling import Sampling

GENERATORS = Path(__file__).resolve().parents[3] / "env" / "generators"
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "loop_window",
                 "suppress_at_start", "stop_at_newline"}
RECIPE_KEYS = {"name", "match", "pre_query_template", "pre_query_template_with_system", "stop_tokens", "sanitize",
               "instruction", "response", "preference", "variants"}
SIDES = ("instruction", "response", "preference")
SANITIZERS = ("magpie-llama-3",)

# For models no recipe knows: Magpie's Llama-3 defaults (instructions at temperature 1, greedy responses), the
# template derived from the chat template, and the end tokens the tokenizer and model declare.
GENERIC = {
    "name": "generic", "pre_query_template": "derive", "stop_tokens": [], "sanitize": None,
    "instruction": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 512},
    "response": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 2048},
    "preference": {"temperature": 0.8, "top_p": 0.95},
}


def _check(spec, where):
    unknown = set(spec) - RECIPE_KEYS
    for side in SIDES:
        unknown |= {f"{side}.{k}" for k in set(spec.get(side) or {}) - SAMPLING_KEYS}
    if unknown:
        raise DataError(f"{where}: unknown recipe keys {sorted(unknown)}")
    if spec.get("sanitize") not in (None, *SANITIZERS):
        raise DataError(f"{where}: sanitize must be one of {SANITIZERS} or null, not {spec['sanitize']!r}")


def _refine(base, variant):
    """A variant's recipe: the family's, with the variant's keys on top (sampling merged key by key)."""
    merged = {**base, **{k: v for k, v in variant.items() if k not in SIDES}}
    for side in SIDES:
        merged[side] = {**base.get(side, {}), **variant.get(side, {})}
    merged.pop("variants", None)
    return merged


def load(directory=GENERATORS):
    """Every recipe, families and their variants, as {name: (family name, recipe)}; in file order."""
    recipes = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        family = yaml.safe_load(path.read_text())
        _check(family, path)
        for variant in family.get("variants") or []:
            _check(variant, f"{path} ({variant.get('name')})")
        recipes[family["name"]] = (family["name"], _refine(family, {}))
        for variant in family.get("variants") or []:
            recipes[variant["name"]] = (family["name"], _refine(family, variant))
    return recipes


def _by_model(spec, model):
    return any(re.search(p, str(model).lower()) for p in (spec.get("match") or {}).get("model", []))


def _by_template(spec, template):
    markers = (spec.get("match") or {}).get("template", [])
    return bool(markers) and bool(template) and all(m in template for m in markers)


def find(model, tokenizer, name=None, directory=GENERATORS):
    """The recipe for `model` (its id or path, then its chat template's markers); `name` forces one. A variant of the
    matching family is picked the same way, else the family's own settings."""
    recipes = load(directory)
    if name is not None and name.endswith((".yaml", ".yml")):  # a recipe of one's own, in env/generators' format
        if not Path(name).is_file():
            raise OptionError(f"--recipe {name}: no such file")
        spec = yaml.safe_load(Path(name).read_text())
        _check(spec, name)
        return _refine(spec, {})
    if name is not None:
        if name == "generic":
            return dict(GENERIC)
        if name not in recipes:
            raise OptionError(f"--recipe {name}: no such recipe; choose one of: {', '.join([*recipes, 'generic'])}")
        return recipes[name][1]
    families = {family: recipes[family][1] for family, _ in recipes.values()}
    template = tokenizer.chat_template or ""
    for matches in (lambda s: _by_model(s, model), lambda s: _by_template(s, template)):
        family = next((f for f, spec in families.items() if matches(spec)), None)
        if family is not None:
            variants = [spec for fam, spec in recipes.values() if fam == family and spec["name"] != family]
            for variant_matches in (lambda s: _by_model(s, model), lambda s: _by_template(s, template)):
                chosen = next((v for v in variants if variant_matches(v)), None)
                if chosen is not None:
                    return chosen
            return families[family]
    print(f"generate: no generator recipe in {GENERATORS} matches {model}: using the generic one (template derived "
          "from the chat template, the model's own end tokens, instructions at temperature 1, greedy responses); "
          "--recipe NAME picks one", file=sys.stderr)
    return dict(GENERIC)


def token_id(tokenizer, token, what):
    """The id of a token string that the tokenizer holds as one token (as written in its vocabulary)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    id_ = ids[0] if ids else None
    if id_ is None or tokenizer.convert_ids_to_tokens(id_) != token:
        raise DataError(f"{what}: {token!r} is not a single token of this tokenizer")
    return int(id_)


@dataclass(frozen=True)
class Recipe:
    """A recipe resolved against a tokenizer: what the generate step samples with."""

    name: str
    template: str | None  # explicit pre-query template (None: derived from the chat template)
    template_with_system: str | None  # ... its form with a system prompt ("{system}" stands for it)
    instruction: Sampling
    response: Sampling | None
    sanitize: str | None

    def _head(self, tokenizer, system):
        """(derived head, explicit head) to swap at the start of every prompt, or None to keep the derived one."""
        explicit = self.template if system is None else self.template_with_system
        if explicit is None:
            return None
        if system is not None:
            explicit = explicit.replace("{system}", system)
        return pre_query_template(tokenizer, system), explicit

    def _swap(self, tokenizer, system, text):
        head = self._head(tokenizer, system)
        if head is None:
            return text
        derived, explicit = head
        if not text.startswith(derived):
            raise DataError(f"recipe {self.name}: the chat template renders conversations that do not begin with its "
                            f"pre-query template {derived!r}; use --recipe generic")
        return explicit + text[len(derived):]

    def pre_query(self, tokenizer, system=None, history=()):
        """The text the model continues with a user message (Magpie's pre-query template, after `history`)."""
        return self._swap(tokenizer, system, pre_query_template(tokenizer, system, history))

    def prompt(self, tokenizer, instruction, system=None, history=()):
        """The prompt that answers `instruction`: the same head as the pre-query template, then the chat template."""
        return self._swap(tokenizer, system, prompt_text(tokenizer, instruction, system, history))


def _sampling(spec, tokenizer, stop_ids, stop_string, what):
    suppress = tuple(token_id(tokenizer, t, f"{what}.suppress_at_start") for t in spec.get("suppress_at_start") or [])
    stop_strings = (stop_string,) + (("\n",) if spec.get("stop_at_newline") else ())
    return Sampling(max_new_tokens=int(spec["max_new_tokens"]), temperature=float(spec["temperature"]),
                    top_p=float(spec["top_p"]), top_k=int(spec.get("top_k", 0)),
                    repetition_penalty=float(spec.get("repetition_penalty", 1.0)), stop_token_ids=stop_ids,
                    stop_strings=tuple(s for s in stop_strings if s), suppress_at_start=suppress,
                    loop_window=int(spec.get("loop_window", 0)))


def resolve(spec, tokenizer, model_stop_ids=(), overrides=None, sanitize=None, responses=True):
    """A recipe dict -> Recipe. Stop tokens become ids (each must be one token), then the model's own end tokens are
    added (a generation that ends on any of them is finished). `overrides` = {"instruction": {...}, "response": {...}}
    holds flag values (None: the recipe's); `sanitize` True/False overrides the recipe's."""
    overrides = overrides or {}
    name = spec["name"]
    stop_ids = tuple(dict.fromkeys([*(token_id(tokenizer, t, f"recipe {name} stop_tokens")
                                      for t in spec.get("stop_tokens") or []), *model_stop_ids]))
    sides = {}
    for side in ("instruction", "response"):
        values = {**spec[side], **{k: v for k, v in (overrides.get(side) or {}).items() if v is not None}}
        sides[side] = _sampling(values, tokenizer, stop_ids, end_of_turn(tokenizer, "user" if side == "instruction"
                                                                         else "assistant"), f"recipe {name} {side}")
    template = spec.get("pre_query_template", "derive")
    rules = spec.get("sanitize")
    if sanitize is not None:
        rules = "magpie-llama-3" if sanitize else None
    return Recipe(name=name, template=None if template == "derive" else template,
                  template_with_system=spec.get("pre_query_template_with_system"),
                  instruction=sides["instruction"], response=sides["response"] if responses else None,
                  sanitize=rules)


def preference_sampling(spec, tokenizer, model_stop_ids=(), overrides=None):
    """How a policy samples the several responses the preference step ranks: the recipe's response settings, refined
    by its `preference` section (where responses are greedy, as in Magpie's, it samples, so that they differ), then
    by `overrides` (the step's flags; None: the recipe's)."""
    spec = {**spec, "response": {**spec["response"], **(spec.get("preference") or {})}}
    return resolve(spec, tokenizer, model_stop_ids, {"response": overrides}).response


def load_system_prompts(path):
    """Task steering (as distilabel's MagpieGenerator): a JSON/YAML list of system prompts (equal weights) or a mapping
    prompt -> weight. Returns {prompt: weight}."""
    data = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    if isinstance(data, list):
        data = {str(p): 1.0 for p in data}
    if not isinstance(data, dict) or not data or not all(
            isinstance(w, (int, float)) and w >= 0 for w in data.values()) or not sum(data.values()) > 0:
        raise DataError(f"{path}: expected a non-empty list of system prompts, or a mapping prompt -> weight >= 0")
    return {str(p): float(w) for p, w in data.items()}


def system_for(prompts, seed, index):
    """The system prompt of record `index`: drawn by weight from a generator seeded by (seed, index) alone, so a
    resumed or sharded run draws the same one."""
    import random

    rng = random.Random(f"system-prompt:{seed}:{index}")
    return rng.choices(list(prompts), weights=list(prompts.values()))[0]
