"""A tiny transformer encoder classifier for 1-D signals (MNIST-1D).

Vaswani et al., "Attention Is All You Need" (2017), with pre-LayerNorm blocks (Xiong et
al., "On Layer Normalization in the Transformer Architecture", 2020) and ViT-style patch
tokens (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021): the length-L signal is
cut into L / patch_size patches, each embedded by one Linear; a learned positional
embedding is added; the token outputs are mean-pooled into a Linear head.

Attention is written out by hand (:class:`MultiHeadSelfAttention`) with separate q/k/v/out
projections so that head pruning (Michel et al., "Are Sixteen Heads Really Better than
One?", 2019) can drop heads and a MAC counter can see every matmul. ``forward`` has no
data-dependent Python control flow, so the model exports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ArchModule, check_classes, check_rank, per_layer

__all__ = ["FeedForward", "MultiHeadSelfAttention", "TinyTransformer", "TransformerBlock",
           "embedder_of"]


class MultiHeadSelfAttention(nn.Module):
    """Softmax self-attention over ``[B, T, dim]`` tokens, ``num_heads`` heads of ``head_dim``.

    ``q``, ``k``, ``v``: Linear(dim -> num_heads * head_dim); ``out``: Linear(num_heads *
    head_dim -> dim). Head ``h`` owns rows ``h*head_dim:(h+1)*head_dim`` of q/k/v and the
    same columns of ``out``. ``num_heads`` is read from ``q``'s width, so a head pruner
    only swaps the four Linears (and ``head_dim`` when it shrinks heads).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H * hd]`` -> ``[B, H, T, hd]``."""
        return x.reshape(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [B, H, T, T]
        mixed = scores.softmax(dim=-1) @ v  # [B, H, T, hd]
        merged = mixed.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # [B, T, H * hd]
        return self.out(merged)


class FeedForward(nn.Module):
    """``fc2(GELU(fc1(x)))``: dim -> hidden -> dim on ``[..., dim]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, head_dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class TinyTransformer(ArchModule):
    """``[B, C, L]`` -> ``L / patch_size`` tokens -> ``depth`` blocks -> mean -> Linear.

    ``num_heads``, ``head_dim`` and ``mlp_dim`` are one value for every block or one per
    block. Layers: ``embed``, ``pos_embedding`` ``[1, T, dim]``, ``blocks.{i}.attn.{q,k,v,
    out}``, ``blocks.{i}.ffn.{fc1,fc2}``, ``norm``, ``classifier``.

    ``num_classes=0``: a mean-pooled embedder -- no classifier (``classifier`` is an
    ``nn.Identity``), the output is the pooled embedding ``[B, dim]``
    (:func:`embedder_of` makes one from a trained classifier).
    """

    arch_name = "transformer"

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int = 4,
                 dim: int = 64, depth: int = 2, num_heads: int | Sequence[int] = 4,
                 head_dim: int | Sequence[int] = 16, mlp_dim: int | Sequence[int] = 128) -> None:
        super().__init__()
        self.input_shape = check_rank("transformer", input_shape, 2, "(channels, length)")
        channels, length = self.input_shape
        patch = per_layer(patch_size, 1, "transformer patch_size")[0]
        if length % patch:
            raise ModelError(f"model 'transformer': signal length {length} is not a multiple "
                             f"of patch_size {patch}")
        width = per_layer(dim, 1, "transformer dim")[0]
        count = per_layer(depth, 1, "transformer depth")[0]
        heads = per_layer(num_heads, count, "transformer num_heads")
        head_dims = per_layer(head_dim, count, "transformer head_dim")
        hiddens = per_layer(mlp_dim, count, "transformer mlp_dim")
        self.patch_size = patch
        self.embed = nn.Linear(channels * patch, width)
        self.pos_embedding = nn.Parameter(torch.zeros(1, length // patch, width))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(width, h, d, m)
                                      for h, d, m in zip(heads, head_dims, hiddens, strict=True)))
        self.norm = nn.LayerNorm(width)
        self.classifier: nn.Module = (
            nn.Identity() if num_classes == 0 and not isinstance(num_classes, bool)
            else nn.Linear(width, check_classes("transformer", num_classes)))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, L]`` -> ``[B, L / patch_size, C * patch_size]`` (patch-major)."""
        patches = x.reshape(x.shape[0], x.shape[1], -1, self.patch_size)  # [B, C, T, P]
        return patches.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.tokens(x)) + self.pos_embedding
        h = self.norm(self.blocks(h))
        return self.classifier(h.mean(dim=1))

    def arch_config(self) -> dict[str, Any]:
        blocks: list[TransformerBlock] = list(self.blocks)
        return {
            "input_shape": list(self.input_shape),
            "num_classes": getattr(self.classifier, "out_features", 0),
            "patch_size": self.patch_size,
            "dim": self.embed.out_features,
            "depth": len(blocks),
            "num_heads": [b.attn.num_heads for b in blocks],
            "head_dim": [b.attn.head_dim for b in blocks],
            "mlp_dim": [b.ffn.fc1.out_features for b in blocks],
        }


def embedder_of(model: TinyTransformer) -> TinyTransformer:
    """A copy of a (trained) transformer without its classifier: the mean-pooled embedding
    ``[B, dim]`` of its last block, after the final LayerNorm, is the output."""
    if not isinstance(model, TinyTransformer):
        raise ModelError(f"embedder_of needs a TinyTransformer, got {type(model).__name__}")
    cfg = {**model.arch_config(), "num_classes": 0}
    embedder = TinyTransformer(**cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    embedder.load_state_dict(state)
    return embedder.eval()
