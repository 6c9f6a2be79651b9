"""Confidence-cascade multiplexing (Eshratifar & Pedram 2020)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nncompress.data import Dataset, class_subset
from nncompress.errors import ConstraintError, ModelError
from nncompress.measure import accuracy as evaluate_accuracy
from nncompress.models.mlp import MLP
from nncompress.share.branches import train_heads
from nncompress.share.multiplex import (
    GRID,
    Cascade,
    calibrate_cascade,
    cascade_curve,
    evaluate_thresholds,
)
from nncompress.share.router import Multiplexer, router_curve, train_router
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


def test_calibration_uses_the_held_out_loader_it_is_given(setup) -> None:
    models, data = setup
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 1, 12, generator=g)
    held = DataLoader(TensorDataset(x, x[:, 0, :3].argmax(dim=1)), batch_size=32)
    budget = cascade_curve(models, data)[0].avg_macs * 3
    cascade = calibrate_cascade(models, data, budget_macs=budget, calibration=held)
    held_points = cascade_curve(models, data, split=held)
    within = [p for p in held_points if p.avg_macs <= budget]
    best = max(within, key=lambda p: (p.accuracy, -p.avg_macs))
    assert cascade.thresholds == best.thresholds
    with pytest.raises(ValueError, match="split"):
        cascade_curve(models, data, split="valid")


# ------------------------------------------------------------------ learned router


class _Fixed(nn.Module):
    """A router whose logits are given per input by a lookup on feature 0's sign."""

    def __init__(self, logits_pos: list[float], logits_neg: list[float]) -> None:
        super().__init__()
        self.pos = torch.tensor(logits_pos)
        self.neg = torch.tensor(logits_neg)
        self.scale = nn.Linear(1, 1)  # a parameter, so MAC counting sees a layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = (x.flatten(1)[:, :1] > 0).float()
        return pos * self.pos + (1 - pos) * self.neg + 0 * self.scale(pos)


def test_multiplexer_sends_each_input_to_the_cheapest_model_it_trusts(setup) -> None:
    models, _ = setup
    # inputs with x0 > 0: the small model is trusted (p = 0.88); others: nobody (p = 0.12)
    mux = Multiplexer(models, _Fixed([2.0, 2.0], [-2.0, -2.0]), threshold=0.5)
    calls = [0, 0]
    hooks = [m.register_forward_hook(lambda _m, args, _o, i=i: calls.__setitem__(
        i, calls[i] + len(args[0]))) for i, m in enumerate(models)]
    x = torch.randn(40, 1, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, who = mux.route(x)
    for h in hooks:
        h.remove()
    pos = x[:, 0, 0] > 0
    assert torch.equal(who, (~pos).long())  # untrusted inputs fall through to the largest
    assert calls == [int(pos.sum()), int((~pos).sum())]  # each model ran only on its own
    with torch.no_grad():
        assert torch.allclose(logits[pos], models[0](x[pos]))
        assert torch.allclose(logits[~pos], models[1](x[~pos]))
    with torch.no_grad():
        assert (Multiplexer(models, mux.router, 0.0).choose(x) == 0).all()
        assert (Multiplexer(models, mux.router, 1.01).choose(x) == 1).all()


def _held_out(n: int = 512, seed: int = 7) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, generator=g)
    return DataLoader(TensorDataset(x, x[:, 0, :3].argmax(dim=1)), batch_size=64)


class _Constant(nn.Module):
    """Always predicts class 0: right exactly on the inputs whose label is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0 * self.fc(x.flatten(1)) + torch.tensor([5.0, 0.0, 0.0])


def test_router_learns_which_inputs_the_small_model_gets_right(setup) -> None:
    models, data = setup
    pair = [_Constant(), models[1]]
    full = evaluate_thresholds(pair, data, (1.01,)).avg_macs
    mux = train_router(pair, data, _held_out(), budget_macs=full * 10, seed=0)
    x = torch.randn(400, 1, 12, generator=torch.Generator().manual_seed(3))
    label0 = x[:, 0, :3].argmax(dim=1) == 0
    with torch.no_grad():
        p_small = torch.sigmoid(mux.router(x))[:, 0]
    # the small model is right only on label-0 inputs; the router has learned that
    assert float(p_small[label0].mean()) > float(p_small[~label0].mean()) + 0.3
    curve = router_curve(mux, data)
    assert [p.avg_macs for p in curve] == sorted(p.avg_macs for p in curve)
    for p in curve:
        assert sum(p.share) == pytest.approx(1.0)
    chosen = next(p for p in curve if p.threshold == mux.threshold)
    with torch.no_grad():
        direct = sum(int((mux(xb).argmax(-1) == yb).sum()) for xb, yb in data.test)
    assert chosen.accuracy == pytest.approx(direct / sum(len(y) for _, y in data.test))


def test_router_budget_and_order_are_checked(setup) -> None:
    models, data = setup
    with pytest.raises(ConstraintError, match="router"):
        train_router(models, data, _held_out(), budget_macs=10)
    with pytest.raises(ModelError, match="cheapest to most expensive"):
        train_router(models[::-1], data, _held_out(), budget_macs=1e9)
    tight = train_router(models, data, _held_out(), budget_macs=1e9, seed=1)
    assert tight.threshold in GRID


# ------------------------------------------------------------------ shared backbone


def test_multi_branch_trains_heads_on_a_frozen_backbone() -> None:
    from helpers import tiny_data

    data = tiny_data(n=192, features=12, classes=4, seed=2)
    task_a, task_b = class_subset(data, [0, 1]), class_subset(data, [2, 3])
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    heads = [nn.Linear(16, 2), nn.Linear(16, 2)]
    head_before = heads[0].weight.detach().clone()
    model = train_heads(backbone, heads, [task_a, task_b], epochs=20, lr=1e-2)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm statistics unchanged
    assert not torch.equal(heads[0].weight, head_before)
    x = torch.randn(6, 1, 12)
    with torch.no_grad():
        outs = model(x)
        assert len(outs) == 2
        assert torch.equal(outs[1], model.branch(1)(x))
    for t, task in enumerate((task_a, task_b)):
        assert evaluate_accuracy(model.branch(t), task.test) > 0.7
    with pytest.raises(ModelError, match="2 heads but 1"):
        train_heads(backbone, heads, [task_a], epochs=1)
    with pytest.raises(ModelError, match="2 classes"):
        train_heads(backbone, [nn.Linear(16, 1)], [task_a], epochs=1)
    with pytest.raises(ModelError, match="no head 2"):
        model.branch(2)


def test_router_training_depends_on_the_seed_only(setup) -> None:
    models, data = setup
    first = train_router(models, data, _held_out(), budget_macs=1e9, seed=4)
    torch.rand(100)  # whatever ran before must not matter
    second = train_router(models, data, _held_out(), budget_macs=1e9, seed=4)
    for p, q in zip(first.router.parameters(), second.router.parameters(), strict=True):
        assert torch.equal(p, q)
    assert first.threshold == second.threshold
