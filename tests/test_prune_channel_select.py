"""channel_lasso (He, Zhang & Sun 2017) and thinet (Luo, Wu & Lin 2017) as techniques."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, RecipeError
from nncompress.measure import count_macs, count_params
from nncompress.recipe import Recipe, Stage


def tiny_data(shape: tuple[int, ...]) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, *shape, generator=g)
    y = (x.flatten(1)[:, :4].sum(dim=1) > 0).long() + 2 * (x.flatten(1)[:, 4] > 0).long()
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator())
    return Dataset("tiny", train, DataLoader(ds, batch_size=64), shape, 4)


def tiny(arch: str, shape: tuple[int, ...], **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build(arch, shape, 4, **kw)


def run(model, data, technique: str, **params) -> nc.CompressionResult:
    recipe = Recipe("t", (Stage.technique(technique, **params),))
    return nc.compress(model, recipe, data, progress=False, measure_latency=False)


@pytest.mark.parametrize("technique", ["channel_lasso", "thinet"])
def test_cnn_gets_physically_smaller_and_round_trips(technique: str, tmp_path) -> None:
    data = tiny_data((1, 24))
    model = tiny("cnn1d", (1, 24), channels=[8, 16, 16])
    result = run(model, data, technique, ratio=0.5, samples=256, batches=2)
    small = result.model
    convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [4, 8, 8]
    assert small.classifier.in_features == 8
    assert count_params(small).total < count_params(model).total
    x = torch.randn(3, 1, 24)
    path = tmp_path / "m.nnc"
    nc.save(small, path)
    assert torch.allclose(nc.load(path)(x), small.eval()(x), atol=1e-6)


def test_reconstruction_beats_plain_l1_on_the_same_budget() -> None:
    """Without fine-tuning, least-squares repair keeps the outputs closer to the original
    than removing the same number of channels by L1 norm."""
    data = tiny_data((1, 24))
    model = tiny("cnn1d", (1, 24), channels=[8, 16, 16])
    nc.fit(model, data, epochs=2, lr=3e-3, progress=False)
    x = torch.cat([b for b, _ in data.test])
    with torch.no_grad():
        ref = model.eval()(x)

    def error(m) -> float:
        with torch.no_grad():
            return float(((m.eval()(x) - ref) ** 2).mean())

    lasso = run(model, data, "channel_lasso", ratio=0.5, samples=512, batches=4).model
    l1 = run(model, data, "l1_filter_prune", ratio=0.5, epochs_per_step=0).model
    assert count_params(lasso).total == count_params(l1).total
    assert error(lasso) < error(l1)


def test_macs_target_is_reached_and_fallback_is_logged() -> None:
    data = tiny_data((1, 24))
    model = tiny("rescnn", (1, 24), channels=8, hidden=[16, 16])
    x = torch.randn(1, 1, 24)
    before = count_macs(model, x).total
    result = run(model, data, "thinet", macs_reduction=1.5, fallback="l1", samples=256)
    assert count_macs(result.model, x).total <= before / 1.5
    assert any("stem.0" in line and "L1" in line for line in result.log)


def test_heads_and_flattened_consumers_are_reconstructed() -> None:
    data = tiny_data((1, 16))
    model = tiny("transformer", (1, 16), patch_size=4, dim=16, depth=1, num_heads=4,
                 head_dim=4, mlp_dim=16)
    result = run(model, data, "channel_lasso", ratio=0.5, samples=256)
    assert result.model.blocks[0].attn.num_heads == 2
    assert result.model.blocks[0].ffn.fc1.out_features == 8
    data2 = tiny_data((1, 8, 8))
    cnn = tiny("cnn2d", (1, 8, 8))
    small = run(cnn, data2, "thinet", ratio=0.5, samples=256).model
    assert small.features.conv2.out_channels == 8
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(RecipeError, match="ratio or macs_reduction"):
        Stage.technique("thinet")
    with pytest.raises(RecipeError, match="ratio"):
        Stage.technique("thinet", ratio=1.5)
    data = tiny_data((1, 24))
    with pytest.raises(ConstraintError, match="no prunable channel group"):
        run(tiny("cnn1d", (1, 24), channels=[8, 16, 16]), data, "thinet", ratio=0.5,
            layers=["nothing*"])
