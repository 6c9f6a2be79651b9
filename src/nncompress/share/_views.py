"""One output of a multi-output model as a module of its own (for ``accuracy``, ``fit``,
``count_macs`` and anything else that expects ``model(x) -> logits``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OutputView"]


class OutputView(nn.Module):
    """``owner.output(x, index)``: the owner computes only what that output needs. The
    owner is a child module, so ``train()`` / ``eval()`` on the view reach it."""

    def __init__(self, owner: nn.Module, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.output(x, self.index)
