"""Top-1 accuracy of a classifier on a loader."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from nncompress.measure.quality import quality

__all__ = ["accuracy"]


def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Fraction in [0, 1] of samples whose arg-max logit equals the label: the ``accuracy``
    metric of :func:`nncompress.measure.quality.quality`.

    ``loader`` yields ``(x [B, ...], y int64 [B])``. Runs in eval mode under
    ``torch.inference_mode``; every module's train/eval flag is restored afterwards.
    """
    return quality(model, loader, "accuracy")
