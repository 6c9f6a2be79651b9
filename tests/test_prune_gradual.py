"""Gradual magnitude pruning (Zhu & Gupta, 2017): the cubic ramp and its schedule."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import nncompress as nc
from helpers import tiny_data
from nncompress import models
from nncompress.prune import magnitude
from nncompress.prune.magnitude import MagnitudePruneConfig, gradual_sparsity, magnitude_prune
from nncompress.prune.masks import mask_sparsity
from nncompress.recipe import Recipe
from nncompress.technique import Context


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("mlp", (1, 12), 3, hidden=[32])


def gradual(sparsity: float = 0.8, **kw: object) -> MagnitudePruneConfig:
    params = {"sparsity": sparsity, "scope": "global", "schedule": "gradual", "steps": 1,
              "epochs_per_step": 2, "lr": 0.003, "frequency": 2, "ramp_fraction": 0.5}
    return MagnitudePruneConfig(**{**params, **kw})


def test_cubic_ramp_values() -> None:
    assert gradual_sparsity(0, 0.9, 100) == 0.0
    assert gradual_sparsity(50, 0.9, 100) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert gradual_sparsity(100, 0.9, 100) == pytest.approx(0.9)
    assert gradual_sparsity(500, 0.9, 100) == pytest.approx(0.9)      # held after the ramp
    values = [gradual_sparsity(t, 0.9, 100) for t in range(101)]
    assert values == sorted(values)
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert steps[0] > steps[50] > steps[-1]                            # fast early, slow late


def test_default_schedule_is_iterative() -> None:
    assert MagnitudePruneConfig(sparsity=0.5).schedule == "iterative"
    with pytest.raises(ValidationError):
        MagnitudePruneConfig(sparsity=0.5, schedule="cubic")
    with pytest.raises(ValidationError):
        MagnitudePruneConfig(sparsity=0.5, frequency=0)


def test_masks_follow_the_ramp_every_frequency_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    targets: list[float] = []
    real = magnitude.magnitude_masks

    def spy(model: torch.nn.Module, sparsity: float, *args: object, **kw: object) -> dict:
        targets.append(sparsity)
        return real(model, sparsity, *args, **kw)

    monkeypatch.setattr(magnitude, "magnitude_masks", spy)
    model, data = tiny_mlp(), tiny_data()
    ctx = Context(data, seed=0, progress=False)
    magnitude_prune(model, gradual(), ctx)
    ramp = 6                                 # 2 epochs x 6 batches x ramp_fraction 0.5
    expected = [gradual_sparsity(t, 0.8, ramp) for t in (2, 4, 6)] + [0.8]
    assert targets == pytest.approx(expected)
    assert mask_sparsity(ctx.masks) == pytest.approx(0.8, abs=1e-3)
    weights = [p for n, p in model.named_parameters() if n in ctx.masks]
    for name, p in zip(ctx.masks, weights, strict=True):
        assert torch.all(p[~ctx.masks[name]] == 0)
    assert "gradual" in ctx.log[-1]


def test_gradual_keeps_accuracy_and_round_trips(tmp_path: Path) -> None:
    model, data = tiny_mlp(), tiny_data()
    nc.train.fit(model, data, epochs=3, lr=0.01, progress=False)
    before = nc.train.evaluate(model, data.test)
    dense = nc.save(model, tmp_path / "dense.nnc")
    ctx = Context(data, seed=0, progress=False)
    magnitude_prune(model, gradual(0.7, epochs_per_step=3), ctx)
    after = nc.train.evaluate(model, data.test)
    assert after >= before - 0.15
    size = nc.save(model, tmp_path / "sparse.nnc")
    assert size < 0.6 * dense
    loaded = nc.load(tmp_path / "sparse.nnc")
    x = torch.randn(5, 1, 12)
    assert torch.equal(loaded(x), model.eval()(x))


def test_gradual_recipe_parses() -> None:
    recipe = Recipe.named("gradual-prune")
    stage = recipe.stages[0]
    assert stage.params["schedule"] == "gradual"
    assert stage.params["sparsity"] >= 0.9
