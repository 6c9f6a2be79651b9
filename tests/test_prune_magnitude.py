"""Magnitude connection pruning (Han et al., 2015): masks, surgery, iterative steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import tiny_data
from nncompress.errors import ConstraintError, ModelError, UnsupportedLayerError
from nncompress.prune import (
    MagnitudePruneConfig,
    apply_masks,
    find_prunable,
    magnitude_masks,
    magnitude_prune,
    mask_sparsity,
)
from nncompress.technique import Context


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3))


def zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / t.numel()


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(12, 8, num_layers=2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.expand(-1, 4, -1))
        return self.head(self.norm(out[:, -1]))


def test_layer_scope_hits_sparsity_exactly_in_every_layer() -> None:
    model = mlp()
    masks = magnitude_masks(model, 0.75, "layer")
    assert set(masks) == {"1.weight", "3.weight"}           # biases are never pruned
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert mask.shape == dict(model.named_parameters())[name].shape
        assert int((~mask).sum()) == round(0.75 * mask.numel())


def test_layer_scope_removes_the_smallest_magnitudes() -> None:
    model = mlp()
    weight = model[1].weight.detach()
    mask = magnitude_masks(model, 0.5, "layer")["1.weight"]
    assert weight[~mask].abs().max() <= weight[mask].abs().min()


def test_global_scope_hits_total_sparsity_and_prunes_small_layers_more() -> None:
    model = mlp()
    with torch.no_grad():
        model[1].weight.mul_(0.01)                         # a small-magnitude layer
    masks = magnitude_masks(model, 0.6, "global")
    total = sum(m.numel() for m in masks.values())
    assert int(sum((~m).sum() for m in masks.values())) == round(0.6 * total)
    small = 1 - masks["1.weight"].float().mean()
    large = 1 - masks["3.weight"].float().mean()
    assert small > 0.6 > large


def test_masks_are_analysis_only() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    magnitude_masks(model, 0.9, "global")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_masks_zeroes_exactly_the_masked_weights() -> None:
    model = mlp()
    masks = magnitude_masks(model, 0.5, "layer")
    apply_masks(model, masks)
    for name, param in model.named_parameters():
        if name in masks:
            assert torch.all(param[~masks[name]] == 0)
            assert torch.all(param[masks[name]] != 0)
        else:
            assert zero_fraction(param) == 0.0


def test_apply_masks_rejects_unknown_names_and_shapes() -> None:
    model = mlp()
    with pytest.raises(ModelError, match=r"'nope\.weight'"):
        apply_masks(model, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ModelError, match=r"'1\.weight' has shape \(2, 2\)"):
        apply_masks(model, {"1.weight": torch.ones(2, 2, dtype=torch.bool)})


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_weights_are_pruned_too(cell: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    model = Recurrent(cell)
    found = find_prunable(model)
    expected = {f"rnn.weight_{kind}_l{layer}" for kind in ("ih", "hh") for layer in (0, 1)}
    assert expected <= set(found.names)
    assert not any("bias" in n or "norm" in n for n in found.names)
    assert found.unsupported == ()                          # LayerNorm is known, not pruned
    masks = magnitude_masks(model, 0.8, "layer")
    apply_masks(model, masks)
    for name in expected:
        weight = dict(model.named_parameters())[name]
        assert zero_fraction(weight) == pytest.approx(round(0.8 * weight.numel()) / weight.numel())
    model(torch.randn(2, 1, 12))                            # still runs


def test_transformer_linear_and_attention_weights_are_prunable() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    names = set(find_prunable(layer).names)
    assert {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
            "linear2.weight"} == names


class Scale(nn.Module):
    """A user layer with a weight of its own that no pruning rule knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_unknown_parameterised_layers_are_reported_by_name() -> None:
    model = nn.Sequential(nn.Flatten(), Scale(12), nn.Linear(12, 3))
    found = find_prunable(model)
    assert found.names == ("2.weight",)
    assert found.unsupported == ("1.weight (Scale)",)
    ctx = Context(data=tiny_data())
    magnitude_prune(model, MagnitudePruneConfig(sparsity=0.5, epochs_per_step=0), ctx)
    assert any("1.weight (Scale)" in line for line in ctx.log)
    assert zero_fraction(model[1].weight) == 0.0


def test_layers_and_exclude_patterns_choose_weights() -> None:
    model = mlp()
    assert set(magnitude_masks(model, 0.5, layers=["3.*"])) == {"3.weight"}
    assert set(magnitude_masks(model, 0.5, exclude=["3.*"])) == {"1.weight"}
    with pytest.raises(ModelError, match="'fc9'"):
        magnitude_masks(model, 0.5, layers=["fc9"])


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ConstraintError, match=r"1\.5"):
        magnitude_masks(mlp(), 1.5)
    with pytest.raises(ConstraintError, match="'ring'"):
        magnitude_masks(mlp(), 0.5, "ring")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedLayerError, match="no prunable weights"):
        magnitude_masks(nn.Sequential(nn.ReLU()), 0.5)


def test_existing_masks_stay_pruned() -> None:
    model = mlp()
    old = magnitude_masks(model, 0.8, "layer")
    apply_masks(model, old)
    new = magnitude_masks(model, 0.5, "layer", existing=old)
    for name in old:
        assert torch.equal(new[name], old[name] & new[name])
        assert int((~new[name]).sum()) == int((~old[name]).sum())   # 80 % stays 80 %
    with torch.no_grad():                                  # weights regrown by training...
        model[1].weight.add_(1.0)
    again = magnitude_masks(model, 0.9, "layer", existing=old)
    assert not torch.any(again["1.weight"] & ~old["1.weight"])       # ...stay pruned


def test_iterative_steps_reach_final_sparsity_and_log_each_step() -> None:
    model = mlp()
    ctx = Context(data=tiny_data(), progress=False)
    cfg = MagnitudePruneConfig(sparsity=0.9, scope="global", steps=3, epochs_per_step=1, lr=1e-3)
    out = magnitude_prune(model, cfg, ctx)
    assert out is model
    assert mask_sparsity(ctx.masks) == pytest.approx(0.9, abs=1e-3)
    weights = [model[1].weight, model[3].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=1e-3)
    steps = [line for line in ctx.log if line.startswith("magnitude_prune step")]
    assert len(steps) == 3
    assert "target 30.00 %" in steps[0] and "target 90.00 %" in steps[2]


def test_masks_survive_fine_tuning() -> None:
    model = mlp()
    ctx = Context(data=tiny_data(), progress=False)
    magnitude_prune(model, MagnitudePruneConfig(sparsity=0.7, epochs_per_step=0), ctx)
    before = model[3].weight.detach().clone()
    ctx.fine_tune(model, epochs=2, lr=1e-2)
    assert not torch.equal(before, model[3].weight)                  # it did train
    for name, param in model.named_parameters():
        if name in ctx.masks:
            assert torch.all(param[~ctx.masks[name]] == 0)


def test_a_linear_subclass_with_other_weight_names_is_reported_not_skipped() -> None:
    from nncompress.prune.masks import find_prunable
    from nncompress.share.hashing import HashedLinear

    found = find_prunable(nn.Sequential(HashedLinear(6, 5, 7), nn.ReLU(), nn.Linear(5, 2),
                                        nn.LayerNorm(2)))
    assert found.names == ("2.weight",)
    assert found.unsupported == ("0.hashed_weight (HashedLinear)", "0.bias (HashedLinear)")
