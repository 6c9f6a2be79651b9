"""The hashed layers of HashedNets: :class:`HashedLinear` and :class:`HashedEmbedding`.

Chen, Wilson, Tyree, Weinberger & Chen (2015), "Compressing neural networks with the
hashing trick": a layer's virtual weight matrix ``V[rows, cols]`` is never stored; each
entry is read from a small vector of ``buckets`` real parameters ``w`` through a hash
``h(i, j)`` and multiplied by a sign hash ``xi(i, j)`` in ``{-1, +1}`` (the paper's
section 4.3, which removes the bias of colliding entries)::

    V[i, j] = xi(i, j) * w[h(i, j)]

Both hashes are a cheap integer mix of ``(i * cols + j, seed)`` computed with torch ops
(no Python loop over elements), rebuilt from ``(shape, seed)``: the ``.nnc`` file stores
only ``w`` (``hashed_weight``, ``[buckets]``) and the bias. The gather gives ``w[k]`` the
sum of the signed gradients of all entries hashed into bucket ``k``: ``dL/dw_k =
sum_{h(i,j)=k} xi(i, j) dL/dV_ij`` (the paper's eq. 12).

Speed: gathering ``V`` on every forward made a hashed model 2-7x slower than the dense one
at batch 1. In eval mode both layers materialise ``V`` once and reuse it until
``hashed_weight`` changes (its ``_version`` or identity) or the mode switches; the copy is
a plain attribute, never a state_dict entry, so files do not grow.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    bool_arg,
    int_arg,
    optional_arg,
    positive_arg,
)

__all__ = ["MAX_VIRTUAL", "HashedEmbedding", "HashedLayer", "HashedLinear", "hash_indices",
           "hash_keys"]

Device = torch.device | str | None

_M32 = 0xFFFFFFFF
#: the most virtual entries (``in * out``) a hashed layer may have: a HashedLinear's index
#: and sign buffers take 9 bytes per entry, an eval-mode copy of V 4 bytes, and a file's
#: args must not make ``load`` (or the first forward) allocate more.
MAX_VIRTUAL = 2**28


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche mix of int64 values in ``[0, 2**32)`` (murmur3-style finaliser with
    multipliers below ``2**31``, so no product leaves int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def hash_keys(key: torch.Tensor, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, sign)`` of int64 ``keys`` (flat positions ``row * cols + col`` of a virtual
    matrix): ``index`` int64 in ``[0, buckets)``, ``sign`` int8 in ``{-1, +1}``."""
    key = (key ^ (key >> 32)) & _M32
    salt_h = (seed * 0x9E3779B1 + 0x85EBCA6B) & _M32
    salt_s = (seed * 0x9E3779B1 + 0xC2B2AE35) & _M32
    index = _mix32(key ^ salt_h) % buckets
    sign = (1 - 2 * (_mix32(key ^ salt_s) & 1)).to(torch.int8)
    return index, sign


def hash_indices(out_features: int, in_features: int, buckets: int, seed: int,
                 device: Device = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, sign)`` for a ``[out, in]`` virtual matrix: ``index`` int64 in
    ``[0, buckets)`` and ``sign`` int8 in ``{-1, +1}``, deterministic in the arguments."""
    key = torch.arange(out_features * in_features, dtype=torch.int64, device=device)
    index, sign = hash_keys(key, buckets, seed)
    shape = (out_features, in_features)
    return index.reshape(shape), sign.reshape(shape)


class _CachedVirtual(torch.autograd.Function):
    """Forward: the materialised virtual weight as is (no gather); backward: the buckets'
    gradient ``dL/dw_k = sum_{h(i,j)=k} xi(i, j) dL/dV_ij`` (Chen et al.'s eq. 12)."""

    @staticmethod
    def forward(ctx: Any, hashed_weight: torch.Tensor, cached: torch.Tensor,
                layer: HashedLayer) -> torch.Tensor:
        ctx.layer = layer
        ctx.buckets = hashed_weight.shape[0]
        return cached.view_as(cached)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        index, sign = ctx.layer.hashes()
        flat = (grad * sign.to(grad.dtype)).reshape(-1)
        out = torch.zeros(ctx.buckets, dtype=grad.dtype, device=grad.device)
        return out.index_add_(0, index.reshape(-1), flat), None, None


class HashedLayer(nn.Module):
    """What both hashed layers share: ``hashed_weight [buckets]``, the hashes of their
    virtual matrix, and its materialised copy for eval mode.

    In training mode the virtual weight is gathered on every forward (the gradient flows
    to the buckets). In eval mode it is gathered once and kept -- not a buffer, so never
    saved -- until ``hashed_weight`` changes (another tensor, or an in-place update, which
    bumps its ``_version``) or the mode switches; a forward that records gradients still
    gets the buckets' gradient through :class:`_CachedVirtual`.
    """

    hashed_weight: nn.Parameter
    #: (the hashed_weight it was made from, its data_ptr, its _version, V) or None
    _cache: tuple[torch.Tensor, int, int, torch.Tensor] | None = None

    def hashes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index int64, sign int8)``, both shaped like the virtual matrix."""
        raise NotImplementedError

    def virtual_weight(self) -> torch.Tensor:
        """``V = sign * hashed_weight[index]``, differentiable in ``hashed_weight``."""
        index, sign = self.hashes()
        return self.hashed_weight[index] * sign.to(self.hashed_weight.dtype)

    def _virtual(self) -> torch.Tensor:
        """The virtual weight this forward uses: gathered (training) or the cached copy."""
        if self.training:
            return self.virtual_weight()
        w = self.hashed_weight
        cache = self._cache
        if (cache is None or cache[0] is not w or cache[1] != w.data_ptr()
                or cache[2] != w._version):
            with torch.inference_mode(False), torch.no_grad():
                cache = self._cache = (w, w.data_ptr(), w._version, self.virtual_weight())
        cached = cache[3]
        if w.requires_grad and torch.is_grad_enabled():
            return _CachedVirtual.apply(w, cached, self)
        return cached

    def train(self, mode: bool = True) -> HashedLayer:
        self._cache = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: the cache stays on this module
        state.pop("_cache", None)
        return state


class HashedLinear(HashedLayer, nn.Linear):
    """``x[..., in] -> x @ V.T + bias -> [..., out]`` with ``V[i, j] = sign[i, j] *
    hashed_weight[index[i, j]]``; ``hashed_weight``: ``[buckets]``, ``bias``: ``[out]``.

    An ``nn.Linear`` subclass so code that reads Linear widths (the reference models'
    ``arch_config``) keeps working. ``weight`` is a read-only property giving the virtual
    ``V [out, in]`` (so MAC counting sees the real ``in * out`` multiply-accumulates); the
    only weight parameter is ``hashed_weight``, which no Linear rule (pruning, SVD) touches.
    In eval mode ``V`` is materialised once (see :class:`HashedLayer`): as fast as a dense
    Linear.
    """

    def __init__(self, in_features: int, out_features: int, buckets: int, seed: int = 0,
                 bias: bool = True, device: Device = None) -> None:
        nn.Module.__init__(self)
        if min(in_features, out_features, buckets) < 1:
            raise ValueError(f"HashedLinear needs positive sizes, got in_features="
                             f"{in_features}, out_features={out_features}, buckets={buckets}")
        if in_features * out_features > MAX_VIRTUAL:
            raise ValueError(f"HashedLinear of {in_features} x {out_features} exceeds "
                             f"{MAX_VIRTUAL} virtual weights")
        self.in_features, self.out_features = in_features, out_features
        self.buckets, self.seed = buckets, seed
        self.hashed_weight = nn.Parameter(torch.empty(buckets, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        index, sign = hash_indices(out_features, in_features, buckets, seed, device=device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The usual Linear init bounds (``1/sqrt(in)``) for the buckets and the bias."""
        if "index" not in self._buffers:  # nn.Linear internals may call this early
            return
        bound = 1.0 / max(1, self.in_features) ** 0.5
        nn.init.uniform_(self.hashed_weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def hashes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index, self.sign

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:  # read-only: the buckets are the parameter
        return self._virtual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._virtual(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"buckets={self.buckets}, seed={self.seed}, bias={self.bias is not None}")


class HashedEmbedding(HashedLayer, nn.Embedding):
    """``ids [...] -> V[ids] [..., dim]`` for a virtual table ``V [num_embeddings, dim]``,
    ``V[i, j] = sign(i, j) * hashed_weight[h(i, j)]`` (the same hashes as a
    ``[num_embeddings, dim]`` :class:`HashedLinear`); the ``padding_idx`` row is a constant
    zero (its sign is 0).

    No index/sign buffers: training hashes only the rows a batch looks up (so a large
    vocabulary costs no ``9 * num * dim`` bytes of buffers); eval mode materialises ``V``
    once (see :class:`HashedLayer`) and is a plain lookup. An ``nn.Embedding`` subclass whose
    ``weight`` is the read-only virtual table; ``max_norm`` is not supported.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, buckets: int, seed: int = 0,
                 padding_idx: int | None = None, device: Device = None) -> None:
        nn.Module.__init__(self)
        if min(num_embeddings, embedding_dim, buckets) < 1:
            raise ValueError(f"HashedEmbedding needs positive sizes, got num_embeddings="
                             f"{num_embeddings}, embedding_dim={embedding_dim}, "
                             f"buckets={buckets}")
        if num_embeddings * embedding_dim > MAX_VIRTUAL:
            raise ValueError(f"HashedEmbedding of {num_embeddings} x {embedding_dim} exceeds "
                             f"{MAX_VIRTUAL} virtual weights")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"HashedEmbedding padding_idx={padding_idx} is outside the "
                                 f"{num_embeddings} rows")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.buckets, self.seed, self.padding_idx = buckets, seed, padding_idx
        self.max_norm, self.norm_type = None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.hashed_weight = nn.Parameter(torch.empty(buckets, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1) buckets, as nn.Embedding initialises its table."""
        if "hashed_weight" in self._parameters:
            nn.init.normal_(self.hashed_weight)

    def _row_hashes(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = torch.arange(self.embedding_dim, device=rows.device)
        index, sign = hash_keys(rows.unsqueeze(-1) * self.embedding_dim + cols,
                                self.buckets, self.seed)
        if self.padding_idx is not None:
            sign = sign * (rows != self.padding_idx).unsqueeze(-1).to(torch.int8)
        return index, sign

    def hashes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._row_hashes(torch.arange(self.num_embeddings,
                                             device=self.hashed_weight.device))

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:  # read-only: the buckets are the parameter
        return self._virtual()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"HashedEmbedding expects int64 or int32 ids, got {ids.dtype}")
        if not self.training:
            return F.embedding(ids, self._virtual(), self.padding_idx)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"HashedEmbedding ids must be in [0, {self.num_embeddings}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        index, sign = self._row_hashes(ids.long())
        return self.hashed_weight[index] * sign.to(self.hashed_weight.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, buckets={self.buckets}, "
                f"seed={self.seed}, padding_idx={self.padding_idx}")


# index/sign buffers are rebuilt from (shape, seed): a file holds only the buckets and bias
LAYER_TYPES.register("HashedLinear", LayerType(HashedLinear, {
    "in_features": positive_arg, "out_features": positive_arg, "buckets": positive_arg,
    "seed": int_arg, "bias": bool_arg}))
LAYER_TYPES.register("HashedEmbedding", LayerType(HashedEmbedding, {
    "num_embeddings": positive_arg, "embedding_dim": positive_arg, "buckets": positive_arg,
    "seed": int_arg, "padding_idx": optional_arg(int_arg)}))
