"""The knowledge-distillation family in ``make demo``, on one seed, each method once on the
model where it matters:

- a KD student (Hinton, Vinyals & Dean 2015): ``student_of(cnn1d, 4)`` trained from the
  cnn1d teacher's soft labels with :func:`nncompress.distill.trainer.distill`, next to the
  same student (same initial weights) trained from the labels with
  :func:`nncompress.train.fit` -- same epochs, learning rate, cosine schedule and seed;
- FSKD (Li, Li, Liu & Zhang 2020): cnn1d pruned to half its MACs by L1 filter pruning
  (Li et al. 2017) with no fine-tuning, then repaired by ``fskd`` from 40 unlabelled
  training inputs, through :func:`nncompress.compress` on the data with labels dropped;
- label-free compression of an embedder: the reference transformer as a mean-pooled
  embedder (:func:`~nncompress.models.transformer.embedder_of`) compressed with the
  packaged recipe ``label-free-embedder`` (6-bit weight sharing, Han, Mao & Dally 2016,
  centroids distilled on the cosine loss) on inputs only, scored by cosine fidelity.

``make bench`` has the full tables (3 seeds, T and alpha chosen on a validation split,
TAKD, KD fine-tuning, cross-domain); the report's formatting is
:mod:`nncompress.report.distilled`.

Cost: about 13 CPU-seconds on one thread for the whole section (measured with
``torch.set_num_threads(1)``; KD student ~8 s, FSKD ~1 s, embedder ~3 s); the models come
from the demo's own cache. With 2 torch threads on a CPU shared with other jobs it took
80 s (threads waiting on each other), so time it on an idle machine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from nncompress.data import Dataset, without_labels
from nncompress.measure import accuracy, artifact_bytes, count_params
from nncompress.report.distilled import EmbedderRow, FSKDRow, StudentRow, distilled_section

__all__ = ["FSKD_SAMPLES", "KD_EPOCHS", "KD_LR", "EmbedderRow", "FSKDRow", "StudentRow",
           "demo_sections", "embedder_row", "fskd_row", "kd_student_rows"]

#: training budget of both students (label-trained and KD), equal by construction
KD_EPOCHS = 10
KD_LR = 3e-3
#: the student is ~1/KD_RATIO of the teacher's parameters
KD_RATIO = 4.0
#: unlabelled training inputs FSKD fits its maps on (1 % of mnist1d's 4000)
FSKD_SAMPLES = 40
#: the structured pruning FSKD repairs: MACs divided by this, no fine-tuning
FSKD_MACS_REDUCTION = 2.0


def _arch(model: nn.Module) -> str:
    return str(getattr(type(model), "arch_name", type(model).__name__))


def _row(label: str, model: nn.Module, data: Dataset) -> StudentRow:
    return StudentRow(label, _arch(model), count_params(model).total,
                      accuracy(model, data.test), artifact_bytes(model))


def kd_student_rows(teacher: nn.Module, data: Dataset, *, epochs: int = KD_EPOCHS,
                    lr: float = KD_LR, seed: int = 0, progress: bool = False
                    ) -> list[StudentRow]:
    """The teacher, then ``student_of(teacher, KD_RATIO)`` trained from labels (cross-entropy)
    and a copy of the same initial student trained by KD (T = 4, alpha = 0.9) from the
    teacher: equal epochs, ``lr``, cosine schedule and seed. ``teacher`` is unchanged."""
    from nncompress.distill.trainer import distill
    from nncompress.models.students import student_of
    from nncompress.train import fit

    labels = student_of(teacher, KD_RATIO, seed=seed)
    kd = copy.deepcopy(labels)
    fit(labels, data, epochs=epochs, lr=lr, seed=seed, progress=progress,
        lr_schedule="cosine", desc="student (labels)")
    distill(kd, teacher, data, epochs=epochs, lr=lr, loss="kd", seed=seed,
            progress=progress, lr_schedule="cosine", desc="student (KD)")
    return [_row("teacher", teacher, data), _row("student, trained from labels", labels, data),
            _row("student, KD from the teacher", kd, data)]


def fskd_row(teacher: nn.Module, data: Dataset, *, samples: int = FSKD_SAMPLES,
             seed: int = 0) -> FSKDRow:
    """``teacher`` pruned to 1/FSKD_MACS_REDUCTION of its MACs (L1 filters, no fine-tuning)
    and repaired by ``fskd`` from ``samples`` training inputs, both through ``compress`` on
    ``without_labels(data)``; the pruning alone is a second, identical run (deterministic)
    so its accuracy can be measured. Accuracies on the labelled test split."""
    from nncompress import api
    from nncompress.recipe import Recipe, Stage

    prune = Stage.technique("l1_filter_prune", macs_reduction=FSKD_MACS_REDUCTION,
                            epochs_per_step=0)
    inputs_only = without_labels(data, seed=seed)
    pruned = api.compress(teacher, Recipe("demo-l1-prune", (prune,)), inputs_only,
                          seed=seed, progress=False, measure_latency=False).model
    result = api.compress(teacher, Recipe("demo-fskd", (prune, Stage.technique(
        "fskd", samples=samples))), inputs_only, seed=seed, progress=False,
        measure_latency=False)
    return FSKDRow(teacher=accuracy(teacher, data.test), pruned=accuracy(pruned, data.test),
                   repaired=accuracy(result.model, data.test),
                   teacher_macs=result.baseline.macs.total,
                   pruned_macs=result.stages[0].measurement.macs.total, samples=samples,
                   seconds=result.stages[-1].seconds)


def embedder_row(transformer: nn.Module, data: Dataset, *, quick: bool = False,
                 seed: int = 0) -> EmbedderRow:
    """``embedder_of(transformer)`` compressed with the packaged ``label-free-embedder``
    recipe on ``without_labels(data)`` (``quick``: its centroid training shortened to 1
    epoch)."""
    import time

    from nncompress import api
    from nncompress.models.transformer import embedder_of
    from nncompress.recipe import Recipe, Stage

    recipe = Recipe.resolve("label-free-embedder")
    if quick:
        recipe = replace(recipe, stages=tuple(
            Stage.technique(s.name, **{**s.params, "epochs": 1})
            if s.kind == "technique" and "epochs" in s.params else s for s in recipe.stages))
    start = time.perf_counter()
    result = api.compress(embedder_of(transformer), recipe, without_labels(data, seed=seed),
                          seed=seed, progress=False, measure_latency=False)
    return EmbedderRow(cosine=result.final.accuracy, bytes_before=result.baseline.artifact_bytes,
                       bytes_after=result.final.artifact_bytes,
                       seconds=time.perf_counter() - start)


def demo_sections(names: Sequence[str], *, quick: bool, seed: int,
                  echo: Callable[[str], None]) -> list[str]:
    """The "Knowledge distillation" section for ``make demo``: the KD student and FSKD
    when ``names`` has cnn1d, the label-free embedder when it has transformer (nothing
    when it has neither). ``quick``: 1-epoch teachers and students (a smoke run)."""
    from nncompress import models as zoo
    from nncompress.demo import QUICK_EPOCHS

    epochs = QUICK_EPOCHS if quick else None
    students: list[StudentRow] = []
    repaired: FSKDRow | None = None
    embedder: EmbedderRow | None = None
    if "cnn1d" in names or "transformer" in names:
        echo("knowledge distillation: KD student and FSKD (cnn1d), label-free embedder "
             "(transformer)")
    if "cnn1d" in names:
        teacher, data = zoo.load("cnn1d", seed=seed, progress=False, epochs=epochs)
        echo(f"  KD: a {KD_RATIO:g}x smaller cnn1d student, from labels and from the teacher")
        students = kd_student_rows(teacher, data, epochs=QUICK_EPOCHS if quick else KD_EPOCHS,
                                   seed=seed)
        echo(f"  FSKD: cnn1d pruned to {FSKD_MACS_REDUCTION:g}x fewer MACs, repaired from "
             f"{FSKD_SAMPLES} unlabelled inputs")
        repaired = fskd_row(teacher, data, seed=seed)
    if "transformer" in names:
        transformer, data = zoo.load("transformer", seed=seed, progress=False, epochs=epochs)
        echo("  label-free: the transformer as an embedder, label-free-embedder recipe")
        embedder = embedder_row(transformer, data, quick=quick, seed=seed)
    if not students and embedder is None:
        return []
    return [distilled_section(students, repaired, embedder, kd_epochs=QUICK_EPOCHS if quick
                              else KD_EPOCHS, kd_lr=KD_LR, kd_ratio=KD_RATIO,
                              macs_reduction=FSKD_MACS_REDUCTION)]
