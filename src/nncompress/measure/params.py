"""Parameter counts: total and non-zero elements (what pruning changes)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nncompress.measure._common import count_nonzero

__all__ = ["ParamCount", "count_params"]


@dataclass(frozen=True)
class ParamCount:
    """Element counts (not bytes) of a model's parameters.

    ``total``: parameter elements, a parameter shared by several modules counted once.
    ``nonzero``: those elements that are not exactly zero.
    ``buffers``: buffer elements (e.g. BatchNorm running statistics), not in ``total``.
    """

    total: int
    nonzero: int
    buffers: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of parameter elements that are zero, in [0, 1] (0.0 for no parameters)."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0


def count_params(model: nn.Module) -> ParamCount:
    """Count ``model.parameters()`` elements (total and non-zero) and buffer elements.

    Counts what the parameters hold now: a pruning mask kept outside the model is not
    applied; masks applied by zeroing weights (as nncompress does) show up in ``nonzero``.
    """
    params = list(model.parameters())
    return ParamCount(
        total=sum(p.numel() for p in params),
        nonzero=sum(count_nonzero(p) for p in params),
        buffers=sum(b.numel() for b in model.buffers()),
    )
