"""LSQ linear and power-of-two quantizers: error bounds at every width, STE gradients, init."""

from __future__ import annotations

import math

import pytest
import torch

from nncompress.errors import RecipeError
from nncompress.quant.lsq import (
    LinearQuantizer,
    LogQuantizer,
    make_quantizer,
    qmax_of,
    round_log2,
)

BITS = range(2, 9)


def sample(n: int = 4000, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def with_step(q: LinearQuantizer | LogQuantizer, step: float) -> None:
    with torch.no_grad():
        q.step.fill_(step)
    q.eval()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_linear_error_is_at_most_half_a_step_inside_the_clip_range(bits: int,
                                                                    signed: bool) -> None:
    q = LinearQuantizer(bits, signed=signed)
    step = 0.37
    with_step(q, step)
    qmax = qmax_of(bits, signed)
    assert qmax == (2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    low = -qmax * step if signed else 0.0
    v = torch.linspace(low, qmax * step, 5001)
    codes = q.codes(v)
    assert codes.dtype == torch.int32
    assert int(codes.min()) == (-qmax if signed else 0) and int(codes.max()) == qmax
    err = (q(v) - v).abs()
    assert float(err.max()) <= step / 2 * (1 + 1e-5) + 1e-6
    assert torch.equal(q(v), codes.float() * step)
    outside = torch.tensor([qmax * step * 3, -qmax * step * 3 - 1])
    clipped = q(outside)
    assert float(clipped[0]) == pytest.approx(qmax * step)
    assert float(clipped[1]) == pytest.approx(-qmax * step if signed else 0.0)
    assert float(q(torch.zeros(3)).abs().max()) == 0.0  # zero is a code


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_log_error_is_relative_inside_the_range(bits: int, signed: bool) -> None:
    q = LogQuantizer(bits, signed=signed)
    scale = 2.5
    with_step(q, scale)
    qmax = qmax_of(bits, signed)
    smallest = scale * 2.0 ** (1 - qmax)
    tested = scale * 2.0 ** (1 - min(qmax, 60))  # 8-bit unsigned reaches 2**-254: below float32
    magnitudes = torch.exp2(torch.linspace(math.log2(tested), math.log2(scale), 3001))
    v = magnitudes if not signed else torch.cat([magnitudes, -magnitudes])
    out = q(v)
    assert float(((out - v).abs() / v.abs()).max()) <= math.sqrt(2) - 1 + 1e-5
    assert torch.equal(torch.sign(out), torch.sign(v))
    exponents = torch.log2(out.abs() / scale)
    assert torch.allclose(exponents, exponents.round(), atol=1e-5)  # powers of two
    assert int(q.codes(v).abs().max()) == qmax
    if qmax < 60:
        tiny = torch.tensor([smallest / 2**0.5 * 0.99, 0.0])
        assert torch.equal(q(tiny), torch.zeros(2))  # below the smallest level: code 0
    assert float(q(torch.tensor([scale * 7]))) == pytest.approx(scale)  # clipped
    if not signed:
        assert float(q(torch.tensor([-1.0]))) == 0.0


@pytest.mark.parametrize("cls", [LinearQuantizer, LogQuantizer])
def test_codes_and_values_round_trip(cls: type) -> None:
    q = cls(4)
    q.initialise(sample())
    q.eval()
    codes = q.codes(sample(seed=1))
    assert int(codes.abs().max()) <= 7
    assert torch.equal(q.codes(q.values(codes)), codes)


def test_linear_ste_gradients_match_lsq() -> None:
    bits, step = 3, 0.5
    q = LinearQuantizer(bits)
    with_step(q, step)
    q.train()
    v = torch.tensor([0.1, -0.7, 0.74, 1.4, 5.0, -9.0], requires_grad=True)
    q(v).sum().backward()
    qmax = qmax_of(bits, True)
    inside = (v.detach() / step).abs() <= qmax
    assert torch.equal(v.grad, inside.float())  # straight through inside, 0 when clipped
    r = v.detach() / step
    expected = torch.where(inside, torch.round(r) - r, torch.sign(r) * qmax).sum()
    g = 1 / math.sqrt(v.numel() * qmax)  # LSQ's gradient scale
    assert float(q.step.grad) == pytest.approx(float(expected) * g, rel=1e-5)


def test_log_ste_gradients() -> None:
    q = LogQuantizer(3)
    with_step(q, 2.0)
    q.train()
    v = torch.tensor([0.3, -1.1, 1.9, 3.0, -4.0], requires_grad=True)
    out = q(v)
    out.sum().backward()
    inside = v.detach().abs() <= 2.0
    assert torch.equal(v.grad, inside.float())
    r = (v.detach() / 2.0).clamp(-1, 1)
    expected = float((out.detach() / 2.0 - r).sum())
    g = 1 / math.sqrt(v.numel() * qmax_of(3, True))
    assert float(q.step.grad) == pytest.approx(expected * g, rel=1e-5, abs=1e-7)


def test_batched_quantizer_scales_by_one_samples_elements() -> None:
    q = LinearQuantizer(4, signed=False, batched=True)
    with_step(q, 0.1)
    q.train()
    x = torch.rand(8, 5) * 3
    q(x).sum().backward()
    r = x / 0.1
    expected = torch.where(r <= 15, torch.round(r) - r, torch.full_like(r, 15.0)).sum()
    assert float(q.step.grad) == pytest.approx(float(expected) / math.sqrt(5 * 15), rel=1e-4)


def test_initialisation_rules_and_lazy_start() -> None:
    v = sample(scale=0.2)
    v[::2] = 0.0  # pruned zeros do not shrink the LSQ step
    q = LinearQuantizer(4)
    assert float(q.step.detach()) == 0.0
    q.eval()
    q(v)  # the first tensor seen sets the step
    nonzero = v[v != 0].abs().mean()
    assert float(q.step.detach()) == pytest.approx(2 * float(nonzero) / math.sqrt(7), rel=1e-5)
    log = LogQuantizer(4)
    log.initialise(v)
    assert float(log.step.detach()) == pytest.approx(float(v.abs().max()))
    for cls in (LinearQuantizer, LogQuantizer):
        rule, mse = cls(3, init="lsq"), cls(3, init="mse")
        rule.initialise(v)
        mse.initialise(v)
        errors = [float(((m.eval()(v) - v) ** 2).sum()) for m in (rule, mse)]
        assert errors[1] <= errors[0]


def test_learning_the_step_lowers_the_error() -> None:
    v = sample(1000, scale=1.0)
    q = LinearQuantizer(3)
    with torch.no_grad():
        q.step.fill_(0.05)  # far too small: most values clip
    start = float(((q.eval()(v) - v) ** 2).mean())
    q.train()
    for _ in range(50):  # plain gradient descent on the step
        q.step.grad = None
        ((q(v) - v) ** 2).mean().backward()
        with torch.no_grad():
            q.step -= 0.1 * q.step.grad
    assert float(((q.eval()(v) - v) ** 2).mean()) < 0.5 * start


def test_training_forward_equals_eval_forward() -> None:
    for cls in (LinearQuantizer, LogQuantizer):
        q = cls(3)
        v = sample()
        q.initialise(v)
        q.train()
        trained = q(v.clone().requires_grad_())
        assert torch.allclose(trained.detach(), q.eval()(v), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bad_bits_are_refused(bits: object) -> None:
    with pytest.raises(RecipeError, match="bits"):
        LinearQuantizer(bits)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="quantizer"):
        make_quantizer("ternary", 3)


def test_round_log2_reads_the_float_bits_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.exp2(torch.rand(20_000, generator=gen) * 120 - 60)
    assert torch.equal(round_log2(v), torch.round(torch.log2(v.double())).to(torch.int32))
    edges = torch.tensor([2**0.5 * 0.9999999, 2**0.5 * 1.0000001, 1.0, 0.75, 2.0**-126])
    assert round_log2(edges).tolist() == [0, 1, 0, 0, -126]
    assert int(round_log2(torch.tensor([0.0, 1e-45]))[0]) < -1000  # zero and denormals
