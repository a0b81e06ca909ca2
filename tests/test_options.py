"""Every step's command line (common/options.py): a bad numeric value stops the step while its arguments are parsed,
before anything loads or is written, with exit status 2 and a message naming the option and the allowed range; a
valid value at the edge of the range parses; -h shows each option's default."""

import argparse

import pytest
from common import OptionError, run_step
from common.options import HelpFormatter, between, eval_batch_size, fraction, positive_int, probability

import compare
import dataset
import dpo
import filter as filter_step
import generate
import judge
import merge
import plan
import preference
import prepare_default
import push
import report
import report_png
import sft
import eval as eval_step

REQUIRED = {  # the required arguments of each step (never read: parsing stops first)
    "generate": ["--model", "m", "--out", "OUT"],
    "judge": ["--in", "i", "--out", "o", "--model", "m"],
    "filter": ["--in", "i", "--out", "o", "--dropped", "d", "--summary", "s"],
    "preference": ["--in", "i", "--policy", "p", "--reward-model", "r", "--scored", "s", "--out", "o"],
    "eval": ["--model", "m", "--out", "o"],
    "dataset": ["--run", "r", "--out", "o"],
    "report_png": ["page.html", "out.png"],
    "plan": ["--tier", "t4", "--model-size", "3b", "--num-samples", "10", "--gen-rows", "8", "--judge-rows", "8",
             "--num-responses", "2", "--pref-rows", "8", "--pref-max-tokens", "64", "--sft-config", "s.yaml",
             "--dpo-config", "d.yaml", "--tasks", "mmlu"],
}
MODULES = {"generate": generate, "judge": judge, "filter": filter_step, "preference": preference, "eval": eval_step,
           "dataset": dataset, "report_png": report_png, "plan": plan, "merge": merge, "report": report,
           "compare": compare, "push": push}

WHOLE = "a whole number at least"
BAD = [  # step, option, value, what the message must say
    ("generate", "--num-samples", "0", f"{WHOLE} 1, got 0"),
    ("generate", "--num-samples", "-3", f"{WHOLE} 1, got -3"),
    ("generate", "--num-samples", "many", f"{WHOLE} 1, got 'many'"),
    ("generate", "--batch-size", "0", f"{WHOLE} 1, got 0"),
    ("generate", "--decode-rows", "0", f"{WHOLE} 1, got 0"),
    ("generate", "--turns", "0", f"{WHOLE} 1, got 0"),
    ("generate", "--seed", "-1", f"{WHOLE} 0, got -1"),
    ("generate", "--instruction-temperature", "-1", "a number at least 0, got -1"),
    ("generate", "--response-temperature", "nan", "a number at least 0, got nan"),
    ("generate", "--instruction-top-p", "0", "a number in (0, 1], got 0"),
    ("generate", "--response-top-p", "1.5", "a number in (0, 1], got 1.5"),
    ("generate", "--instruction-top-k", "-1", f"{WHOLE} 0, got -1"),
    ("generate", "--response-repetition-penalty", "0", "a number greater than 0, got 0"),
    ("generate", "--max-instruction-tokens", "0", f"{WHOLE} 1, got 0"),
    ("judge", "--batch-size", "0", f"{WHOLE} 1, got 0"),
    ("judge", "--max-new-tokens", "0", f"{WHOLE} 1, got 0"),
    ("judge", "--temperature", "-0.5", "a number at least 0, got -0.5"),
    ("filter", "--max-response-tokens", "0", f"{WHOLE} 1, got 0"),
    ("filter", "--min-instruction-tokens", "-1", f"{WHOLE} 0, got -1"),
    ("filter", "--near-duplicate-threshold", "1.5", "a number in [0, 1], got 1.5"),
    ("filter", "--max-repeated-ngram-ratio", "-0.1", "a number in [0, 1], got -0.1"),
    ("filter", "--min-reward", "inf", "a finite number, got inf"),
    ("preference", "--num-responses", "1", f"{WHOLE} 2, got 1"),
    ("preference", "--batch-size", "0", f"{WHOLE} 1, got 0"),
    ("preference", "--reward-batch-size", "0", f"{WHOLE} 1, got 0"),
    ("preference", "--temperature", "-1", "a number at least 0, got -1"),
    ("preference", "--top-p", "0", "a number in (0, 1], got 0"),
    ("preference", "--min-margin", "-1", "a number at least 0, got -1"),
    ("eval", "--limit", "0", "a whole number of documents (at least 1) or a fraction in (0, 1), optionally per task "
                             "(1000,ifeval=all), got '0'"),
    ("eval", "--limit", "1000,ifeval=2.5", "a whole number of documents (at least 1) or a fraction in (0, 1), "
                                           "optionally per task (1000,ifeval=all), got '1000,ifeval=2.5'"),
    ("eval", "--batch-size", "0", "a whole number at least 1, auto or auto:N (N at least 1), got '0'"),
    ("eval", "--batch-size", "auto:0", "a whole number at least 1, auto or auto:N (N at least 1), got 'auto:0'"),
    ("eval", "--max-gen-toks", "0", f"{WHOLE} 1, got 0"),
    ("dataset", "--test-fraction", "1.0", "a number in [0, 1), got 1.0"),
    ("dataset", "--test-fraction", "-0.1", "a number in [0, 1), got -0.1"),
    ("report_png", "--width", "0", f"{WHOLE} 1, got 0"),
    ("plan", "--num-samples", "0", f"{WHOLE} 1, got 0"),
    ("plan", "--test-fraction", "1.0", "a number in [0, 1), got 1.0"),
    ("plan", "--limit", "0", "a whole number of documents (at least 1) or a fraction in (0, 1), optionally per task "
                             "(1000,ifeval=all), got '0'"),
    ("plan", "--nproc", "0", f"{WHOLE} 1, got 0"),
]


@pytest.mark.parametrize("step,option,value,message", BAD, ids=[f"{s}{o}={v}" for s, o, v, _ in BAD])
def test_a_bad_value_is_refused_naming_the_option_and_its_range(step, option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        MODULES[step].parse_args([*REQUIRED[step], f"{option}={value}"])
    assert exit_.value.code == 2
    assert f"error: argument {option}: must be {message}\n" in capsys.readouterr().err


def test_generate_refuses_a_bad_count_before_writing_anything(tmp_path, capsys):
    """The issue's case: --num-samples -3 (or 0) exited 0 with an empty generated.jsonl that make took as finished;
    --batch-size 0 ended in a ZeroDivisionError. Now main() stops in parsing: no model, no output, no partial."""
    out = tmp_path / "generated.jsonl"
    for bad in (["--num-samples", "-3"], ["--num-samples", "0"], ["--batch-size", "0"],
                ["--instruction-temperature", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            generate.main(["--model", "embedded:smollm2", "--out", str(out), *bad])
        assert exit_.value.code == 2 and f"argument {bad[0]}: must be" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_filter_refuses_a_minimum_above_the_maximum(capsys):
    with pytest.raises(SystemExit) as exit_:
        filter_step.parse_args([*REQUIRED["filter"], "--min-response-tokens", "10", "--max-response-tokens", "5"])
    assert exit_.value.code == 2
    assert "--min-response-tokens 10 is above --max-response-tokens 5" in capsys.readouterr().err


def test_values_at_the_edges_of_each_range_parse():
    """The control: the smallest (and largest) allowed values go through, as the same types as before."""
    args = generate.parse_args([*REQUIRED["generate"], "--num-samples", "1", "--batch-size", "1", "--seed", "0",
                                "--instruction-temperature", "0", "--instruction-top-p", "1", "--response-top-p",
                                "0.01", "--instruction-top-k", "0", "--response-repetition-penalty", "1.2"])
    assert (args.num_samples, args.batch_size, args.seed) == (1, 1, 0) and type(args.num_samples) is int
    assert (args.instruction_temperature, args.instruction_top_p, args.response_top_p) == (0.0, 1.0, 0.01)
    assert args.response_temperature is None  # unset: the recipe's value
    assert generate.parse_args(REQUIRED["generate"]).num_samples == 1000
    args = preference.parse_args([*REQUIRED["preference"], "--num-responses", "2", "--top-p", "1", "--temperature",
                                  "0", "--min-margin", "0"])
    assert (args.num_responses, args.top_p, args.temperature, args.min_margin) == (2, 1.0, 0.0, 0.0)
    args = filter_step.parse_args([*REQUIRED["filter"], "--near-duplicate-threshold", "1", "--min-reward", "-2.5",
                                   "--min-response-tokens", "0", "--max-response-tokens", "1"])
    assert (args.near_duplicate_threshold, args.min_reward, args.min_response_tokens) == (1.0, -2.5, 0)
    assert dataset.parse_args([*REQUIRED["dataset"], "--test-fraction", "0"]).test_fraction == 0.0
    assert dataset.parse_args([*REQUIRED["dataset"], "--test-fraction", "0.99"]).test_fraction == 0.99
    for value in ("0.5", "4", "1", "1000,ifeval=all", "mmlu=0.1"):  # kept as the text (the results record it)
        assert eval_step.parse_args([*REQUIRED["eval"], "--limit", value]).limit == value
    for value in ("auto", "auto:4", "16"):  # kept as the text lm-eval takes (and the results record)
        assert eval_step.parse_args([*REQUIRED["eval"], "--batch-size", value]).batch_size == value
    args = plan.parse_args([*REQUIRED["plan"], "--limit=", "--max-gen-toks=", "--max-instruction-tokens="])
    assert (args.limit, args.max_gen_toks, args.max_instruction_tokens) == (None, None, None)  # make's unset variables
    args = plan.parse_args([*REQUIRED["plan"], "--limit=0.25", "--max-gen-toks=256", "--test-fraction", "0"])
    assert (args.limit, args.max_gen_toks, args.test_fraction) == ("0.25", 256, 0.0)


def test_the_types_edges():
    assert positive_int("1") == 1 and probability("1") == 1.0 and fraction("0") == 0.0
    for kind, bad in ((positive_int, "0"), (positive_int, "1.5"), (probability, "0"), (probability, "1.0001"),
                      (fraction, "1"), (fraction, "-inf"), (between(0, 1), "nan"),
                      (eval_batch_size, "auto:"), (eval_batch_size, "-2")):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            kind(bad)


def test_sft_and_dpo_check_their_test_fraction(capsys):
    """sft.py and dpo.py parse with TRL's parser, which takes a dataclass field's type as is: the field checks its
    range itself, whether the value came from the flag or a --config YAML, and the step exits 2 naming it."""
    for step in (sft, dpo):
        extra = {"sft_adapter": "a"} if step is dpo else {}
        assert step.DataArguments(train_file="t", test_fraction=0.0, **extra).test_fraction == 0.0
        assert step.DataArguments(train_file="t", test_fraction="0.25", **extra).test_fraction == 0.25
        for bad in (1.0, -0.1):
            with pytest.raises(OptionError, match=r"--test_fraction: must be a number in \[0, 1\), got"):
                step.DataArguments(train_file="t", test_fraction=bad, **extra)
    # Through TRL's parser and the steps' run_step, before any model loads: exit status 2 and the message
    with pytest.raises(SystemExit) as exit_:
        run_step(lambda: sft.main(["--train_file", "t.jsonl", "--output_dir", "never", "--model_name_or_path",
                                   "embedded:smollm2", "--test_fraction", "1.0"]))
    assert exit_.value.code == 2
    assert "error: --test_fraction: must be a number in [0, 1), got 1.0" in capsys.readouterr().err


def spied_parser(module, argv, monkeypatch):
    """(the ArgumentParser a step's parse_args builds, its -h text)."""
    seen = []
    real = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(argv)
    monkeypatch.undo()
    assert exit_.value.code == 0
    return seen[-1]


@pytest.mark.parametrize("step", sorted(MODULES))
def test_help_shows_every_default(step, monkeypatch, capsys):
    parser = spied_parser(MODULES[step], ["-h"], monkeypatch)
    text = capsys.readouterr().out
    assert parser.formatter_class is HelpFormatter
    assert text.startswith("usage:") and MODULES[step].__doc__.splitlines()[0] in text  # the docstring as written
    shown = [a for a in parser._actions if a.default not in (None, "", argparse.SUPPRESS) and not a.required
             and not (a.nargs == 0 and isinstance(a.default, bool))]
    def bare(s):  # wrapping ignored (argparse may break a long word at a hyphen)
        return "".join(s.split())

    for action in shown:  # each option's own help ends with its default
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        own = bare(formatter.format_help())
        assert own.endswith(bare(f"(default: {action.default})")), own
        assert own in bare(text)
    if step in ("generate", "judge", "filter", "preference", "eval", "plan"):
        assert shown and "(default:" in text


def test_generate_help_names_the_defaults_of_the_issue(monkeypatch, capsys):
    spied_parser(generate, ["-h"], monkeypatch)
    text = " ".join(capsys.readouterr().out.split())
    assert "--num-samples NUM_SAMPLES records to write (default: 1000)" in text
    assert "--seed SEED (default: 0)" in text and "--batch-size BATCH_SIZE samples" in text
    assert "--instruction-only write instructions without responses --engine" in text  # a flag: no "(default: False)"
    assert "(default: None)" not in text


def test_prepare_default_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare_default.main(["-h"])
    assert exit_.value.code == 0 and "(default: bfloat16)" in " ".join(capsys.readouterr().out.split())
