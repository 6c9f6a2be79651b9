"""Helpers shared by the measurement modules: eval mode with exact restore, safe forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from nncompress import inputs
from nncompress.errors import ModelError, NNCError
from nncompress.inputs import Inputs


def count_nonzero(t: torch.Tensor) -> int:
    """Number of non-zero elements of ``t`` (exact integer)."""
    return int(torch.count_nonzero(t.detach()))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own train/eval flag.

    Restoring per module (not ``model.train(flag)``) keeps e.g. a frozen BatchNorm that a
    user left in eval mode inside a training model exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def call_model(model: nn.Module, x: Inputs) -> Any:
    """``model(x)`` (``model(*x)`` / ``model(**x)`` for a tuple / dict of inputs); a failure
    caused by the input becomes a one-line :class:`ModelError`."""
    try:
        return inputs.call(model, x)
    except NNCError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {type(model).__name__} failed on inputs "
                         f"{inputs.describe(x)}: {first}") from exc


def first_param(model: nn.Module) -> torch.Tensor | None:
    """The model's first parameter (for its device and dtype), or None if it has none."""
    return next(model.parameters(), None)
