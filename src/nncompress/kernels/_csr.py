"""What every sparse module holds: a weight matrix ``[rows, cols]`` in CSR buffers
(``crow_indices [rows + 1]``, ``col_indices [nnz]``, ``values [nnz]``), an optional
frozen ``bias [rows]``, and a cached CSR tensor over those buffers that follows them
through ``.to()`` / ``.double()``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["CSRWeight"]


class CSRWeight(nn.Module):
    """Base of :class:`SparseLinear` and :class:`SparseConv`: ``matrix`` ``[rows, cols]``
    (its zeros are the pruned weights) stored as CSR; inference only."""

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.matrix_shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = matrix.detach().to_sparse_csr()
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self._csr = self._build()

    def _build(self) -> torch.Tensor:
        """The CSR tensor over the current buffers."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                           self.matrix_shape)

    def _apply(self, fn: Any, recurse: bool = True) -> CSRWeight:  # type: ignore[override]
        super()._apply(fn, recurse)
        self._csr = self._build()  # keep the cached views on the moved/cast tensors
        return self

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def dense_matrix(self) -> torch.Tensor:
        """The dense matrix ``[rows, cols]`` (zeros where pruned)."""
        return self._csr.to_dense()
