"""User-facing errors. Each one's ``str()`` is a single line that names the bad value.

The CLI prints ``nncompress: error: <message>`` and exits non-zero for any of these.
"""

from __future__ import annotations


class NNCError(Exception):
    """Base class of every error caused by bad input (never by a bug in nncompress)."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class FormatError(NNCError):
    """A .nnc file is missing, truncated, corrupted, hostile or of a newer format version."""


class RecipeError(NNCError):
    """A recipe is invalid: unknown technique, unknown or mistyped parameter, bad YAML."""


class DataError(NNCError):
    """A dataset name or user data reference cannot be resolved or gives unusable data."""


class ModelError(NNCError):
    """A model name is unknown, or a model does not fit the data it is given."""


class UnsupportedLayerError(NNCError):
    """A technique met a layer type it cannot handle; the message names the layer."""


class ConstraintError(NNCError):
    """A requested target (sparsity, ratio, budget) is impossible."""


class KernelUnavailableError(NNCError):
    """A C kernel cannot be built or loaded here (no gcc, a failed build); names which."""


def raise_if_interrupted(exc: BaseException) -> None:
    """Raise KeyboardInterrupt when ``exc`` is, wraps or was raised while handling one: a
    Ctrl-C that lands inside native code that calls back into Python (torch's ONNX tracer,
    ONNX Runtime) comes back wrapped in a RuntimeError, which a broad ``except Exception``
    must not swallow."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt) or "KeyboardInterrupt" in str(cur)[:2000]:
            raise KeyboardInterrupt from exc
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
