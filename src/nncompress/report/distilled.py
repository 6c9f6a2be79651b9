"""The "Knowledge distillation" section of the demo report: a KD student next to the same
student trained from labels, FSKD repairing a pruned model from a few unlabelled inputs,
and an embedder compressed from inputs only: the rows (measured by
:mod:`nncompress.demo_distill`) and their tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nncompress.report.tables import fmt_bytes, fmt_count, fmt_pct, fmt_ratio, render_markdown

__all__ = ["EmbedderRow", "FSKDRow", "StudentRow", "distilled_section", "embedder_markdown",
           "fskd_markdown", "students_markdown"]

TITLE = "## Knowledge distillation"


@dataclass(frozen=True)
class StudentRow:
    """One model of the KD comparison: ``arch`` its architecture name, ``accuracy`` top-1
    on the test split in [0, 1], ``file_bytes`` its ``.nnc`` file."""

    label: str
    arch: str
    params: int
    accuracy: float
    file_bytes: int


@dataclass(frozen=True)
class FSKDRow:
    """Test accuracy (labelled test split, [0, 1]) of the teacher, the pruned model and the
    pruned model after FSKD; MACs per sample of the teacher and the pruned model; the fskd
    stage's wall-clock seconds; ``samples``: unlabelled inputs it read."""

    teacher: float
    pruned: float
    repaired: float
    teacher_macs: int
    pruned_macs: int
    samples: int
    seconds: float

    @property
    def recovered(self) -> float | None:
        """Fraction of the accuracy lost by pruning that FSKD won back (None: none lost)."""
        lost = self.teacher - self.pruned
        return None if lost <= 0 else (self.repaired - self.pruned) / lost


@dataclass(frozen=True)
class EmbedderRow:
    """The label-free embedder: mean cosine of the compressed model's embeddings to the
    fp32 model's on the test inputs, ``.nnc`` bytes before / after, the run's seconds."""

    cosine: float
    bytes_before: int
    bytes_after: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after


def students_markdown(rows: Sequence[StudentRow]) -> str:
    """Teacher and students: architecture, parameters, test accuracy, .nnc bytes."""
    cells = [[r.label, r.arch, fmt_count(r.params), fmt_pct(r.accuracy),
              fmt_bytes(r.file_bytes)] for r in rows]
    return render_markdown(["model", "architecture", "parameters", "test accuracy",
                            "bytes on disk (.nnc)"], cells)


def fskd_markdown(row: FSKDRow) -> str:
    """Teacher / pruned / after FSKD: accuracy, MACs, share of the loss recovered."""
    recovered = "-" if row.recovered is None else f"{100 * row.recovered:.0f} %"
    cells = [["teacher (cnn1d)", fmt_count(row.teacher_macs), fmt_pct(row.teacher), "-", "-"],
             ["pruned, no fine-tuning", fmt_count(row.pruned_macs), fmt_pct(row.pruned),
              fmt_pct(row.pruned - row.teacher, signed=True), "-"],
             [f"pruned + FSKD ({row.samples} inputs, no labels)", fmt_count(row.pruned_macs),
              fmt_pct(row.repaired), fmt_pct(row.repaired - row.teacher, signed=True),
              recovered]]
    return render_markdown(["model", "MACs / input", "test accuracy", "vs teacher",
                            "loss recovered"], cells)


def embedder_markdown(row: EmbedderRow) -> str:
    """Cosine to the fp32 embeddings, .nnc bytes before and after, ratio."""
    cells = [[f"{row.cosine:.4f}", fmt_bytes(row.bytes_before), fmt_bytes(row.bytes_after),
              fmt_ratio(row.ratio), f"{row.seconds:.1f} s"]]
    return render_markdown(["cosine to fp32 embeddings", "bytes on disk (.nnc), fp32",
                            "compressed", "ratio", "run time"], cells)


def distilled_section(students: Sequence[StudentRow], repaired: FSKDRow | None,
                      embedder: EmbedderRow | None, *, kd_epochs: int, kd_lr: float,
                      kd_ratio: float, macs_reduction: float) -> str:
    """The report section (``## Knowledge distillation``); each table after one line saying
    what was measured and how. Parts with no rows are left out."""
    blocks = [TITLE]
    if students:
        blocks += [
            f"**KD student** (Hinton, Vinyals & Dean 2015): `student_of(cnn1d, {kd_ratio:g})`"
            f" (the auto kind) trained {kd_epochs} epochs at lr {kd_lr:g}, cosine schedule, "
            "seed fixed, once from the labels (cross-entropy) and once -- from the same "
            "initial weights -- by KD from the teacher (T = 4, alpha = 0.9); top-1 on "
            "mnist1d's test split, one seed (`make bench`: 3 seeds).",
            students_markdown(students)]
    if repaired is not None:
        blocks += [
            f"**FSKD** (Li, Li, Liu & Zhang 2020): cnn1d L1-filter-pruned (Li et al. 2017) "
            f"to {macs_reduction:g}x fewer MACs with no fine-tuning, then each Conv / Linear "
            f"corrected by a pointwise map least-squares-fitted to the teacher's features on "
            f"{repaired.samples} training inputs (labels dropped) and merged into the layer, "
            "through `nc.compress` on `without_labels(mnist1d)`; accuracy on the labelled "
            "test split; **loss recovered** = (FSKD - pruned) / (teacher - pruned); the "
            f"fskd stage took {repaired.seconds:.1f} s wall-clock.",
            fskd_markdown(repaired)]
    if embedder is not None:
        blocks += [
            "**Label-free embedder**: the transformer without its classifier "
            "(`embedder_of`: the mean-pooled last-block embedding) compressed with the "
            "packaged recipe `label-free-embedder` (6-bit weight sharing, centroids "
            "distilled on the cosine loss from the fp32 model) on mnist1d inputs only; "
            "cosine = mean over test inputs of cos(compressed embedding, fp32 embedding); "
            "bytes of the `.nnc` file; run time includes measuring.",
            embedder_markdown(embedder)]
    return "\n\n".join(blocks)
