"""Validators that absl's bounds cannot say: exclusive bounds, lists of numbers, regexes.

absl's `lower_bound` is inclusive, so "> 0" on a float and "in [0, 1)" are validators here,
each with a message that names the flag and the values allowed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

from absl import flags


def single(fv: flags.FlagValues, name: str, checker: Callable, message: str) -> None:
    flags.register_validator(name, checker, message, flag_values=fv)


def multi(fv: flags.FlagValues, names: list[str], checker: Callable, message: str) -> None:
    flags.register_multi_flags_validator(names, checker, message, flag_values=fv)


def positive(fv: flags.FlagValues, *names: str) -> None:
    """Each float flag of `names` is > 0 (or None, where its default is None)."""
    for name in names:
        single(fv, name, lambda v: v is None or v > 0, f"--{name} must be > 0")


def fraction_below_one(fv: flags.FlagValues, *names: str) -> None:
    """Each float flag of `names` is in [0, 1) (or None)."""
    for name in names:
        single(fv, name, lambda v: v is None or 0.0 <= v < 1.0, f"--{name} must be in [0, 1)")


def numbers(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def increasing(values: list[str]) -> bool:
    if not numbers(values):
        return True  # reported by the list's own validator
    parsed = [float(v) for v in values]
    return all(a < b for a, b in itertools.pairwise(parsed))


def regexes(patterns: list[str]) -> bool:
    try:
        [re.compile(p) for p in patterns]
    except re.error:
        return False
    return True


def number_list(fv: flags.FlagValues, *names: str) -> None:
    for name in names:
        single(fv, name, numbers, f"--{name} must be a comma-separated list of numbers")


def floats(values: list[str]) -> tuple[float, ...] | None:
    """A list flag of numbers as a tuple, None when empty."""
    return tuple(float(v) for v in values) if values else None
