"""The one training loop every technique reuses: ``fit``, ``fine_tune``, ``evaluate``.

Adam (Kingma & Ba, 2015) on cross-entropy, one progress bar over epochs. Hooks let
techniques shape training without a loop of their own:

- ``after_step(model)`` runs after every optimizer step (e.g. re-apply pruning masks,
  Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks");
- ``extra_loss(model)`` is added to the cross-entropy (e.g. a sparsity or distillation term).

Distillation: given a :class:`Teacher` (a model and a loss such as
:class:`nncompress.distill.losses.KDLoss`), the training loss is
``teacher.loss(student_out, teacher_out, labels)`` instead of the cross-entropy, with the
teacher run in eval mode without autograd on the same batch. That is how every stage that
trains (fine-tuning, QAT, centroid training, re-training after surgery) learns from the
uncompressed model (``compress``'s ``teacher: original``), and how it trains on unlabelled
data, whose batches are ``(x, None)``: without a teacher such data is a one-line DataError.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nncompress import inputs
from nncompress.data import Dataset
from nncompress.errors import DataError
from nncompress.measure.quality import check_metric, default_metric, quality

__all__ = ["EpochRecord", "Teacher", "TrainLog", "evaluate", "fine_tune", "fit"]

AfterStep = Callable[[nn.Module], None]
ExtraLoss = Callable[[nn.Module], torch.Tensor]
#: name -> learning-rate factor at training progress ``t`` in [0, 1).
LR_SCHEDULES: Mapping[str, Callable[[float], float]] = MappingProxyType({
    "constant": lambda t: 1.0,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
})


@dataclass(frozen=True)
class Teacher:
    """What a student learns from: the teacher ``model`` and the ``loss`` comparing outputs,
    ``loss(student_out, teacher_out, labels or None) -> scalar`` (an ``nn.Module`` of
    :mod:`nncompress.distill.losses`). The teacher is only ever run in eval mode without
    autograd; it is never trained.

    Subclasses (feature hints, class-wise self-distillation) override :meth:`step`, the
    loss of one batch, and :meth:`trainable`, parameters of their own (adapters) that the
    optimizer trains with the student.
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

    def outputs(self, x: Any) -> torch.Tensor:
        """The teacher's outputs on batch ``x`` (eval mode, no autograd; every module's
        train/eval flag restored)."""
        from nncompress.measure._common import eval_mode

        with eval_mode(self.model), torch.no_grad():
            return inputs.call(self.model, x)

    def step(self, student: nn.Module, x: Any, y: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student outputs, loss)`` of one training batch."""
        out = inputs.call(student, x)
        return out, self.loss(out, self.outputs(x), y)

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the teacher side adds to training (none for output distillation)."""
        return []

    def bind(self, student: nn.Module, data: Dataset) -> Teacher:
        """The teacher one training run of ``student`` on ``data`` uses (``fit`` calls this
        first): itself, or, for a teacher that attaches to the student (a recipe's feature
        hints), one built for this student."""
        return self


class EpochRecord:
    """What every per-epoch training record answers from its ``loss``, ``test_acc`` and
    ``seconds`` tuples (one entry per epoch; ``test_acc`` entries may be None)."""

    loss: tuple[float, ...]
    test_acc: tuple[float | None, ...]
    seconds: tuple[float, ...]

    @property
    def epochs(self) -> int:
        return len(self.loss)

    @property
    def final_test_acc(self) -> float | None:
        """Test quality after the last epoch (None when no epoch ran or none was
        measured)."""
        return self.test_acc[-1] if self.test_acc else None

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))


@dataclass(frozen=True)
class TrainLog(EpochRecord):
    """Per-epoch record of one ``fit`` call.

    ``loss``: mean training loss (cross-entropy or the teacher's loss, + extra loss) per
    sample; ``train_acc``: top-1 accuracy on the labels in [0, 1], measured on the fly in
    train mode (nan for unlabelled data); ``test_acc``: the quality ``metric`` on the test
    split (top-1 accuracy by default; see :mod:`nncompress.measure.quality`);
    ``seconds``: wall-clock seconds of each epoch including its evaluation.
    """

    loss: tuple[float, ...]
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    seconds: tuple[float, ...]
    metric: str = "accuracy"


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


@dataclass(frozen=True)
class _Hooks:
    after_step: AfterStep | None
    extra_loss: ExtraLoss | None
    teacher: Teacher | None


def _train_epoch(model: nn.Module, data: Dataset, optimizer: torch.optim.Optimizer,
                 schedule: _Schedule, epoch: int, hooks: _Hooks) -> tuple[float, float]:
    """One pass over ``data.train``; returns (mean loss per sample, train accuracy or nan)."""
    model.train()
    loss_sum = 0.0
    correct = seen = labelled = 0
    for step, (x, y) in enumerate(data.train):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(epoch, step)
        optimizer.zero_grad(set_to_none=True)
        if hooks.teacher is not None:
            logits, loss = hooks.teacher.step(model, x, y)
        else:
            logits = inputs.call(model, x)
            loss = F.cross_entropy(logits, y)
        if hooks.extra_loss is not None:
            loss = loss + hooks.extra_loss(model)
        loss.backward()
        optimizer.step()
        if hooks.after_step is not None:
            hooks.after_step(model)
        n = inputs.batch_size(x)
        loss_sum += float(loss.detach()) * n
        seen += n
        if y is not None:
            correct += int((logits.detach().argmax(dim=-1) == y).sum())
            labelled += n
    if seen == 0:
        raise DataError(f"cannot train: the train loader of {data.name!r} yields no samples")
    return loss_sum / seen, (correct / labelled if labelled else math.nan)


def fit(model: nn.Module, data: Dataset, *, epochs: int, lr: float = 1e-3,
        weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
        desc: str = "train", after_step: AfterStep | None = None,
        extra_loss: ExtraLoss | None = None, lr_schedule: str = "constant",
        teacher: Teacher | None = None, metric: str | None = None) -> TrainLog:
    """Train ``model`` in place with Adam for ``epochs`` epochs, on cross-entropy or, given
    a ``teacher``, on the teacher's loss (distillation; the only way to train on unlabelled
    data).

    Evaluates ``metric`` (default: accuracy on labelled data, top-1 agreement with the
    teacher on unlabelled data) on ``data.test`` after every epoch; the model ends in eval
    mode. Only parameters with ``requires_grad`` are optimised. ``epochs=0`` returns an empty log.
    ``lr_schedule`` names an entry of :data:`LR_SCHEDULES`.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; known: "
                         f"{', '.join(sorted(LR_SCHEDULES))}")
    if not data.labelled and teacher is None:
        raise DataError(f"{desc}: training on cross-entropy needs labels, but "
                        f"{data.name!r} has inputs only; give a teacher to distil from")
    name = metric or default_metric(data.labelled)
    check_metric(name, labelled=data.labelled, has_teacher=teacher is not None)
    torch.manual_seed(seed)
    reseed_loader(data.train, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not params:
        return TrainLog((), (), (), (), name)
    if teacher is not None:
        teacher = teacher.bind(model, data)
    extra = teacher.trainable() if teacher is not None else []
    optimizer = torch.optim.Adam(params + extra, lr=lr, weight_decay=weight_decay)
    schedule = _Schedule(lr, epochs, _steps_per_epoch(data.train), LR_SCHEDULES[lr_schedule])
    losses: list[float] = []
    train_accs: list[float] = []
    test_accs: list[float] = []
    seconds: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, file=sys.stderr,
               unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        start = time.perf_counter()
        loss, train_acc = _train_epoch(model, data, optimizer, schedule, epoch,
                                       _Hooks(after_step, extra_loss, teacher))
        test_acc = (evaluate(model, data.test) if name == "accuracy" else
                    quality(model, data.test, name,
                            teacher=teacher.model if teacher is not None else None))
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        train_accs.append(train_acc)
        test_accs.append(test_acc)
        bar.set_postfix(loss=f"{loss:.3f}", train=f"{train_acc:.3f}", test=f"{test_acc:.3f}")
    bar.close()
    return TrainLog(tuple(losses), tuple(train_accs), tuple(test_accs), tuple(seconds), name)


def fine_tune(model: nn.Module, data: Dataset, *, epochs: int, lr: float = 1e-4,
              weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
              desc: str = "fine-tune", after_step: AfterStep | None = None,
              extra_loss: ExtraLoss | None = None, lr_schedule: str = "constant",
              teacher: Teacher | None = None, metric: str | None = None) -> TrainLog:
    """``fit`` with a smaller default learning rate, for recovering after compression."""
    return fit(model, data, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
               progress=progress, desc=desc, after_step=after_step, extra_loss=extra_loss,
               lr_schedule=lr_schedule, teacher=teacher, metric=metric)
