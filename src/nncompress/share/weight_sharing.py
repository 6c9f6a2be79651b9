"""Trained quantization by weight sharing (technique ``weight_sharing``).

Han, Mao & Dally (2015), "Deep compression: compressing deep neural networks with
pruning, trained quantization and Huffman coding", section 3: the surviving (non-zero)
weights of each layer are clustered with 1-D k-means into ``2**bits`` shared values
(paper: 8 bits for conv, 5 for fully connected layers); every weight becomes an index
into its layer's codebook. The centroids are then fine-tuned: the layer's weight is the
gather ``W = C[I]`` (``C: [k]``, ``I``: int64 shaped like ``W``), so autograd gives each
centroid the *sum* of its members' gradients, ``dL/dC_k = sum_{I_ij = k} dL/dW_ij``
(the paper's equation 3), and only ``C`` is updated.

Pruned weights (False in ``ctx.masks``, or exactly zero) stay exact zeros: they are not
clustered and are no cluster of their own. The result is a plain dense weight whose
values are exactly the centroids (plus zeros); the ``.nnc`` container stores such a
tensor as a codebook plus indices and Huffman-codes it (its job, not this module's).
A later ``fine_tune`` stage would train the shared weights apart again: share last.

Which weights are shared follows ``prune.masks.PRUNABLE`` (weights of Linear, conv,
recurrent, attention and embedding layers; biases and norms stay float). The bits per
layer type come from one table, :data:`BITS_FIELD`.

Recurrent matrices stack their gates' blocks (GRU r/z/n, LSTM i/f/g/o), whose value
distributions differ. ``rnn_codebooks="gate"`` (our option) clusters every gate block
separately into ``2**rnn_bits`` values; the container stores one codebook per tensor, so
a tensor of G gates then holds up to ``G * 2**rnn_bits`` distinct values, whose indices
need about ``log2(G)`` more bits each (less after Huffman coding): the log says so.
Measured on the reference GRU / LSTM (see the ``deep-compression`` recipe), per-gate
codebooks stored more for no accuracy, so the default is ``"tensor"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from nncompress import train
from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.prune.masks import apply_masks, find_prunable, gate_blocks, selected_weights
from nncompress.share.kmeans import OPTIMAL_MAX_WORK, Init, kmeans_1d
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = [
    "BITS_FIELD",
    "CentroidModel",
    "SharedWeight",
    "WeightSharingConfig",
    "cluster_blocks",
    "cluster_weight",
    "fine_tune_centroids",
    "weight_sharing",
]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
Bits = Annotated[int, Field(ge=1, le=16)]

#: Layer type -> the config field giving its bits (first isinstance match wins).
BITS_FIELD: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvNd, "conv_bits"),
    (nn.RNNBase, "rnn_bits"),
    (nn.RNNCellBase, "rnn_bits"),
    (nn.Linear, "linear_bits"),
    (nn.Bilinear, "linear_bits"),
    (nn.MultiheadAttention, "linear_bits"),
    (nn.Embedding, "embedding_bits"),
    (nn.EmbeddingBag, "embedding_bits"),
)


class WeightSharingConfig(TechniqueConfig):
    """Parameters of ``weight_sharing``.

    - ``bits``: if set, the bits of every shared layer (``2**bits`` non-zero centroids);
      otherwise ``conv_bits`` (paper: 8), ``linear_bits`` (paper: 5), ``rnn_bits`` and
      ``embedding_bits`` (nn.Embedding / nn.EmbeddingBag tables) by layer type.
    - ``rnn_codebooks``: ``"tensor"`` clusters a recurrent matrix as a whole; ``"gate"``
      clusters each gate block of it separately, ``2**bits`` values per gate (see the
      module docstring for what that costs in stored bits).
    - ``init``: centroid initialisation, ``linear`` (paper), ``density`` or ``random``.
    - ``method``: ``lloyd`` iterations (at most ``iters``) or ``optimal`` (exact 1-D
      dynamic programming where ``k * n_unique**2 <= 2**28``, Lloyd elsewhere, noted).
    - ``epochs`` / ``lr``: centroid fine-tuning (0 epochs: cluster only); biases and
      unshared weights train alongside, with their masks kept.
    - ``layers`` / ``exclude``: fnmatch patterns over parameter names.
    - ``zero_below``: a centroid with ``|c| <= zero_below * max|w|`` (the layer's largest
      surviving weight) becomes an exact zero, its members pruned (kept pruned through
      fine-tuning). 0 (default) keeps every centroid, as the paper does. Our addition:
      clustering can reveal that many surviving weights are effectively zero (sparse VD
      keeps small weights whose noise is low), and storing them as zeros costs nothing
      in accuracy but shrinks the sparse streams.
    """

    bits: Bits | None = None
    conv_bits: Bits = 8
    linear_bits: Bits = 5
    rnn_bits: Bits = 5
    embedding_bits: Bits = 5
    rnn_codebooks: Literal["tensor", "gate"] = "tensor"
    init: Init = "linear"
    method: Literal["lloyd", "optimal"] = "lloyd"
    iters: int = Field(default=100, ge=0)
    epochs: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    zero_below: float = Field(default=0.0, ge=0.0, lt=1.0)


@dataclass(frozen=True)
class SharedWeight:
    """One shared weight: ``centroids [k]`` (the weight's dtype), ``index`` int64 and
    ``keep`` bool, both shaped like the weight (index 0 where ``keep`` is False)."""

    centroids: torch.Tensor
    index: torch.Tensor
    keep: torch.Tensor

    def weight(self, centroids: torch.Tensor | None = None) -> torch.Tensor:
        """``where(keep, C[index], 0)``; differentiable in ``centroids`` (default: own)."""
        c = self.centroids if centroids is None else centroids
        return torch.where(self.keep, c[self.index], torch.zeros((), dtype=c.dtype))


def cluster_weight(weight: torch.Tensor, keep: torch.Tensor, bits: int, *,
                   init: Init = "linear", method: str = "lloyd", iters: int = 100,
                   seed: int = 0) -> SharedWeight:
    """k-means (``k = 2**bits``) over ``weight[keep]``; an all-pruned weight gets k = 1."""
    w = weight.detach().cpu()
    keep = keep.to(device="cpu", dtype=torch.bool) & (w != 0)
    values = w[keep]
    if values.numel() == 0:
        cents = torch.zeros(1, dtype=w.dtype)
        return SharedWeight(cents, torch.zeros(w.shape, dtype=torch.int64), keep)
    cents, labels = kmeans_1d(values, 2**bits, init=init, method=method,  # type: ignore[arg-type]
                              iters=iters, seed=seed)
    index = torch.zeros(w.shape, dtype=torch.int64)
    index[keep] = labels
    return SharedWeight(cents.to(w.dtype), index, keep)


def cluster_blocks(weight: torch.Tensor, keep: torch.Tensor, bits: int,
                   blocks: Sequence[slice], **kwargs: Any) -> SharedWeight:
    """:func:`cluster_weight` on each row block of ``weight`` (e.g. the gates of a
    recurrent matrix), merged into one :class:`SharedWeight` whose codebook is the blocks'
    codebooks one after another (up to ``len(blocks) * 2**bits`` centroids)."""
    parts = [cluster_weight(weight[rows], keep[rows], bits, **kwargs) for rows in blocks]
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.centroids.numel())
    return SharedWeight(torch.cat([p.centroids for p in parts]),
                        torch.cat([p.index + o for p, o in zip(parts, offsets, strict=True)]),
                        torch.cat([p.keep for p in parts]))


class CentroidModel(nn.Module):
    """``model`` run with its shared weights replaced by ``C[I]`` gathers (one call of
    ``torch.func.functional_call``), so the centroids ``C`` are what trains."""

    def __init__(self, model: nn.Module, shared: Mapping[str, SharedWeight]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(shared)
        self.shared = dict(shared)
        self.centroids = nn.ParameterList(
            [nn.Parameter(shared[n].centroids.clone()) for n in self.names])

    def current(self) -> dict[str, torch.Tensor]:
        """The shared weights as the centroids now give them."""
        return {n: self.shared[n].weight(c) for n, c in zip(self.names, self.centroids,
                                                                  strict=True)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.current(), args, kwargs)


def _bits_for(module: nn.Module, config: WeightSharingConfig, name: str) -> int:
    for layer_type, fld in BITS_FIELD:
        if isinstance(module, layer_type):
            return config.bits if config.bits is not None else int(getattr(config, fld))
    raise UnsupportedLayerError(f"weight_sharing has no bits rule for {name!r} "
                                f"({type(module).__name__})")


def fine_tune_centroids(model: nn.Module, shared: Mapping[str, SharedWeight], ctx: Context, *,
                        epochs: int, lr: float) -> dict[str, SharedWeight]:
    """Train the centroids (and the unshared parameters) ``epochs`` epochs with ``train.fit``.

    Writes ``C[I]`` into the shared weights of ``model`` and returns the updated
    :class:`SharedWeight` per name; masks of unshared weights in ``ctx.masks`` stay applied.
    """
    params = dict(model.named_parameters())
    frozen = {n: params[n].requires_grad for n in shared}
    others = {n: m for n, m in ctx.masks.items() if n not in shared}
    wrapper = CentroidModel(model, shared)
    try:
        for n in shared:
            params[n].requires_grad_(False)
        train.fine_tune(wrapper, ctx.data, epochs=epochs, lr=lr, seed=ctx.seed,
                        progress=ctx.progress, desc="centroid fine-tune",
                        after_step=(lambda w: apply_masks(model, others)) if others else None,
                        **ctx.train_options())
    finally:
        for n, flag in frozen.items():
            params[n].requires_grad_(flag)
    out = {n: SharedWeight(c.detach().clone(), shared[n].index, shared[n].keep)
           for n, c in zip(wrapper.names, wrapper.centroids, strict=True)}
    _write(model, out)
    return out


def _write(model: nn.Module, shared: Mapping[str, SharedWeight]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, sw in shared.items():
            params[name].copy_(sw.weight().to(params[name].device))


def _method_for(sw_values: int, k: int, method: str) -> str:
    if method == "optimal" and k * sw_values * sw_values > OPTIMAL_MAX_WORK:
        return "lloyd"
    return method


def zero_small_centroids(sw: SharedWeight, zero_below: float) -> tuple[SharedWeight, int]:
    """Prune the members of every centroid with ``|c| <= zero_below * max|w|``; returns
    the updated weight and how many weights were pruned."""
    if zero_below <= 0 or not bool(sw.keep.any()):
        return sw, 0
    values = sw.weight()[sw.keep]
    small = sw.centroids.abs() <= zero_below * float(values.abs().max())
    drop = sw.keep & small[sw.index]
    return SharedWeight(sw.centroids, sw.index, sw.keep & ~drop), int(drop.sum())


def _blocks(module: nn.Module, attr: str, config: WeightSharingConfig
            ) -> tuple[tuple[str, slice], ...] | None:
    """The gate blocks to cluster apart, or None to cluster the tensor as a whole."""
    if config.rnn_codebooks != "gate" or not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return None
    blocks = gate_blocks(module, attr)
    return blocks if len(blocks) > 1 else None


def _share_one(weight: torch.Tensor, keep: torch.Tensor, bits: int,
               blocks: tuple[tuple[str, slice], ...] | None, config: WeightSharingConfig,
               ctx: Context, name: str) -> SharedWeight:
    """Cluster one weight (per block when ``blocks`` is given), noting a Lloyd fallback."""
    w = weight.detach().cpu()
    rows = [r for _, r in blocks] if blocks else [slice(0, w.shape[0])]
    methods = set()
    for r in rows:
        n_unique = int(torch.unique(w[r][keep[r]]).numel())
        method = _method_for(n_unique, 2**bits, config.method)
        methods.add(method)
        if method != config.method:
            ctx.note(f"weight_sharing: {name}: {n_unique} unique values are too many for "
                     f"optimal k-means with k={2**bits}; used Lloyd")
    method = "lloyd" if "lloyd" in methods else config.method
    kwargs: dict[str, Any] = {"init": config.init, "method": method, "iters": config.iters,
                              "seed": ctx.seed}
    if not blocks:
        return cluster_weight(weight, keep, bits, **kwargs)
    ctx.note(f"weight_sharing: {name}: one codebook of {2**bits} values per gate "
             f"({'/'.join(g for g, _ in blocks)}): up to {len(blocks) * 2**bits} distinct "
             "values in the tensor's stored codebook")
    return cluster_blocks(weight, keep, bits, rows, **kwargs)


def _cluster_all(model: nn.Module, names: Sequence[str], config: WeightSharingConfig,
                 ctx: Context) -> dict[str, SharedWeight]:
    params = dict(model.named_parameters())
    shared: dict[str, SharedWeight] = {}
    for name in names:
        weight = params[name]
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        bits = _bits_for(module, config, name)
        keep = ctx.masks.get(name, torch.ones(weight.shape, dtype=torch.bool))
        if keep.shape != weight.shape:
            raise ModelError(f"pruning mask for {name!r} has shape {tuple(keep.shape)}, the "
                             f"weight has {tuple(weight.shape)}")
        keep = keep.cpu().bool() & (weight.detach().cpu() != 0)
        sw = _share_one(weight, keep, bits, _blocks(module, attr, config), config, ctx, name)
        shared[name], dropped = zero_small_centroids(sw, config.zero_below)
        if dropped:
            ctx.note(f"weight_sharing: {name}: {dropped} weights on centroids within "
                     f"{config.zero_below:g} x max|w| of zero set to zero")
    return shared


def weight_sharing(model: nn.Module, config: WeightSharingConfig, ctx: Context) -> nn.Module:
    """Share the selected weights of ``model`` in place (Han, Mao & Dally, 2015).

    Each selected weight ends with at most ``2**bits`` distinct non-zero values plus its
    pruned zeros; its keep-mask (existing mask AND non-zero) goes to ``ctx.masks``.
    """
    names = selected_weights(model, config.layers, config.exclude)
    for line in find_prunable(model).unsupported:
        ctx.note(f"weight_sharing: not shared, no rule for parameter {line}")
    apply_masks(model, ctx.masks)
    shared = _cluster_all(model, names, config, ctx)
    _write(model, shared)
    if config.epochs > 0:
        shared = fine_tune_centroids(model, shared, ctx, epochs=config.epochs, lr=config.lr)
    params = dict(model.named_parameters())
    for name, sw in shared.items():
        ctx.masks[name] = sw.keep.clone()
        w = params[name].detach()
        distinct = int(torch.unique(w[w != 0]).numel())
        ctx.note(f"weight_sharing: {name}: {distinct} distinct non-zero values "
                 f"(k <= {sw.centroids.numel()}), {100 * float((w == 0).float().mean()):.2f} "
                 f"% zeros")
    return model


TECHNIQUES.register("weight_sharing", Technique(
    name="weight_sharing",
    category="sparse-representation",
    paper="Han, Mao & Dally (2015): Deep compression: compressing deep neural networks "
          "with pruning, trained quantization and Huffman coding",
    summary="Per-layer 1-D k-means over the non-zero weights (linear / density / random "
            "init, Lloyd or exact DP) into 2**bits shared values, then centroid "
            "fine-tuning with each centroid's gradient the sum of its members'.",
    config=WeightSharingConfig,
    apply=weight_sharing,
))
