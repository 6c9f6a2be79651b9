"""Equivalents of PyTorch's attention built-ins whose every weight lives in a called Linear.

``nn.MultiheadAttention`` keeps its q/k/v projections in one ``in_proj_weight`` read by
``F.multi_head_attention_forward``, and ``nn.TransformerEncoderLayer``'s fused fast path
(``torch._transformer_encoder_layer_fwd``) reads ``self_attn.in_proj_weight``,
``linear1.weight``, ... directly. A technique that replaces or wraps a sublayer (low-rank
factorisation, sparse variational dropout, head or FFN pruning) would silently be bypassed
or break them (``mat1 and mat2 shapes cannot be multiplied``). The classes here compute
the same function through submodules that are always *called*:

- :class:`SplitMultiheadAttention`: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``
  Linears, ``num_heads`` heads of ``head_dim`` (Vaswani et al., 2017); the same call
  signature and results as ``nn.MultiheadAttention`` (masks, ``need_weights``,
  ``batch_first``, unbatched inputs). Heads can be removed (``num_heads`` follows
  ``q_proj``'s width), so the inner width may differ from ``embed_dim``.
- :class:`SplitTransformerEncoderLayer`: ``nn.TransformerEncoderLayer``'s slow path only.

:func:`nncompress.modules.rewrite.decompose` swaps them in; outputs agree with the built-ins
to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    bool_arg,
    choice_arg,
    float_arg,
    fraction_arg,
    positive_arg,
)

__all__ = ["ACTIVATIONS", "SplitMultiheadAttention", "SplitTransformerEncoderLayer",
           "activation_name"]

#: activation name -> (module factory); the names a transformer layer's record may hold.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation_name(fn: object) -> str | None:
    """The :data:`ACTIVATIONS` name of a function or module, or None if it has none."""
    if fn is F.relu or type(fn) is nn.ReLU:
        return "relu"
    if fn is F.gelu or (type(fn) is nn.GELU and fn.approximate == "none"):
        return "gelu"
    if type(fn) is nn.GELU and fn.approximate == "tanh":
        return "gelu_tanh"
    if fn is F.silu or type(fn) is nn.SiLU:
        return "silu"
    if fn is torch.tanh or type(fn) is nn.Tanh:
        return "tanh"
    return None


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = not allowed) as an additive float mask; float masks as given."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    return mask.to(dtype)


class SplitMultiheadAttention(nn.Module):
    """Multi-head attention with separate, called q/k/v/out projections.

    ``q_proj``: Linear(embed_dim -> H * head_dim), ``k_proj``: Linear(kdim -> H *
    head_dim), ``v_proj``: Linear(vdim -> H * head_dim), ``out_proj``: Linear(H * head_dim
    -> embed_dim). Head ``h`` owns rows ``h*head_dim:(h+1)*head_dim`` of q/k/v and the
    same columns of ``out_proj``. Inputs ``[B, L, E]`` (``batch_first``) or ``[L, B, E]``,
    or unbatched ``[L, E]``; returns ``(output, weights or None)`` like
    ``nn.MultiheadAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None,
                 kdim: int | None = None, vdim: int | None = None, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        if head_dim is None:
            if num_heads < 1 or embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads "
                                 f"{num_heads}")
            head_dim = embed_dim // num_heads
        inner = num_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        self.head_dim = head_dim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)

    @property
    def embed_dim(self) -> int:
        return self.out_proj.out_features

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def kdim(self) -> int:
        return self.k_proj.in_features

    @property
    def vdim(self) -> int:
        return self.v_proj.in_features

    @property
    def bias(self) -> bool:
        return self.q_proj.bias is not None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H * hd]`` -> ``[B, H, L, hd]``."""
        return x.reshape(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One additive mask broadcastable to ``[B, H, L, S]``."""
        merged = _float_mask(attn_mask, dtype)
        if merged is not None and merged.dim() == 3:
            if merged.shape[0] == 1:
                merged = merged.unsqueeze(0)
            elif merged.shape[0] == batch * self.num_heads:
                merged = merged.reshape(batch, self.num_heads, *merged.shape[1:])
            else:
                raise ValueError(f"attn_mask of shape {tuple(merged.shape)} does not fit "
                                 f"{batch} x {self.num_heads} heads")
        padding = _float_mask(key_padding_mask, dtype)
        if padding is not None:
            padding = padding.reshape(batch, 1, 1, -1)
            merged = padding if merged is None else merged + padding
        return merged

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt = query.shape[0], query.shape[1]
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        mask = self._mask(attn_mask, key_padding_mask, batch, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            mixed = F.dropout(attn, p=p) @ v if p > 0 else attn @ v
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(mixed.transpose(1, 2).reshape(batch, tgt, -1))
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, batch_first={self.batch_first}")


class SplitTransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post- or pre-norm) without its fused fast path.

    Children as in the built-in: ``self_attn`` (a :class:`SplitMultiheadAttention`),
    ``linear1``, ``dropout``, ``linear2``, ``norm1``, ``norm2``, ``dropout1``,
    ``dropout2``, ``activation``; the same ``forward(src, src_mask, src_key_padding_mask,
    is_causal)``. The constructor args are kept as attributes of the same names (the
    dropout rate as ``dropout_p``, the activation's name as ``activation_name``): they
    describe the layer as built, before any pruning changed its children.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout_p: float = 0.1, activation_name: str = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if activation_name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got "
                             f"{activation_name!r}")
        self.d_model, self.nhead, self.dim_feedforward = d_model, nhead, dim_feedforward
        self.dropout_p, self.activation_name = float(dropout_p), activation_name
        self.layer_norm_eps, self.batch_first, self.bias = layer_norm_eps, batch_first, bias
        dropout, activation = dropout_p, activation_name
        kw = {"device": device, "dtype": dtype}
        self.self_attn = SplitMultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, **kw)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]()

    def _sa_block(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                  key_padding_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


# rewritten attention built-ins: rebuilt parent first, then their children
LAYER_TYPES.register("SplitMultiheadAttention", LayerType(SplitMultiheadAttention, {
    "embed_dim": positive_arg, "num_heads": positive_arg, "head_dim": positive_arg,
    "kdim": positive_arg, "vdim": positive_arg, "bias": bool_arg, "dropout": fraction_arg,
    "batch_first": bool_arg}))
LAYER_TYPES.register("SplitTransformerEncoderLayer", LayerType(SplitTransformerEncoderLayer, {
    "d_model": positive_arg, "nhead": positive_arg, "dim_feedforward": positive_arg,
    "dropout_p": fraction_arg, "activation_name": choice_arg(*ACTIVATIONS),
    "layer_norm_eps": float_arg, "batch_first": bool_arg, "norm_first": bool_arg,
    "bias": bool_arg}))
