"""The checks of an argument a user gives, written once: each raises a ``ValueError`` whose message
starts with the argument's name (``k must be an integer >= 1, got 0``), which
``tad_torchtune.errors`` turns into the one-line ``kd_loss.k: must be ...`` of a config key."""

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, minimum: int = 1, optional: bool = False,
              detail: str = "") -> int | None:
    """``value`` if it is an integer ``>= minimum`` (or None when ``optional``).

    Raises:
        ValueError: ``"{name} must be an integer >= {minimum}[ or null]{detail}, got {value!r}"``
            (null: what a YAML config writes for None).
    """
    if value is None and optional:
        return None
    if not is_int(value) or value < minimum:
        accepted = f"an integer >= {minimum}{' or null' if optional else ''}{detail}"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def check_positive(value: Any, name: str) -> float:
    """``float(value)`` if it is a finite number > 0 (a temperature, TAD's beta, DRKL's gamma:
    infinity would make the loss infinite or NaN).

    Raises:
        ValueError: ``"{name} must be a finite number > 0, got {value!r}"``.
    """
    if not is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(value: Any, name: str) -> float:
    """``float(value)`` if it is a number >= 0 (NaN is not).

    Raises:
        ValueError: ``"{name} must be a number >= 0, got {value!r}"``.
    """
    if not is_number(value) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: ``"{name} must be one of {choices}, got {value!r}"``.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
