"""layer_prune: which layers are removable, greedy removal, masks, the .nnc round trip."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, ModelError, UnsupportedLayerError
from nncompress.measure import count_params
from nncompress.prune.layers import (
    LayerPruneConfig,
    layer_prune,
    layer_scores,
    removable_layers,
    remove_layer,
)
from nncompress.recipe import Recipe, Stage
from nncompress.technique import TECHNIQUES, Context, all_techniques

SHAPE = (1, 16)


def tiny_data(n: int = 96, classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *SHAPE, generator=g)
    y = x[:, 0, :classes].argmax(dim=1)
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator())
    return Dataset("tiny", train, DataLoader(ds, batch_size=96), SHAPE, classes)


def build(name: str, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return models.build(name, SHAPE, 3, **overrides)


EXPECTED = {
    "rescnn": ("blocks.0", "blocks.1", "blocks.2"),
    "transformer": ("blocks.0", "blocks.1"),
    "gru": ("layers.1", "layers.2"),
    "lstm": ("layers.1", "layers.2"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_removable_layers_of_reference_models(name: str) -> None:
    model = build(name, hidden=[16, 16, 16]) if name in ("gru", "lstm") else build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ok, refused = removable_layers(model, torch.randn(2, *SHAPE))
    assert ok == EXPECTED[name]
    if name in ("gru", "lstm"):
        assert "layers.0" in refused  # 1 -> 16 features: removing it changes shapes
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_mlp_and_cnn_layers_are_refused_by_name() -> None:
    ok, refused = removable_layers(build("mlp", hidden=[8, 8]), torch.randn(2, *SHAPE))
    assert ok == () and refused == ("layers.fc1", "layers.fc2", "layers.fc3")
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    with pytest.raises(UnsupportedLayerError, match=r"refused: features\.conv1"):
        layer_prune(build("cnn1d", channels=[8, 8]), LayerPruneConfig(count=1), ctx)


def test_remove_layer_renumbers_and_roundtrips(tmp_path: Path) -> None:
    model = build("transformer", depth=3, num_heads=[1, 2, 4]).eval()
    model = remove_layer(model, "blocks.1")
    assert model.arch_config()["depth"] == 2 and model.arch_config()["num_heads"] == [1, 4]
    assert list(model.blocks._modules) == ["0", "1"]
    nc.save(model, tmp_path / "t.nnc")
    x = torch.randn(3, *SHAPE)
    assert torch.equal(nc.load(tmp_path / "t.nnc")(x), model(x))
    with pytest.raises(ModelError, match="'embed'"):
        remove_layer(model, "embed")


def test_scores_rank_an_identity_block_lowest() -> None:
    model = build("rescnn").eval()
    with torch.no_grad():  # blocks.1 adds bn3(...) = 0: removing it changes nothing
        model.blocks[1].bn3.weight.zero_()
        model.blocks[1].bn3.bias.zero_()
    data = tiny_data()
    scores = layer_scores(model, ["blocks.0", "blocks.1", "blocks.2"], [next(iter(data.train))])
    assert scores["blocks.1"] == pytest.approx(0.0, abs=1e-6)
    ctx = Context(data=data, seed=0, progress=False)
    ctx.masks["blocks.2.expand.weight"] = torch.ones(64, 32, 1, dtype=torch.bool)
    ctx.masks["blocks.1.expand.weight"] = torch.ones(64, 32, 1, dtype=torch.bool)
    out = layer_prune(model, LayerPruneConfig(count=1, epochs=0), ctx)
    assert len(out.blocks) == 2 and out.arch_config()["hidden"] == [64, 64]
    assert set(ctx.masks) == {"blocks.1.expand.weight"}  # renamed from blocks.2; 1 dropped
    assert any("removed blocks.1" in line for line in ctx.log)


def test_params_target_and_impossible_target() -> None:
    model = build("gru", hidden=[16, 16, 16])
    before = count_params(model).total
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    out = layer_prune(model, LayerPruneConfig(params_reduction=2.0, epochs=1), ctx)
    assert count_params(out).total <= before / 2.0
    assert out.arch_config()["hidden"] == [16]
    with pytest.raises(ConstraintError, match="no removable layer is left"):
        layer_prune(build("gru", hidden=[16, 16]), LayerPruneConfig(macs_reduction=100.0),
                    ctx)


def test_config_needs_exactly_one_target() -> None:
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        LayerPruneConfig()
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        LayerPruneConfig(count=1, params_reduction=2.0)


def test_recipe_stage_and_roundtrip(tmp_path: Path) -> None:
    all_techniques()
    assert TECHNIQUES.get("layer_prune").category == "pruning"
    data = tiny_data()
    recipe = Recipe("t-layer-prune", [
        Stage.technique("layer_prune", count=2, layers=["blocks.*"], epochs=1, lr=1e-3),
    ])
    result = nc.compress(build("rescnn"), recipe, data, progress=False)
    assert len(result.model.blocks) == 1
    nc.save(result.model, tmp_path / "r.nnc")
    x = next(iter(data.test))[0]
    assert torch.equal(nc.load(tmp_path / "r.nnc")(x), result.model.eval()(x))


def test_packaged_recipe() -> None:
    stage = Recipe.named("layer-prune").stages[0]
    assert stage.name == "layer_prune" and stage.config.count == 1 and stage.config.epochs > 0
