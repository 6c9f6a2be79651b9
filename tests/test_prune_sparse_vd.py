"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, 2017)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import models
from nncompress.prune.masks import mask_sparsity
from nncompress.prune.variational import SparseVDConfig, SVDLayer, kl_approx, sparse_vd
from nncompress.recipe import Recipe
from nncompress.technique import TECHNIQUES, Context


def test_registered() -> None:
    technique = TECHNIQUES.get("sparse_vd")
    assert technique.config is SparseVDConfig
    assert "Molchanov" in technique.paper


def test_kl_approximation_matches_the_paper() -> None:
    log_alpha = torch.tensor([-10.0, 0.0, 3.0, 10.0])
    per_weight = torch.stack([kl_approx(v.reshape(1)) for v in log_alpha])
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    alpha = log_alpha.exp()
    expected = -(k1 * torch.sigmoid(k2 + k3 * log_alpha) - 0.5 * torch.log1p(1 / alpha) - k1)
    assert torch.allclose(per_weight, expected, atol=1e-5)
    assert torch.all(per_weight[:-1] > per_weight[1:])        # more noise, less KL
    assert per_weight[-1] < 1e-3                               # -> 0 as alpha -> infinity


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv1d(2, 3, 3, padding=1),
                                   nn.Conv2d(2, 3, 3)])
def test_local_reparameterisation_mean_and_variance(layer: nn.Module) -> None:
    torch.manual_seed(0)
    wrapper = SVDLayer(layer, threshold=3.0, init_log_sigma2=-4.0)
    x = torch.randn(1, *({nn.Linear: (6,), nn.Conv1d: (2, 5), nn.Conv2d: (2, 5, 5)}
                         [type(layer)]))
    wrapper.train()
    with torch.no_grad():
        samples = torch.stack([wrapper(x) for _ in range(4000)])
        mean = layer(x)
        var = wrapper.op.std(layer, x, wrapper.log_sigma2.exp()) ** 2 - 1e-8
    assert torch.allclose(samples.mean(0), mean, atol=5 * float(var.max().sqrt()) / 4000 ** 0.5)
    assert torch.allclose(samples.var(0), var, rtol=0.1, atol=1e-3)


def test_eval_drops_weights_above_the_threshold() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    wrapper = SVDLayer(layer, threshold=3.0, init_log_sigma2=-10.0)
    with torch.no_grad():
        wrapper.log_sigma2[0, 1] = 5.0                         # log alpha = 5 > 3
    assert wrapper.keep_mask().sum() == 7 and not wrapper.keep_mask()[0, 1]
    out = wrapper.eval()(torch.ones(1, 4))
    assert torch.allclose(out, torch.tensor([[3.0, 4.0]]))


def test_mlp_sparsifies_keeps_types_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[64, 32])
    data = tiny_data()
    nc.train.fit(model, data, epochs=3, lr=0.01, progress=False)
    keys = set(model.state_dict())
    dense = nc.save(model, tmp_path / "dense.nnc")
    ctx = Context(data, seed=0, progress=False)
    out = sparse_vd(model, SparseVDConfig(epochs=3, lr=0.01, init_log_sigma2=-4.0), ctx)
    assert out is model and set(model.state_dict()) == keys     # no log_sigma2 left
    assert [type(m) for m in model.layers if m._parameters] == [nn.Linear] * 3
    assert mask_sparsity(ctx.masks) > 0.5
    params = dict(model.named_parameters())
    for name, mask in ctx.masks.items():
        assert torch.all(params[name][~mask] == 0)
        assert not torch.signbit(params[name][~mask]).any()
    assert nc.train.evaluate(model, data.test) > 0.6
    size = nc.save(model, tmp_path / "svd.nnc")
    assert size < 0.6 * dense
    loaded = nc.load(tmp_path / "svd.nnc")
    x = torch.randn(4, 1, 12)
    assert torch.equal(loaded(x), model.eval()(x))


def test_conv_model_is_supported() -> None:
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 12), 3, channels=[4, 8])
    ctx = Context(tiny_data(), seed=0, progress=False)
    sparse_vd(model, SparseVDConfig(epochs=1, lr=0.01, init_log_sigma2=-4.0), ctx)
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv1d]
    assert convs and all(f"{n}.weight" in ctx.masks for n in convs)
    assert model(torch.randn(2, 1, 12)).shape == (2, 3)


class SelfAttentionModel(nn.Module):
    """Linear -> torch's nn.MultiheadAttention (packed in_proj_weight) -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(1, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.transpose(1, 2))
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_attention_is_rewritten_then_its_projections_sparsified() -> None:
    """nn.MultiheadAttention reads its packed projections itself: sparse_vd rewrites it to
    SplitMultiheadAttention (noted) and sparsifies the called q/k/v/out Linears."""
    from nncompress.modules import SplitMultiheadAttention

    torch.manual_seed(0)
    ctx = Context(tiny_data(), seed=0, progress=False)
    model = sparse_vd(SelfAttentionModel(), SparseVDConfig(epochs=1), ctx)
    assert isinstance(model.attn, SplitMultiheadAttention)
    assert any("rewrote attn" in line for line in ctx.log)
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
            "attn.out_proj.weight"} <= set(ctx.masks)
    assert model(torch.randn(2, 1, 12)).shape == (2, 3)


class EncoderModel(nn.Module):
    """Linear -> torch's built-in TransformerEncoderLayer -> mean pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(1, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x.transpose(1, 2))).mean(1))


def test_built_in_encoder_layer_with_attention_excluded() -> None:
    # the layer's fused eval fast path reads linear1.weight / linear2.bias directly: the
    # wrappers expose the deterministic (masked) weight and the bias as read-only views
    torch.manual_seed(0)
    model = EncoderModel()
    ctx = Context(tiny_data(), seed=0, progress=False)
    sparse_vd(model, SparseVDConfig(epochs=1, exclude=("*self_attn*",)), ctx)
    assert sorted(ctx.masks) == ["enc.linear1.weight", "enc.linear2.weight", "head.weight",
                                 "inp.weight"]
    assert type(model.enc.linear1) is nn.Linear
    assert model(torch.randn(2, 1, 12)).shape == (2, 3)


def test_wrapper_weight_and_bias_are_the_deterministic_layer() -> None:
    layer = nn.Linear(4, 2)
    wrapper = SVDLayer(layer, threshold=3.0, init_log_sigma2=-10.0)
    with torch.no_grad():
        wrapper.log_sigma2[1, 2] = 20.0                        # clipped log alpha 10 > 3
    expected = layer.weight.detach().clone()
    expected[1, 2] = 0.0
    assert torch.equal(wrapper.weight, expected)
    assert wrapper.bias is layer.bias
    with pytest.raises(AttributeError):
        wrapper.weight = torch.zeros(2, 4)                    # read-only
    x = torch.randn(3, 4)
    assert torch.equal(wrapper.eval()(x), nn.functional.linear(x, expected, layer.bias))


def test_recipe_parses() -> None:
    stage = Recipe.named("sparse-vd").stages[0]
    assert stage.params["threshold"] == 3.0
