"""Channel selection and least-squares repair from sampled consumer inputs
(He, Zhang & Sun 2017; Luo, Wu & Lin 2017)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.errors import ConstraintError, UnsupportedLayerError
from nncompress.prune.reconstruct import (
    consumer_weight,
    lasso_select,
    least_squares_weight,
    output_of,
    patches,
    sample_inputs,
    thinet_scales,
    thinet_select,
)


def _bias_free(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's real output without bias, as ``[locations, O]``."""
    out = layer(x)
    if x.dim() == 2:
        return out - layer.bias
    out = out - layer.bias.view(1, -1, *([1] * (x.dim() - 2)))
    return out.reshape(out.shape[0], out.shape[1], -1).permute(0, 2, 1).reshape(
        -1, out.shape[1])


@pytest.mark.parametrize(("layer", "shape"), [
    (nn.Conv1d(6, 5, 5, stride=2, padding=2), (3, 6, 20)),
    (nn.Conv1d(6, 5, 3, padding=2, dilation=2), (3, 6, 11)),
    (nn.Conv2d(6, 5, 3, padding=1, stride=2), (3, 6, 8, 8)),
    (nn.Linear(6, 5), (3, 6)),
])
def test_patches_reproduce_the_layer(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    y = output_of(patches(layer, x), consumer_weight(layer))
    assert torch.allclose(y, _bias_free(layer, x), atol=1e-5)


def test_grouped_conv_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedLayerError, match="Conv1d"):
        consumer_weight(nn.Conv1d(4, 4, 3, groups=4))


def _weak_channel_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    layer = nn.Conv1d(8, 6, 3, padding=1)
    x = torch.randn(64, 8, 16)
    x[:, [1, 4, 6]] *= 0.01  # three channels carry almost nothing to the output
    xs, w = patches(layer, x), consumer_weight(layer)
    return xs, w, output_of(xs, w)


def test_lasso_and_thinet_drop_the_channels_that_carry_nothing() -> None:
    x, w, y = _weak_channel_problem()
    assert lasso_select(x, w, y, 5) == [0, 2, 3, 5, 7]
    kept, _ = thinet_select(x, w, 5)
    assert kept == [0, 2, 3, 5, 7]


def test_selection_keeps_the_requested_count() -> None:
    x, w, y = _weak_channel_problem()
    for keep in (1, 3, 8):
        assert len(lasso_select(x, w, y, keep)) == keep
        assert len(thinet_select(x, w, keep)[0]) == keep
    with pytest.raises(ConstraintError, match="9 of 8"):
        lasso_select(x, w, y, 9)


def test_least_squares_beats_plain_removal_on_the_same_channels() -> None:
    """Correlated channels: what is lost with a removed channel can be rebuilt from others."""
    torch.manual_seed(2)
    base = torch.randn(400, 4, 3)
    x = torch.cat([base, base[:, :2] + 0.1 * torch.randn(400, 2, 3)], dim=1)  # 6 channels
    w = torch.randn(5, 6, 3)
    y = output_of(x, w)
    kept = [0, 1, 2, 3]  # drop channels 4, 5 (near-copies of 0, 1)
    plain = float(((output_of(x[:, kept], w[:, kept]) - y) ** 2).mean())
    refit = float(((output_of(x[:, kept], least_squares_weight(x, y, kept)) - y) ** 2).mean())
    assert refit < 0.05 * plain


def test_thinet_scaling_reduces_error() -> None:
    torch.manual_seed(3)
    base = torch.randn(500, 3, 1)
    x = torch.cat([base, base[:, :1] * 0.9], dim=1)  # channel 3 ~ 0.9 x channel 0
    w = torch.randn(4, 4, 1)
    kept, xhat = thinet_select(x, w, 3, samples=2000)
    target = xhat.sum(dim=1)
    plain = float(((xhat[:, kept].sum(dim=1) - target) ** 2).mean())
    scaled = float(((xhat[:, kept] @ thinet_scales(xhat, kept) - target) ** 2).mean())
    assert scaled < plain


def test_sample_inputs_hooks_the_consumer() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 3, 3,
                                                                              padding=1))
    batches = [torch.randn(5, 2, 10) for _ in range(3)]
    x = sample_inputs(model, model[2], batches, samples=100, seed=0)
    assert x.shape == (100, 4, 3)
    assert (x >= 0).all()  # the consumer sees post-ReLU activations
    assert torch.equal(x, sample_inputs(model, model[2], batches, samples=100, seed=0))
