"""The demo's knowledge-distillation section: each part on a tiny reference model, the
report formatting on hand-made rows, and (slow) the whole section on the quick demo models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY_MODELS, tiny_data
from nncompress import models as zoo
from nncompress.data import Dataset
from nncompress.demo_distill import (
    EmbedderRow,
    FSKDRow,
    StudentRow,
    demo_sections,
    embedder_row,
    fskd_row,
    kd_student_rows,
)
from nncompress.measure import accuracy
from nncompress.report.distilled import distilled_section
from nncompress.train import fit


def _trained(name: str, features: int, epochs: int = 8) -> tuple[torch.nn.Module, Dataset]:
    _, overrides = TINY_MODELS[name]
    data = tiny_data(n=192, features=features)
    torch.manual_seed(0)
    model = zoo.build(name, (1, features), data.num_classes, **overrides)
    fit(model, data, epochs=epochs, lr=1e-2, seed=0, progress=False)
    return model.eval(), data


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_kd_student_rows_compare_equal_students_and_leave_the_teacher() -> None:
    teacher, data = _trained("cnn1d", 23)
    before = _state(teacher)
    rows = kd_student_rows(teacher, data, epochs=2, lr=1e-2, seed=0)
    assert [r.label for r in rows] == ["teacher", "student, trained from labels",
                                       "student, KD from the teacher"]
    top, labels, kd = rows
    assert top.accuracy == accuracy(teacher, data.test)
    # one student architecture, ~4x fewer parameters, a smaller .nnc file
    assert labels.params == kd.params and labels.arch == kd.arch == "cnn1d"
    assert 3.0 < top.params / kd.params < 5.5
    assert kd.file_bytes < top.file_bytes / 2
    assert all(0.0 <= r.accuracy <= 1.0 for r in rows)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_fskd_row_halves_the_macs_and_repairs_from_inputs_only() -> None:
    teacher, data = _trained("cnn1d", 23)
    row = fskd_row(teacher, data, samples=24, seed=0)
    assert row.samples == 24 and row.seconds >= 0.0
    assert row.teacher == accuracy(teacher, data.test)
    assert row.pruned_macs <= 0.55 * row.teacher_macs
    # the repaired model is the pruned one corrected towards the teacher: it moved
    assert row.repaired != row.pruned or row.pruned == row.teacher
    assert row.repaired >= row.pruned - 0.05


def test_fskd_recovered_fraction() -> None:
    row = FSKDRow(teacher=0.9, pruned=0.5, repaired=0.8, teacher_macs=100, pruned_macs=50,
                  samples=40, seconds=0.5)
    assert row.recovered == pytest.approx(0.75)
    nothing_lost = FSKDRow(0.9, 0.9, 0.9, 100, 50, 40, 0.5)
    assert nothing_lost.recovered is None


def test_embedder_row_is_label_free_and_smaller() -> None:
    transformer, data = _trained("transformer", 20)
    row = embedder_row(transformer, data, quick=True, seed=0)
    assert row.cosine > 0.95
    assert row.bytes_after < row.bytes_before and row.ratio == row.bytes_before / row.bytes_after
    assert row.seconds > 0.0


def test_section_formats_every_part_and_leaves_out_missing_ones() -> None:
    students = [StudentRow("teacher", "cnn1d", 53098, 0.957, 214735),
                StudentRow("student, trained from labels", "cnn1d", 13185, 0.886, 54155),
                StudentRow("student, KD from the teacher", "cnn1d", 13185, 0.901, 54155)]
    repaired = FSKDRow(0.957, 0.214, 0.800, 311680, 153850, 40, 0.69)
    embedder = EmbedderRow(0.99971, 272928, 55373, 48.2)
    text = distilled_section(students, repaired, embedder, kd_epochs=10, kd_lr=3e-3,
                             kd_ratio=4, macs_reduction=2)
    assert text.startswith("## Knowledge distillation")
    assert "| student, KD from the teacher | cnn1d | 13.19 k | 90.10 % | 52.9 KiB |" in text
    assert "| pruned + FSKD (40 inputs, no labels) | 153.85 k | 80.00 % | -15.70 pt | 79 % |" \
        in text
    assert "| 0.9997 | 266.5 KiB | 54.1 KiB | 4.93x | 48.2 s |" in text
    assert "trained 10 epochs at lr 0.003" in text and "took 0.7 s" in text
    only = distilled_section([], None, embedder, kd_epochs=10, kd_lr=3e-3, kd_ratio=4,
                             macs_reduction=2)
    assert "Label-free embedder" in only and "FSKD" not in only and "KD student" not in only


def test_no_section_without_cnn1d_or_transformer() -> None:
    said: list[str] = []
    assert demo_sections(["mlp", "gru"], quick=True, seed=0, echo=said.append) == []
    assert said == []


@pytest.mark.slow
def test_quick_demo_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    (text,) = demo_sections(["cnn1d", "transformer"], quick=True, seed=0, echo=said.append)
    assert "| student, KD from the teacher |" in text
    assert "| pruned + FSKD (40 inputs, no labels) |" in text
    assert "cosine to fp32 embeddings" in text
    assert len(said) == 4
