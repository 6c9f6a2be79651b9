"""Small validators for values read from a ``.nnc`` file; each failure is a FormatError.

Everything read from a file is hostile until checked: these helpers check JSON values for
exact types (a ``bool`` is not an ``int``), ranges and key sets, and name the bad value.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, NoReturn

from nncompress.errors import FormatError

__all__ = [
    "MAX_ELEMENTS",
    "MAX_INT",
    "check_bool",
    "check_dict",
    "check_float",
    "check_int",
    "check_keys",
    "check_list",
    "check_str",
    "clip",
    "fail",
    "short",
]

#: Upper bound of any integer read from a header (offsets, lengths, sizes, layer widths).
MAX_INT = 2**62
#: Upper bound of one tensor's element count (2**31 elements: 8 GiB of float32).
MAX_ELEMENTS = 2**31


def fail(message: str) -> NoReturn:
    """Raise :class:`FormatError` with ``message``."""
    raise FormatError(message)


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (for quoting an exception inside a message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(value: Any, what: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
    """An ``int`` (not ``bool``) within ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"{what} must be an integer, got {short(value)}")
    if not lo <= value <= hi:
        fail(f"{what} must be between {lo} and {hi}, got {value}")
    return value


def check_float(value: Any, what: str) -> float:
    """A finite ``int`` or ``float`` (not ``bool``), returned as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"{what} must be a number, got {short(value)}")
    if not math.isfinite(value):
        fail(f"{what} must be finite, got {value!r}")
    return float(value)


def check_bool(value: Any, what: str) -> bool:
    """A JSON ``true`` / ``false``."""
    if not isinstance(value, bool):
        fail(f"{what} must be true or false, got {short(value)}")
    return value


def check_str(value: Any, what: str) -> str:
    """A ``str``."""
    if not isinstance(value, str):
        fail(f"{what} must be a string, got {short(value)}")
    return value


def check_list(value: Any, what: str, *, max_len: int = MAX_INT) -> list[Any]:
    """A JSON array of at most ``max_len`` items."""
    if not isinstance(value, list):
        fail(f"{what} must be a list, got {short(value)}")
    if len(value) > max_len:
        fail(f"{what} has {len(value)} items, more than {max_len}")
    return value


def check_dict(value: Any, what: str) -> dict[str, Any]:
    """A JSON object (its keys are strings by construction of JSON)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        fail(f"{what} must be a JSON object, got {short(value)}")
    return value


def check_keys(value: Any, what: str, required: Collection[str],
               optional: Collection[str] = ()) -> dict[str, Any]:
    """A JSON object holding every key of ``required`` and nothing outside ``optional``."""
    obj = check_dict(value, what)
    missing = [k for k in required if k not in obj]
    if missing:
        fail(f"{what} lacks key {missing[0]!r}")
    extra = [k for k in obj if k not in required and k not in optional]
    if extra:
        fail(f"{what} has unexpected key {short(extra[0])}")
    return obj
