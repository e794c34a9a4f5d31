"""Ranges of numeric options, checked before any work with a one-line error.

Without an upper bound a typo such as ``--steps 100000000000000000000`` is accepted and only fails,
if ever, deep inside a run.
"""

from __future__ import annotations

import math

from nca_tiles.errors import NcaTilesError

# The counter-based rng folds a seed into a 32-bit key: within 0 … 2**32 − 1 every seed gives
# different numbers; beyond (or below) it a seed would silently repeat a smaller one.
MAX_SEED = 2**32 - 1


def check_int(option: str, value: int, low: int, high: int, hint: str = "") -> None:
    """Refuse ``value`` outside ``low … high``; ``hint`` is appended to the message."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NcaTilesError(f"{option} must be between {low:,} and {high:,}, got {value}{hint}")


def check_seed(option: str, value: int) -> None:
    check_int(option, value, 0, MAX_SEED)


def check_positive_finite(option: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise NcaTilesError(f"{option} must be a positive finite number, got {value}")
