"""The hashing trick for weight sharing (technique ``hashed_net``).

Chen, Wilson, Tyree, Weinberger & Chen (2015), "Compressing neural networks with the
hashing trick" (HashedNets): a layer's virtual weight matrix ``V[out, in]`` is never
stored; each entry is read from ``buckets`` shared parameters through a hash and a sign
hash (the layers: :mod:`nncompress.share.hashed_layers`).

The technique replaces selected ``nn.Linear`` layers of a trained model by
:class:`HashedLinear` with ``buckets = round(in * out / compression)`` and ``nn.Embedding``
tables by :class:`HashedEmbedding` with ``round(num_embeddings * embedding_dim /
compression)`` (the padding row stays a constant zero), initialising each bucket to the
mean of the sign-corrected trained weights hashed into it, then fine-tunes.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.share.hashed_layers import (
    MAX_VIRTUAL,
    HashedEmbedding,
    HashedLayer,
    HashedLinear,
    hash_indices,
    hash_keys,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["MAX_VIRTUAL", "HashedEmbedding", "HashedLinear", "HashedNetConfig", "hash_indices",
           "hash_keys", "hashed_net", "to_hashed", "to_hashed_embedding"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]

def _signed_means(layer: HashedLayer, weight: torch.Tensor) -> torch.Tensor:
    """Bucket ``k``: the mean of ``sign * W`` over the entries hashed into it (entries of
    sign 0, e.g. a padding row, do not count; 0 for an empty bucket)."""
    index, sign = layer.hashes()
    flat = index.reshape(-1)
    s = sign.reshape(-1).to(weight.dtype)
    sums = torch.zeros(layer.buckets, dtype=weight.dtype, device=weight.device)
    sums.index_add_(0, flat, weight.reshape(-1) * s)
    counts = torch.zeros_like(sums).index_add_(0, flat, s.abs())
    return sums / counts.clamp(min=1)


def to_hashed(linear: nn.Linear, buckets: int, seed: int) -> HashedLinear:
    """A :class:`HashedLinear` whose bucket ``k`` is the mean of ``sign * W`` over the
    entries hashed into ``k`` (0 for an empty bucket); the bias is copied."""
    w = linear.weight.detach()
    new = HashedLinear(linear.in_features, linear.out_features, buckets, seed,
                       bias=linear.bias is not None, device=w.device).to(w.dtype)
    with torch.no_grad():
        new.hashed_weight.copy_(_signed_means(new, w))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    return new


def to_hashed_embedding(emb: nn.Embedding, buckets: int, seed: int) -> HashedEmbedding:
    """A :class:`HashedEmbedding` (same padding row) whose bucket ``k`` is the mean of
    ``sign * W`` over the table entries hashed into ``k``."""
    w = emb.weight.detach()
    new = HashedEmbedding(emb.num_embeddings, emb.embedding_dim, buckets, seed,
                          padding_idx=emb.padding_idx, device=w.device).to(w.dtype)
    with torch.no_grad():
        new.hashed_weight.copy_(_signed_means(new, w))
    return new


class HashedNetConfig(TechniqueConfig):
    """Parameters of ``hashed_net``.

    - ``compression``: virtual weights per stored bucket (``buckets = round(in * out /
      compression)``, or ``num_embeddings * embedding_dim / compression``, at least 1);
      the paper reports 8x and 64x.
    - ``layers`` / ``exclude``: fnmatch patterns over module names. Only exact
      ``nn.Linear`` and ``nn.Embedding`` (without ``max_norm``) layers are hashed; a
      wildcard that also matches other layers skips them (noted), a pattern without
      wildcards naming another layer type is an error.
    - ``epochs`` / ``lr``: fine-tuning after hashing (0: none).
    - ``seed``: hash seed of the first hashed layer (the next ones get ``seed + 1``, ...);
      default: the run's seed.
    """

    compression: float = Field(default=8.0, ge=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    epochs: int = Field(default=3, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)


def _explicit(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


def _why_not(module: nn.Module) -> str | None:
    """Why ``module`` cannot be hashed (None: it can)."""
    if type(module) is nn.Linear:
        return None
    if type(module) is nn.Embedding:
        if module.max_norm is not None:
            return f"Embedding with max_norm={module.max_norm}"
        return None
    return f"{type(module).__name__}; only nn.Linear and nn.Embedding"


def _selected(model: nn.Module, config: HashedNetConfig, ctx: Context) -> list[str]:
    """Names of the layers to hash; refuses, before any change, a layer a pattern names
    explicitly that cannot be hashed."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for pattern in config.layers:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ModelError(f"hashed_net: layers pattern {pattern!r} matches no module")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.layers)
              and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
    out = []
    for name in chosen:
        reason = _why_not(modules[name])
        if reason is None:
            out.append(name)
        elif name in config.layers and _explicit(name):
            raise UnsupportedLayerError(f"hashed_net: cannot hash {name!r} ({reason})")
        elif any(True for _ in modules[name].parameters(recurse=False)):
            ctx.note(f"hashed_net: not hashed: {name} ({reason})")
    if not out:
        raise UnsupportedLayerError(f"hashed_net: the patterns {list(config.layers)} select "
                                    f"no nn.Linear or nn.Embedding layer in "
                                    f"{type(model).__name__}")
    return out


def hashed_net(model: nn.Module, config: HashedNetConfig, ctx: Context) -> nn.Module:
    """Replace the selected Linear / Embedding layers of ``model`` in place by
    :class:`HashedLinear` / :class:`HashedEmbedding` (Chen et al., 2015), then fine-tune
    ``epochs`` at ``lr``; drops their weight masks."""
    base = ctx.seed if config.seed is None else config.seed
    for offset, name in enumerate(_selected(model, config, ctx)):
        old = model.get_submodule(name)
        virtual = old.weight.numel()
        buckets = max(1, round(virtual / config.compression))
        if isinstance(old, nn.Embedding):
            new: nn.Module = to_hashed_embedding(old, buckets, base + offset)
        else:
            new = to_hashed(old, buckets, base + offset)  # type: ignore[arg-type]
        model.set_submodule(name, new)
        if ctx.masks.pop(f"{name}.weight", None) is not None:
            ctx.note(f"hashed_net: dropped the pruning mask of {name}.weight")
        ctx.note(f"hashed_net: {name}: {virtual} weights -> {buckets} buckets")
    if config.epochs > 0:
        ctx.fine_tune(model, epochs=config.epochs, lr=config.lr, desc="hashed-net fine-tune")
    return model


TECHNIQUES.register("hashed_net", Technique(
    name="hashed_net",
    category="sparse-representation",
    paper="Chen, Wilson, Tyree, Weinberger & Chen (2015): Compressing neural networks with "
          "the hashing trick",
    summary="HashedNets: each selected Linear's weight matrix (or Embedding's table) "
            "becomes a virtual one read through a hash (with a sign hash) from "
            "numel/compression shared parameters, initialised from the trained weights, "
            "then fine-tuned.",
    config=HashedNetConfig,
    apply=hashed_net,
))
