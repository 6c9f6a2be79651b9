"""Top-1 accuracy of a classifier on a loader."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from nncompress import inputs
from nncompress.errors import DataError
from nncompress.measure._common import call_model, eval_mode, first_param

__all__ = ["accuracy"]


def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Fraction in [0, 1] of samples whose arg-max logit equals the label.

    ``loader`` yields ``(x [B, ...], y int64 [B])``. Runs in eval mode under
    ``torch.inference_mode``; every module's train/eval flag is restored afterwards.
    """
    p = first_param(model)
    device = p.device if p is not None else torch.device("cpu")
    correct = total = 0
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            x, y = inputs.to(batch[0], device), batch[1].to(device)
            logits = call_model(model, x)
            correct += int((logits.argmax(dim=-1) == y).sum())
            total += y.numel()
    if total == 0:
        raise DataError("cannot measure accuracy: the loader yields no samples")
    return correct / total
