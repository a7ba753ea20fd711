"""The valid values of what a user passes in, defined once. The Python API names an argument as it is spelled there
(`top_p`), the `llama` command as its flag (`--top-p`); both check with the same rules, so they cannot disagree.

No torch here: the command checks every flag with this module before it imports torch or loads a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any


class ArgumentError(ValueError):
    """A value outside what an argument accepts. The message names the argument (or the flag)."""


@dataclass(frozen=True)
class Rule:
    whole: bool  # a whole number (int), rather than any finite real number
    accepts: Callable[[Any], bool]
    expected: str  # what `accepts` means, as the message says it
    optional: bool = False  # None is accepted too (it means "the default")


RULES = {
    "max_new_tokens": Rule(True, lambda v: v >= 1, ">= 1"),
    "temperature": Rule(False, lambda v: v >= 0, ">= 0 (0 is greedy)"),
    "top_k": Rule(True, lambda v: v >= 1, ">= 1", optional=True),
    "top_p": Rule(False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": Rule(False, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": Rule(False, lambda v: v > 0, "> 0"),
    "seed": Rule(True, lambda v: 0 <= v < 2**64, "in [0, 2**64)", optional=True),  # torch.Generator's range
    "max_seq_len": Rule(True, lambda v: v >= 1, ">= 1", optional=True),
    "max_batch_size": Rule(True, lambda v: v >= 1, ">= 1", optional=True),
    "context": Rule(True, lambda v: v >= 2, ">= 2"),  # (a window needs a token to score and one before it)
    "num_speculative_tokens": Rule(True, lambda v: 1 <= v <= 16, "in [1, 16]"),
}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def spelled(name: str, as_flag: bool) -> str:
    """`top_p` as the API spells it, or `--top-p` as the command does."""
    return "--" + name.replace("_", "-") if as_flag else name


def check(name: str, value: Any, as_flag: bool = False) -> Any:
    """`value` if it is a valid `name` (see RULES), as a plain int or float; else an ArgumentError naming it."""
    rule = RULES[name]
    if value is None and rule.optional:
        return None
    label = spelled(name, as_flag)
    # bool is an int to Python, but `top_k=True` is a mistake, not a 1
    if isinstance(value, bool) or not isinstance(value, Integral if rule.whole else Real):
        kind = "a whole number" if rule.whole else "a number"
        raise ArgumentError(f"{label} must be {kind}{' or None' if rule.optional and not as_flag else ''}, "
                            f"got {value!r} ({type(value).__name__})")
    value = int(value) if rule.whole else float(value)
    if not (math.isfinite(value) and rule.accepts(value)):
        raise ArgumentError(f"{label} must be {rule.expected}, got {value!r}")
    return value


def check_all(values: dict[str, Any], as_flag: bool = False) -> dict[str, Any]:
    """`check` each of several arguments; returns them checked."""
    return {name: check(name, value, as_flag) for name, value in values.items()}


def check_stop(stop: str | Sequence[str] | None, as_flag: bool = False) -> list[str]:
    """Stop strings: one string, or a list of them; none may be empty (it would stop before the first token)."""
    label = spelled("stop", as_flag)
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, Sequence) or not all(isinstance(s, str) for s in strings):
        raise ArgumentError(f"{label} must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in strings):
        raise ArgumentError(f"{label} must not be an empty string (it would match before the first token)")
    return list(strings)


def check_device_name(device: str, as_flag: bool = False) -> str:
    """A device's spelling: cpu, cuda, cuda:N, mps or xpu (whether it is present is torch's to say, later)."""
    match = re.fullmatch(r"([a-z]+)(?::(\d+))?", device)
    if not match or match[1] not in DEVICE_TYPES:
        raise ArgumentError(f"{spelled('device', as_flag)} {device!r}: not a device; use one of cpu, cuda, cuda:N "
                            f"(N counts from 0), mps, xpu")
    return device
