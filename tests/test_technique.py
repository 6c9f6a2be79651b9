"""Technique records, the registry, and the per-run Context."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nncompress.data import Dataset
from nncompress.errors import RecipeError
from nncompress.technique import (
    CATEGORIES,
    TECHNIQUES,
    Context,
    Technique,
    TechniqueConfig,
    all_techniques,
)


def tiny_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, generator=g)
    y = (x[:, 0, 0] > 0).long()
    ds = TensorDataset(x, y)
    return Dataset("tiny", DataLoader(ds, batch_size=16, shuffle=True, generator=g),
                   DataLoader(ds, batch_size=64), (1, 6), 2)


class Empty(TechniqueConfig):
    pass


def identity(model: nn.Module, config: BaseModel, ctx: Context) -> nn.Module:
    return model


def test_registry_holds_magnitude_prune_with_its_paper() -> None:
    registry = all_techniques()
    assert registry is TECHNIQUES
    technique = registry.get("magnitude_prune")
    assert technique.category == "pruning" and technique.category in CATEGORIES
    assert "Han" in technique.paper and "2015" in technique.paper
    assert technique.config.model_config["frozen"] is True
    assert technique.config.model_config["extra"] == "forbid"


def test_unknown_technique_lists_known_names() -> None:
    with pytest.raises(RecipeError, match=r"unknown technique 'zip'; known: .*magnitude_prune"):
        all_techniques().get("zip")


def test_technique_record_is_checked() -> None:
    ok = Technique("t", "miscellaneous", "Someone (2020): Title", "does nothing", Empty, identity)
    assert ok.apply(nn.Linear(1, 1), Empty(), Context(data=tiny_data())) is not None
    with pytest.raises(ValueError, match="'compression'"):
        Technique("t", "compression", "p", "s", Empty, identity)

    class Loose(BaseModel):
        model_config = ConfigDict(frozen=True)

    with pytest.raises(TypeError, match="extra='forbid'"):
        Technique("t", "pruning", "p", "s", Loose, identity)
    with pytest.raises(ValueError, match="duplicate technique name 'magnitude_prune'"):
        TECHNIQUES.register("magnitude_prune", ok)


def test_context_is_per_run() -> None:
    data = tiny_data()
    a, b = Context(data=data), Context(data=data)
    a.masks["w"] = torch.ones(1, dtype=torch.bool)
    a.note("hello   world\nagain")
    assert b.masks == {} and b.log == []
    assert a.log == ["hello world again"]


def test_context_fine_tune_trains_and_keeps_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2))
    ctx = Context(data=tiny_data(), progress=False)
    mask = torch.rand(2, 6) > 0.5
    ctx.masks["1.weight"] = mask
    log = ctx.fine_tune(model, epochs=2, lr=5e-2)
    assert log.epochs == 2
    assert torch.all(model[1].weight[~mask] == 0)        # applied before and after each step
    assert torch.all(model[1].weight[mask] != 0)


def test_context_fine_tune_without_masks_is_plain_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2))
    before = model[1].weight.detach().clone()
    Context(data=tiny_data(), progress=False).fine_tune(model, epochs=1, lr=1e-2)
    assert not torch.equal(before, model[1].weight)
    assert torch.all(model[1].weight != 0)
