"""Sparse variational dropout: learn a dropout rate per weight, drop the noisy ones.

Molchanov, Ashukha & Vetrov (2017), "Variational dropout sparsifies deep neural
networks". Each selected weight ``w`` (Linear ``[out, in]``, Conv1d ``[out, in, k]``,
Conv2d ``[out, in, kh, kw]``, Embedding ``[num, dim]``, recurrent matrices) gets a
posterior ``N(theta, sigma^2)``; ``theta`` is the layer's own weight and ``log sigma^2`` a
new tensor of the same shape. With ``log alpha = log sigma^2 - log theta^2`` (clipped to
[-10, 10]) the training objective is the ELBO per sample ``CE + kl_weight * KL / N`` (the
paper's ``N * CE + KL``, divided by the train-set size ``N``), with the paper's
approximation::

    -KL(w) ~= k1 * sigmoid(k2 + k3 * log alpha) - 0.5 * log(1 + 1 / alpha) - k1
    k1 = 0.63576, k2 = 1.87320, k3 = 1.48695

``kl_weight`` ramps linearly from 0 to 1 over the first ``kl_ramp`` share of training (as
the paper's code does). Linear, convolution and embedding layers train with the local
reparameterisation trick: a layer's output is sampled from ``N(mean, var)`` with ``mean =
op(x, theta)`` and ``var = op(x^2, sigma^2)`` (``op`` = linear or convolution; ``x``: the
layer input, e.g. ``[B, in]`` or ``[B, in, L]``); for an embedding lookup of ids ``x``,
``mean = embedding(x, theta)`` and ``var = embedding(x, sigma^2)`` (one-hot inputs square
to themselves; lookups of the ``padding_idx`` row get no noise).

Recurrent weights (every layer and direction of ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``:
``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*``; the cells' ``weight_ih`` /
``weight_hh``) follow Lobacheva, Chirkova & Vetrov (2017), "Bayesian sparsification of
recurrent neural networks": same prior, KL and threshold, but the weights are sampled
once per mini-batch and shared across time steps, no local reparameterisation (see
:mod:`nncompress.prune.variational_rnn`); the run's log gives each recurrent matrix's
sparsity per gate block (GRU r/z/n, LSTM i/f/g/o). ``nn.EmbeddingBag`` tables are
sampled the same way.

Afterwards weights with ``log alpha > threshold`` (paper: 3) are zeroed, the layers are
their plain types again, and the keep-masks go into ``ctx.masks``. Attention weights
(``nn.MultiheadAttention``'s packed projections) and other types are not supported:
selecting one raises ``UnsupportedLayerError`` before the model is touched (exclude it
with ``exclude``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from nncompress import inputs, train
from nncompress.errors import UnsupportedLayerError
from nncompress.prune.masks import (
    apply_masks,
    find_prunable,
    mask_sparsity,
    selected_weights,
)
from nncompress.prune.variational_rnn import (
    LOG_ALPHA_CLIP,
    SAMPLED,
    SampledWeights,
    gate_notes,
    log_alpha,
    sampled_rule,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["SVD_OPS", "SVDLayer", "SVDOp", "SparseVDConfig", "kl_approx", "sparse_vd"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
K1, K2, K3 = 0.63576, 1.87320, 1.48695


class SVDOp(NamedTuple):
    """How one layer type computes its output's mean and standard deviation.

    ``mean(layer, x, w, b)``: the layer's op with weight ``w`` and bias ``b``;
    ``std(layer, x, sigma2)``: the standard deviation of that output when the weights are
    independent ``N(w, sigma2)`` (local reparameterisation), ``sqrt(var + 1e-8)``.
    """

    mean: Callable[..., torch.Tensor]
    std: Callable[..., torch.Tensor]


def _linear(layer: nn.Module, x: torch.Tensor, w: torch.Tensor,
            b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def _linear_std(layer: nn.Module, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(F.linear(x * x, sigma2) + 1e-8)


def _conv(layer: nn.Module, x: torch.Tensor, w: torch.Tensor,
          b: torch.Tensor | None) -> torch.Tensor:
    return layer._conv_forward(x, w, b)  # type: ignore[operator]


def _conv_std(layer: nn.Module, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(layer._conv_forward(x * x, sigma2, None) + 1e-8)  # type: ignore[operator]


def _embedding(layer: nn.Module, ids: torch.Tensor, w: torch.Tensor,
               b: torch.Tensor | None) -> torch.Tensor:
    return F.embedding(ids, w, layer.padding_idx, layer.max_norm,  # type: ignore[arg-type]
                       layer.norm_type, layer.scale_grad_by_freq,  # type: ignore[arg-type]
                       layer.sparse)  # type: ignore[arg-type]


def _embedding_std(layer: nn.Module, ids: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    std = torch.sqrt(F.embedding(ids, sigma2) + 1e-8)
    if layer.padding_idx is None:
        return std
    return std * (ids != layer.padding_idx).unsqueeze(-1)  # the padding row: a constant 0


#: The one table of layer types sparse VD wraps with local reparameterisation.
SVD_OPS: Mapping[type[nn.Module], SVDOp] = {
    nn.Linear: SVDOp(_linear, _linear_std),
    nn.Conv1d: SVDOp(_conv, _conv_std),
    nn.Conv2d: SVDOp(_conv, _conv_std),
    nn.Embedding: SVDOp(_embedding, _embedding_std),
}


def kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al. (2017) approximation of KL(q || log-uniform prior), summed."""
    neg_kl = (K1 * torch.sigmoid(K2 + K3 * log_alpha)
              - 0.5 * F.softplus(-log_alpha) - K1)
    return -neg_kl.sum()


class SVDLayer(nn.Module):
    """A Linear/Conv/Embedding layer (``base``; its weight is ``theta``) with a per-weight
    variance.

    ``log_sigma2`` has the weight's shape. Training forward samples the output with the
    local reparameterisation trick; eval forward uses ``theta`` with the weights whose
    ``log alpha`` exceeds ``threshold`` set to zero. ``weight`` and ``bias`` are read-only
    views of that deterministic layer, for code that reads a layer's weight directly (e.g.
    the fused fast path of ``nn.TransformerEncoderLayer``).
    """

    def __init__(self, base: nn.Module, threshold: float, init_log_sigma2: float) -> None:
        super().__init__()
        self.base = base
        self.op = SVD_OPS[type(base)]
        self.threshold = threshold
        self.log_sigma2 = nn.Parameter(torch.full_like(base.weight.detach(), init_log_sigma2))

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.base.weight, self.log_sigma2)

    def keep_mask(self) -> torch.Tensor:
        """Bool ``[weight shape]``: True where ``log alpha <= threshold``."""
        return self.log_alpha().detach() <= self.threshold

    @property
    def weight(self) -> torch.Tensor:
        """``theta`` with the weights above the threshold zeroed (read-only)."""
        return torch.where(self.keep_mask(), self.base.weight, 0.0)

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (None for a layer without one)."""
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.op.mean(self.base, x, self.weight, self.bias)
        mean = self.op.mean(self.base, x, self.base.weight, self.bias)
        std = self.op.std(self.base, x, torch.exp(self.log_sigma2))
        return mean + std * torch.randn_like(mean)


class SparseVDConfig(TechniqueConfig):
    """Parameters of ``sparse_vd``.

    - ``epochs`` / ``lr``: Adam training of theta and log sigma^2 (all other parameters
      train too).
    - ``kl_ramp``: share of training over which the KL weight rises from 0 to 1.
    - ``threshold``: weights with ``log alpha`` above it are dropped (paper: 3).
    - ``kl_weight``: scale of the KL term (1: the ELBO; below 1 weights the data more, so
      fewer weights are dropped and less noise is trained in -- what an accuracy budget
      turns down, the threshold alone barely moving the result).
    - ``init_log_sigma2``: starting ``log sigma^2`` of every weight (paper's code: -10).
    - ``layers`` / ``exclude``: fnmatch patterns over prunable parameter names.
    """

    epochs: int = Field(default=30, ge=1)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    kl_ramp: float = Field(default=0.5, ge=0.0, le=1.0)
    threshold: float = Field(default=3.0, ge=-LOG_ALPHA_CLIP, le=LOG_ALPHA_CLIP)
    kl_weight: float = Field(default=1.0, gt=0.0, le=10.0)
    init_log_sigma2: float = Field(default=-10.0, ge=-30.0, le=10.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()


def _supported() -> str:
    return ", ".join([t.__name__ for t in SVD_OPS] + [t.__name__ for t, _ in SAMPLED])


def _targets(model: nn.Module, config: SparseVDConfig) -> tuple[dict[str, str], tuple[str, ...]]:
    """(weight name -> module path of the layers to wrap, names of the sampled weights);
    raises, before anything is changed, for a parameter sparse VD cannot handle."""
    names = selected_weights(model, config.layers, config.exclude)
    modules = dict(model.named_modules())
    layers: dict[str, str] = {}
    sampled: list[str] = []
    for name in names:
        path, _, attr = name.rpartition(".")
        module = modules[path]
        if type(module) in SVD_OPS and attr == "weight":
            layers[name] = path
        elif sampled_rule(module, attr):
            sampled.append(name)
        else:
            raise UnsupportedLayerError(
                f"sparse_vd cannot handle parameter {name!r} of layer {path or '<root>'!r} "
                f"({type(module).__name__}); supported: {_supported()}; exclude it with "
                "exclude=[...]")
    return layers, tuple(sampled)


def _train_size(ctx: Context) -> int:
    try:
        return max(1, len(ctx.data.train.dataset))  # type: ignore[arg-type]
    except (AttributeError, TypeError):
        return max(1, sum(inputs.batch_size(x) for x, _ in ctx.data.train))


def _kl_loss(wrappers: list[SVDLayer], sampler: SampledWeights | None, n_train: int,
             ramp_steps: int, scale: float = 1.0) -> Callable[[nn.Module], torch.Tensor]:
    """``extra_loss`` hook: ``scale * ramp(step) * sum KL / N`` with a linear warm-up."""
    step = [0]

    def extra_loss(_: nn.Module) -> torch.Tensor:
        weight = min(1.0, step[0] / ramp_steps) if ramp_steps > 0 else 1.0
        step[0] += 1
        kl = sum(kl_approx(w.log_alpha()) for w in wrappers)
        if sampler is not None:
            kl = kl + sum(kl_approx(a) for a in sampler.log_alphas())
        return scale * weight * kl / n_train
    return extra_loss


def sparse_vd(model: nn.Module, config: SparseVDConfig, ctx: Context) -> nn.Module:
    """Train with sparse variational dropout, then drop high-``log alpha`` weights in place.

    The returned model has the original layer types; its keep-masks go to ``ctx.masks``.
    Built-ins that read their weights directly (``nn.MultiheadAttention``'s packed
    projections) are rewritten first (:func:`nncompress.modules.decompose`).
    """
    from nncompress.prune.structured import rewrite_builtins

    model = rewrite_builtins(model, ctx.masks, ctx.note, "sparse_vd")
    layers, sampled = _targets(model, config)
    targets = {*layers, *sampled}
    for line in find_prunable(model).unsupported:
        ctx.note(f"sparse_vd: not pruned, no pruning rule for parameter {line}")
    apply_masks(model, ctx.masks)

    others = {n: m for n, m in ctx.masks.items() if n not in targets}
    wrappers: dict[str, SVDLayer] = {}
    for name, path in layers.items():
        wrappers[name] = SVDLayer(model.get_submodule(path), config.threshold,
                                  config.init_log_sigma2)
        model.set_submodule(path, wrappers[name])
    sampler = (SampledWeights(model, sampled, config.threshold, config.init_log_sigma2)
               if sampled else None)
    try:
        steps = config.epochs * len(ctx.data.train)
    except TypeError:
        steps = config.epochs
    extra = _kl_loss(list(wrappers.values()), sampler, _train_size(ctx),
                     round(config.kl_ramp * steps), config.kl_weight)
    try:
        train.fit(model if sampler is None else sampler, ctx.data, epochs=config.epochs,
                  lr=config.lr, seed=ctx.seed, progress=ctx.progress, desc="sparse VD",
                  extra_loss=extra,
                  after_step=(lambda _: apply_masks(model, others)) if others else None,
                  **ctx.train_options())
    finally:
        alphas = _unwrap(model, layers, wrappers)
        if sampler is not None:
            alphas.update(sampler.alphas())
    _finish(model, {n: a <= config.threshold for n, a in alphas.items()}, config, ctx)
    return model


def _finish(model: nn.Module, masks: dict[str, torch.Tensor], config: SparseVDConfig,
            ctx: Context) -> None:
    """AND the new masks with earlier ones, apply them, store them, log the sparsity."""
    for name, mask in masks.items():
        if name in ctx.masks:
            mask &= ctx.masks[name].to(device=mask.device, dtype=torch.bool)
    apply_masks(model, masks)
    ctx.masks.update(masks)
    ctx.note(f"sparse_vd: sparsity {100 * mask_sparsity(masks):.2f} % of {len(masks)} "
             f"tensors (log alpha > {config.threshold:g}) after {config.epochs} epochs")
    for line in gate_notes(model, masks):
        ctx.note(f"sparse_vd: {line}")
    model.eval()


def _unwrap(model: nn.Module, targets: Mapping[str, str],
            wrappers: Mapping[str, SVDLayer]) -> dict[str, torch.Tensor]:
    """Put the plain layers back; return their log alphas (weight-shaped)."""
    alphas: dict[str, torch.Tensor] = {}
    for name, path in targets.items():
        wrapper = wrappers[name]
        alphas[name] = wrapper.log_alpha().detach().cpu()
        model.set_submodule(path, wrapper.base)
    return alphas


TECHNIQUES.register("sparse_vd", Technique(
    name="sparse_vd",
    category="pruning",
    paper="Molchanov, Ashukha & Vetrov (2017): Variational dropout sparsifies deep neural "
          "networks; recurrent weights: Lobacheva, Chirkova & Vetrov (2017): Bayesian "
          "sparsification of recurrent neural networks",
    summary="Learn a Gaussian dropout rate per weight with a log-uniform prior (local "
            "reparameterisation; recurrent weights sampled once per mini-batch, shared "
            "across time steps; approximate KL); drop weights with log alpha > 3; the "
            "zeros are stored sparsely.",
    config=SparseVDConfig,
    apply=sparse_vd,
))
