"""User-facing errors: name the parameter, the bad value, what is allowed and a fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VoxelomeError(ValueError):
    """An input problem the user can fix; the message says how."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Validate ``value`` against ``choices``; raise :class:`VoxelomeError` otherwise.

    Parameters
    ----------
    name : str
        Parameter name, quoted in the message.
    value : str
        The value the user gave.
    choices : iterable of str
        Allowed values.
    """
    choices = list(choices)
    if value not in choices:
        raise VoxelomeError(
            f"{name}={value!r} is not one of {sorted(choices)}.{did_you_mean(value, choices)}"
        )
    return value


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Raise :class:`VoxelomeError` unless ``value`` is a finite positive number."""
    import math

    ok = value is not None and math.isfinite(float(value)) and (
        float(value) >= 0 if allow_zero else float(value) > 0
    )
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise VoxelomeError(f"{name}={value!r} must be a finite number {bound}.")
    return float(value)
