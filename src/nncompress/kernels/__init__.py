"""Fast inference paths, each beside a plain-torch reference it is tested against."""

from __future__ import annotations

from nncompress.kernels.sparse import (
    SPARSE_PATHS,
    LayerChoice,
    SparseLinear,
    SparsePath,
    SparsifyReport,
    densify,
    sparsify,
)
from nncompress.kernels.sparse_conv import SparseConv

__all__ = ["SPARSE_PATHS", "LayerChoice", "SparseConv", "SparseLinear", "SparsePath",
           "SparsifyReport",
           "densify", "sparsify"]
