"""Confidence-cascade multiplexing (Eshratifar & Pedram 2020)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nncompress.data import Dataset
from nncompress.errors import ConstraintError, ModelError
from nncompress.models.mlp import MLP
from nncompress.share.multiplex import (
    Cascade,
    calibrate_cascade,
    cascade_curve,
    evaluate_thresholds,
)
from nncompress.train import fit


@pytest.fixture(scope="module")
def setup() -> tuple[list[MLP], Dataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 12, generator=g)
    y = x[:, 0, :3].argmax(dim=1)
    ds = TensorDataset(x, y)
    data = Dataset("tiny", DataLoader(ds, batch_size=32, shuffle=True,
                                      generator=torch.Generator()),
                   DataLoader(ds, batch_size=64), (1, 12), 3)
    torch.manual_seed(0)
    small, large = MLP((1, 12), 3, hidden=(4,)), MLP((1, 12), 3, hidden=(64, 64))
    fit(small, data, epochs=2, lr=1e-2, progress=False)
    fit(large, data, epochs=6, lr=1e-2, progress=False)
    return [small.eval(), large.eval()], data


def test_routing_follows_the_thresholds(setup) -> None:
    models, _ = setup
    x = torch.randn(16, 1, 12)
    with torch.no_grad():
        everyone_small, who = Cascade(models, [0.0]).route(x)
        assert torch.equal(everyone_small, models[0](x)) and (who == 0).all()
        everyone_large, who = Cascade(models, [1.01]).route(x)
        assert torch.equal(everyone_large, models[1](x)) and (who == 1).all()
        mixed, who = Cascade(models, [0.9]).route(x)
        sure = models[0](x).softmax(-1).amax(-1) >= 0.9
        assert torch.equal(who == 0, sure)
        assert torch.equal(mixed[sure], models[0](x)[sure])
        assert torch.equal(mixed[~sure], models[1](x)[~sure])


def test_curve_is_a_pareto_front_between_the_two_models(setup) -> None:
    models, data = setup
    curve = cascade_curve(models, data)
    costs = [p.avg_macs for p in curve]
    accs = [p.accuracy for p in curve]
    assert costs == sorted(costs) and accs == sorted(accs)
    assert curve[0].share[0] == 1.0  # the cheapest point uses the small model only
    for p in curve:
        assert sum(p.share) == pytest.approx(1.0)


def test_calibration_respects_the_budget(setup) -> None:
    models, data = setup
    small_cost = cascade_curve(models, data)[0].avg_macs
    budget = small_cost * 3
    cascade = calibrate_cascade(models, data, budget_macs=budget)
    train_points = cascade_curve(models, data, split="train")
    chosen = next(p for p in train_points if p.thresholds == cascade.thresholds)
    assert chosen.avg_macs <= budget
    with pytest.raises(ConstraintError, match="below the cheapest"):
        calibrate_cascade(models, data, budget_macs=1)
    with pytest.raises(ModelError, match="cheapest to most expensive"):
        calibrate_cascade(models[::-1], data, budget_macs=budget)


def test_fixed_thresholds_match_the_cascade_module(setup) -> None:
    models, data = setup
    point = evaluate_thresholds(models, data, (0.9,))
    cascade = Cascade(models, (0.9,))
    correct = seen = 0
    answered_small = 0
    with torch.no_grad():
        for x, y in data.test:
            logits, who = cascade.route(x)
            correct += int((logits.argmax(-1) == y).sum())
            answered_small += int((who == 0).sum())
            seen += len(y)
    assert point.accuracy == pytest.approx(correct / seen)
    assert point.share[0] == pytest.approx(answered_small / seen)
