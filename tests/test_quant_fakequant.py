"""Fake quantization for QAT (Jacob et al. 2018 section 3): forward = quantize-dequantize,
straight-through gradients, EMA ranges, weight fake quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.errors import RecipeError
from nncompress.quant import affine
from nncompress.quant.fakequant import FakeQuantize, fake_quant_weight, fake_quantize


def dequantized(x: torch.Tensor, qt: affine.QType) -> torch.Tensor:
    q = affine.quantize_tensor(x, qt.scale, qt.zero_point)
    return (q - qt.zero_point).float() * torch.tensor(qt.scale, dtype=torch.float32)


def fixed(lo: float, hi: float) -> FakeQuantize:
    """A FakeQuantize whose range is ``[lo, hi]``, in eval mode."""
    fq = FakeQuantize()
    fq.observe(torch.tensor([lo, hi]))
    return fq.eval()


def test_forward_equals_quantize_dequantize() -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 2
    fq = FakeQuantize().train()
    y = fq(x)
    qt = fq.qtype()
    assert qt == affine.activation_qtype(float(x.min()), float(x.max()))
    assert torch.equal(y, dequantized(x, qt))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert 0 < (y - x).abs().max() <= qt.scale / 2 + 1e-6
    assert len(torch.unique(y)) <= 256


def test_ste_gradient_inside_and_zero_outside() -> None:
    fq = fixed(-1.0, 1.0)
    qt = fq.qtype()
    lo, hi = (affine.QMIN - qt.zero_point) * qt.scale, (affine.QMAX - qt.zero_point) * qt.scale
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.99, 1.5, 10.0], requires_grad=True)
    y = fq(x)
    (y * torch.arange(1.0, 8.0)).sum().backward()
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert inside.tolist() == [False, True, True, True, True, False, False]
    assert torch.equal(x.grad, torch.where(inside, torch.arange(1.0, 8.0), 0.0))
    assert float(y[0].detach()) == pytest.approx(lo, abs=1e-6)
    assert float(y[-1].detach()) == pytest.approx(hi, abs=1e-6)


def test_gradients_flow_through_a_qat_model() -> None:
    torch.manual_seed(0)
    layer, fq = nn.Linear(6, 3), FakeQuantize(momentum=0.1)
    x, target = torch.randn(32, 6), torch.randn(32, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        out = fq(nn.functional.linear(x, fake_quant_weight(layer.weight), layer.bias))
        loss = nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert int(fq.steps) == 30


def test_ema_converges_on_a_fixed_input() -> None:
    fq = FakeQuantize(momentum=0.1).train()
    fq(torch.tensor([-10.0, 20.0]))                 # first batch sets the range
    assert (float(fq.lo), float(fq.hi)) == (-10.0, 20.0)
    x = torch.linspace(-1.0, 3.0, 50)
    fq(x)
    assert float(fq.lo) == pytest.approx(-10.0 + 0.1 * 9.0)      # one EMA step
    for _ in range(200):
        fq(x)
    assert float(fq.lo) == pytest.approx(-1.0, abs=1e-5)
    assert float(fq.hi) == pytest.approx(3.0, abs=1e-5)
    expected = affine.activation_qtype(-1.0, 3.0)
    assert fq.qtype().zero_point == expected.zero_point
    assert fq.qtype().scale == pytest.approx(expected.scale, rel=1e-4)


def test_freeze_after_and_eval_keep_the_range() -> None:
    fq = FakeQuantize(momentum=0.5, freeze_after=3).train()
    for k in range(3):
        fq(torch.tensor([-1.0 - k, 1.0 + k]))
    assert fq.frozen
    before = (float(fq.lo), float(fq.hi))
    fq(torch.tensor([-100.0, 100.0]))
    assert (float(fq.lo), float(fq.hi)) == before and int(fq.steps) == 3
    live = FakeQuantize(momentum=0.5).train()
    live(torch.tensor([-1.0, 1.0]))
    live.eval()
    live(torch.tensor([-100.0, 100.0]))
    assert (float(live.lo), float(live.hi)) == (-1.0, 1.0)


def test_delay_and_no_range_pass_the_input_through() -> None:
    x = torch.randn(20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(FakeQuantize().eval()(x), x)          # nothing observed yet
    fq = FakeQuantize(delay=2).train()
    assert torch.equal(fq(x), x)                             # step 1 of 2: not yet
    assert not torch.equal(fq(x), x)                         # step 2: quantized


def test_state_dict_round_trip() -> None:
    fq = FakeQuantize(momentum=0.2).train()
    fq(torch.randn(100) * 3)
    fresh = FakeQuantize(momentum=0.2)
    fresh.load_state_dict(fq.state_dict())
    assert set(fq.state_dict()) == {"lo", "hi", "steps"}
    assert fresh.qtype() == fq.qtype()


def test_non_finite_values_are_not_observed() -> None:
    fq = FakeQuantize().train()
    fq(torch.tensor([float("nan"), float("inf")]))
    assert int(fq.steps) == 0
    fq(torch.tensor([-2.0, float("inf"), 4.0]))
    assert (float(fq.lo), float(fq.hi)) == (-2.0, 4.0)


@pytest.mark.parametrize("options", [{"momentum": 0.0}, {"momentum": 1.5}, {"momentum": True},
                                     {"freeze_after": 0}, {"freeze_after": 2.5},
                                     {"delay": -1}])
def test_bad_options_raise(options: dict) -> None:
    with pytest.raises(RecipeError, match="FakeQuantize"):
        FakeQuantize(**options)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_weight(per_channel: bool) -> None:
    w = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(2))
    w[2] *= 10
    w[4] = 0.0                                              # an all-zero channel
    w.requires_grad_(True)
    wq = fake_quant_weight(w, per_channel=per_channel)
    scales = affine.weight_scales(w, per_channel=per_channel)
    shape = (-1, 1, 1) if per_channel else ()
    s = scales.reshape(shape) if per_channel else scales.reshape(())
    q = affine.quantize_tensor(w.detach(), s, 0, -affine.WMAX, affine.WMAX)
    assert torch.equal(wq, q.float() * s.float())
    assert q.abs().max() == affine.WMAX
    assert torch.equal(wq[4], torch.zeros(4, 3))
    err = (wq - w).abs().detach().amax(dim=(1, 2))
    assert bool((err <= scales.float() / 2 + 1e-6).all())
    (wq * 3.0).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))     # STE: identity


def test_per_channel_beats_per_tensor_on_uneven_channels() -> None:
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    w[0] *= 50
    per_channel = (fake_quant_weight(w) - w)[1:].pow(2).mean()     # the ordinary channels
    per_tensor = (fake_quant_weight(w, per_channel=False) - w)[1:].pow(2).mean()
    assert per_channel < 0.01 * per_tensor


def test_fake_quant_weight_of_a_vector_is_per_tensor() -> None:
    v = torch.tensor([0.5, -1.27, 0.01])
    assert torch.allclose(fake_quant_weight(v), torch.tensor([0.5, -1.27, 0.01]), atol=0.005)
    assert fake_quantize(v, affine.QType("int8", 0.01, 0)).tolist() == pytest.approx(
        [0.5, -1.27, 0.01])
