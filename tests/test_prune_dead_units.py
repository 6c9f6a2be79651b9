"""Dead-unit elimination: units with no live incoming / outgoing weight removed exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models
from nncompress.data import Dataset
from nncompress.errors import ModelError, RecipeError, UnsupportedLayerError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.prune import apply_masks, magnitude_masks
from nncompress.prune.dead_units import DeadUnitsConfig, dead_units
from nncompress.recipe import Recipe, Stage
from nncompress.technique import TECHNIQUES, Context


def data_for(shape: tuple[int, ...], n: int = 64, classes: int = 3) -> Dataset:
    """Seeded random samples of ``shape`` (labels from the first features); the test split
    (where outputs are compared) holds other samples than the calibration (train) one."""
    g = torch.Generator().manual_seed(0)

    def split() -> TensorDataset:
        x = torch.randn(n, *shape, generator=g)
        return TensorDataset(x, x.flatten(1)[:, :classes].argmax(dim=1))

    train = DataLoader(split(), batch_size=16, shuffle=True, generator=torch.Generator())
    return Dataset("rand", train, DataLoader(split(), batch_size=32), shape, classes)


def run(model: nn.Module, data: Dataset, masks: dict | None = None,
        **params) -> tuple[nn.Module, Context]:
    ctx = Context(data=data, progress=False, masks=dict(masks or {}))
    return dead_units(model, DeadUnitsConfig(**params), ctx), ctx


def outputs(model: nn.Module, data: Dataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in data.test])


def assert_same_outputs(a: nn.Module, b: nn.Module, data: Dataset) -> None:
    torch.testing.assert_close(outputs(a, data), outputs(b, data), atol=1e-5, rtol=1e-5)


def linear_stack() -> nn.Sequential:
    """6 -> 8 -> 5 (no bias) -> 3 with dead units of every kind planted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[[1, 2]] = 0           # no live incoming weight ...
        model[0].bias[1], model[0].bias[2] = 0.7, -0.4   # ... constant 0.7 and relu(-0.4) = 0
        model[2].weight[:, 4] = 0             # unit 4 of the first layer: no live outgoing
        model[2].weight[0] = 0                # second layer unit 0: constant 0 (no bias)
        model[4].weight[:, 3] = 0             # second layer unit 3: no live outgoing
        model[4].weight[1] = 0                # an output unit with no input: never removed
    return model


def test_linear_stack_removes_every_dead_unit_with_same_outputs(tmp_path) -> None:
    model = linear_stack()
    data = data_for((6,))
    out, ctx = run(model, data)
    assert (out[0].out_features, out[2].in_features, out[2].out_features,
            out[4].in_features, out[4].out_features) == (5, 5, 3, 3, 3)
    assert model[0].out_features == 8  # the model passed in is not changed
    assert out[2].bias is not None     # the constant 0.7 went into a new bias
    assert_same_outputs(out, model, data)
    assert any("0: removed 3 of 8 units (1 with no live outgoing weight, 2 with no live "
               "incoming" in line and "12 bytes" in line for line in ctx.log), ctx.log
    assert ctx.log[-1] == ("dead_units: biases and norm vectors 44 -> 44 bytes; new biases "
                           "(for folded constants): 2")
    assert any(line.startswith("dead_units: 2: removed 2 of 5") for line in ctx.log)
    nc.save(out, tmp_path / "m.nnc")
    skeleton = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False),
                             nn.ReLU(), nn.Linear(3, 3))
    loaded = nc.load(tmp_path / "m.nnc", skeleton=skeleton)
    assert loaded[2].bias is not None
    assert_same_outputs(loaded, model, data)


def test_folding_cascades_until_nothing_is_left() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(),
                          nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 1.0
        model[2].weight[2] = torch.tensor([0.5, 0.0, 0.0])  # lives only on the dead unit
    data = data_for((4,))
    out, ctx = run(model, data)
    assert (out[0].out_features, out[2].out_features) == (2, 2)
    assert_same_outputs(out, model, data)
    assert any("2: removed 1 of 3 units (0 with no live outgoing weight, 1" in line
               for line in ctx.log)


def conv_model() -> nn.Sequential:
    """Conv1d -> BN -> ReLU -> Conv1d (padding 0) -> ReLU -> Conv1d (padding 1) -> pool ->
    Linear, with planted dead filters and columns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1, bias=False), nn.BatchNorm1d(6),
                          nn.ReLU(), nn.Conv1d(6, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        model[0].weight[[0, 1]] = 0            # BN of 0: constant relu(beta - mean*scale)
        bn.bias[0], bn.bias[1], bn.running_mean[:2] = 1.0, -1.0, 0.0
        model[3].weight[:, 5] = 0              # first conv's unit 5: no live outgoing
        model[3].weight[[0, 1]] = 0            # second conv: constants relu(+0.3), relu(-0.3)
        model[3].bias[0], model[3].bias[1] = 0.3, -0.3
        model[5].weight[2] = 0                 # third conv: constant into the Linear
    return model


def test_conv_bn_constants_fold_where_exact_and_stay_where_padding_varies() -> None:
    model = conv_model()
    data = data_for((2, 10))
    out, ctx = run(model, data)
    # conv1: 0, 1 folded into the unpadded conv, 5 unused; conv2: unit 1 (constant 0)
    # removed, unit 0 (0.3 read by a zero-padded conv) kept; conv3: unit 2 folded
    assert (out[0].out_channels, out[1].num_features, out[3].out_channels,
            out[5].out_channels) == (3, 3, 3, 3)
    assert_same_outputs(out, model, data)
    assert any("3: 1 unit(s) with no live incoming weight kept: 5 pads with zeros "
               "(padding=(1,)): a non-zero constant" in line for line in ctx.log), ctx.log


def plant(model: nn.Module, group: ChannelGroup) -> None:
    """Units 0, 1: every producer row zero; units 2, 3: every consumer column zero."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in group.producers:
            w = mods[name].weight
            per = w.shape[0] // group.size
            w[: 2 * per] = 0
        for name in group.consumers:
            w = mods[name].weight
            per = w.shape[1] // group.size
            w[:, 2 * per: 4 * per] = 0


@pytest.mark.parametrize(("arch", "shape"), [("mlp", (1, 8, 8)), ("cnn1d", (1, 24)),
                                             ("rescnn", (1, 24)), ("cnn2d", (1, 8, 8))])
def test_reference_models_after_magnitude_pruning(arch: str, shape: tuple[int, ...],
                                                  tmp_path) -> None:
    torch.manual_seed(0)
    model = models.build(arch, shape, 3).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    data = data_for(shape)
    masks = magnitude_masks(model, 0.7)
    apply_masks(model, masks)
    groups = channel_groups(model, torch.randn(2, *shape))
    for g in groups:
        plant(model, g)
    out, ctx = run(model, data, masks)
    after = {g.name: g.size for g in channel_groups(out, torch.randn(2, *shape))}
    assert all(after[g.name] <= g.size - 2 for g in groups), (after, ctx.log)
    assert_same_outputs(out, model, data)
    params = dict(out.named_parameters())
    assert ctx.masks and all(params[n].shape == m.shape for n, m in ctx.masks.items())
    assert all(bool((params[n][~m] == 0).all()) for n, m in ctx.masks.items())
    nc.save(out, tmp_path / "m.nnc")
    assert_same_outputs(nc.load(tmp_path / "m.nnc"), model, data)


def test_tolerance_counts_small_weights_as_dead() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[2].weight[:, 1] = 1e-4
    data = data_for((4,))
    assert run(model, data)[0][0].out_features == 5
    out, ctx = run(model, data, tolerance=1e-3)
    assert out[0].out_features == 4
    assert any("tolerance 0.001 changed the outputs by" in line for line in ctx.log)
    torch.testing.assert_close(outputs(out, data), outputs(model, data), atol=1e-3, rtol=0)


def test_refusals_name_the_layer_and_leave_the_model_alone() -> None:
    torch.manual_seed(0)
    data = data_for((4,))
    layer_norm = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        layer_norm[2].weight[:, 0] = 0  # dead, but removing it would change the norm
    with pytest.raises(UnsupportedLayerError, match=r"1 \(LayerNorm\) as norm"):
        run(layer_norm, data, layers=["0"])
    out, ctx = run(layer_norm, data)  # by default: left alone, and said so
    assert out[0].out_features == 6
    assert any(line.startswith("dead_units: 0 left alone: 1 (LayerNorm)") for line in ctx.log)
    with pytest.raises(ModelError, match="nothing"):
        run(layer_norm, data, layers=["nothing"])
    mixing = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1), nn.Linear(6, 2))
    with torch.no_grad():
        mixing[2].weight[:, 0] = 0
    before = copy.deepcopy(mixing.state_dict())
    with pytest.raises(ModelError, match=r"changed the outputs"):
        run(mixing, data)
    assert all(torch.equal(before[k], v) for k, v in mixing.state_dict().items())
    with pytest.raises(ValueError, match="tolerance"):
        DeadUnitsConfig(tolerance=-1.0)


def test_recurrent_groups_are_left_alone() -> None:
    torch.manual_seed(0)
    model = models.build("gru", (1, 12), 3, hidden=6)
    out, ctx = run(model, data_for((1, 12)))
    assert out.layers[0].hidden_size == 6
    assert any("layers.0:hidden left alone: hidden units" in line for line in ctx.log)


def test_registered_and_exact_through_compress() -> None:
    technique = TECHNIQUES.get("dead_units")
    assert technique.category == "pruning"
    with pytest.raises(RecipeError, match="nope"):
        Recipe("x", [Stage.technique("dead_units", nope=1)])
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=(32, 16))
    data = data_for((1, 12))
    recipe = Recipe("t", [Stage.technique("magnitude_prune", sparsity=0.95, steps=1,
                                          epochs_per_step=0),
                          Stage.technique("dead_units")])
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    pruned, final = result.stages[0].measurement, result.stages[1].measurement
    assert final.accuracy == pruned.accuracy
    assert final.params.total < pruned.params.total
    assert final.artifact_bytes < pruned.artifact_bytes
    assert final.macs.total < pruned.macs.total
    assert any(line.startswith("dead_units: layers.fc1: removed") for line in result.log)


@pytest.mark.parametrize("dead", ["incoming", "outgoing"])
def test_a_group_with_every_unit_dead_keeps_one(dead: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        if dead == "incoming":
            model[0].weight.zero_()
            model[0].bias.copy_(torch.tensor([0.5, 1.0, 2.0]))
        else:
            model[2].weight.zero_()
    data = data_for((4,))
    out, ctx = run(model, data)
    assert out[0].out_features == 1
    assert_same_outputs(out, model, data)
    if dead == "incoming":
        assert any("1 unit(s) with no live incoming weight kept: the group keeps at least one"
                   in line for line in ctx.log)


@pytest.mark.slow
def test_trained_mlp_after_magnitude_pruning_keeps_its_accuracy(tmp_path) -> None:
    model, data = models.load("mlp", progress=False)
    recipe = Recipe("p", [Stage.technique("magnitude_prune", sparsity=0.98, scope="global",
                                          steps=1, epochs_per_step=0)])
    pruned = nc.compress(model, recipe, data, progress=False, measure_latency=False).model
    out, _ = run(pruned, data)
    assert out.layers.fc1.out_features < pruned.layers.fc1.out_features
    assert_same_outputs(out, pruned, data)
    assert nc.evaluate(out, data.test) == nc.evaluate(pruned, data.test)
    assert nc.save(out, tmp_path / "a.nnc") < nc.save(pruned, tmp_path / "b.nnc")
