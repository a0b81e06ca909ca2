"""The steps' command lines: one help layout and the checks on numeric options, shared by every step.

Each check is an argparse `type=`: a bad value stops the step while its arguments are parsed, before anything loads,
and argparse names the option: "error: argument --num-samples: must be a whole number at least 1, got -3" (exit
status 2, the usage above it). Standard library only: steps/plan.py runs on the system Python before setup.

Library internals (argparse of Python 3.11-3.13): HelpFormatter's `_get_help_string` and `_format_action`,
overridden to show defaults only where they mean something (argparse documents only its formatters' names).
"""

import argparse
import copy
import math

from common import OptionError
from common.eval_requests import parse_limit


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The step's docstring as written, and each option's default after its help: "(default: 1000)". Options that
    default to None or "" (their help says what happens then), flags and required options show none."""

    @staticmethod
    def _shows_default(action):
        return not (action.default in (None, "", argparse.SUPPRESS) or action.required
                    or (action.nargs == 0 and isinstance(action.default, bool)))

    def _get_help_string(self, action):
        return super()._get_help_string(action) if self._shows_default(action) else action.help

    def _format_action(self, action):
        if not action.help and self._shows_default(action):  # argparse prints no default where there is no help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def step_parser(description):
    """An ArgumentParser for a step: its docstring as the description, defaults shown in -h."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def _number(text, kind, need):
    """text as a finite int or float, else the error: what the option needs, and what it got."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
    return value


def _checked(need, kind, ok):
    """A type for argparse: `text` as `kind`, which must satisfy ok(value); the error says `need`."""

    def check(text):
        value = _number(text, kind, need)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    check.__name__ = need  # argparse's fallback message names the type by this
    return check


def at_least(low, kind=int):
    """A whole number (kind=float: a number) >= low."""
    return _checked(f"{'a whole number' if kind is int else 'a number'} at least {low}", kind, lambda v: v >= low)


def between(low, high, low_open=False, high_open=False):
    """A number in the interval from low to high; *_open leaves that end out. The message writes the interval in the
    usual notation, e.g. "must be a number in (0, 1]"."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return _checked(f"a number in {interval}", float,
                    lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high))


def greater_than(low):
    """A number > low."""
    return _checked(f"a number greater than {low}", float, lambda v: v > low)


def check_value(option, value, kind):
    """`value` checked by the type `kind` where argparse does not parse it (a dataclass field of TRL's parser, which
    a --config YAML can set too): a bad one raises OptionError naming the option (exit status 2 under run_step)."""
    try:
        return kind(str(value))
    except argparse.ArgumentTypeError as e:
        raise OptionError(f"{option}: {e}") from None


def optional(kind):
    """`kind`, or None for an empty value (make passes `--opt=` for an unset variable)."""

    def check(text):
        return None if text == "" else kind(text)

    check.__name__ = kind.__name__
    return check


positive_int = at_least(1)  # counts, batch sizes, rows, token caps
non_negative_int = at_least(0)  # seeds; 0 = off (top-k, loop window) or no minimum
non_negative_float = at_least(0, float)  # temperatures (0: greedy), margins
positive_float = greater_than(0)  # repetition penalties (1: off)
probability = between(0, 1, low_open=True)  # top-p: (0, 1], 1: off
fraction = between(0, 1, high_open=True)  # held-out shares: [0, 1)
share = between(0, 1)  # ratios and cosine thresholds: [0, 1]
number = _checked("a finite number", float, lambda v: True)  # e.g. a reward threshold, any sign



def eval_batch_size(text):
    """lm-eval's --batch-size: a whole number >= 1, "auto", or "auto:N" (re-detect the size N times)."""
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) >= 1):
        return text
    try:
        if int(text) >= 1:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a whole number at least 1, auto or auto:N (N at least 1), got {text!r}")


def eval_limit(text):
    """LIMIT: N documents of each task, a fraction in (0, 1), per task N,TASK=N|all (common/eval_requests.py); kept
    as the text, which the results record."""
    try:
        parse_limit(text)
    except OptionError:
        raise argparse.ArgumentTypeError("must be a whole number of documents (at least 1) or a fraction in (0, 1), "
                                         f"optionally per task (1000,ifeval=all), got {text!r}") from None
    return text
