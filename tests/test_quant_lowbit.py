"""Low-bit layers (training and frozen forms), their .nnc round trip, and the lowbit technique."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import formats, models
from nncompress.errors import RecipeError, UnsupportedLayerError
from nncompress.measure import accuracy
from nncompress.quant.lowbit import LowBitConfig, code_bytes, lowbit, plan_layers
from nncompress.quant.lowbit_layers import (
    FrozenLowBitConv1d,
    FrozenLowBitConv2d,
    FrozenLowBitLinear,
    LowBitLinear,
    from_float,
)
from nncompress.recipe import Recipe, Stage
from nncompress.technique import Context
from nncompress.train import fit

FROZEN = (FrozenLowBitLinear, FrozenLowBitConv1d, FrozenLowBitConv2d)


def layer_cases() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [
        (nn.Linear(10, 6), (5, 10)),
        (nn.Conv1d(4, 6, 3, padding=1, groups=2), (3, 4, 9)),           # grouped
        (nn.Conv1d(4, 4, 3, stride=2, groups=4, bias=False), (3, 4, 9)),  # depthwise
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", dilation=1), (2, 3, 5, 7)),
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("quantizer", ["linear", "log"])
@pytest.mark.parametrize("acts", [None, 3])
def test_freeze_gives_int8_codes_and_the_same_outputs(case: int, quantizer: str,
                                                      acts: int | None) -> None:
    layer, shape = layer_cases()[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(case))
    with torch.no_grad():
        layer.weight[0].zero_()  # a pruned row
    lowbit_layer = from_float(layer, weight_bits=3, activation_bits=acts, quantizer=quantizer,
                              act_signed=True)
    assert isinstance(lowbit_layer, type(layer))  # subclasses the float layer
    lowbit_layer.eval()
    with torch.no_grad():
        expected = lowbit_layer(x)  # also sets the input step from x
    frozen = lowbit_layer.freeze()
    assert isinstance(frozen, FROZEN) and isinstance(frozen, type(layer))
    assert frozen.weight.dtype == torch.int8 and not frozen.weight.requires_grad
    assert int(frozen.weight.abs().max()) <= 3 and int(frozen.weight[0].abs().max()) == 0
    with torch.no_grad():
        assert torch.equal(frozen(x), expected)
        reference = lowbit_layer.weight_quant(layer.weight)
    assert torch.equal(frozen.dequantized_weight(), reference)
    assert "3-bit" in repr(frozen)


def test_training_form_passes_gradients_to_weights_and_steps() -> None:
    layer = from_float(nn.Linear(8, 4), weight_bits=2, activation_bits=4, act_signed=False)
    layer.train()
    x = torch.rand(16, 8)
    out = layer(x)  # the first call sets the input step
    assert float(layer.input_quant.step.detach()) > 0
    layer(x).pow(2).sum().backward()
    assert out.shape == (16, 4)
    assert float(layer.weight.grad.abs().sum()) > 0
    assert float(layer.weight_quant.step.grad.abs()) > 0
    assert float(layer.input_quant.step.grad.abs()) > 0


def test_bad_layer_arguments_are_refused() -> None:
    with pytest.raises(RecipeError, match="weight_bits"):
        FrozenLowBitLinear(3, 2, weight_bits=9)
    with pytest.raises(RecipeError, match="quantizer"):
        LowBitLinear(3, 2, quantizer="ternary")
    with pytest.raises(RecipeError, match="LSTM"):
        from_float(nn.LSTM(3, 2), weight_bits=4)


def frozen_copy(model: nn.Module, bits: int, quantizer: str, acts: int | None) -> nn.Module:
    """``model`` with every Linear / Conv frozen to ``bits``-bit codes."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d):
            low = from_float(m, weight_bits=bits, activation_bits=acts, quantizer=quantizer)
            if acts is not None:
                low.input_quant.initialise(torch.rand(4, 3))
            model.set_submodule(name, low.freeze())
    return model.eval()


@pytest.mark.parametrize(("arch", "shape", "kwargs"), [
    ("mlp", (1, 12), {"hidden": [20, 16]}),
    ("cnn1d", (1, 24), {"channels": [8, 16, 16]}),
    ("rescnn", (1, 24), {"channels": 8, "hidden": [16, 16]}),
    ("cnn2d", (1, 8, 8), {"channels": [4, 6], "hidden": [12, 10]}),
])
@pytest.mark.parametrize(("bits", "quantizer", "acts"), [(2, "linear", None), (3, "log", 4),
                                                         (5, "linear", 8)])
def test_frozen_models_round_trip_through_nnc(arch: str, shape: tuple[int, ...], kwargs: dict,
                                             bits: int, quantizer: str, acts: int | None,
                                             tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = frozen_copy(models.build(arch, shape, 3, **kwargs), bits, quantizer, acts)
    path = tmp_path / "m.nnc"
    nc.save(model, path)
    again = nc.load(path)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    kinds = {n: type(m) for n, m in again.named_modules() if isinstance(m, FROZEN)}
    assert kinds and kinds == {n: type(m) for n, m in model.named_modules()
                               if isinstance(m, FROZEN)}
    for info in formats.inspect(path).tensors:  # a b-bit code takes at most b bits
        if info.dtype == "int8":
            assert info.stored_bytes <= math.ceil(math.prod(info.shape) * bits / 8), info


def test_lowbit_technique_plans_bits_and_notes() -> None:
    data = tiny_data(features=12)
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[16, 16, 8])
    fit(model, data, epochs=30, lr=1e-2, progress=False)
    trained = accuracy(model, data.test)
    config = LowBitConfig(weight_bits=3, activation_bits=4, epochs=1, lr=1e-3,
                          bits={"layers.fc3": 5})
    ctx = Context(data, progress=False)
    out = lowbit(model, config, ctx)
    layers = {n: m for n, m in out.named_modules() if isinstance(m, FrozenLowBitLinear)}
    bits = {n: (m.weight_bits, m.activation_bits, m.act_signed) for n, m in layers.items()}
    assert bits == {"layers.fc1": (8, 8, True),    # first: 8 bits; raw inputs are signed
                    "layers.fc2": (3, 4, False),   # after a ReLU: unsigned
                    "layers.fc3": (5, 4, False),   # per-layer bits
                    "layers.fc4": (8, 8, False)}   # last: 8 bits
    assert any("layers.fc2: 3-bit linear weights, 4-bit unsigned inputs" in line
               for line in ctx.log)
    assert trained > 0.8 and accuracy(out, data.test) > trained - 0.2


def test_kept_layers_use_uniform_levels_under_the_log_quantizer() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[8, 8])
    plans, _, _ = plan_layers(model, LowBitConfig(quantizer="log", weight_bits=3),
                              torch.randn(16, 1, 12))
    assert [(p.name, p.quantizer, p.weight_bits) for p in plans] == [
        ("layers.fc1", "linear", 8), ("layers.fc2", "log", 3), ("layers.fc3", "linear", 8)]


def test_technique_composes_after_pruning_and_sharing(tmp_path: Path) -> None:
    data = tiny_data(features=12)
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[32, 16])
    recipe = Recipe("prune-lowbit", (
        Stage.technique("magnitude_prune", sparsity=0.8, steps=1, epochs_per_step=1),
        Stage.technique("weight_sharing", bits=3, epochs=1),
        Stage.technique("lowbit", weight_bits=3, epochs=1, lr=1e-3)))
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    fc1 = result.model.get_submodule("layers.fc1")
    assert isinstance(fc1, FrozenLowBitLinear)
    zeros = float((fc1.weight == 0).float().mean())
    assert zeros >= 0.75  # the pruned weights stayed code 0
    path = tmp_path / "p.nnc"
    nc.save(result.model, path)
    tensors = {t.name: t for t in formats.inspect(path).tensors}
    assert tensors["layers.fc1.weight"].encoding != "dense"


def test_technique_composes_after_sparse_vd_and_folding() -> None:
    data = tiny_data(features=24)
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 24), 3, channels=[4, 8, 8])
    recipe = Recipe("dc-lowbit", (
        Stage.technique("sparse_vd", epochs=1),
        Stage.technique("fold_batchnorm"),
        Stage.technique("lowbit", weight_bits=4, activation_bits=4, epochs=1,
                        quantizer="log")))
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    kinds = {type(m) for m in result.model.modules()}
    assert FrozenLowBitConv1d in kinds and FrozenLowBitLinear in kinds
    assert nn.BatchNorm1d not in kinds


class Mixed(nn.Module):
    """A GRU, a LayerNorm, an attention block and Linears: what lowbit takes and leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.rnn(x.reshape(x.shape[0], 3, 4))[0])
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_unhandled_layers_are_named_and_attention_is_rewritten() -> None:
    data = tiny_data(features=12)
    torch.manual_seed(0)
    ctx = Context(data, progress=False)
    out = lowbit(Mixed(), LowBitConfig(weight_bits=4, epochs=0, keep_first=False,
                                       exclude=("rnn",)), ctx)
    log = "\n".join(ctx.log)
    assert "stays float (recurrent layer: excluded, recurrent: false" in log and ": rnn" in log
    assert "stays float (normalisation parameters): norm" in log
    assert "rewrote attn" in log
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"):
        assert isinstance(out.get_submodule(name), FrozenLowBitLinear), name
    assert out.get_submodule("attn.q_proj").weight_bits == 4
    assert out(torch.randn(2, 1, 12)).shape == (2, 3)


def test_empty_selection_and_unknown_bits_raise_before_touching_the_model() -> None:
    data = tiny_data(features=12)
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[8])
    before = copy.deepcopy(model.state_dict())
    ctx = Context(data, progress=False)
    with pytest.raises(UnsupportedLayerError, match="no Linear/Conv1d/Conv2d"):
        lowbit(model, LowBitConfig(exclude=["*"]), ctx)
    with pytest.raises(RecipeError, match=r"'layers\.fc9'"):
        lowbit(model, LowBitConfig(bits={"layers.fc9": 3}), ctx)
    assert all(type(m) is not FrozenLowBitLinear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RecipeError, match="weight_bits"):
        Recipe("bad", (Stage.technique("lowbit", weight_bits=1),))


def test_packaged_recipes_load() -> None:
    for name in ("lowbit", "deep-compression-lowbit"):
        recipe = Recipe.named(name)
        assert "lowbit" in [s.name for s in recipe.stages]


def test_code_bytes_follow_the_bits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10))
    sizes = [code_bytes(model, {"0": b, "2": b})["0"] for b in range(2, 9)]
    assert all(s <= math.ceil(64 * 40 * b / 8) for s, b in zip(sizes, range(2, 9), strict=True))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 2
    with pytest.raises(RecipeError, match="'1'"):
        code_bytes(model, {"1": 4})
