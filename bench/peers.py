"""What a user of each peer tool does, written the way that tool's documentation shows.

Every runner takes a trained model and the dataset, and returns the model that tool's user
ends up with; fine-tuning always goes through ``nncompress.train.fine_tune`` with the same
budget as ours, so only the compression method differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from nncompress.data import Dataset, example_input
from nncompress.measure import count_macs
from nncompress.train import fine_tune


def _final_linear(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def _tp_pruner(model: nn.Module, x: torch.Tensor, ratio: float, steps: int) -> tp.pruner.BasePruner:
    """torch-pruning's L1-magnitude pruner (Li et al. 2017 importance), per-layer uniform
    ratio, the classifier's outputs left alone -- the library's documented quick start."""
    return tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        iterative_steps=steps, ignored_layers=[_final_linear(model)])


def tp_ratio_for_macs(model: nn.Module, data: Dataset, macs_reduction: float) -> float:
    """The smallest torch-pruning ratio whose one-shot pruned model has at most
    ``baseline MACs / macs_reduction`` MACs (bisection on copies), for equal-MAC tests."""
    x = example_input(data, 1)
    target = count_macs(model, x).total / macs_reduction
    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        _tp_pruner(trial, x, mid, 1).step()
        if count_macs(trial, x).total <= target:
            hi = mid
        else:
            lo = mid
    return hi


def run_torch_pruning(model: nn.Module, data: Dataset, macs_reduction: float, *, steps: int,
                      epochs_per_step: int, final_epochs: int, lr: float,
                      seed: int, lr_schedule: str = "constant") -> nn.Module:
    """torch-pruning ``MagnitudePruner`` (L1) to equal MACs, iterative, same fine-tuning."""
    ratio = tp_ratio_for_macs(model, data, macs_reduction)
    m = copy.deepcopy(model)
    pruner = _tp_pruner(m, example_input(data, 1), ratio, steps)
    for _ in range(steps):
        pruner.step()
        fine_tune(m, data, epochs=epochs_per_step, lr=lr, seed=seed, progress=False)
    fine_tune(m, data, epochs=final_epochs, lr=lr, seed=seed, progress=False,
              lr_schedule=lr_schedule)
    return m


def try_peer(run: Callable[[], nn.Module]) -> tuple[nn.Module | None, str | None]:
    """Run a peer; a peer that cannot handle a model gives its error instead of a model."""
    try:
        return run(), None
    except Exception as exc:  # the peer's own failure is a result we report
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
