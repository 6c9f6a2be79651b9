"""Quality metrics (issue 11): each against a hand computation on a tiny fixed model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nncompress.data import Dataset, unlabelled
from nncompress.errors import DataError
from nncompress.measure import METRICS, measure, quality
from nncompress.measure.quality import soft_labels, top1


class Fixed(nn.Module):
    """Returns a fixed output per sample index stored in the input's first feature."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.w = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()] + 0 * self.w(x)


STUDENT = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0], [0.5, 0.0, 0.0]])
TEACHER = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
LABELS = torch.tensor([0, 0, 2, 1])
X = torch.arange(4.0)[:, None]


def loader(labels: torch.Tensor | None) -> DataLoader:
    if labels is None:
        return unlabelled(X, X, batch_size=3).test
    return DataLoader(TensorDataset(X, labels), batch_size=3)


def value(metric: str, labels: torch.Tensor | None = None) -> float:
    return quality(Fixed(STUDENT), loader(labels), metric, teacher=Fixed(TEACHER))


def test_accuracy_and_agreement() -> None:
    s, t = STUDENT.numpy(), TEACHER.numpy()
    assert value("accuracy", LABELS) == pytest.approx(np.mean(s.argmax(1) == LABELS.numpy()))
    assert value("agreement") == pytest.approx(np.mean(s.argmax(1) == t.argmax(1)))
    assert value("agreement") == 0.75


def test_cosine_is_the_mean_of_per_sample_cosines() -> None:
    s, t = STUDENT.numpy(), TEACHER.numpy()
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(s, t, strict=True)]
    assert value("cosine") == pytest.approx(float(np.mean(cos)), rel=1e-6)


def test_mse_and_r2_against_the_teacher_without_float_targets() -> None:
    s, t = STUDENT.numpy(), TEACHER.numpy()
    assert value("mse") == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)
    r2 = 1 - ((s - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    assert value("r2") == pytest.approx(float(r2), rel=1e-6)
    assert value("r2", LABELS) == pytest.approx(float(r2), rel=1e-6)  # class labels: teacher


def test_mse_against_float_regression_targets() -> None:
    targets = STUDENT + 0.5
    got = quality(Fixed(STUDENT), DataLoader(TensorDataset(X, targets), batch_size=3), "mse")
    assert got == pytest.approx(0.25)
    assert quality(Fixed(STUDENT), DataLoader(TensorDataset(X, STUDENT), batch_size=3),
                   "r2") == pytest.approx(1.0)


def test_kl_is_teacher_to_student_in_nats() -> None:
    s, t = STUDENT.numpy(), TEACHER.numpy()
    p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    q = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    expected = float(np.mean((p * (np.log(p) - np.log(q))).sum(1)))
    assert value("kl") == pytest.approx(expected, rel=1e-5)
    assert quality(Fixed(TEACHER), loader(None), "kl", teacher=Fixed(TEACHER)) == \
        pytest.approx(0.0, abs=1e-6)


def test_directions_and_labels_needed() -> None:
    assert {n: METRICS.get(n).higher_is_better for n in METRICS.names()} == {
        "accuracy": True, "agreement": True, "cosine": True, "mse": False, "r2": True,
        "kl": False}
    with pytest.raises(DataError, match="needs labelled data"):
        value("accuracy")
    with pytest.raises(DataError, match="compares with a teacher"):
        quality(Fixed(STUDENT), loader(None), "cosine")
    with pytest.raises(DataError, match="unknown quality metric 'top5'"):
        value("top5")


def test_soft_labels_fill_missing_labels_with_teacher_probabilities() -> None:
    batches = soft_labels(list(loader(None)), Fixed(TEACHER))
    y = torch.cat([b[1] for b in batches])
    assert torch.allclose(y, torch.softmax(TEACHER, dim=1))
    assert torch.equal(top1(y), TEACHER.argmax(1))
    kept = soft_labels(list(loader(LABELS)), Fixed(TEACHER))
    assert torch.equal(torch.cat([b[1] for b in kept]), LABELS)


def test_measure_names_its_metric() -> None:
    data = Dataset("d", loader(LABELS), loader(LABELS), (1,), 3)
    m = measure(Fixed(STUDENT), data, with_latency=False, metric="cosine",
                teacher=Fixed(TEACHER))
    assert m.metric == "cosine" and m.quality == pytest.approx(value("cosine"))
    assert measure(Fixed(STUDENT), data, with_latency=False).metric == "accuracy"
    free = unlabelled(X, X)
    m = measure(Fixed(STUDENT), free, with_latency=False, teacher=Fixed(TEACHER))
    assert m.metric == "agreement" and m.accuracy == 0.75
    assert math.isclose(measure(Fixed(STUDENT), free, with_latency=False).accuracy, 1.0)
