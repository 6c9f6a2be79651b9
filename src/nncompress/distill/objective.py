"""The teacher a ``compress`` run's training stages learn from (``distill:`` in a recipe).

:func:`make_teacher` turns a recipe's :class:`~nncompress.recipe.DistillConfig` and the
run's quality metric into a :class:`nncompress.train.Teacher`: a frozen copy of the
teacher model (eval mode, no gradients) and the loss that compares outputs with it --
Hinton, Vinyals & Dean (2015) logits KD for classifiers, cosine or MSE to the teacher's
outputs for embedding and regression models (``loss: auto`` picks the one that matches
the metric).
"""

from __future__ import annotations

import copy

from torch import nn

from nncompress.distill.losses import CosineLoss, KDLoss, MSELoss
from nncompress.recipe import DistillConfig
from nncompress.train import Teacher

__all__ = ["loss_for", "make_teacher"]

#: metric name -> the distillation loss ``loss: auto`` uses with it (default: kd).
_AUTO_LOSS = {"cosine": "cosine", "mse": "mse", "r2": "mse"}


def loss_for(config: DistillConfig, metric: str) -> tuple[str, nn.Module]:
    """``(name, loss module)`` for ``config.loss`` (``auto`` resolved against ``metric``)."""
    name = _AUTO_LOSS.get(metric, "kd") if config.loss == "auto" else config.loss
    if name == "cosine":
        return name, CosineLoss()
    if name == "mse":
        return name, MSELoss()
    return name, KDLoss(temperature=config.temperature, alpha=config.alpha)


def frozen(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every parameter's ``requires_grad`` off."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_teacher(model: nn.Module, config: DistillConfig, metric: str) -> Teacher:
    """A :class:`Teacher` of a frozen copy of ``model`` with the loss ``config`` names."""
    return Teacher(frozen(model), loss_for(config, metric)[1])
