"""Dynamic network surgery (Guo, Yao & Chen, 2016): prune, splice, hysteresis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from helpers import tiny_data
from nncompress import models
from nncompress.data import Dataset
from nncompress.errors import ModelError
from nncompress.prune.dns import DynamicSurgeryConfig, Surgery, dynamic_surgery
from nncompress.prune.masks import mask_sparsity
from nncompress.recipe import Recipe
from nncompress.technique import TECHNIQUES, Context


def test_registered() -> None:
    technique = TECHNIQUES.get("dynamic_surgery")
    assert technique.config is DynamicSurgeryConfig
    assert "Guo" in technique.paper


def test_two_thresholds_prune_splice_and_hold() -> None:
    weight = nn.Parameter(torch.linspace(0.0, 1.0, 101))
    surgery = Surgery({"w": weight}, sparsity=0.5, margin=0.1, seed=0)
    a, b = surgery.thresholds("w")
    assert 0 < a < b and b == pytest.approx(a * 1.1 / 0.9)
    mag = weight.detach()
    surgery.masks["w"][:] = torch.arange(101) % 2 == 0       # an arbitrary current mask
    before = surgery.masks["w"].clone()
    surgery.update_masks()
    mask = surgery.masks["w"]
    assert not mask[mag < a].any()                           # pruned below a
    assert mask[mag >= b].all()                              # spliced back above b
    band = (mag >= a) & (mag < b)
    assert band.any() and torch.equal(mask[band], before[band])   # hysteresis


def test_splicing_restores_a_weight_whose_importance_grows() -> None:
    """The weight from the only informative input starts at 0 (pruned) and must return."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.mul_(0.3)
        model[1].weight[:, 0] = 0.0                        # smallest magnitudes: pruned first
    ctx = Context(tiny_data(), seed=0, progress=False)
    config = DynamicSurgeryConfig(sparsity=0.5, epochs=3, lr=0.03, gamma=0.0)
    dynamic_surgery(model, config, ctx)
    mask = ctx.masks["1.weight"]
    assert mask[:, 0].all()                                # spliced back
    assert model[1].weight[:, 0].abs().min() > 0.1
    assert mask_sparsity(ctx.masks) == pytest.approx(0.5, abs=0.1)
    assert nc.train.evaluate(model, ctx.data.test) > 0.6


def test_mlp_is_pruned_zeroed_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[64, 32])
    data = tiny_data()
    nc.train.fit(model, data, epochs=3, lr=0.01, progress=False)
    dense = nc.save(model, tmp_path / "dense.nnc")
    ctx = Context(data, seed=0, progress=False)
    dynamic_surgery(model, DynamicSurgeryConfig(sparsity=0.8, epochs=3, lr=0.003), ctx)
    assert set(ctx.masks) == {"layers.fc1.weight", "layers.fc2.weight", "layers.fc3.weight"}
    assert mask_sparsity(ctx.masks) == pytest.approx(0.8, abs=0.05)
    params = dict(model.named_parameters())
    for name, mask in ctx.masks.items():
        pruned = params[name][~mask]
        assert torch.all(pruned == 0) and not torch.signbit(pruned).any()   # +0.0 only
        assert torch.all(params[name][mask] != 0)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert nc.train.evaluate(model, data.test) > 0.7
    size = nc.save(model, tmp_path / "dns.nnc")
    assert size < 0.5 * dense
    loaded = nc.load(tmp_path / "dns.nnc")
    x = torch.randn(4, 1, 12)
    assert torch.equal(loaded(x), model.eval()(x))


def test_recurrent_weights_are_supported() -> None:
    torch.manual_seed(0)
    model = models.build("gru", (12, 4), 3, hidden=8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 12, 4, generator=g)
    ds = TensorDataset(x, x[:, :3, -1].argmax(dim=1))
    data = Dataset("seq", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=48),
                   (12, 4), 3)
    ctx = Context(data, seed=0, progress=False)
    dynamic_surgery(model, DynamicSurgeryConfig(sparsity=0.6, epochs=1), ctx)
    assert any("weight_hh" in n for n in ctx.masks)
    assert mask_sparsity(ctx.masks) == pytest.approx(0.6, abs=0.1)


def test_bad_selection_is_reported() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    ctx = Context(tiny_data(), seed=0, progress=False)
    with pytest.raises(ModelError, match="leaves no weight"):
        dynamic_surgery(model, DynamicSurgeryConfig(sparsity=0.5, exclude=("*",)), ctx)


def test_recipe_parses() -> None:
    stage = Recipe.named("dynamic-surgery").stages[0]
    assert stage.params["sparsity"] >= 0.9
