"""Dynamic network surgery: connection pruning that can splice connections back.

Guo, Yao & Chen (2016), "Dynamic network surgery for efficient DNNs". Every prunable
weight ``W_k`` (any shape, e.g. Linear ``[out, in]``, Conv2d ``[out, in, kh, kw]``) gets a
0/1 mask ``T_k`` of the same shape. Training runs the network with ``W_k * T_k`` but applies
the gradient with respect to that product to *all* of ``W_k`` (straight-through), so a
pruned weight keeps moving and comes back when it grows important again. ``T_k`` is
updated by the paper's two thresholds ``a_k < b_k`` on ``|W_k|``::

    T = 0 where |W| < a_k,   T = 1 where |W| >= b_k,   T unchanged in between (hysteresis)

with ``a_k = (1 - margin) * t_k``, ``b_k = (1 + margin) * t_k`` and ``t_k = mean_k + c_k *
std_k`` of ``|W_k|`` (the paper's code: margin 0.1). ``c_k`` (the paper's crate) is solved
once per layer at the start so that ``t_k`` is the ``sparsity`` quantile of ``|W_k|``; the
mean and std are re-read at each update, so the sparsity tracks the target while weights
move (the paper fixes them at the start; this keeps ``sparsity`` meaningful). Masks are
updated after an optimizer step with probability ``(1 + gamma * iter) ** -power`` (the
paper's decreasing surgery frequency), drawn from a generator seeded by ``ctx.seed``.

Implementation: the shared training loop (``train.fine_tune``) runs with the masked
weights in place; a post-accumulate-grad hook on each pruned weight restores its dense
values just before the optimizer step (so the step applies ``dL/d(W*T)`` to dense ``W``),
and ``after_step`` updates the masks and writes ``W * T`` back for the next forward. At the
end the weights are zeroed by their masks and the masks go into ``ctx.masks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from nncompress import train
from nncompress.prune.masks import (
    apply_masks,
    find_prunable,
    mask_sparsity,
    selected_weights,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["DynamicSurgeryConfig", "Surgery", "dynamic_surgery"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]


class DynamicSurgeryConfig(TechniqueConfig):
    """Parameters of ``dynamic_surgery``.

    - ``sparsity``: target fraction of each selected weight pruned; sets each layer's
      threshold multiplier ``c_k`` (``t_k`` = this quantile of ``|W_k|`` at the start).
    - ``margin``: ``a_k = (1 - margin) t_k``, ``b_k = (1 + margin) t_k`` (paper: 0.1).
    - ``epochs`` / ``lr``: length and Adam learning rate of the surgery training.
    - ``gamma`` / ``power``: mask-update probability ``(1 + gamma * iter) ** -power``.
    - ``layers`` / ``exclude``: fnmatch patterns over prunable parameter names.
    """

    sparsity: float = Field(ge=0.0, lt=1.0)
    margin: float = Field(default=0.1, ge=0.0, lt=1.0)
    epochs: int = Field(default=10, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    gamma: float = Field(default=1e-4, ge=0.0)
    power: float = Field(default=1.0, ge=0.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()


def _stats(weight: torch.Tensor) -> tuple[float, float]:
    """Mean and std of ``|weight|`` (std 1e-12 at least)."""
    mag = weight.detach().abs().float()
    return float(mag.mean()), max(float(mag.std(unbiased=False)), 1e-12)


class Surgery:
    """Masks, thresholds and dense weights of one dynamic-surgery run (no global state).

    ``params``: parameter name -> weight to prune. ``masks[name]`` is a bool tensor of the
    weight's shape. ``crate[name]`` is the layer's threshold multiplier ``c_k``.
    """

    def __init__(self, params: dict[str, nn.Parameter], sparsity: float, margin: float,
                 seed: int) -> None:
        self.params = params
        self.margin = margin
        self.crate: dict[str, float] = {}
        for name, p in params.items():
            mean, std = _stats(p)
            flat = p.detach().abs().float().flatten()
            q = float(torch.quantile(flat, sparsity)) if flat.numel() > 1 else float(flat[0])
            self.crate[name] = (q - mean) / std
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        self.dense = {n: p.detach().clone() for n, p in params.items()}
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.restored: set[str] = set()

    def thresholds(self, name: str) -> tuple[float, float]:
        """``(a_k, b_k)`` for the current dense weight of ``name``."""
        mean, std = _stats(self.dense[name])
        t = max(mean + self.crate[name] * std, 0.0)
        return (1.0 - self.margin) * t, (1.0 + self.margin) * t

    def update_masks(self) -> None:
        """Prune below ``a_k``, splice back at or above ``b_k``, keep the rest."""
        for name, mask in self.masks.items():
            a, b = self.thresholds(name)
            mag = self.dense[name].abs()
            mask &= ~(mag < a)
            mask |= mag >= b

    def restore_dense(self, name: str) -> Callable[[torch.Tensor], None]:
        """A post-accumulate-grad hook: put the dense values back before the step."""
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                param.copy_(self.dense[name])
            self.restored.add(name)
        return hook

    def after_step(self, power: float, gamma: float) -> Callable[[nn.Module], None]:
        """``train`` hook: read the dense weights, maybe update masks, write ``W * T``."""
        def hook(_: nn.Module) -> None:
            self.iteration += 1
            with torch.no_grad():
                for name in self.restored:         # a weight without a gradient kept W*T
                    self.dense[name].copy_(self.params[name])
            self.restored.clear()
            prob = (1.0 + gamma * self.iteration) ** -power
            if float(torch.rand((), generator=self.generator)) < prob:
                self.update_masks()
            self.write_masked()
        return hook

    def write_masked(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.where(self.masks[name], self.dense[name], 0.0))  # +0.0, not -0.0


def _selected(model: nn.Module, config: DynamicSurgeryConfig) -> dict[str, nn.Parameter]:
    names = selected_weights(model, config.layers, config.exclude)
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}


def dynamic_surgery(model: nn.Module, config: DynamicSurgeryConfig, ctx: Context) -> nn.Module:
    """Prune-and-splice training (Guo, Yao & Chen, 2016) in place; masks go to ``ctx.masks``.

    Weights already masked in ``ctx.masks`` start pruned but may be spliced back.
    """
    for line in find_prunable(model).unsupported:
        ctx.note(f"dynamic_surgery: not pruned, no pruning rule for parameter {line}")
    params = _selected(model, config)
    surgery = Surgery(params, config.sparsity, config.margin, ctx.seed)
    for name in params:
        if name in ctx.masks:
            surgery.masks[name] &= ctx.masks[name].to(torch.bool)
    surgery.update_masks()
    surgery.write_masked()
    others = {n: m for n, m in ctx.masks.items() if n not in params}
    hooks = [p.register_post_accumulate_grad_hook(surgery.restore_dense(n))
             for n, p in params.items()]
    step = surgery.after_step(config.power, config.gamma)

    def after_step(m: nn.Module) -> None:
        step(m)
        apply_masks(m, others)

    try:
        train.fine_tune(model, ctx.data, epochs=config.epochs, lr=config.lr, seed=ctx.seed,
                        progress=ctx.progress, desc="dynamic surgery", after_step=after_step,
                        **ctx.train_options())
    finally:
        for handle in hooks:
            handle.remove()
    surgery.write_masked()
    ctx.masks.update({n: m.clone() for n, m in surgery.masks.items()})
    crates = ", ".join(f"{n}: {c:+.2f}" for n, c in surgery.crate.items())
    ctx.note(f"dynamic_surgery: sparsity {100 * mask_sparsity(surgery.masks):.2f} % "
             f"(target {100 * config.sparsity:.2f} %) of {len(params)} tensors after "
             f"{surgery.iteration} steps; threshold multipliers c_k {crates}")
    return model


TECHNIQUES.register("dynamic_surgery", Technique(
    name="dynamic_surgery",
    category="pruning",
    paper="Guo, Yao & Chen (2016): Dynamic network surgery for efficient DNNs",
    summary="Prune and splice: train with masked weights while every weight keeps its "
            "gradient; two thresholds per layer prune small weights and restore ones that "
            "grow again; the zeros are stored sparsely.",
    config=DynamicSurgeryConfig,
    apply=dynamic_surgery,
))
