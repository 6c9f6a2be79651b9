"""Sparse variational dropout on weights sampled once per mini-batch (recurrent layers).

Lobacheva, Chirkova & Vetrov (2017), "Bayesian sparsification of recurrent neural
networks", apply the sparse VD of Molchanov, Ashukha & Vetrov (2017) to RNNs: every
weight of the input-hidden matrices ``W^x`` and hidden-hidden matrices ``W^h`` gets a
fully factorised Gaussian posterior ``N(theta, sigma^2)`` under a log-uniform prior, with
the same KL approximation and the same ``log alpha = log sigma^2 - log theta^2`` threshold.
What differs is how the noise enters: following the binary variational dropout for RNNs
(Gal & Ghahramani, 2016) the *same* weights must be used at every time step, so the
local reparameterisation trick does not apply to ``W^x`` nor ``W^h``. The weights
themselves are sampled, ``w = theta + sigma * eps`` with ``eps ~ N(0, 1)`` of the weight's
shape, once per mini-batch (the paper's choice for efficiency; one sample per sequence
would need ``[B, *W.shape]`` noise) and shared by every sequence and time step of it.

:class:`SampledWeights` runs a whole model with such sampled weights through
``torch.func.functional_call``, so a GRU / LSTM / RNN keeps its native kernel and a
``GRUCell`` / ``LSTMCell`` / ``RNNCell`` stepped by a Python loop sees one sample for the
whole forward (every time step). :data:`SAMPLED` lists which parameters are handled this
way: every layer and direction's ``weight_ih_l*``, ``weight_hh_l*`` and (LSTM projection)
``weight_hr_l*``, the cells' ``weight_ih`` / ``weight_hh``, and an ``nn.EmbeddingBag``'s
table (its bag reduction has no cheap output variance, so it is sampled like a recurrent
weight). In eval mode the model runs with ``theta`` where ``log alpha <= threshold`` and
zero elsewhere.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from nncompress.prune.masks import gate_blocks

__all__ = ["LOG_ALPHA_CLIP", "SAMPLED", "SampledWeights", "gate_notes", "log_alpha",
           "sampled_rule"]

#: ``log alpha`` is clipped to ``[-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP]`` (Molchanov et al.).
LOG_ALPHA_CLIP = 10.0

#: Layer type -> its own parameters whose weights are sampled once per mini-batch (first
#: isinstance match wins).
SAMPLED: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.RNNBase, ("weight_ih_l*", "weight_hh_l*", "weight_hr_l*")),
    (nn.RNNCellBase, ("weight_ih", "weight_hh")),
    (nn.EmbeddingBag, ("weight",)),
)


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``clip(log sigma^2 - log theta^2, -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)``, per weight."""
    return torch.clamp(log_sigma2 - torch.log(theta.pow(2) + 1e-8),
                       -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)


def sampled_rule(module: nn.Module, param: str) -> bool:
    """Whether ``module``'s own parameter ``param`` is sampled per mini-batch."""
    for layer_type, patterns in SAMPLED:
        if isinstance(module, layer_type):
            return any(fnmatch.fnmatchcase(param, p) for p in patterns)
    return False


class SampledWeights(nn.Module):
    """``model`` run with the weights ``names`` drawn from ``N(theta, sigma^2)``.

    One ``log_sigma2`` per name (the weight's shape, starting at ``init_log_sigma2``);
    ``theta`` is the model's own parameter. Training forward: one sample of every such
    weight per call (= per mini-batch), shared by all time steps. Eval forward: ``theta``
    with the weights whose ``log alpha`` exceeds ``threshold`` set to zero.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], threshold: float,
                 init_log_sigma2: float) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.threshold = threshold
        params = dict(model.named_parameters())
        self.log_sigma2 = nn.ParameterList(
            [nn.Parameter(torch.full_like(params[n].detach(), init_log_sigma2))
             for n in self.names])

    def thetas(self) -> list[torch.Tensor]:
        """The model's parameters for ``names``, in order."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def log_alphas(self) -> list[torch.Tensor]:
        """``log alpha`` per name (differentiable), in order."""
        return [log_alpha(t, s) for t, s in zip(self.thetas(), self.log_sigma2, strict=True)]

    def alphas(self) -> dict[str, torch.Tensor]:
        """``log alpha`` per name (detached, on the CPU)."""
        return {n: a.detach().cpu() for n, a in zip(self.names, self.log_alphas(),
                                                     strict=True)}

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Bool keep-mask per name: True where ``log alpha <= threshold``."""
        return {n: (a.detach() <= self.threshold).cpu()
                for n, a in zip(self.names, self.log_alphas(), strict=True)}

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights the next forward uses: a fresh sample (training) or masked theta."""
        out: dict[str, torch.Tensor] = {}
        for name, theta, ls2 in zip(self.names, self.thetas(), self.log_sigma2, strict=True):
            if self.training:
                out[name] = theta + torch.exp(0.5 * ls2) * torch.randn_like(theta)
            else:
                keep = log_alpha(theta, ls2).detach() <= self.threshold
                out[name] = torch.where(keep, theta, torch.zeros((), dtype=theta.dtype))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.weights(), args, kwargs)


def gate_notes(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per recurrent weight in ``masks``: the share of zeros in each gate block.

    E.g. ``"layers.0.weight_hh_l0 (GRU): r 97.1 %, z 95.0 %, n 88.2 % pruned"``.
    """
    modules = dict(model.named_modules())
    lines = []
    for name, mask in masks.items():
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            continue
        parts = [f"{gate or 'all'} {100 * (1 - float(mask[rows].float().mean())):.1f} %"
                 for gate, rows in gate_blocks(module, attr)]
        lines.append(f"{name} ({type(module).__name__}): {', '.join(parts)} pruned")
    return lines
