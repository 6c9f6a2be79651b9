"""MobileDA cross-domain distillation (nncompress.distill.domain) on a tiny toy shift."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nncompress as nc
from nncompress.data.core import Dataset, tensor_loader, without_labels
from nncompress.distill import domain as da
from nncompress.errors import DataError, ModelError, RecipeError

SHAPE = (1, 16)
CLASSES = 3


def _toy(shift: float, gain: float, seed: int, labels: str = "true") -> Dataset:
    """3 classes of 1-D signals: class c is a bump at position 4 + 4c plus noise; the
    target domain adds a linear trend of slope ``shift`` and scales by ``gain``.
    ``labels="wrong"`` replaces the train labels by (y + 1) mod 3."""
    g = torch.Generator().manual_seed(seed)
    n = 96
    y = torch.arange(n) % CLASSES
    pos = torch.arange(SHAPE[1]).float()
    x = torch.exp(-((pos[None, :] - (4 + 4 * y[:, None])) ** 2) / 4.0)
    x = gain * x + shift * torch.linspace(-1, 1, SHAPE[1]) + 0.1 * torch.randn(n, 16, generator=g)
    x = x[:, None, :]
    y_train = (y[:64] + 1) % CLASSES if labels == "wrong" else y[:64]
    return Dataset(f"toy{shift}", tensor_loader(x[:64], y_train, batch_size=16, shuffle=True,
                                                seed=0),
                   tensor_loader(x[64:], y[64:], batch_size=32, shuffle=False, seed=0),
                   SHAPE, CLASSES)


def _model(seed: int, channels: list[int]) -> nn.Module:
    torch.manual_seed(seed)
    return nc.models.build("cnn1d", SHAPE, CLASSES, channels=channels)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    model = _model(1, [8, 16])
    nc.train.fit(model, _toy(0.0, 1.0, 0), epochs=3, lr=1e-2, progress=False)  # a mechanics
    # test teacher: right on its source, near chance on the toy target (no accuracy claims)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_epoch_trains_every_term_and_leaves_the_teacher(teacher: nn.Module) -> None:
    student = _model(0, [4, 8])
    before, teacher_before = _state(student), _state(teacher)
    teacher.train()
    log = da.mobileda(student, teacher, _toy(0.0, 1.0, 0), _toy(1.5, 0.5, 1), epochs=1,
                      lr=1e-2, progress=False)
    assert log.epochs == 1 and len(log.test_acc) == 1 and log.final_test_acc is not None
    for column in (log.loss, log.ce, log.kd, log.align):
        assert torch.isfinite(torch.tensor(column)).all()
    assert log.ce[0] > 0 and log.kd[0] > 0 and log.align[0] > 0
    assert not _same(before, _state(student))
    assert _same(teacher_before, _state(teacher)) and teacher.training  # mode restored


def test_target_train_labels_are_never_read(teacher: nn.Module) -> None:
    """Wrong target train labels, or none at all, give the very same student."""
    source = _toy(0.0, 1.0, 0)
    runs = []
    for target in (_toy(1.5, 0.5, 1), _toy(1.5, 0.5, 1, labels="wrong"),
                   without_labels(_toy(1.5, 0.5, 1))):
        student = _model(0, [4, 8])
        log = da.mobileda(student, teacher, source, target, epochs=2, lr=1e-2, progress=False)
        runs.append((_state(student), log))
    assert _same(runs[0][0], runs[1][0]) and _same(runs[0][0], runs[2][0])
    assert runs[0][1].loss == runs[1][1].loss == runs[2][1].loss
    assert runs[2][1].test_acc == (None, None)  # unlabelled target: nothing to score


def test_alignment_brings_the_domains_closer(teacher: nn.Module) -> None:
    source, target = _toy(0.0, 1.0, 0), _toy(1.5, 0.5, 1)
    mmd = {}
    for weight in (0.0, 10.0):
        student = _model(0, [4, 8])
        da.mobileda(student, teacher, source, target, epochs=4, lr=1e-2,
                    align_weight=weight, progress=False)
        mmd[weight] = da.feature_mmd(student, source.test, target.test)
    assert mmd[10.0] < 0.5 * mmd[0.0]


def test_baselines_match_their_definitions(teacher: nn.Module) -> None:
    source, target = _toy(0.0, 1.0, 0), _toy(1.5, 0.5, 1)
    a, b = _model(0, [4, 8]), _model(0, [4, 8])
    log_a = da.target_kd(a, teacher, source, target, epochs=1, lr=1e-2, progress=False)
    da.mobileda(b, teacher, source, target, epochs=1, lr=1e-2, align_weight=0.0,
                progress=False)
    assert _same(_state(a), _state(b)) and log_a.align == (0.0,) and log_a.kd[0] > 0

    class NoTrain(Dataset):
        """A target whose train split must never be iterated."""

    blocked = NoTrain(target.name, train=None, test=target.test,  # type: ignore[arg-type]
                      input_shape=SHAPE, num_classes=CLASSES)
    c, d = _model(0, [4, 8]), _model(0, [4, 8])
    log_c = da.source_only(c, source, blocked, epochs=2, lr=1e-2, progress=False)
    nc.train.fit(d, source, epochs=2, lr=1e-2, progress=False)
    assert log_c.kd == log_c.align == (0.0, 0.0) and log_c.final_test_acc is not None
    assert _same(_state(c), _state(d))  # the same loop as train.fit on the source alone


def test_same_seed_same_student(teacher: nn.Module) -> None:
    states = []
    for _ in range(2):
        student = _model(0, [4, 8])
        da.mobileda(student, teacher, _toy(0.0, 1.0, 0), _toy(1.5, 0.5, 1), epochs=1,
                    lr=1e-2, seed=3, progress=False)
        states.append(_state(student))
    assert _same(*states)


def test_final_linear_is_the_last_one_called() -> None:
    x = torch.zeros(2, *SHAPE)
    assert da.final_linear(_model(0, [4]), x) == "classifier"
    mlp = nc.models.build("mlp", SHAPE, CLASSES, hidden=[8, 6])
    names = [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
    assert da.final_linear(mlp, x) == names[-1]


def test_model_without_a_final_linear_is_a_one_line_model_error(teacher: nn.Module) -> None:
    convnet = nn.Sequential(nn.Conv1d(1, CLASSES, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten())
    with pytest.raises(ModelError, match=r"'Sequential' has no final nn\.Linear") as info:
        da.mobileda(convnet, teacher, _toy(0.0, 1.0, 0), _toy(1.5, 0.5, 1), epochs=1,
                    progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"),
    ({"align_weight": -1.0}, "align_weight"), ({"epochs": -1}, "epochs"),
    ({"lr": float("inf")}, "lr"), ({"lr_schedule": "step"}, "lr_schedule"),
])
def test_bad_settings_are_recipe_errors(teacher: nn.Module, kwargs: dict, named: str) -> None:
    with pytest.raises(RecipeError, match=named):
        da.mobileda(_model(0, [4]), teacher, _toy(0.0, 1.0, 0), _toy(1.5, 0.5, 1),
                    progress=False, **kwargs)


def test_bad_domains_are_data_errors(teacher: nn.Module) -> None:
    source = _toy(0.0, 1.0, 0)
    with pytest.raises(DataError, match="labelled source"):
        da.mobileda(_model(0, [4]), teacher, without_labels(source), source, progress=False)
    other = copy.copy(source)
    object.__setattr__(other, "input_shape", (1, 20))
    with pytest.raises(DataError, match=r"\(1, 20\)"):
        da.mobileda(_model(0, [4]), teacher, source, other, progress=False)
