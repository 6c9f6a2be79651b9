"""Distillation as recipe stages: ``kd_student`` (a smaller student trained from the model,
directly or through teacher assistants) and ``cs_kd`` (class-wise self-distillation).

``fskd`` (few-sample KD) registers itself in :mod:`nncompress.distill.fskd`; KD fine-tuning
in every training stage comes from the recipe's ``distill:`` key (see
:class:`nncompress.recipe.DistillConfig`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from nncompress.data import example_input, require_labels
from nncompress.distill.trainer import cskd_fit, distill, takd
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["CSKDConfig", "KDStudentConfig"]


class KDStudentConfig(TechniqueConfig):
    """``kd_student``: replace the model by a student ``size_ratio`` x smaller in parameters
    (:func:`nncompress.models.students.student_of`, ``kind``) trained ``epochs`` by logits KD
    from the model the stage receives (Hinton et al. 2015: ``temperature``, ``alpha``);
    ``assistants`` > 0 trains a teacher-assistant chain first (Mirzadeh et al. 2020), each
    link ``epochs``. ``privacy_noise``: RONA's noisy teacher (Wang et al. 2019), the noise
    std in units of the teacher's output-norm bound."""

    size_ratio: float = Field(default=4.0, gt=1.0, le=1000.0)
    kind: Literal["auto", "width", "shallow", "mobilenet", "shufflenet"] = "auto"
    assistants: int = Field(default=0, ge=0, le=4)
    epochs: int = Field(default=10, ge=0, le=10_000)
    lr: float = Field(default=3e-3, gt=0.0, le=1.0)
    temperature: float = Field(default=4.0, gt=0.0, le=1000.0)
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    privacy_noise: float | None = Field(default=None, ge=0.0, le=100.0)


class CSKDConfig(TechniqueConfig):
    """``cs_kd``: fine-tune ``epochs`` with class-wise self-knowledge distillation (Yun et
    al. 2020) at ``lr``; ``weight`` of the KL term at ``temperature``. Needs labels."""

    epochs: int = Field(default=5, ge=0, le=10_000)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    temperature: float = Field(default=4.0, gt=0.0, le=1000.0)
    weight: float = Field(default=1.0, ge=0.0, le=100.0)


def kd_student(model: nn.Module, config: KDStudentConfig, ctx: Context) -> nn.Module:
    """Build and train the student (see :class:`KDStudentConfig`); the teacher is the model
    this stage receives (the uncompressed input model when it is the first stage)."""
    from nncompress.models.students import student_of

    teacher = model.eval()
    if config.assistants > 0 and config.privacy_noise is None:
        chain = takd(teacher, ctx.data, size_ratio=config.size_ratio,
                     assistants=config.assistants, kind=config.kind, epochs=config.epochs,
                     lr=config.lr, temperature=config.temperature, alpha=config.alpha,
                     metric=ctx.metric, seed=ctx.seed, progress=ctx.progress,
                     note=ctx.note)
        sizes = " -> ".join(str(n) for n in (chain.teacher_params,
                                             *(link.params for link in chain.links)))
        ctx.note(f"kd_student: teacher-assistant chain {sizes} parameters, "
                 f"{config.epochs} epochs per link")
        student = chain.student
    else:
        if config.assistants > 0:
            ctx.note("kd_student: privacy_noise trains the student directly from the noisy "
                     "teacher (no assistants)")
        student = student_of(teacher, config.size_ratio, kind=config.kind, seed=ctx.seed,
                             example_input=example_input(ctx.data, 2), note=ctx.note)
        distill(student, teacher, ctx.data, epochs=config.epochs, lr=config.lr,
                temperature=config.temperature, alpha=config.alpha,
                privacy_noise=config.privacy_noise, metric=ctx.metric, seed=ctx.seed,
                progress=ctx.progress, desc="kd_student")
    if ctx.masks:
        ctx.note(f"kd_student: {len(ctx.masks)} pruning masks of the teacher dropped")
        ctx.masks.clear()
    params = (sum(p.numel() for p in teacher.parameters()),
              sum(p.numel() for p in student.parameters()))
    ctx.note(f"kd_student: {type(student).__name__} student of {params[1]} parameters "
             f"({params[0] / params[1]:.2f}x fewer than the teacher's {params[0]})")
    return student.eval()


def cs_kd(model: nn.Module, config: CSKDConfig, ctx: Context) -> nn.Module:
    """Fine-tune ``model`` in place with CS-KD (see :class:`CSKDConfig`)."""
    require_labels(ctx.data, "cs_kd (class-wise self-distillation pairs samples of a class)")
    cskd_fit(model, ctx.data, epochs=config.epochs, lr=config.lr,
             temperature=config.temperature, weight=config.weight, seed=ctx.seed,
             progress=ctx.progress)
    return model


TECHNIQUES.register("kd_student", Technique(
    name="kd_student",
    category="knowledge-distillation",
    paper="Hinton, Vinyals & Dean (2015): Distilling the knowledge in a neural network; "
          "Mirzadeh et al. (2020): Improved knowledge distillation via teacher assistant; "
          "Wang et al. (2019): Private model compression via knowledge distillation",
    summary="a smaller student (width / MobileNet / ShuffleNet / shallow) trained by KD, "
            "optionally through teacher assistants or from a noisy (private) teacher",
    config=KDStudentConfig,
    apply=kd_student,
))

TECHNIQUES.register("cs_kd", Technique(
    name="cs_kd",
    category="knowledge-distillation",
    paper="Yun, Park, Lee & Shin (2020): Regularizing class-wise predictions via "
          "self-knowledge distillation",
    summary="fine-tuning with class-wise self-distillation (needs labels)",
    config=CSKDConfig,
    apply=cs_kd,
))
