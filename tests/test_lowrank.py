"""low_rank: SVD factorised layers, rank rules, reference models, the .nnc round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import formats, models
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, FormatError, ModelError, UnsupportedLayerError
from nncompress.formats.arch import parse_record
from nncompress.lowrank import (
    LowRankConfig,
    LowRankConv1d,
    LowRankConv2d,
    LowRankLinear,
    LowRankRNN,
    factorise,
    low_rank,
    svd_rank,
    truncated_svd,
)
from nncompress.measure import count_macs, count_params
from nncompress.recipe import Recipe, Stage
from nncompress.technique import TECHNIQUES, Context, all_techniques

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

SHAPES = {"mlp": (1, 16), "cnn1d": (1, 16), "cnn2d": (1, 8, 8), "rescnn": (1, 16),
          "gru": (1, 16), "lstm": (1, 16), "transformer": (1, 16)}


def tiny_data(shape: tuple[int, ...] = (1, 16), n: int = 96, classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = x.flatten(1)[:, :classes].argmax(dim=1)
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator())
    return Dataset("tiny", train, DataLoader(ds, batch_size=96), shape, classes)


def full_rank(s: torch.Tensor) -> int:
    return len(s)


def test_svd_rank_by_energy_and_ratio() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert svd_rank(s, energy=9 / 14) == 1
    assert svd_rank(s, energy=0.9) == 2
    assert svd_rank(s, energy=1.0) == 3
    assert svd_rank(s, ratio=0.5) == 2
    assert svd_rank(s, ratio=0.01) == 1


def test_truncated_svd_is_best_rank_r() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 2) @ torch.randn(2, 5)  # rank 2
    a, b = truncated_svd(w, 2)
    assert a.shape == (6, 2) and b.shape == (2, 5)
    assert torch.allclose(a @ b, w, atol=1e-5)


@pytest.mark.parametrize("layer", [
    nn.Linear(12, 10),
    nn.Conv1d(4, 12, 3, stride=2, padding=1),
    nn.Conv2d(3, 8, 3, padding=1, bias=False),
    nn.GRU(12, 5, batch_first=True),
    nn.LSTM(12, 5, batch_first=True),
], ids=["linear", "conv1d", "conv2d", "gru", "lstm"])
def test_rank_two_weights_factorise_exactly(layer: nn.Module) -> None:
    torch.manual_seed(1)
    recurrent = isinstance(layer, nn.RNNBase)
    weight = layer.weight_ih_l0 if recurrent else layer.weight
    with torch.no_grad():  # make the weight exactly rank 2
        flat = torch.randn(weight.shape[0], 2) @ torch.randn(2, weight[0].numel())
        weight.copy_(flat.reshape(weight.shape))
    model = nn.Sequential(layer).eval()
    if isinstance(layer, (nn.Linear, nn.RNNBase)):
        x = torch.randn(2, 7, 12)
    else:
        x = torch.randn(2, layer.in_channels, *(9,) * (weight.dim() - 2))
    out, lines = factorise(copy.deepcopy(model), lambda s: svd_rank(s, energy=0.999999),
                           min_params=0)
    assert isinstance(out[0], (LowRankLinear, LowRankConv1d, LowRankConv2d, LowRankRNN))
    assert out[0].rank == 2 and "rank 2" in lines[0]
    assert count_params(out).total < count_params(model).total
    before, after = model(x), out(x)
    if recurrent:
        before, after = before[0], after[0]
    assert torch.allclose(after, before, atol=1e-4)


def test_factorised_layers_count_macs_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(20, 10, 3), nn.ReLU(), LowRankConv1d(1, 4, 2, 3))
    macs = count_macs(model[:1], torch.randn(1, 20))
    assert macs.total == 20 * 3 + 3 * 10
    conv = count_macs(model[2:], torch.randn(1, 1, 8))
    assert conv.total == 6 * (1 * 3 * 2) + 6 * (2 * 4)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_reference_models_factorise_and_roundtrip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name, SHAPES[name], 3).eval()
    x = torch.randn(4, *SHAPES[name])
    out, lines = factorise(copy.deepcopy(model), lambda s: max(1, len(s) // 4), min_params=0,
                           recurrent="projection")
    assert count_params(out).total < count_params(model).total
    assert out(x).shape == (4, 3)
    formats.save(out, tmp_path / "m.nnc")
    loaded = formats.load(tmp_path / "m.nnc")
    assert torch.equal(loaded(x), out.eval()(x))
    assert count_macs(out, x).total < count_macs(model, x).total
    if name == "rescnn":  # depthwise convs have no rule: named, not skipped silently
        assert any("blocks.0.depthwise (Conv1d groups=" in line for line in lines)
    if name == "transformer":
        assert any("pos_embedding (TinyTransformer)" in line for line in lines)
    if name == "gru":
        assert any("W_hh kept dense" in line for line in lines)


def test_lstm_projection_factorises_the_recurrence() -> None:
    torch.manual_seed(0)
    model = models.build("lstm", (1, 16), 3, hidden=[32, 32]).eval()
    x = torch.randn(4, 1, 16)
    with torch.no_grad():  # every reader of each LSTM's output sees one 8-dim row space
        for readers in ((model.layers[0].weight_hh_l0, model.layers[1].weight_ih_l0),
                        (model.layers[1].weight_hh_l0, model.classifier.weight)):
            space = torch.randn(8, 32)
            for w in readers:
                w.copy_(torch.randn(w.shape[0], 8) @ space / 8)
    exact, _ = factorise(copy.deepcopy(model), lambda s: svd_rank(s, energy=0.999999),
                         recurrent="projection", layers=("layers.*",), min_params=0)
    assert exact.layers[0].proj_size == 8 and exact.layers[1].proj_size == 8
    assert exact.classifier.in_features == 8
    assert torch.allclose(exact(x), model(x), atol=1e-4)
    small, _ = factorise(copy.deepcopy(model), lambda s: 4, recurrent="projection",
                         min_params=0)
    assert count_params(small).total < count_params(model).total / 3
    only_input, _ = factorise(copy.deepcopy(model), lambda s: 4, min_params=0)
    assert isinstance(only_input.layers[1], LowRankRNN) and only_input.layers[1].proj_size == 0
    assert torch.isfinite(small(x)).all()


def test_only_unsupported_layers_selected_raises() -> None:
    torch.manual_seed(0)
    model = models.build("rescnn", (1, 16), 3)
    with pytest.raises(UnsupportedLayerError, match=r"blocks\.0\.depthwise \(Conv1d groups="):
        factorise(model, full_rank, layers=("blocks.0.depthwise",))
    with pytest.raises(ModelError, match="'nope'"):
        factorise(model, full_rank, layers=("nope",))


def test_config_needs_exactly_one_target() -> None:
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        LowRankConfig()
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        LowRankConfig(energy=0.9, rank_ratio=0.5)
    with pytest.raises(pydantic.ValidationError):
        LowRankConfig(energy=1.5)


def test_params_reduction_target_and_masks() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 16), 3, hidden=[64, 64])
    before = count_params(model).total
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    ctx.masks["layers.fc2.weight"] = torch.ones(64, 64, dtype=torch.bool)
    ctx.masks["layers.fc1.bias"] = torch.ones(64, dtype=torch.bool)
    out = low_rank(model, LowRankConfig(params_reduction=2.0, min_params=0), ctx)
    assert count_params(out).total <= before / 2
    assert "layers.fc2.weight" not in ctx.masks and "layers.fc1.bias" in ctx.masks
    assert any("rank_ratio" in line for line in ctx.log)
    gru = models.build("gru", (1, 16), 3)
    with pytest.raises(ConstraintError, match="out of reach"):
        low_rank(gru, LowRankConfig(params_reduction=10.0, min_params=0), ctx)


def test_compress_recipe_fine_tunes_and_saves(tmp_path: Path) -> None:
    all_techniques()
    assert TECHNIQUES.get("low_rank").category == "pruning"
    torch.manual_seed(0)
    data = tiny_data()
    model = models.build("cnn1d", (1, 16), 3, channels=[8, 16])
    recipe = Recipe("t-low-rank", [
        Stage.technique("low_rank", energy=0.8, min_params=0, epochs=1, lr=1e-3),
        Stage.evaluate(),
    ])
    result = nc.compress(model, recipe, data, progress=False)
    assert isinstance(result.model.features.conv2, LowRankConv1d)
    nc.save(result.model, tmp_path / "m.nnc")
    loaded = nc.load(tmp_path / "m.nnc")
    x = next(iter(data.test))[0]
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_loader_validates_factorised_args() -> None:
    base = {"builder": {"name": None, "class": "x.Y"}}
    good = {"type": "LowRankLinear",
            "args": {"in_features": 4, "out_features": 3, "rank": 2, "bias": True}}
    assert parse_record({**base, "modules": {"fc": good}}).modules["fc"][0] == "LowRankLinear"
    for bad in ({**good["args"], "rank": 0}, {**good["args"], "rank": True},
                {**good["args"], "extra": 1}):
        with pytest.raises(FormatError):
            parse_record({**base, "modules": {"fc": {"type": "LowRankLinear", "args": bad}}})
    rnn = {"mode": "eval", "input_size": 4, "rank": 2, "hidden_size": 3, "bias": True,
           "batch_first": True, "proj_size": 0}
    with pytest.raises(FormatError, match="mode"):
        parse_record({**base, "modules": {"r": {"type": "LowRankRNN", "args": rnn}}})


def test_factorised_layers_and_linear_subclasses_are_left_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.MultiheadAttention(32, 2, batch_first=True))
    once, lines = factorise(model, lambda s: 2, min_params=0)
    assert isinstance(once[0], LowRankLinear) and type(once[1].out_proj) is not LowRankLinear
    assert any("1.out_proj.weight (NonDynamicallyQuantizableLinear)" in ln for ln in lines)
    first = once[0].first
    with pytest.raises(UnsupportedLayerError):  # only the factors' parents and MHA are left
        factorise(once, lambda s: 1, layers=("0*",), min_params=0)
    assert once[0].first is first


def test_packaged_recipe() -> None:
    stage = Recipe.named("low-rank").stages[0]
    assert stage.name == "low_rank" and stage.config.energy == 0.9 and stage.config.epochs > 0


def test_low_rank_on_a_builtin_transformer_encoder_layer_keeps_it_working() -> None:
    """nn.TransformerEncoderLayer's fused fast path reads linear1.weight directly; the
    technique rewrites the layer first, so the factorised FFN is really used."""
    from nncompress.lowrank.svd import LowRankConfig, low_rank
    from nncompress.modules import SplitTransformerEncoderLayer
    from nncompress.technique import Context

    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0,
                                                     batch_first=True)).eval()
    x = torch.randn(3, 5, 32)
    out = low_rank(model, LowRankConfig(rank_ratio=0.5, min_params=0),
                   Context(data=tiny_data((1, 16)), progress=False)).eval()
    layer = out[0]
    assert isinstance(layer, SplitTransformerEncoderLayer)
    assert type(layer.linear1).__name__ == "LowRankLinear"
    dense = copy.deepcopy(out)
    for name in ("linear1", "linear2"):  # the same layer with the factors multiplied out
        f = getattr(layer, name)
        plain = nn.Linear(f.in_features, f.out_features)
        with torch.no_grad():
            plain.weight.copy_(f.weight @ f.first.weight)
            plain.bias.copy_(f.bias)
        setattr(dense[0], name, plain)
    torch.testing.assert_close(out(x), dense(x), atol=1e-5, rtol=1e-4)
