"""The teacher a ``compress`` run's training stages learn from (``distill:`` in a recipe).

:func:`loss_for` turns a recipe's :class:`~nncompress.recipe.DistillConfig` and the
run's quality metric into the loss that compares a student's outputs with the teacher's --
Hinton, Vinyals & Dean (2015) logits KD for classifiers, cosine or MSE to the teacher's
outputs for embedding and regression models (``loss: auto`` picks the one that matches
the metric); :func:`frozen` is the teacher model's copy (eval mode, no gradients) that a
:class:`nncompress.train.Teacher` holds.
"""

from __future__ import annotations

import copy

from torch import nn

from nncompress.distill.losses import CosineLoss, KDLoss, MSELoss
from nncompress.recipe import DistillConfig

__all__ = ["frozen", "loss_for"]

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
