"""``raise_if_interrupted``: a Ctrl-C wrapped by native code (a RuntimeError raised while
handling a KeyboardInterrupt, or naming it) is raised again; other errors pass."""

from __future__ import annotations

import pytest

from nncompress.errors import raise_if_interrupted


def _wrapped() -> RuntimeError:
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("tracer failed") from None   # no __cause__, but __context__
    except RuntimeError as exc:
        return exc


def test_wrapped_interrupts_are_raised_again() -> None:
    exc = _wrapped()
    exc.__suppress_context__ = True
    with pytest.raises(KeyboardInterrupt):
        raise_if_interrupted(exc)
    with pytest.raises(KeyboardInterrupt):
        raise_if_interrupted(RuntimeError("KeyboardInterrupt: <EMPTY MESSAGE>"))


def test_other_errors_pass() -> None:
    raise_if_interrupted(RuntimeError("shape mismatch"))
    try:
        raise ValueError("inner")
    except ValueError as inner:
        outer = RuntimeError("outer")
        outer.__context__ = inner
    raise_if_interrupted(outer)
