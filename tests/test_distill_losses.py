"""Distillation losses against hand computations on tiny tensors (plain math / numpy)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.distill.losses import (
    AngularLoss,
    ClassPairs,
    CORALLoss,
    CosineLoss,
    CSKDLoss,
    KDLoss,
    MMDLoss,
    MSELoss,
    NoisyTeacher,
)
from nncompress.errors import DataError, ModelError, RecipeError

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
Y = [1, 2]


def _softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _hand_kl(s: list[list[float]], t: list[list[float]], temp: float) -> float:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over rows."""
    total = 0.0
    for srow, trow in zip(s, t, strict=True):
        ps, pt = _softmax(srow, temp), _softmax(trow, temp)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return temp * temp * total / len(s)


def _hand_ce(s: list[list[float]], y: list[int]) -> float:
    return -sum(math.log(_softmax(row, 1.0)[c]) for row, c in zip(s, y, strict=True)) / len(s)


def _t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def test_kd_matches_hand_computation_with_t_squared() -> None:
    loss = KDLoss(temperature=4.0, alpha=0.7)(_t(S), _t(T), torch.tensor(Y))
    expected = 0.7 * _hand_kl(S, T, 4.0) + 0.3 * _hand_ce(S, Y)
    assert float(loss) == pytest.approx(expected, rel=1e-10)
    # the T^2 factor: the soft term is 16x the plain KL at T = 4
    plain = _hand_kl(S, T, 4.0) / 16.0
    assert float(KDLoss(4.0, 1.0)(_t(S), _t(T))) == pytest.approx(16.0 * plain, rel=1e-10)


def test_kd_alpha_edges() -> None:
    s, t, y = _t(S), _t(T), torch.tensor(Y)
    soft_only = KDLoss(2.0, 1.0)(s, t, y)
    assert float(soft_only) == pytest.approx(_hand_kl(S, T, 2.0), rel=1e-10)
    assert float(KDLoss(2.0, 1.0)(s, t)) == pytest.approx(float(soft_only))
    assert float(KDLoss(2.0, 0.0)(s, t, y)) == pytest.approx(_hand_ce(S, Y), rel=1e-10)
    # no labels: the soft term alone, whatever alpha (alpha treated as 1)
    assert float(KDLoss(2.0, 0.3)(s, t)) == pytest.approx(_hand_kl(S, T, 2.0), rel=1e-10)
    with pytest.raises(DataError, match="KDLoss with alpha=0 needs labels") as err:
        KDLoss(2.0, 0.0)(s, t)
    assert "\n" not in str(err.value)


def test_kd_large_temperature_tends_to_logit_matching() -> None:
    """Hinton et al. sec. 2.1: for zero-mean logits and large T, T^2 * KL tends to
    sum((s - t)^2) / (2 C) per sample, and its gradient to (s - t) / (C * B)."""
    s = _t(S)
    s = (s - s.mean(dim=1, keepdim=True)).detach().requires_grad_(True)
    t = _t(T)
    t = t - t.mean(dim=1, keepdim=True)
    b, c = s.shape
    loss = KDLoss(temperature=1e4, alpha=1.0)(s, t)
    loss.backward()
    diff = (s - t).detach()
    assert float(loss.detach()) == pytest.approx(float(diff.pow(2).sum()) / (2 * c * b),
                                                rel=1e-3)
    assert torch.allclose(s.grad, diff / (c * b), rtol=1e-3, atol=1e-8)
    # at a moderate T it is measurably not there yet
    small = KDLoss(temperature=1.0, alpha=1.0)(s, t)
    assert abs(float(small.detach()) - float(diff.pow(2).sum()) / (2 * c * b)) > 1e-2


def test_kd_validation_and_teacher_gets_no_gradient() -> None:
    for bad in ({"temperature": 0.0}, {"temperature": float("nan")}, {"alpha": 1.5},
                {"alpha": -0.1}):
        with pytest.raises(RecipeError):
            KDLoss(**bad)
    with pytest.raises(ModelError, match=r"\[2, 3\].*\[2, 4\]"):
        KDLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(DataError, match="labels"):
        KDLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    s, t = _t(S, grad=True), _t(T, grad=True)
    KDLoss()(s, t, torch.tensor(Y)).backward()
    assert t.grad is None and s.grad is not None


def test_kd_sequence_logits_are_rows() -> None:
    s = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    t = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(4, (2, 5), generator=torch.Generator().manual_seed(2))
    a = KDLoss(3.0, 0.5)(s, t, y)
    b = KDLoss(3.0, 0.5)(s.reshape(10, 4), t.reshape(10, 4), y.reshape(10))
    assert torch.allclose(a, b)


def test_cosine_mse_angular_match_hand_computation() -> None:
    s, t = np.array(S), np.array(T)
    cos = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    assert float(CosineLoss()(_t(S), _t(T))) == pytest.approx(float((1 - cos).mean()))
    assert float(MSELoss()(_t(S), _t(T), torch.tensor(Y))) == pytest.approx(
        float(((s - t) ** 2).mean()))
    unit = s / np.linalg.norm(s, axis=1, keepdims=True) - t / np.linalg.norm(t, axis=1,
                                                                            keepdims=True)
    angular = float(AngularLoss()(_t(S), _t(T)))
    assert angular == pytest.approx(float((unit ** 2).sum(1).mean()))
    assert angular == pytest.approx(2 * float((1 - cos).mean()))
    # blind to the norm; flattened per sample for [B, C, L]
    assert float(AngularLoss()(3 * _t(S), _t(T))) == pytest.approx(angular)
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    assert float(CosineLoss()(x, 2 * x)) == pytest.approx(0.0, abs=1e-6)


def test_cskd_matches_hand_computation_and_stops_gradient() -> None:
    s, t = _t(S, grad=True), _t(T, grad=True)
    loss = CSKDLoss(temperature=4.0, weight=0.5)(s, t, torch.tensor(Y))
    expected = _hand_ce(S, Y) + 0.5 * _hand_kl(S, T, 4.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(DataError, match="CSKDLoss needs labels"):
        CSKDLoss()(_t(S), _t(T))
    with pytest.raises(RecipeError, match="weight"):
        CSKDLoss(weight=-1.0)


def _pool() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(24, dtype=torch.float32).reshape(8, 3)   # every sample distinct
    y = torch.tensor([0, 1, 0, 2, 1, 0, 1, 0])                # class 2 has one sample
    return x, y


def test_class_pairs_same_class_and_not_itself() -> None:
    x, y = _pool()
    pairs = ClassPairs(x, y, seed=0)
    for _ in range(20):
        partners = pairs.partners(y, x)
        index = [int(torch.nonzero((x == p).all(1))[0]) for p in partners]
        assert [int(y[i]) for i in index] == y.tolist()
        for i, j in enumerate(index):
            assert j != i or int(y[i]) == 2          # only the single-sample class pairs itself
    assert torch.equal(ClassPairs(x, y, seed=3).partners(y), ClassPairs(x, y, seed=3).partners(y))
    draws = torch.stack([ClassPairs(x, y, seed=s).partners(y) for s in range(5)])
    assert len(torch.unique(draws, dim=0)) > 1
    with pytest.raises(DataError, match="class 7"):
        pairs.partners(torch.tensor([7]))


def test_class_pairs_tuple_inputs_and_bad_labels() -> None:
    x, y = _pool()
    pairs = ClassPairs((x, -x), y, seed=1)
    a, b = pairs.partners(y[:3], (x[:3], -x[:3]))
    assert torch.equal(a, -b) and a.shape == (3, 3)
    with pytest.raises(DataError, match="integer labels"):
        ClassPairs(x, y.float(), seed=0)


def test_noisy_teacher_deterministic_and_noise_std() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(4, 10)
    with torch.no_grad():
        teacher.weight.mul_(0.1)
    x = torch.randn(2000, 4)
    clean = teacher(x).detach()
    assert float(clean.norm(dim=1).max()) < 5.0
    a, b = NoisyTeacher(teacher, 0.3, seed=5, bound=5.0), NoisyTeacher(teacher, 0.3, seed=5,
                                                                      bound=5.0)
    out_a = a(x)
    assert torch.equal(out_a, b(x)) and not torch.equal(out_a, a(x))
    assert not torch.equal(out_a, NoisyTeacher(teacher, 0.3, seed=6, bound=5.0)(x))
    a.reseed()
    assert torch.equal(a(x), out_a)
    noise = out_a - clean                     # nothing clipped: pure noise, std = sigma * B
    assert float(noise.std()) == pytest.approx(0.3 * 5.0, rel=0.03)
    assert abs(float(noise.mean())) < 0.05
    assert not out_a.requires_grad and copy.deepcopy(a) is not a


def test_noisy_teacher_bounds_outputs() -> None:
    torch.manual_seed(1)
    teacher = nn.Linear(4, 6)
    x = torch.randn(101, 4)
    clipped = NoisyTeacher(teacher, 0.0, bound=0.1)(x)
    assert float(clipped.norm(dim=1).max()) <= 0.1 + 1e-6
    norms = teacher(x).detach().norm(dim=1)
    adaptive = NoisyTeacher(teacher, 0.0)(x).norm(dim=1)   # bound = median norm
    assert float(adaptive.max()) == pytest.approx(float(norms.median()), rel=1e-5)
    assert int((adaptive < norms - 1e-6).sum()) == 50
    with pytest.raises(RecipeError, match="noise_scale"):
        NoisyTeacher(teacher, -1.0)
    with pytest.raises(RecipeError, match="bound"):
        NoisyTeacher(teacher, 1.0, bound=0.0)


def _hand_mmd(s: np.ndarray, t: np.ndarray, bandwidths: tuple[float, ...]) -> float:
    z = np.concatenate([s, t])
    n = len(z)
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    m = d2.sum() / (n * n - n)
    k = sum(np.exp(-d2 / (b * m)) for b in bandwidths) / len(bandwidths)
    ns = len(s)
    return float(k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean())


def test_mmd_matches_hand_computation() -> None:
    s = np.array([[0.0, 1.0], [1.0, 0.5]])
    t = np.array([[2.0, 0.0], [1.5, 1.0], [3.0, -1.0]])
    loss = MMDLoss(bandwidths=(0.5, 2.0))(torch.tensor(s), torch.tensor(t))
    assert float(loss) == pytest.approx(_hand_mmd(s, t, (0.5, 2.0)), rel=1e-10)
    linear = MMDLoss("linear")(torch.tensor(s), torch.tensor(t))
    assert float(linear) == pytest.approx(float(((s.mean(0) - t.mean(0)) ** 2).sum()))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    assert float(MMDLoss()(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(MMDLoss()(x, x + 2.0)) > 0.1
    with pytest.raises(RecipeError, match="kernel"):
        MMDLoss("laplace")
    with pytest.raises(DataError, match="width"):
        MMDLoss()(torch.zeros(4, 3), torch.zeros(4, 2))


def test_coral_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) * 2.0
    expected = float(((np.cov(s.T) - np.cov(t.T)) ** 2).sum()) / (4 * 9)
    src = torch.tensor(s, requires_grad=True)
    loss = CORALLoss()(src, torch.tensor(t))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert src.grad is not None and float(src.grad.abs().sum()) > 0
    assert float(CORALLoss()(torch.tensor(s), torch.tensor(s) + 1.0)) == pytest.approx(0.0,
                                                                                      abs=1e-12)
    with pytest.raises(DataError, match="at least 2 samples"):
        CORALLoss()(torch.zeros(1, 3), torch.zeros(4, 3))


def test_class_pairs_from_data_needs_labels() -> None:
    import dataclasses

    from nncompress.data.core import Dataset, tensor_loader

    x, y = _pool()
    loader = tensor_loader(x, y, batch_size=4, shuffle=True, seed=0)
    data = Dataset("tiny", loader, loader, (3,), 3)
    partners = ClassPairs.from_data(data, seed=0).partners(y, x)
    assert torch.equal(partners[3], x[3])                      # class 2: its only sample
    assert not torch.equal(partners[0], x[0])
    with pytest.raises(DataError, match="CS-KD needs labelled data"):
        ClassPairs.from_data(dataclasses.replace(data, labelled=False))
