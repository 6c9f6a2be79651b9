"""Cross-domain distillation: MobileDA (Yang, Zou, Cao, Chen & Xie, "MobileDA: Toward Edge
Domain Adaptation", IEEE Internet of Things Journal, 2020), and its two baselines.

A teacher trained on a labelled *source* domain teaches a small student that must work
on an unlabelled *target* domain. Every step draws a source batch ``(x_s, y_s)`` and a
target batch ``x_t`` (the target's labels, if it has any, are dropped unread) and
minimises

    (1 - alpha) * CE(s(x_s), y_s)                              source supervision
    + alpha * T^2 * KL(softmax(t(x_t) / T) || softmax(s(x_t) / T))   cross-domain distillation
    + align_weight * MMD^2(f_s(x_s), f_s(x_t))                  domain confusion

with ``s`` / ``t`` the student's / teacher's logits ``[B, classes]`` and ``f_s`` the
student's features ``[B, D]``: the input of its final Linear (the last one its forward
calls), flattened per sample. The distillation term is Hinton, Vinyals & Dean (2015)
(:class:`nncompress.distill.losses.KDLoss` without labels); the alignment term is the
maximum mean discrepancy (Gretton et al., 2012) between the two domains' features
(:class:`nncompress.distill.losses.MMDLoss`), as MobileDA's domain-confusion loss. Source
and target batches go through the student as one batch, so its BatchNorm statistics
(used in training and accumulated for inference) cover both domains.

Baselines at the same training budget, for reporting the gain of adaptation:
:func:`source_only` (cross-entropy on the source, target never seen) and
:func:`target_kd` (MobileDA without the alignment term).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nncompress import inputs
from nncompress.data import Dataset, example_input
from nncompress.data.core import first_samples
from nncompress.distill.losses import KDLoss, MMDLoss
from nncompress.errors import DataError, ModelError, RecipeError
from nncompress.inputs import Inputs
from nncompress.train import LR_SCHEDULES, EpochRecord, evaluate, reseed_loader

__all__ = ["DomainLog", "feature_mmd", "final_linear", "mobileda", "source_only",
           "target_kd"]


@dataclass(frozen=True)
class DomainLog(EpochRecord):
    """Per-epoch record of one cross-domain training run (shaped like ``TrainLog``).

    ``loss``: mean total loss per step; ``ce`` / ``kd`` / ``align``: the mean of each term
    before weighting (``ce`` on source batches, ``kd`` and ``align`` 0.0 when unused);
    ``train_acc``: student top-1 on the source batches on the fly; ``source_acc``: top-1
    on the source test split; ``test_acc``: top-1 on the *target* test split (None when the
    target has no labels); ``seconds``: wall-clock seconds per epoch including evaluation.
    """

    loss: tuple[float, ...]
    ce: tuple[float, ...]
    kd: tuple[float, ...]
    align: tuple[float, ...]
    train_acc: tuple[float, ...]
    source_acc: tuple[float, ...]
    test_acc: tuple[float | None, ...]
    seconds: tuple[float, ...]


@dataclass(frozen=True)
class _Terms:
    """What one run trains on: the loss weights and modules (None: the term is off)."""

    ce_weight: float
    kd_weight: float
    align_weight: float
    kd: nn.Module | None
    align: nn.Module | None


# --------------------------------------------------------------------------- features


def final_linear(model: nn.Module, x: Inputs) -> str:
    """Name of the last ``nn.Linear`` that ``model``'s forward calls on ``x`` (its input is
    the feature vector MobileDA aligns). One probe forward in eval mode, no autograd; the
    model's mode is restored. A model that calls no Linear raises a one-line ModelError."""
    called: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=name: called.append(n))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            inputs.call(model, x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not called:
        raise ModelError(f"model {type(model).__name__!r} has no final nn.Linear whose input "
                         "could serve as the features to align across domains")
    return called[-1]


@contextmanager
def _input_of(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """While open, the list holds the input of ``module``'s latest call (with autograd);
    ``module=None``: stays empty. (``FeatureTap`` records outputs; this needs the input.)"""
    seen: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[:] = [args[0]]

    if module is None:
        yield seen
        return
    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def feature_mmd(model: nn.Module, source: Iterable[Any], target: Iterable[Any], *,
                samples: int = 512) -> float:
    """Squared MMD (:class:`~nncompress.distill.losses.MMDLoss`) between ``model``'s
    features (the input of its final Linear, ``[N, D]``) on the first ``samples`` inputs of
    two loaders of ``(x, _)`` batches: how far apart the domains look to the model. Eval
    mode, no autograd; the model's mode is restored."""
    xs, xt = (inputs.concat(first_samples(loader, samples)) for loader in (source, target))
    layer = model.get_submodule(final_linear(model, inputs.take(xs, 2)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _input_of(layer) as feats:
            inputs.call(model, xs)
            fs = feats[0].flatten(1)
            inputs.call(model, xt)
            ft = feats[0].flatten(1)
    finally:
        model.train(was_training)
    return float(MMDLoss()(fs, ft))


# --------------------------------------------------------------------------- the loop


def _step_loss(student: nn.Module, teacher: nn.Module | None, feats: list[torch.Tensor],
               batch: tuple[Inputs, torch.Tensor, Inputs | None], terms: _Terms
               ) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Total loss of one step, its unweighted terms [ce, kd, align] and the source logits."""
    x_s, y_s, x_t = batch
    n = inputs.batch_size(x_s)
    logits = inputs.call(student, x_s if x_t is None else inputs.concat([x_s, x_t]))
    ce = F.cross_entropy(logits[:n], y_s)
    total = terms.ce_weight * ce
    parts = [float(ce.detach()), 0.0, 0.0]
    if terms.kd is not None and teacher is not None and x_t is not None:
        with torch.no_grad():
            soft = inputs.call(teacher, x_t)
        if soft.shape != logits[n:].shape:
            raise ModelError(f"teacher outputs {list(soft.shape)} but the student "
                             f"{list(logits[n:].shape)} on the same target batch")
        kd = terms.kd(logits[n:], soft, None)
        total = total + terms.kd_weight * kd
        parts[1] = float(kd.detach())
    if terms.align is not None and x_t is not None:
        f = feats[0].flatten(1)
        align = terms.align(f[:n], f[n:])
        total = total + terms.align_weight * align
        parts[2] = float(align.detach())
    return total, parts, logits[:n].detach()


def _batches(source: Dataset, target: Dataset | None
             ) -> Iterator[tuple[Inputs, torch.Tensor, Inputs | None]]:
    """One pass over the source's train split, each batch paired with the next target
    train batch (the target split restarts when it runs out); target labels dropped."""
    stream = _cycle(target.train) if target is not None else None
    for x_s, y_s in source.train:
        yield x_s, y_s, (next(stream) if stream is not None else None)


def _cycle(loader: object) -> Iterator[Inputs]:
    while True:
        empty = True
        for x, _ in loader:  # type: ignore[attr-defined]
            empty = False
            yield x
        if empty:
            raise DataError("the target domain's train loader yields no samples")


@dataclass(frozen=True)
class _Optimizer:
    """Adam (Kingma & Ba, 2015) with the learning rate of ``train``'s schedules."""

    adam: torch.optim.Adam
    lr: float
    epochs: int
    steps: int
    factor: Callable[[float], float]

    def set_lr(self, epoch: int, step: int) -> None:
        progress = min(epoch + step / self.steps, self.epochs) / self.epochs
        for group in self.adam.param_groups:
            group["lr"] = self.lr * self.factor(progress)


def _epoch(student: nn.Module, teacher: nn.Module | None, data: tuple[Dataset, Dataset | None],
           terms: _Terms, opt: _Optimizer, epoch: int, feats: list[torch.Tensor]
           ) -> tuple[float, list[float], float]:
    """One pass; returns (mean total loss, mean [ce, kd, align], source train accuracy)."""
    student.train()
    total = 0.0
    sums = [0.0, 0.0, 0.0]
    correct = seen = steps = 0
    for i, batch in enumerate(_batches(*data)):
        opt.set_lr(epoch, i)
        opt.adam.zero_grad(set_to_none=True)
        loss, parts, logits = _step_loss(student, teacher, feats, batch, terms)
        loss.backward()
        opt.adam.step()
        total += float(loss.detach())
        sums = [a + b for a, b in zip(sums, parts, strict=True)]
        correct += int((logits.argmax(dim=-1) == batch[1]).sum())
        seen += len(batch[1])
        steps += 1
    if steps == 0:
        raise DataError(f"cannot train: the train loader of {data[0].name!r} yields no samples")
    return total / steps, [s / steps for s in sums], correct / seen


@dataclass(frozen=True)
class _Settings:
    epochs: int
    lr: float
    seed: int
    progress: bool
    desc: str
    lr_schedule: str


def _run(student: nn.Module, teacher: nn.Module | None, source: Dataset,
         target: Dataset | None, terms: _Terms, s: _Settings) -> DomainLog:
    """Train ``student`` in place; evaluate on both test splits after every epoch."""
    adapt = target if (terms.kd is not None or terms.align is not None) else None
    torch.manual_seed(s.seed)
    reseed_loader(source.train, s.seed)
    if adapt is not None:
        reseed_loader(adapt.train, s.seed + 1)
    params = [p for p in student.parameters() if p.requires_grad]
    if s.epochs == 0 or not params:
        return DomainLog((), (), (), (), (), (), (), ())
    opt = _Optimizer(torch.optim.Adam(params, lr=s.lr), s.lr, s.epochs,
                     max(1, len(source.train)), LR_SCHEDULES[s.lr_schedule])
    layer = (student.get_submodule(final_linear(student, example_input(source, 2)))
             if terms.align is not None else None)
    rows: list[tuple[float, ...]] = []
    bar = tqdm(range(s.epochs), desc=s.desc, disable=not s.progress, file=sys.stderr,
               unit="epoch", dynamic_ncols=True)
    with _teacher_mode(teacher), _input_of(layer) as feats:
        for epoch in bar:
            start = time.perf_counter()
            loss, parts, train_acc = _epoch(student, teacher, (source, adapt), terms, opt,
                                            epoch, feats)
            src_acc = evaluate(student, source.test)
            tgt_acc = (evaluate(student, target.test)
                       if target is not None and target.labelled else None)
            rows.append((loss, *parts, train_acc, src_acc, tgt_acc,  # type: ignore[arg-type]
                         time.perf_counter() - start))
            bar.set_postfix(loss=f"{loss:.3f}", source=f"{src_acc:.3f}",
                            target="-" if tgt_acc is None else f"{tgt_acc:.3f}")
    bar.close()
    return DomainLog(*(tuple(column) for column in zip(*rows, strict=True)))


@contextmanager
def _teacher_mode(teacher: nn.Module | None) -> Iterator[None]:
    """The teacher in eval mode while open (its BatchNorm statistics stay as trained)."""
    was = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    try:
        yield
    finally:
        if teacher is not None:
            teacher.train(was)


# --------------------------------------------------------------------------- public API


def _settings(epochs: object, lr: object, seed: object, progress: bool, desc: str,
              lr_schedule: str) -> _Settings:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise RecipeError(f"epochs must be a non-negative integer, got {epochs!r}")
    _number("lr", lr, lambda v: v > 0, "> 0")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"seed must be an integer, got {seed!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise RecipeError(f"unknown lr_schedule {lr_schedule!r}; known: "
                          f"{', '.join(sorted(LR_SCHEDULES))}")
    return _Settings(epochs, float(lr), seed, bool(progress), desc, lr_schedule)  # type: ignore[arg-type]


def _number(name: str, value: object, ok: Callable[[float], bool], rule: str) -> float:
    """``value`` as a float when finite and ``ok``, else a one-line RecipeError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not ok(value):
        raise RecipeError(f"{name} must be a finite number {rule}, got {value!r}")
    return float(value)


def _check_domains(source: Dataset, target: Dataset | None) -> None:
    if not source.labelled:
        raise DataError(f"cross-domain training needs a labelled source domain, but "
                        f"{source.name!r} has inputs only")
    if target is not None and tuple(target.input_shape) != tuple(source.input_shape):
        raise DataError(f"target domain {target.name!r} has samples shaped "
                        f"{tuple(target.input_shape)}, the source {tuple(source.input_shape)}")


def mobileda(student: nn.Module, teacher: nn.Module, source: Dataset, target: Dataset, *,
             epochs: int = 20, lr: float = 3e-3, temperature: float = 4.0,
             alpha: float = 0.9, align_weight: float = 1.0, seed: int = 0,
             progress: bool = True, lr_schedule: str = "constant") -> DomainLog:
    """Train ``student`` in place by MobileDA (Yang et al., 2020; the module docstring has
    the objective): source labels, the teacher's soft labels on target inputs and an MMD
    alignment of the student's source and target features (the input of its final
    Linear, ``[B, D]``). The teacher is only run (eval mode, no autograd), never trained.

    ``source``: labelled, batches ``(x, y int64 [B])``; ``target``: batches ``(x, _)`` whose
    labels, if any, are never read in training (its test labels only score each epoch).
    ``epochs`` passes over the source's train split, each source batch paired with one
    target batch. Returns the per-epoch :class:`DomainLog`.
    """
    s = _settings(epochs, lr, seed, progress, "mobileda", lr_schedule)
    _check_domains(source, target)
    _number("temperature", temperature, lambda v: v > 0, "> 0")
    weight = _number("align_weight", align_weight, lambda v: v >= 0, ">= 0")
    kd_weight = _number("alpha", alpha, lambda v: 0 <= v <= 1, "in [0, 1]")
    terms = _Terms(1.0 - kd_weight, kd_weight, weight,
                   KDLoss(temperature=float(temperature), alpha=1.0) if kd_weight > 0 else None,
                   MMDLoss() if weight > 0 else None)
    return _run(student, teacher, source, target, terms, s)


def target_kd(student: nn.Module, teacher: nn.Module, source: Dataset, target: Dataset, *,
              epochs: int = 20, lr: float = 3e-3, temperature: float = 4.0,
              alpha: float = 0.9, seed: int = 0, progress: bool = True,
              lr_schedule: str = "constant") -> DomainLog:
    """Baseline: :func:`mobileda` without the alignment term -- source labels plus the
    teacher's soft labels on target inputs (Hinton et al., 2015)."""
    return mobileda(student, teacher, source, target, epochs=epochs, lr=lr,
                    temperature=temperature, alpha=alpha, align_weight=0.0, seed=seed,
                    progress=progress, lr_schedule=lr_schedule)


def source_only(student: nn.Module, source: Dataset, target: Dataset | None = None, *,
                epochs: int = 20, lr: float = 3e-3, seed: int = 0, progress: bool = True,
                lr_schedule: str = "constant") -> DomainLog:
    """Baseline without adaptation: cross-entropy on the source's labels only, the same
    loop and budget as :func:`mobileda`; ``target`` (optional) is only scored, never
    trained on."""
    s = _settings(epochs, lr, seed, progress, "source-only", lr_schedule)
    _check_domains(source, target)
    return _run(student, None, source, target, _Terms(1.0, 0.0, 0.0, None, None), s)
