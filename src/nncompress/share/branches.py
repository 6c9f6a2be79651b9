"""A multi-branch model: one frozen, shared backbone and several task heads.

The survey's multiplexing section (Eshratifar & Pedram 2020 and the shared-backbone
multi-task models it discusses): the expensive feature extractor is computed once per
input and shared by every task; each task adds only a small head. The backbone is frozen
(weights and BatchNorm statistics), so adding a task never changes the others' answers;
each head is trained on its own task's data through :func:`nncompress.train.fit`.

Shapes: ``backbone`` maps ``[B, *input_shape]`` to features ``[B, *feature_shape]``; each
head maps features to that task's logits ``[B, classes_t]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nncompress.data import Dataset, example_input
from nncompress.errors import DataError, ModelError
from nncompress.share._views import OutputView
from nncompress.train import fit

__all__ = ["MultiBranch", "train_heads"]


class MultiBranch(nn.Module):
    """``forward(x)`` returns every head's logits (a tuple, backbone run once);
    :meth:`branch` gives one task as a single-output module."""

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ModelError("a multi-branch model needs at least one head")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> MultiBranch:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics never move
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(x)
        return tuple(head(features) for head in self.heads)

    def branch(self, index: int) -> nn.Module:
        """Task ``index``: backbone then head ``index``, returning that head's logits."""
        if not 0 <= index < len(self.heads):
            raise ModelError(f"no head {index!r}; this model has {len(self.heads)}")
        return OutputView(self, index)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Head ``index``'s logits (the backbone runs, the other heads do not)."""
        return self.heads[index](self.backbone(x))


def train_heads(backbone: nn.Module, heads: Sequence[nn.Module], tasks: Sequence[Dataset],
                *, epochs: int, lr: float = 1e-3, seed: int = 0,
                progress: bool = False) -> MultiBranch:
    """Freeze ``backbone`` and train head ``t`` on ``tasks[t]`` (Adam, cross-entropy,
    ``epochs`` epochs; only the head's parameters move). Returns the :class:`MultiBranch`."""
    if len(heads) != len(tasks):
        raise ModelError(f"{len(heads)} heads but {len(tasks)} task datasets")
    shape = tasks[0].input_shape
    for data in tasks:
        if data.input_shape != shape:
            raise DataError(f"the tasks must share an input: {data.name!r} has samples "
                            f"shaped {data.input_shape}, {tasks[0].name!r} {shape}")
    model = MultiBranch(backbone, heads)
    for t, data in enumerate(tasks):
        branch = model.branch(t)
        with torch.no_grad():
            out = branch.eval()(example_input(data, 2))
        if out.dim() != 2 or out.shape[1] < data.num_classes:
            raise ModelError(f"head {t} gives outputs shaped {tuple(out.shape[1:])} per "
                             f"sample; task {data.name!r} has {data.num_classes} classes")
        fit(branch, data, epochs=epochs, lr=lr, seed=seed + t, progress=progress,
            desc=f"head {t} on {data.name}")
    return model.eval()
