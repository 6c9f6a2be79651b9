"""binarize (BNN / XNOR-Net): STE, binary layers, freezing, the technique, the container."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from helpers import tiny_data
from nncompress import formats, models
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, UnsupportedLayerError
from nncompress.kernels import xnor
from nncompress.quant import binary_layers as bl
from nncompress.quant.binary import BinarizeConfig, binarize, plan_binarization
from nncompress.recipe import Recipe, Stage
from nncompress.technique import Context

needs_kernel = pytest.mark.skipif(not xnor.available(),
                                  reason=f"xnor kernel: {xnor.unavailable_reason()}")


def _seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.build("mlp", (1, 12), 3, hidden=(16, 8))


def _cnn_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 24, generator=g)
    y = (x[:, 0, :12].sum(dim=1) > 0).long()
    ds = TensorDataset(x, y)
    return Dataset("tiny1d", DataLoader(ds, batch_size=16, shuffle=True,
                                        generator=torch.Generator()),
                   DataLoader(ds, batch_size=32), (1, 24), 2)


# -- the straight-through estimator -------------------------------------------------------

def test_ste_sign_values_and_clipped_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 1.5], requires_grad=True)
    y = bl.ste_sign(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # zero where |x| > 1


def test_stochastic_sign_follows_hard_sigmoid_and_is_seeded() -> None:
    x = torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.5]).repeat(4000, 1)
    g = torch.Generator().manual_seed(3)
    y = bl.ste_sign(x, torch.rand(x.shape, generator=g))
    p = (y == 1).float().mean(dim=0)
    assert torch.allclose(p, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), atol=0.03)
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(y, bl.ste_sign(x, torch.rand(x.shape, generator=g2)))


def test_latent_layer_stochastic_draws_depend_on_seed_and_step() -> None:
    layer = bl.BinaryLinear(20, 30, stochastic=True, seed=5, activations=False).train()
    with torch.no_grad():
        layer.weight.mul_(0.01)  # near 0: draws are coin flips
    x = torch.ones(1, 20)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b) and layer.steps == 2
    twin = bl.BinaryLinear(20, 30, stochastic=True, seed=5, activations=False).train()
    twin.load_state_dict(layer.state_dict())
    assert torch.equal(twin(x), a)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # deterministic sign in eval


# -- latent and frozen layers -------------------------------------------------------------

def test_latent_linear_clips_weights_and_trains_threshold() -> None:
    layer = bl.BinaryLinear(6, 4, activations=True)
    with torch.no_grad():
        layer.weight.copy_(_seeded(4, 6) * 3)
    x = _seeded(5, 6, seed=1)
    layer(x).sum().backward()
    assert float(layer.weight.detach().abs().max()) <= 1.0
    assert layer.threshold is not None and layer.threshold.grad is not None
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("activations", [True, False])
@pytest.mark.parametrize("scaling", [True, False])
def test_freeze_keeps_eval_outputs(activations: bool, scaling: bool) -> None:
    layer = bl.BinaryLinear(65, 7, activations=activations, scaling=scaling)
    with torch.no_grad():
        layer.weight.uniform_(-0.2, 0.2)
        if layer.threshold is not None:
            layer.threshold.uniform_(-0.1, 0.1)
    layer.eval()
    x = _seeded(3, 65, seed=2)
    frozen = layer.freeze().eval()
    assert frozen.weight.dtype == torch.int8 and set(frozen.weight.unique().tolist()) <= {-1, 1}
    assert not frozen.weight.requires_grad
    expect_alpha = layer.weight.abs().mean(dim=1) if scaling else torch.ones(7)
    assert torch.allclose(frozen.alpha, expect_alpha)
    with torch.no_grad():
        assert torch.allclose(frozen(x), layer(x), atol=1e-5)


@pytest.mark.parametrize("cls", [bl.BinaryConv1d, bl.BinaryConv2d])
def test_latent_conv_freeze_keeps_eval_outputs(cls: type) -> None:
    dims = 1 if cls is bl.BinaryConv1d else 2
    layer = cls(5, 6, 3, stride=2, padding=1, activations=True).eval()
    x = _seeded(2, 5, *(9,) * dims, seed=3)
    frozen = layer.freeze().eval()
    assert frozen.weight.shape == layer.weight.shape and frozen.threshold.shape == (5,)
    with torch.no_grad():
        assert torch.allclose(frozen(x), layer(x), atol=1e-5)


def _frozen(layer: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.where(torch.rand(layer.weight.shape, generator=g) < 0.5, -1, 1))
        layer.alpha.uniform_(0.05, 0.2, generator=g)
        if layer.bias is not None:
            layer.bias.uniform_(-1, 1, generator=g)
        if layer.threshold is not None:
            layer.threshold.uniform_(-0.3, 0.3, generator=g)
    return layer.eval()


FROZEN = [
    lambda: bl.FrozenBinaryLinear(65, 9),
    lambda: bl.FrozenBinaryLinear(100, 5, bias=False),
    lambda: bl.FrozenBinaryConv1d(13, 6, 5, stride=2, padding=2),
    lambda: bl.FrozenBinaryConv2d(7, 4, (3, 3), padding=1),
]
INPUTS = [(3, 65), (1, 100), (2, 13, 11), (2, 7, 6, 5)]


@needs_kernel
@pytest.mark.parametrize("index", range(len(FROZEN)))
def test_frozen_kernel_path_equals_reference(index: int) -> None:
    layer = _frozen(FROZEN[index](), index)
    x = _seeded(*INPUTS[index], seed=index)
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, layer.reference(x))
    assert layer._use_kernel(x)


def test_frozen_layer_copies_after_running_the_kernel() -> None:
    layer = _frozen(bl.FrozenBinaryLinear(65, 9), 2)
    x = _seeded(2, 65)
    with torch.no_grad():
        before = layer(x)
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            twin.weight.neg_()  # the copy owns its tensors and derives its own plan
        assert torch.equal(layer(x), before)
        assert torch.equal(twin(x), twin.reference(x)) and not torch.equal(twin(x), before)


def test_frozen_falls_back_to_reference_with_a_log_note(monkeypatch, caplog) -> None:
    layer = _frozen(bl.FrozenBinaryLinear(65, 9), 0)
    x = _seeded(3, 65)
    monkeypatch.setattr(xnor, "available", lambda: False)
    monkeypatch.setattr(xnor, "unavailable_reason", lambda: "test: no gcc")
    bl._note_fallback.cache_clear()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = layer(x)
    assert "XNOR kernel unavailable (test: no gcc)" in caplog.text
    assert torch.equal(got, layer.reference(x))
    bl._note_fallback.cache_clear()


def test_frozen_training_mode_passes_ste_gradients_to_inputs() -> None:
    layer = _frozen(bl.FrozenBinaryLinear(4, 3), 1).train()
    x = torch.tensor([[0.0, 5.0, -5.0, 0.5]]) + layer.threshold
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert x.grad[0, 1] == 0 and x.grad[0, 2] == 0  # |x - t| > 1: clipped
    assert x.grad[0, 0] != 0 and x.grad[0, 3] != 0


# -- the technique ------------------------------------------------------------------------

def test_plan_keeps_first_and_last_and_marks_data_inputs() -> None:
    model, x = _mlp(), torch.randn(2, 1, 12)
    plan = plan_binarization(model, x, BinarizeConfig())
    assert plan.selected == ("layers.fc2",) and not plan.real_input
    assert [n for n, _ in plan.kept] == ["layers.fc1", "layers.fc3"]
    plan = plan_binarization(model, x, BinarizeConfig(keep_first=False, keep_last=False))
    assert plan.selected == ("layers.fc1", "layers.fc2", "layers.fc3")
    assert plan.real_input == {"layers.fc1"}


def test_binarize_mlp_freezes_one_bit_layers_and_notes_them() -> None:
    data, model = tiny_data(), _mlp()
    ctx = Context(data=data, seed=0, progress=False)
    ctx.masks["layers.fc2.weight"] = torch.ones(8, 16, dtype=torch.bool)
    config = BinarizeConfig(keep_first=False, epochs=1, lr=0.01)
    out = binarize(model, config, ctx)
    layers = out.layers
    assert isinstance(layers.fc1, bl.FrozenBinaryLinear) and not layers.fc1.activations
    assert isinstance(layers.fc2, bl.FrozenBinaryLinear) and layers.fc2.activations
    assert type(layers.fc3) is nn.Linear
    assert "layers.fc2.weight" not in ctx.masks
    log = "\n".join(ctx.log)
    assert "layers.fc3 not binarized: last layer kept in float" in log
    assert "pruning mask is dropped" in log
    assert "1-bit weights and inputs" in log and "layers.fc2" in log
    assert "1-bit weights, real-valued inputs: layers.fc1" in log
    assert 0.0 <= nc.train.evaluate(out, data.test) <= 1.0


def test_binarize_names_layers_it_cannot_binarize() -> None:
    torch.manual_seed(0)
    model = models.build("gru", (1, 12), 3, hidden=8)
    data = tiny_data()
    ctx = Context(data=data, seed=0, progress=False)
    binarize(model, BinarizeConfig(keep_first=False, keep_last=False, epochs=0), ctx)
    log = "\n".join(ctx.log)
    assert "recurrent layer: no binary form" in log
    assert any(isinstance(m, bl.FrozenBinaryLinear) for m in model.modules())


def test_binarize_refuses_before_touching_the_model() -> None:
    model = _mlp()
    model.layers = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = copy.deepcopy(model.state_dict())
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    with pytest.raises(ConstraintError, match="keep_first/keep_last") as info:
        binarize(model, BinarizeConfig(), ctx)
    assert "\n" not in str(info.value)
    assert type(model.layers[1]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    norm_only = nn.Sequential(nn.Flatten(), nn.LayerNorm(12))
    with pytest.raises(UnsupportedLayerError, match="no Linear/Conv1d/Conv2d"):
        binarize(norm_only, BinarizeConfig(), Context(data=tiny_data(), progress=False))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="epochs"):
        BinarizeConfig(epochs=-1)
    with pytest.raises(ValueError, match="extra"):
        BinarizeConfig(bits=1)


@pytest.mark.parametrize("keep_first", [True, False])
def test_binarized_cnn1d_round_trips_through_nnc(keep_first: bool, tmp_path) -> None:
    data = _cnn_data()
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 24), 2, channels=[8, 16, 16])
    recipe = Recipe("bin", (Stage.technique("binarize", keep_first=keep_first,
                                            keep_last=False, epochs=1, lr=0.01),))
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    out = result.model.eval()
    frozen = [m for m in out.modules() if isinstance(m, bl._FrozenBinary)]
    assert len(frozen) == (3 if keep_first else 4)
    path = tmp_path / "b.nnc"
    nc.save(out, path)
    again = nc.load(path).eval()
    assert [type(m) for m in again.modules()] == [type(m) for m in out.modules()]
    x = torch.randn(5, 1, 24)
    with torch.no_grad():
        assert torch.equal(again(x), out(x))
    info = formats.inspect(path)
    weights = {t.name: t for t in info.tensors if t.name.endswith(".weight")}
    conv2 = weights["features.conv2.weight"]
    assert conv2.encoding == "codebook" and conv2.stored_bytes <= 8 * 16 * 5 / 8 + 8  # ~1 bit each


def test_binarize_recipe_is_packaged() -> None:
    recipe = Recipe.named("binarize")
    stage = recipe.stages[0]
    assert stage.kind == "technique" and stage.name == "binarize"
    assert isinstance(stage.config, BinarizeConfig)
