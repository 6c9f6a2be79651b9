"""Structured surgery (prune_channels), L1 scores, selection, MAC planning, techniques."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, ModelError, UnsupportedLayerError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.measure import count_macs, count_params
from nncompress.prune.structured import (
    l1_importance,
    plan_for_macs,
    prune_channels,
    select_by_ratio,
)
from nncompress.recipe import Recipe, Stage
from nncompress.technique import TECHNIQUES

SHAPES = {"mlp": (1, 8, 8), "cnn1d": (1, 40), "cnn2d": (1, 8, 8), "rescnn": (1, 40),
          "gru": (1, 40), "lstm": (1, 40), "transformer": (1, 40)}


def _zero_units(model: nn.Module, group: ChannelGroup, drop: list[int]) -> None:
    """The masked reference: zero dropped units' producer rows, consumer columns, norms."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in group.producers:
            m = mods[name]
            if isinstance(m, nn.RNNBase):
                rows = [g * m.hidden_size + j for g in range(m.weight_hh_l0.shape[0]
                                                             // m.hidden_size) for j in drop]
                for p in (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0):
                    p[rows] = 0
                continue
            per = m.weight.shape[0] // group.size
            rows = [j * per + i for j in drop for i in range(per)]
            m.weight[rows] = 0
            if m.bias is not None:
                m.bias[rows] = 0
        for name in group.consumers:
            m = mods[name]
            w = m.weight_ih_l0 if isinstance(m, nn.RNNBase) else m.weight
            per = w.shape[1] // group.size
            w[:, [j * per + i for j in drop for i in range(per)]] = 0
        for name in group.norms:
            mods[name].weight[drop] = 0
            mods[name].bias[drop] = 0


@pytest.mark.parametrize("arch", list(SHAPES))
def test_prune_matches_masked_model_and_round_trips(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = models.build(arch, SHAPES[arch], 10).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, *SHAPES[arch])
    groups = channel_groups(model, x)
    keep = select_by_ratio({g.name: l1_importance(model, g) for g in groups}, 0.5)
    masked = copy.deepcopy(model)
    for g in groups:
        _zero_units(masked, g, sorted(set(range(g.size)) - set(keep[g.name])))
    before = count_params(model).total
    prune_channels(model, keep, x)
    assert count_params(model).total < before
    assert {g.name: g.size for g in channel_groups(model, x)} == {
        n: len(k) for n, k in keep.items()}
    torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-4)
    nc.save(model, tmp_path / "m.nnc")
    torch.testing.assert_close(nc.load(tmp_path / "m.nnc").eval()(x), model(x))


def test_keep_validation() -> None:
    model = models.build("cnn1d", (1, 40), 10)
    x = torch.randn(2, 1, 40)
    with pytest.raises(ConstraintError, match=r"features\.conv1"):
        prune_channels(model, {"features.conv1": []}, x)
    with pytest.raises(ConstraintError, match="out of range"):
        prune_channels(model, {"features.conv1": [99]}, x)
    with pytest.raises(ModelError, match="nope"):
        prune_channels(model, {"nope": [0]}, x)


def test_l1_importance_and_selection() -> None:
    model = models.build("mlp", (1, 4, 4), 3, hidden=(6,))
    group = channel_groups(model, torch.randn(2, 1, 4, 4))[0]
    with torch.no_grad():
        model.layers.fc1.weight.fill_(1.0)
        model.layers.fc1.weight[2] = 0.1
    score = l1_importance(model, group)
    assert score.shape == (6,) and score[2] == pytest.approx(1.6)
    assert select_by_ratio({"a": score}, 0.2) == {"a": [0, 1, 3, 4, 5]}
    glob = select_by_ratio({"a": torch.tensor([1.0, 1, 1, 1]), "b": torch.tensor([1.0, 9])},
                           0.5, "global")
    assert sum(map(len, glob.values())) == 3 and glob["b"] == [1]
    with pytest.raises(ConstraintError, match=r"1\.5"):
        select_by_ratio({"a": score}, 1.5)


@pytest.mark.parametrize("arch", ["cnn1d", "gru"])
def test_plan_for_macs_reaches_target(arch: str) -> None:
    torch.manual_seed(0)
    model = models.build(arch, SHAPES[arch], 10)
    x = torch.randn(2, *SHAPES[arch])
    groups = channel_groups(model, x)
    keep = plan_for_macs(model, x, groups, {g.name: l1_importance(model, g) for g in groups},
                         2.0)
    base = count_macs(model, x[:1]).total
    pruned = prune_channels(copy.deepcopy(model), keep, x)
    assert 0.4 * base <= count_macs(pruned, x[:1]).total <= base / 2


def tiny_data(n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, generator=g)
    y = x[:, 0, :3].argmax(dim=1)
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator())
    return Dataset("tiny", train, DataLoader(ds, batch_size=48), (1, 16), 3)


def test_l1_filter_prune_technique_through_compress(tmp_path) -> None:
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 16), 3, channels=(8, 16))
    recipe = Recipe("t", [Stage.technique("l1_filter_prune", macs_reduction=2.0, steps=2,
                                          epochs_per_step=1, lr=1e-3, exclude=["nothing"])])
    result = nc.compress(model, recipe, tiny_data(), progress=False, measure_latency=False)
    x = torch.randn(1, 1, 16)
    assert count_macs(result.model, x).total <= count_macs(model, x).total / 2
    assert any("l1_filter_prune step 2/2" in line for line in result.log)
    nc.save(result, tmp_path / "r.nnc")
    assert nc.load(tmp_path / "r.nnc")(x).shape == (1, 3)


def test_l1_filter_prune_config_needs_one_target() -> None:
    cfg = TECHNIQUES.get("l1_filter_prune").config
    with pytest.raises(ValueError, match="exactly one"):
        cfg(ratio=0.5, macs_reduction=2.0)
    assert cfg(ratio={"features.conv1": 0.5}).ratio == {"features.conv1": 0.5}


def test_network_slimming_prunes_bn_channels_and_rejects_bn_free_models() -> None:
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 16), 3, channels=(8, 16))
    recipe = Recipe("s", [Stage.technique("network_slimming", ratio=0.5, epochs=1,
                                          epochs_after=1, penalty=1e-3)])
    result = nc.compress(model, recipe, tiny_data(), progress=False, measure_latency=False)
    assert count_params(result.model).total < count_params(model).total
    assert any("kept 12 of 24 BN channels" in line for line in result.log)
    mlp = models.build("mlp", (1, 16), 3, hidden=(8,))
    with pytest.raises(UnsupportedLayerError, match=r"layers\.fc1"):
        nc.compress(mlp, recipe, tiny_data(), progress=False, measure_latency=False)


def test_l1_filter_prune_slices_the_masks_of_reshaped_weights() -> None:
    """Connection pruning done before survives structured pruning: each mask is cut like
    its weight, and the fine-tuning after the surgery keeps the pruned weights at zero."""
    from nncompress.prune.filter_l1 import L1FilterPruneConfig, l1_filter_prune
    from nncompress.technique import Context

    torch.manual_seed(0)
    model = models.build("gru", (1, 16), 3, hidden=8)
    ctx = Context(data=tiny_data(), progress=False)
    mask = torch.rand(24, 8) > 0.5
    with torch.no_grad():
        model.layers[0].weight_hh_l0.mul_(mask)
    ctx.masks["layers.0.weight_hh_l0"] = mask.clone()
    ctx.masks["classifier.bias"] = torch.ones(3, dtype=torch.bool)
    scores = l1_importance(model, {g.name: g for g in channel_groups(
        model, torch.randn(2, 1, 16))}["layers.0:hidden"])
    kept = sorted(torch.argsort(scores, descending=True, stable=True)[:4].tolist())
    l1_filter_prune(model, L1FilterPruneConfig(ratio=0.5, epochs_per_step=1), ctx)
    assert [rnn.hidden_size for rnn in model.layers] == [4, 4]
    rows = torch.cat([torch.tensor(kept) + g * 8 for g in range(3)])
    assert torch.equal(ctx.masks["layers.0.weight_hh_l0"], mask[rows][:, kept])
    weight = model.layers[0].weight_hh_l0.detach()
    assert bool((weight[~ctx.masks["layers.0.weight_hh_l0"]] == 0).all())
    assert model(torch.randn(2, 1, 16)).shape == (2, 3)


def test_l1_filter_prune_per_group_ratio_and_unknown_group() -> None:
    from nncompress.prune.filter_l1 import L1FilterPruneConfig, l1_filter_prune
    from nncompress.technique import Context

    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 16), 3, channels=(8, 16))
    ctx = Context(data=tiny_data(), progress=False)
    cfg = L1FilterPruneConfig(ratio={"features.conv1": 0.5}, steps=2, epochs_per_step=0)
    l1_filter_prune(model, cfg, ctx)
    assert (model.features.conv1.out_channels, model.features.conv2.out_channels) == (4, 16)
    with pytest.raises(ModelError, match=r"features\.conv9"):
        l1_filter_prune(model, L1FilterPruneConfig(ratio={"features.conv9": 0.5}), ctx)
