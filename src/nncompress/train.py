"""The one training loop every technique reuses: ``fit``, ``fine_tune``, ``evaluate``.

Adam (Kingma & Ba, 2015) on cross-entropy, one progress bar over epochs. Hooks let
techniques shape training without a loop of their own:

- ``after_step(model)`` runs after every optimizer step (e.g. re-apply pruning masks,
  Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks");
- ``extra_loss(model)`` is added to the cross-entropy (e.g. a sparsity or distillation term).

Learning rate: constant by default; ``lr_schedule="cosine"`` decays it per step to 0
(Loshchilov & Hutter, "SGDR", 2017), which the reference models train with (an extension
of the documented contract; the default keeps the contract's behaviour).

Determinism: ``fit`` seeds torch with ``seed`` and reseeds the train loader's own
generator (when it has one) so the batch order depends on ``seed`` alone, not on how
often the loader was iterated before. The same call gives the same weights.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nncompress import inputs
from nncompress.data import Dataset
from nncompress.errors import DataError

__all__ = ["TrainLog", "evaluate", "fine_tune", "fit"]

AfterStep = Callable[[nn.Module], None]
ExtraLoss = Callable[[nn.Module], torch.Tensor]
#: name -> learning-rate factor at training progress ``t`` in [0, 1).
LR_SCHEDULES: Mapping[str, Callable[[float], float]] = MappingProxyType({
    "constant": lambda t: 1.0,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
})


@dataclass(frozen=True)
class TrainLog:
    """Per-epoch record of one ``fit`` call.

    ``loss``: mean training loss (cross-entropy + extra loss) per sample; ``train_acc`` and
    ``test_acc``: top-1 accuracy in [0, 1] (train accuracy is measured on the fly, in train
    mode); ``seconds``: wall-clock seconds of each epoch including its evaluation.
    """

    loss: tuple[float, ...]
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    seconds: tuple[float, ...]

    @property
    def epochs(self) -> int:
        return len(self.loss)

    @property
    def final_test_acc(self) -> float | None:
        """Test accuracy after the last epoch (None when no epoch ran)."""
        return self.test_acc[-1] if self.test_acc else None

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))


def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in [0, 1].

    Puts the model in eval mode (and leaves it there) and runs without autograd.
    """
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((inputs.call(model, x).argmax(dim=-1) == y).sum())
            total += len(y)
    if total == 0:
        raise DataError("cannot evaluate: the loader yields no samples")
    return correct / total


def reseed_loader(loader: object, seed: int) -> None:
    """Make the loader's shuffle order a function of ``seed`` only."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


def _steps_per_epoch(loader: object) -> int | None:
    try:
        return max(1, len(loader))  # type: ignore[arg-type]
    except TypeError:  # an iterable-style loader has no length: schedule per epoch
        return None


@dataclass(frozen=True)
class _Schedule:
    """Learning rate of step ``i`` of epoch ``epoch``: ``lr * factor(progress)``."""

    lr: float
    epochs: int
    steps: int | None
    factor: Callable[[float], float]

    def lr_at(self, epoch: int, step: int) -> float:
        within = step / self.steps if self.steps else 0.0
        return self.lr * self.factor(min(epoch + within, self.epochs) / self.epochs)


def _train_epoch(model: nn.Module, data: Dataset, optimizer: torch.optim.Optimizer,
                 schedule: _Schedule, epoch: int, after_step: AfterStep | None,
                 extra_loss: ExtraLoss | None) -> tuple[float, float]:
    """One pass over ``data.train``; returns (mean loss per sample, train accuracy)."""
    model.train()
    loss_sum = 0.0
    correct = seen = 0
    for step, (x, y) in enumerate(data.train):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(epoch, step)
        optimizer.zero_grad(set_to_none=True)
        logits = inputs.call(model, x)
        loss = F.cross_entropy(logits, y)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(dim=-1) == y).sum())
        seen += len(y)
    if seen == 0:
        raise DataError(f"cannot train: the train loader of {data.name!r} yields no samples")
    return loss_sum / seen, correct / seen


def fit(model: nn.Module, data: Dataset, *, epochs: int, lr: float = 1e-3,
        weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
        desc: str = "train", after_step: AfterStep | None = None,
        extra_loss: ExtraLoss | None = None, lr_schedule: str = "constant") -> TrainLog:
    """Train ``model`` in place with Adam on cross-entropy for ``epochs`` epochs.

    Evaluates on ``data.test`` after every epoch; the model ends in eval mode. Only
    parameters with ``requires_grad`` are optimised. ``epochs=0`` returns an empty log.
    ``lr_schedule`` names an entry of :data:`LR_SCHEDULES`.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; known: "
                         f"{', '.join(sorted(LR_SCHEDULES))}")
    torch.manual_seed(seed)
    reseed_loader(data.train, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not params:
        return TrainLog((), (), (), ())
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = _Schedule(lr, epochs, _steps_per_epoch(data.train), LR_SCHEDULES[lr_schedule])
    losses: list[float] = []
    train_accs: list[float] = []
    test_accs: list[float] = []
    seconds: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, file=sys.stderr,
               unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        start = time.perf_counter()
        loss, train_acc = _train_epoch(model, data, optimizer, schedule, epoch, after_step,
                                       extra_loss)
        test_acc = evaluate(model, data.test)
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        train_accs.append(train_acc)
        test_accs.append(test_acc)
        bar.set_postfix(loss=f"{loss:.3f}", train=f"{train_acc:.3f}", test=f"{test_acc:.3f}")
    bar.close()
    return TrainLog(tuple(losses), tuple(train_accs), tuple(test_accs), tuple(seconds))


def fine_tune(model: nn.Module, data: Dataset, *, epochs: int, lr: float = 1e-4,
              weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
              desc: str = "fine-tune", after_step: AfterStep | None = None,
              extra_loss: ExtraLoss | None = None, lr_schedule: str = "constant") -> TrainLog:
    """``fit`` with a smaller default learning rate, for recovering after compression."""
    return fit(model, data, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
               progress=progress, desc=desc, after_step=after_step, extra_loss=extra_loss,
               lr_schedule=lr_schedule)
