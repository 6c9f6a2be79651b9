"""Fast inference paths, each beside a plain-torch reference it is tested against."""

from __future__ import annotations

from nncompress.kernels.sparse import (
    LayerChoice,
    SparseLinear,
    SparsifyReport,
    densify,
    sparsify,
)

__all__ = ["LayerChoice", "SparseLinear", "SparsifyReport", "densify", "sparsify"]
