"""Sparse variational dropout: learn a dropout rate per weight, drop the noisy ones.

Molchanov, Ashukha & Vetrov (2017), "Variational dropout sparsifies deep neural
networks". Each selected weight ``w`` (Linear ``[out, in]``, Conv1d ``[out, in, k]``,
Conv2d ``[out, in, kh, kw]``) gets a posterior ``N(theta, sigma^2)``; ``theta`` is the
layer's own weight and ``log sigma^2`` a new tensor of the same shape. With
``log alpha = log sigma^2 - log theta^2`` (clipped to [-10, 10]) the training objective is
the ELBO per sample ``CE + kl_weight * KL / N`` (the paper's ``N * CE + KL``, divided by
the train-set size ``N``), with the paper's approximation::

    -KL(w) ~= k1 * sigmoid(k2 + k3 * log alpha) - 0.5 * log(1 + 1 / alpha) - k1
    k1 = 0.63576, k2 = 1.87320, k3 = 1.48695

``kl_weight`` ramps linearly from 0 to 1 over the first ``kl_ramp`` share of training (as
the paper's code does). Training uses the local reparameterisation trick: a layer's output
is sampled from ``N(mean, var)`` with ``mean = op(x, theta)`` and ``var = op(x^2,
sigma^2)`` (``op`` = linear or convolution; ``x``: the layer input, e.g. ``[B, in]`` or
``[B, in, L]``). Afterwards weights with ``log alpha > threshold`` (paper: 3) are zeroed,
the layers are plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` again, and the keep-masks
go into ``ctx.masks``. Recurrent and attention weights are not supported: selecting one
raises ``UnsupportedLayerError`` (exclude it with ``exclude``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from nncompress import train
from nncompress.errors import UnsupportedLayerError
from nncompress.prune.masks import (
    apply_masks,
    find_prunable,
    mask_sparsity,
    selected_weights,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["SVDLayer", "SparseVDConfig", "kl_approx", "sparse_vd"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLIP = 10.0


def _linear(layer: nn.Module, x: torch.Tensor, w: torch.Tensor,
            b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def _conv(layer: nn.Module, x: torch.Tensor, w: torch.Tensor,
          b: torch.Tensor | None) -> torch.Tensor:
    return layer._conv_forward(x, w, b)  # type: ignore[operator]


#: The one table of layer types sparse VD can wrap -> the op ``(layer, x, w, b) -> y``.
SVD_OPS: Mapping[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
}


def kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al. (2017) approximation of KL(q || log-uniform prior), summed."""
    neg_kl = (K1 * torch.sigmoid(K2 + K3 * log_alpha)
              - 0.5 * F.softplus(-log_alpha) - K1)
    return -neg_kl.sum()


class SVDLayer(nn.Module):
    """A Linear/Conv layer (``base``; its weight is ``theta``) with a per-weight variance.

    ``log_sigma2`` has the weight's shape. Training forward samples the output with the
    local reparameterisation trick; eval forward uses ``theta`` with the weights whose
    ``log alpha`` exceeds ``threshold`` set to zero.
    """

    def __init__(self, base: nn.Module, threshold: float, init_log_sigma2: float) -> None:
        super().__init__()
        self.base = base
        self.op = SVD_OPS[type(base)]
        self.threshold = threshold
        self.log_sigma2 = nn.Parameter(torch.full_like(base.weight.detach(), init_log_sigma2))

    def log_alpha(self) -> torch.Tensor:
        theta2 = self.base.weight.pow(2)
        return torch.clamp(self.log_sigma2 - torch.log(theta2 + 1e-8),
                           -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)

    def keep_mask(self) -> torch.Tensor:
        """Bool ``[weight shape]``: True where ``log alpha <= threshold``."""
        return self.log_alpha().detach() <= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base.weight, self.base.bias
        if not self.training:
            return self.op(self.base, x, torch.where(self.keep_mask(), weight, 0.0), bias)
        mean = self.op(self.base, x, weight, bias)
        var = self.op(self.base, x * x, torch.exp(self.log_sigma2), None)
        return mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)


class SparseVDConfig(TechniqueConfig):
    """Parameters of ``sparse_vd``.

    - ``epochs`` / ``lr``: Adam training of theta and log sigma^2 (all other parameters
      train too).
    - ``kl_ramp``: share of training over which the KL weight rises from 0 to 1.
    - ``threshold``: weights with ``log alpha`` above it are dropped (paper: 3).
    - ``init_log_sigma2``: starting ``log sigma^2`` of every weight (paper's code: -10).
    - ``layers`` / ``exclude``: fnmatch patterns over prunable parameter names.
    """

    epochs: int = Field(default=30, ge=1)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    kl_ramp: float = Field(default=0.5, ge=0.0, le=1.0)
    threshold: float = Field(default=3.0, ge=-LOG_ALPHA_CLIP, le=LOG_ALPHA_CLIP)
    init_log_sigma2: float = Field(default=-10.0, ge=-30.0, le=10.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()


def _targets(model: nn.Module, config: SparseVDConfig) -> dict[str, str]:
    """Selected weight name -> owning module path; raises for a layer SVD cannot wrap."""
    names = selected_weights(model, config.layers, config.exclude)
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        module = modules[path]
        if type(module) not in SVD_OPS or attr != "weight":
            raise UnsupportedLayerError(
                f"sparse_vd cannot handle parameter {name!r} of layer {path or '<root>'!r} "
                f"({type(module).__name__}); supported: "
                f"{', '.join(t.__name__ for t in SVD_OPS)}; exclude it with exclude=[...]")
        out[name] = path
    return out


def _train_size(ctx: Context) -> int:
    try:
        return max(1, len(ctx.data.train.dataset))  # type: ignore[arg-type]
    except (AttributeError, TypeError):
        return max(1, sum(len(y) for _, y in ctx.data.train))


def _kl_loss(wrappers: list[SVDLayer], n_train: int, ramp_steps: int
             ) -> Callable[[nn.Module], torch.Tensor]:
    """``extra_loss`` hook: ``kl_weight(step) * sum KL / N`` with a linear warm-up."""
    step = [0]

    def extra_loss(_: nn.Module) -> torch.Tensor:
        weight = min(1.0, step[0] / ramp_steps) if ramp_steps > 0 else 1.0
        step[0] += 1
        return weight * sum(kl_approx(w.log_alpha()) for w in wrappers) / n_train
    return extra_loss


def sparse_vd(model: nn.Module, config: SparseVDConfig, ctx: Context) -> nn.Module:
    """Train with sparse variational dropout, then drop high-``log alpha`` weights in place.

    The returned model has the original layer types; its keep-masks go to ``ctx.masks``.
    """
    targets = _targets(model, config)
    for line in find_prunable(model).unsupported:
        ctx.note(f"sparse_vd: not pruned, no pruning rule for parameter {line}")
    apply_masks(model, ctx.masks)
    others = {n: m for n, m in ctx.masks.items() if n not in targets}
    wrappers: dict[str, SVDLayer] = {}
    for name, path in targets.items():
        wrappers[name] = SVDLayer(model.get_submodule(path), config.threshold,
                                  config.init_log_sigma2)
        model.set_submodule(path, wrappers[name])
    try:
        steps = config.epochs * len(ctx.data.train)
    except TypeError:
        steps = config.epochs
    extra = _kl_loss(list(wrappers.values()), _train_size(ctx), round(config.kl_ramp * steps))
    try:
        train.fit(model, ctx.data, epochs=config.epochs, lr=config.lr, seed=ctx.seed,
                  progress=ctx.progress, desc="sparse VD", extra_loss=extra,
                  after_step=(lambda m: apply_masks(m, others)) if others else None)
    finally:
        masks = _unwrap(model, targets, wrappers)
    for name, mask in masks.items():
        if name in ctx.masks:
            mask &= ctx.masks[name].to(device=mask.device, dtype=torch.bool)
    apply_masks(model, masks)
    ctx.masks.update(masks)
    ctx.note(f"sparse_vd: sparsity {100 * mask_sparsity(masks):.2f} % of {len(masks)} "
             f"tensors (log alpha > {config.threshold:g}) after {config.epochs} epochs")
    model.eval()
    return model


def _unwrap(model: nn.Module, targets: Mapping[str, str],
            wrappers: Mapping[str, SVDLayer]) -> dict[str, torch.Tensor]:
    """Put the plain layers back; return their keep-masks (bool, weight-shaped)."""
    masks: dict[str, torch.Tensor] = {}
    for name, path in targets.items():
        wrapper = wrappers[name]
        masks[name] = wrapper.keep_mask().cpu()
        model.set_submodule(path, wrapper.base)
    return masks


TECHNIQUES.register("sparse_vd", Technique(
    name="sparse_vd",
    category="pruning",
    paper="Molchanov, Ashukha & Vetrov (2017): Variational dropout sparsifies deep neural "
          "networks",
    summary="Learn a Gaussian dropout rate per weight with a log-uniform prior (local "
            "reparameterisation, approximate KL); drop weights with log alpha > 3; the "
            "zeros are stored sparsely.",
    config=SparseVDConfig,
    apply=sparse_vd,
))
