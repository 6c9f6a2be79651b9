"""Distillation trainers: a student learns from a teacher (or from itself) with the one
training loop of :mod:`nncompress.train`.

- :func:`distill` -- logits KD (Hinton, Vinyals & Dean 2015), cosine / MSE to the teacher's
  outputs for embedding and regression models, optional feature hints between named layers
  with adapters (FitNets, Romero et al. 2015; the angular loss of ShrinkTeaNet, Duong et
  al. 2019) and a privacy-preserving noisy teacher (RONA, Wang et al. 2019).
- :func:`cskd_fit` -- class-wise self-knowledge distillation (Yun, Park, Lee & Shin 2020):
  no teacher; each sample's prediction is pulled towards that of another sample of its
  class. Needs labels.
- :func:`takd` -- teacher-assistant KD (Mirzadeh et al. 2020): teacher -> assistant(s) ->
  student, each trained by KD from the one before; the chain's sizes are built
  automatically (:func:`chain_ratios`).

Every trainer takes a seed and gives the same weights for the same call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nncompress import inputs
from nncompress.data import Dataset, example_input, require_labels
from nncompress.distill.features import FeatureDistiller
from nncompress.distill.losses import ClassPairs, CSKDLoss, NoisyTeacher
from nncompress.distill.objective import frozen, loss_for
from nncompress.errors import DataError, ModelError, RecipeError
from nncompress.measure.quality import default_metric
from nncompress.recipe import DistillConfig
from nncompress.train import Teacher, TrainLog, fit

__all__ = ["ChainLink", "HintedTeacher", "TAResult", "chain_ratios", "cskd_fit", "distill",
           "takd"]


@dataclass(frozen=True)
class _HintTeacher(Teacher):
    """Output loss plus ``weight`` x the hint loss of a :class:`FeatureDistiller`."""

    distiller: FeatureDistiller | None = None
    weight: float = 1.0

    def step(self, student: nn.Module, x: Any, y: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.distiller is not None
        d = self.distiller(x)
        return d.student_out, self.loss(d.student_out, d.teacher_out, y) + self.weight * d.hint

    def trainable(self) -> list[nn.Parameter]:
        return list(self.distiller.parameters()) if self.distiller is not None else []


@dataclass(frozen=True)
class HintedTeacher(Teacher):
    """A recipe's teacher with feature hints (``DistillConfig.hints``): each training run
    binds it to the student it trains (:meth:`bind`), with fresh adapters, since the
    student's widths change from stage to stage (pruning)."""

    hints: tuple[tuple[str, str], ...] = ()
    hint_loss: str = "mse"
    weight: float = 1.0
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None  # RONA on the features

    def bind(self, student: nn.Module, data: Dataset) -> Teacher:
        fd = FeatureDistiller(student, self.model, self.hints, example_input(data, 2),
                              loss=self.hint_loss, perturb=self.perturb)
        return _HintTeacher(self.model, self.loss, fd, self.weight)


@dataclass(frozen=True)
class _ClassWise(Teacher):
    """CS-KD: the "teacher" output of a sample is the student's own output (no gradient) on
    another training sample of the same class."""

    pairs: ClassPairs | None = None

    def step(self, student: nn.Module, x: Any, y: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            raise DataError("cs_kd needs labels (it pairs samples of one class); the batch "
                            "has inputs only")
        assert self.pairs is not None
        out = inputs.call(student, x)
        with torch.no_grad():
            partner = inputs.call(student, self.pairs.partners(y, x))
        return out, self.loss(out, partner, y)


def _check_epochs(epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise RecipeError(f"epochs must be a non-negative integer, got {epochs!r}")


def distill(student: nn.Module, teacher: nn.Module, data: Dataset, *, epochs: int,
            lr: float = 1e-3, loss: str = "auto", temperature: float = 4.0,
            alpha: float = 0.9, hints: Mapping[str, str] | Sequence[tuple[str, str]] = (),
            hint_loss: str = "mse", hint_weight: float = 1.0,
            privacy_noise: float | None = None, metric: str | None = None, seed: int = 0,
            progress: bool = True, lr_schedule: str = "cosine",
            desc: str = "distill") -> TrainLog:
    """Train ``student`` in place for ``epochs`` on ``data`` from ``teacher``'s outputs.

    ``loss``: ``kd`` (``alpha * T^2 * KL(soft) + (1 - alpha) * CE``; the CE term is dropped
    on unlabelled data), ``cosine`` / ``mse`` to the teacher's outputs, or ``auto`` (as
    the ``metric``: cosine for ``cosine``, mse for ``mse`` / ``r2``, else kd). ``hints``:
    ``{student layer: teacher layer}`` pairs whose features are matched through adapters
    (``hint_loss``: ``mse`` as FitNets, ``angular`` as ShrinkTeaNet), weighted
    ``hint_weight``; a layer name that does not exist is a one-line ModelError.
    ``privacy_noise`` (RONA): the teacher's outputs are clipped to a norm bound B and get
    Gaussian noise of std ``privacy_noise * B`` (see
    :class:`~nncompress.distill.losses.NoisyTeacher`). The teacher is never changed.
    """
    _check_epochs(epochs)
    config = DistillConfig(loss=loss, temperature=temperature, alpha=alpha)  # validates
    name = metric or default_metric(data.labelled)
    source = frozen(teacher)
    if privacy_noise is not None:
        source = NoisyTeacher(source, privacy_noise, seed=seed).eval()
    objective = loss_for(config, name)[1]
    trainer = Teacher(source, objective)
    if hints:  # bound now, so a bad layer name fails before any training
        pairs = tuple(hints.items()) if isinstance(hints, Mapping) else tuple(hints)
        perturb = source.perturb if privacy_noise is not None else None
        trainer = HintedTeacher(source, objective, pairs, hint_loss, float(hint_weight),
                                perturb).bind(student, data)
    return fit(student, data, epochs=epochs, lr=lr, seed=seed, progress=progress, desc=desc,
               lr_schedule=lr_schedule, teacher=trainer, metric=metric)


def cskd_fit(model: nn.Module, data: Dataset, *, epochs: int, lr: float = 1e-3,
             temperature: float = 4.0, weight: float = 1.0, seed: int = 0,
             progress: bool = True, lr_schedule: str = "cosine",
             desc: str = "cs-kd") -> TrainLog:
    """Class-wise self-knowledge distillation (Yun et al. 2020): train ``model`` in place
    on ``CE(f(x), y) + weight * T^2 * KL(softmax(f(x')/T) || softmax(f(x)/T))``, ``x'``
    another training sample of ``x``'s class and ``f(x')`` without gradient. Needs labels
    (a one-line DataError otherwise)."""
    _check_epochs(epochs)
    require_labels(data, "cs_kd (class-wise self-distillation)")
    pairs = ClassPairs.from_data(data, seed=seed)
    trainer = _ClassWise(model, CSKDLoss(temperature=temperature, weight=weight), pairs)
    return fit(model, data, epochs=epochs, lr=lr, seed=seed, progress=progress, desc=desc,
               lr_schedule=lr_schedule, teacher=trainer, metric="accuracy")


# ------------------------------------------------------------------ teacher assistants


def chain_ratios(size_ratio: float, assistants: int) -> tuple[float, ...]:
    """Size ratios (teacher params / model params) of the assistants and the student:
    geometric steps ``size_ratio ** (i / (assistants + 1))``, i = 1 .. assistants + 1, so
    each link shrinks its teacher by the same factor (Mirzadeh et al. 2020 find one
    assistant halfway, in size, already helps)."""
    if isinstance(assistants, bool) or not isinstance(assistants, int) or assistants < 0:
        raise RecipeError(f"assistants must be a non-negative integer, got {assistants!r}")
    if isinstance(size_ratio, bool) or not isinstance(size_ratio, (int, float)) \
            or not math.isfinite(size_ratio) or size_ratio <= 1:
        raise RecipeError(f"size_ratio must be a number > 1, got {size_ratio!r}")
    k = assistants + 1
    return tuple(float(size_ratio) ** (i / k) for i in range(1, k + 1))


@dataclass(frozen=True)
class ChainLink:
    """One trained model of a TA chain: its size ratio target, parameter count, final test
    quality (the run's metric) and the model itself."""

    ratio: float
    params: int
    quality: float
    model: nn.Module


@dataclass(frozen=True)
class TAResult:
    """The chain teacher -> assistants -> student; ``student`` is the last link's model."""

    teacher_params: int
    links: tuple[ChainLink, ...]

    @property
    def student(self) -> nn.Module:
        return self.links[-1].model


def takd(teacher: nn.Module, data: Dataset, *, size_ratio: float, assistants: int = 1,
         kind: str = "auto", epochs: int, lr: float = 3e-3, temperature: float = 4.0,
         alpha: float = 0.9, metric: str | None = None, seed: int = 0,
         progress: bool = True, note: Callable[[str], None] | None = None) -> TAResult:
    """Teacher-assistant knowledge distillation (Mirzadeh, Farajtabar, Li, Levine,
    Matsukawa & Ghasemzadeh 2020).

    Builds ``assistants`` intermediate models and the student with
    :func:`nncompress.models.students.student_of` at the sizes of :func:`chain_ratios`
    (strictly decreasing parameter counts; a chain whose sizes would not decrease is a
    one-line ModelError), and trains each for ``epochs`` by KD from the link before it
    (the first from ``teacher``). ``assistants=0`` is plain KD. ``teacher`` is unchanged.
    A teacher that is not a reference model gets narrowed width students, traced on a
    batch of ``data`` (``note``: what that analysis leaves alone).
    """
    from nncompress.models.students import student_of

    ratios = chain_ratios(size_ratio, assistants)
    example = example_input(data, 2)
    models = [student_of(teacher, r, kind=kind, seed=seed + i, example_input=example,
                         note=note) for i, r in enumerate(ratios)]
    sizes = [sum(p.numel() for p in m.parameters()) for m in models]
    top = sum(p.numel() for p in teacher.parameters())
    if any(b >= a for a, b in zip([top, *sizes], sizes, strict=False)):
        raise ModelError(f"TA chain sizes {[top, *sizes]} do not strictly decrease; use "
                         "fewer assistants or a larger size_ratio")
    links: list[ChainLink] = []
    previous = teacher
    for i, (ratio, model) in enumerate(zip(ratios, models, strict=True)):
        log = distill(model, previous, data, epochs=epochs, lr=lr, temperature=temperature,
                      alpha=alpha, metric=metric, seed=seed, progress=progress,
                      desc=f"takd link {i + 1}/{len(models)}")
        quality = log.final_test_acc if log.final_test_acc is not None else math.nan
        links.append(ChainLink(ratio, sizes[i], quality, model.eval()))
        previous = model
    return TAResult(top, tuple(links))
