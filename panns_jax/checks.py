"""Checks of the values a user passes: one function and one message per kind of value.

The command lines, :class:`panns_jax.tagger.AudioTagger`, :mod:`panns_jax.streaming`,
:mod:`panns_jax.hear` and the export command all call these, so a value is refused with the
same words wherever it is given. Each check raises ``ValueError`` naming ``what`` (the option
or argument, e.g. ``--hop`` or ``hop``) and the value it got. Nothing here loads a model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

MAX_BATCH_SIZE = 1024  # Chunks held before a flush: 1024 x 10 s at 32 kHz is 1.3 GB.
MIN_HOP_S = 0.01  # One 10 ms frame: finer hops multiply the work with no new information.


def is_integer(value: Any) -> bool:
    """A Python or numpy integer, not a bool (``True`` is an ``int`` to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _shown(value: Any) -> str:
    """A number as a user typed it (``0``, ``nan``, ``1e-05``); anything else as its repr."""
    if is_real(value):
        return f"{float(value):g}"
    return repr(value)


def positive_seconds(value: Any, what: str) -> float:
    """``value`` as seconds; ValueError naming ``what`` unless it is positive and finite."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{what} must be a positive, finite number of seconds, got {_shown(value)}"
        )
    return seconds


def hop_seconds(value: Any, what: str = "hop", minimum: float = MIN_HOP_S) -> float:
    """``value`` as positive seconds of at least ``minimum``: finer hops add work, not
    information (the tagger's minimum is one 10 ms frame)."""
    seconds = positive_seconds(value, what)
    if seconds < minimum:
        raise ValueError(
            f"{what} {_shown(value)} s is below {minimum:g} s; finer hops multiply the "
            "work without new information"
        )
    return seconds


def hop_within_window(hop_s: float, window_s: float) -> None:
    """ValueError unless ``0 < hop_s <= window_s``: every sample falls in some window."""
    if not 0 < hop_s <= window_s:
        raise ValueError(
            f"need 0 < hop <= window, got hop {_shown(hop_s)} s, window {_shown(window_s)} s"
        )


def batch_size(value: Any) -> int:
    """``value`` unless it is not an integer in 1..:data:`MAX_BATCH_SIZE`."""
    if not is_integer(value) or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"batch size must be an integer in 1..{MAX_BATCH_SIZE}, got {value!r}")
    return int(value)


def positive_integer(value: Any, what: str) -> int:
    """``value`` unless it is not an integer of at least 1 (top-k, an export's batch)."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def top_k(value: Any) -> int:
    """How many classes to list: a positive integer."""
    return positive_integer(value, "top-k")


def probability(value: Any, what: str = "threshold") -> float:
    """``value`` unless it is not a number in [0, 1] (an event threshold)."""
    if not (is_real(value) and 0 <= value <= 1):
        raise ValueError(f"{what} must be a probability in [0, 1], got {value!r}")
    return float(value)


def hysteresis(on: float, off: float) -> None:
    """ValueError unless ``0 <= off <= on <= 1``: a class switches off below where it
    switched on, so a probability hovering at one threshold does not flicker."""
    if not 0.0 <= off <= on <= 1.0:
        raise ValueError(f"need 0 <= off_threshold <= on_threshold <= 1, got {off}, {on}")


def labels_fit(labels: Sequence[str], num_classes: int) -> None:
    """ValueError unless there is one label per output class."""
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for a {num_classes}-class model")


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(value: Any, what: str = "dtype") -> str:
    """The name of a compute dtype; ValueError naming ``what`` unless float32 or bfloat16."""
    try:
        name = value if isinstance(value, str) else np.dtype(value).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}")
    return name
