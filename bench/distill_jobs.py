"""The runs of the distillation bench section (:mod:`distill`), one function per run.

Each function is a self-contained job: it loads what it needs (the cached reference
models, the bundled datasets), trains or compresses with a fixed seed, and returns a
frozen record of plain numbers, so :mod:`distill` can run the jobs in worker processes
(1 torch thread each) in any order and get the same figures. The settings every job
shares are the constants below; the section's text quotes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import Dataset, holdout, load_dataset, without_labels
from nncompress.data.domains import SHIFTED_NAME
from nncompress.distill.domain import mobileda, source_only, target_kd
from nncompress.distill.trainer import distill, takd
from nncompress.models.students import student_of
from nncompress.models.transformer import embedder_of
from nncompress.recipe import Recipe, Stage
from nncompress.train import evaluate, fit

SEEDS = (0, 1, 2)
LR = 3e-3                       # the reference cnn1d's own training lr
SCHEDULE = "cosine"
KIND = "width"                  # student_of's "auto" for cnn1d (see models/students.py)
RATIO = 4.0                     # target 1: student >= 4x fewer parameters
EPOCHS = 40                     # target 1: twice the teacher's epochs (KD is slower)
SHORT_EPOCHS = 20               # target 1, also shown: the teacher's own epoch count
GRID = tuple((t, a) for t in (2.0, 4.0, 8.0) for a in (0.5, 0.9))
VAL_FRACTION = 0.1              # of the training split, for choosing T and alpha
VAL_SEED = 0
TA_RATIO = 10.0                 # target 2: student >= 10x fewer parameters
TA_EPOCHS = 20                  # per link
FSKD_SAMPLES = 40               # 1 % of mnist1d's 4000 training inputs
PRUNERS: dict[str, dict[str, object]] = {
    "l1_filter_prune": {"macs_reduction": 2.0, "scope": "layer", "steps": 1,
                        "epochs_per_step": 0},
    "thinet": {"macs_reduction": 2.0},
}
FINE_TUNE = (("mlp", "digits", "deep-compression"), ("cnn1d", "mnist1d", "qat-int8"))
DOMAIN_EPOCHS = 10
DOMAIN_METHODS = ("source-only", "kd-target", "mobileda")
EMBEDDER_RECIPES = ("label-free-embedder", "int8")


def init_worker() -> None:
    """Worker start-up: one torch thread (two workers share the two cores)."""
    torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cnn1d() -> tuple[nn.Module, Dataset]:
    """The trained reference cnn1d (the teacher of every cnn1d row) and mnist1d."""
    return zoo.load("cnn1d", "mnist1d", seed=0, progress=False)


# ------------------------------------------------------------ 1. KD vs labels (4x)


def validation_teacher(path: str) -> float:
    """Train the cnn1d the reference way (``models.load``: its epochs, lr and schedule,
    seed 0) on the training split minus the held-out 10 %, save it to ``path`` (.nnc)
    and return its accuracy on the held-out part. The reference teacher saw that part in
    training, so its soft labels would carry the held-out labels into the student and
    flatter KD on the validation split; this one never saw them."""
    _, data = cnn1d()
    rest, held = holdout(data, VAL_FRACTION, seed=VAL_SEED)
    teacher, _ = zoo.load("cnn1d", rest, seed=0, progress=False)
    nc.save(teacher, path)
    return evaluate(teacher, held)


def grid_point(teacher_path: str, temperature: float, alpha: float) -> float:
    """Validation accuracy of the 4x student distilled at ``(temperature, alpha)`` from
    the :func:`validation_teacher` saved at ``teacher_path``, on the training split minus
    the held-out 10 % and scored on that 10 % (never the test split): seed
    :data:`VAL_SEED`, :data:`EPOCHS` epochs."""
    _, data = cnn1d()
    teacher = nc.load(teacher_path)
    rest, held = holdout(data, VAL_FRACTION, seed=VAL_SEED)
    val = replace(rest, test=held)           # fit's per-epoch scoring reads the held-out part
    student = student_of(teacher, RATIO, kind=KIND, seed=VAL_SEED)
    distill(student, teacher, val, epochs=EPOCHS, lr=LR, temperature=temperature,
            alpha=alpha, seed=VAL_SEED, progress=False, lr_schedule=SCHEDULE)
    return evaluate(student, held)


@dataclass(frozen=True)
class StudentRun:
    """One trained student: ``method`` ("labels" or "kd"), its parameter count and test
    accuracy."""

    method: str
    seed: int
    params: int
    accuracy: float


def student_run(method: str, seed: int, ratio: float = RATIO, epochs: int = EPOCHS,
                temperature: float = 4.0, alpha: float = 0.9) -> StudentRun:
    """A fresh ``student_of(teacher, ratio)`` trained ``epochs`` on the full training split
    from the labels (cross-entropy, ``train.fit``) or by KD from the cnn1d teacher."""
    teacher, data = cnn1d()
    student = student_of(teacher, ratio, kind=KIND, seed=seed)
    if method == "labels":
        fit(student, data, epochs=epochs, lr=LR, seed=seed, progress=False,
            lr_schedule=SCHEDULE)
    else:
        distill(student, teacher, data, epochs=epochs, lr=LR, temperature=temperature,
                alpha=alpha, seed=seed, progress=False, lr_schedule=SCHEDULE)
    return StudentRun(method, seed, n_params(student), evaluate(student, data.test))


# ------------------------------------------------------------ 2. TAKD (10x)


@dataclass(frozen=True)
class ChainRun:
    """One TA chain (``assistants`` 0: direct KD): params and test accuracy per link."""

    assistants: int
    epochs: int
    seed: int
    params: tuple[int, ...]
    accuracy: tuple[float, ...]


def takd_run(assistants: int, epochs: int, seed: int, temperature: float,
             alpha: float) -> ChainRun:
    """``takd`` from the cnn1d teacher to a student :data:`TA_RATIO` x smaller."""
    teacher, data = cnn1d()
    result = takd(teacher, data, size_ratio=TA_RATIO, assistants=assistants, kind=KIND,
                  epochs=epochs, lr=LR, temperature=temperature, alpha=alpha, seed=seed,
                  progress=False)
    return ChainRun(assistants, epochs, seed, tuple(link.params for link in result.links),
                    tuple(evaluate(link.model, data.test) for link in result.links))


# ------------------------------------------------------------ 3. FSKD


@dataclass(frozen=True)
class FskdRun:
    """2x-MAC pruning without fine-tuning, then fskd: test accuracies, MACs, fskd seconds."""

    pruner: str
    seed: int
    teacher: float
    pruned: float
    repaired: float
    macs_before: int
    macs_after: int
    seconds: float


def fskd_run(pruner: str, seed: int) -> FskdRun:
    """``nc.compress`` of the cnn1d with [``pruner`` (2x fewer MACs, no fine-tuning),
    ``fskd`` on :data:`FSKD_SAMPLES` unlabelled training inputs]."""
    model, data = cnn1d()
    recipe = Recipe("bench-fskd", (Stage.technique(pruner, **PRUNERS[pruner]),
                                   Stage.technique("fskd", samples=FSKD_SAMPLES)))
    r = nc.compress(model, recipe, data, seed=seed, progress=False, measure_latency=False)
    pruned, repaired = r.stages
    return FskdRun(pruner, seed, r.baseline.accuracy, pruned.measurement.accuracy,
                   repaired.measurement.accuracy, r.baseline.macs.total,
                   repaired.measurement.macs.total, repaired.seconds)


# ------------------------------------------------------------ 4. KD vs CE fine-tuning


@dataclass(frozen=True)
class TuneRun:
    """One compress run: test accuracy and .nnc bytes before and after."""

    model: str
    recipe: str
    teacher: str
    seed: int
    accuracy_before: float
    accuracy: float
    bytes_before: int
    bytes: int
    nonzero_before: int
    nonzero: int
    seconds: float


def tune_run(model_name: str, dataset: str, recipe: str, teacher: str, seed: int) -> TuneRun:
    """``nc.compress(model, recipe, data, teacher=teacher)``: every training stage of the
    recipe learns from the original model (``"original"``: KD) or the labels (``"none"``)."""
    model, data = zoo.load(model_name, dataset, seed=0, progress=False)
    start = time.perf_counter()
    r = nc.compress(model, recipe, data, seed=seed, progress=False, measure_latency=False,
                    teacher=teacher)
    return TuneRun(model_name, recipe, teacher, seed, r.baseline.accuracy, r.final.accuracy,
                   r.baseline.artifact_bytes, r.final.artifact_bytes,
                   r.baseline.params.nonzero, r.final.params.nonzero,
                   time.perf_counter() - start)


# ------------------------------------------------------------ 5. cross-domain


@dataclass(frozen=True)
class DomainRun:
    """A student trained one way: test accuracy on the target and the source domain."""

    method: str
    seed: int
    params: int
    target: float
    source: float


def domain_run(method: str, seed: int) -> DomainRun:
    """The 4x student trained on labelled mnist1d and, but for ``source-only``, unlabelled
    mnist1d-shifted inputs (the target's training labels are never read)."""
    teacher, source = cnn1d()
    target = load_dataset(SHIFTED_NAME)
    student = student_of(teacher, RATIO, kind=KIND, seed=seed)
    common = {"epochs": DOMAIN_EPOCHS, "lr": LR, "seed": seed, "progress": False}
    if method == "source-only":
        source_only(student, source, target, **common)
    elif method == "kd-target":
        target_kd(student, teacher, source, target, **common)
    else:
        mobileda(student, teacher, source, target, **common)
    return DomainRun(method, seed, n_params(student), evaluate(student, target.test),
                     evaluate(student, source.test))


# ------------------------------------------------------------ 6. label-free embedder


@dataclass(frozen=True)
class EmbedRun:
    """The transformer embedder compressed from inputs only: bytes, cosine, labels."""

    recipe: str
    seed: int
    bytes_before: int
    bytes: int
    cosine: float
    labelled: bool
    seconds: float


def embedder_run(recipe: str, seed: int) -> EmbedRun:
    """``nc.compress`` of ``embedder_of(trained transformer)`` on ``without_labels`` of
    mnist1d, scored by the cosine of its embeddings to the fp32 embedder's (test split)."""
    model, data = zoo.load("transformer", "mnist1d", seed=0, progress=False)
    inputs_only = without_labels(data)
    start = time.perf_counter()
    r = nc.compress(embedder_of(model), recipe, inputs_only, seed=seed, progress=False,
                    measure_latency=False, metric="cosine")
    return EmbedRun(recipe, seed, r.baseline.artifact_bytes, r.final.artifact_bytes,
                    r.final.accuracy, inputs_only.labelled, time.perf_counter() - start)
