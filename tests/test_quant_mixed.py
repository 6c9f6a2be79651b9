"""Mixed precision (HAWQ): Hutchinson traces, the exact allocator, budgets, the technique,
the Pareto helper and its plot."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import formats, models
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, RecipeError
from nncompress.quant import mixed
from nncompress.quant.lowbit_layers import FrozenLowBitLinear
from nncompress.quant.mixed import (
    MixedPrecisionConfig,
    allocate,
    choose_bits,
    mixed_precision,
    training_batches,
)
from nncompress.quant.mixed_pareto import pareto, uniform_bytes
from nncompress.quant.mixed_sensitivity import hessian_traces, hutchinson_traces
from nncompress.recipe import Recipe, Stage
from nncompress.report import write_report
from nncompress.report.pareto import PARETO_PNG, pareto_section
from nncompress.technique import TECHNIQUES, Context
from nncompress.train import fit

LAYERS = ("layers.fc1", "layers.fc2", "layers.fc3")
Trained = tuple[nn.Module, Dataset]


def _quadratic(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g)
    return m @ m.T / n + torch.eye(n)


def test_hutchinson_trace_of_a_known_quadratic() -> None:
    a = _quadratic(20, 0)
    w1, w2 = torch.randn(8, requires_grad=True), torch.randn(3, 4, requires_grad=True)

    def loss() -> torch.Tensor:
        w = torch.cat([w1, w2.reshape(-1)])
        return 0.5 * w @ a @ w + (w * torch.linspace(-1, 1, 20)).sum()

    exact = [float(a[:8, :8].trace()), float(a[8:, 8:].trace())]  # the two diagonal blocks
    got = hutchinson_traces(loss, [w1, w2], samples=1000,
                            generator=torch.Generator().manual_seed(1))
    for g, e in zip(got, exact, strict=True):
        assert g == pytest.approx(e, rel=0.03), (got, exact)
    # a diagonal Hessian is exact from one Rademacher vector
    d = torch.linspace(1, 3, 5)
    v = torch.randn(5, requires_grad=True)
    one = hutchinson_traces(lambda: 0.5 * (d * v * v).sum(), [v], samples=1,
                            generator=torch.Generator().manual_seed(0))
    assert one[0] == pytest.approx(float(d.sum()), rel=1e-6)


def test_hessian_traces_match_the_exact_hessian_of_a_small_net() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    names = ["0", "2"]
    traces = hessian_traces(net, names, [(x, y)], samples=2000, seed=0)
    for name in names:
        layer = net.get_submodule(name)
        w0 = layer.weight.detach().clone()

        def loss_of(w: torch.Tensor, key: str = f"{name}.weight") -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(net, {key: w}, (x,)), y)
        exact = torch.autograd.functional.hessian(loss_of, w0)
        true = float(exact.reshape(w0.numel(), w0.numel()).trace())
        assert traces[name] == pytest.approx(true, rel=0.15), (name, traces[name], true)
        assert torch.equal(layer.weight, w0) and layer.weight.grad is None


def test_hessian_traces_through_pytorch_attention() -> None:
    """nn.TransformerEncoder's fused attention kernels have no double backward; the traces
    run it on the math kernel instead of refusing the model (once a one-line refusal)."""
    from nncompress.models.plain import Encoder

    torch.manual_seed(0)
    net = Encoder(dim=16).eval()
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    names = ["embed", "encoder.layers.0.linear1", "head"]
    traces = hessian_traces(net, names, [(x, y)], samples=4, seed=0)
    assert set(traces) == set(names) and all(math.isfinite(t) for t in traces.values())
    assert traces["head"] > 0  # convex in the last layer


@pytest.mark.parametrize("seed", range(6))
def test_allocator_is_optimal_against_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    widths = (2, 3, 4, 6, 8)
    names = [f"l{i}" for i in range(5)]
    costs = {n: {b: int(torch.randint(5, 50, ()).item() * b // 2) for b in widths}
             for n in names}
    scores = {n: {b: float(torch.rand((), generator=g)) * 2.0 ** -b for b in widths}
              for n in names}
    if seed % 2:  # a layer with fewer allowed widths, scores not monotone in the bits
        costs["l0"] = {8: 40}
        scores["l0"] = {8: 0.3}
        scores["l1"] = {b: float(torch.rand((), generator=g)) for b in widths}
    low = sum(min(c.values()) for c in costs.values())
    high = sum(max(c.values()) for c in costs.values())
    for budget in (low, (2 * low + high) // 3, (low + high) // 2, high):
        got = allocate(costs, scores, budget)
        best = min((sum(scores[n][b] for n, b in zip(names, combo, strict=True)), combo)
                   for combo in itertools.product(*(costs[n] for n in names))
                   if sum(costs[n][b] for n, b in zip(names, combo, strict=True)) <= budget)
        assert got.score == pytest.approx(best[0], abs=1e-12)
        assert got.bytes == sum(costs[n][b] for n, b in got.bits.items()) <= budget
        assert got.score == pytest.approx(sum(scores[n][b] for n, b in got.bits.items()))
    with pytest.raises(ConstraintError, match=f"budget {low - 1} B"):
        allocate(costs, scores, low - 1)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Dataset]:
    data = tiny_data(features=12)
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[32, 16])
    fit(model, data, epochs=20, lr=1e-2, progress=False)
    return model, data


def _trained_mlp(trained: Trained) -> tuple[nn.Module, Dataset]:
    """A fresh copy of the module's trained MLP (12 -> 32 -> 16 -> 3) and its data."""
    return copy.deepcopy(trained[0]), trained[1]


def test_impossible_budget_raises_before_touching_the_model(
        trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _trained_mlp(trained)
    before = copy.deepcopy(model.state_dict())

    def no_sensitivity(*args: object, **kwargs: object) -> None:
        raise AssertionError("sensitivity measured for an impossible budget")

    monkeypatch.setattr(mixed, "hessian_traces", no_sensitivity)
    ctx = Context(data, progress=False)
    with pytest.raises(ConstraintError, match="budget 50 B is below") as err:
        mixed_precision(model, MixedPrecisionConfig(budget_bytes=50), ctx)
    assert "\n" not in str(err.value)
    with pytest.raises(ConstraintError, match="budget"):
        mixed_precision(model, MixedPrecisionConfig(average_bits=1.5, cost="packed"), ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not FrozenLowBitLinear for m in model.modules())


def test_config_needs_exactly_one_budget() -> None:
    with pytest.raises(RecipeError, match="exactly one of budget_bytes"):
        Recipe("bad", (Stage.technique("mixed_precision"),))
    with pytest.raises(RecipeError, match="exactly one of"):
        Recipe("bad", (Stage.technique("mixed_precision", budget_bytes=10, average_bits=3),))
    with pytest.raises(RecipeError, match="candidates"):
        Recipe("bad", (Stage.technique("mixed_precision", budget_bytes=10, candidates=[1]),))
    assert "mixed_precision" in TECHNIQUES
    ok = Recipe("ok", (Stage.technique("mixed_precision", average_bits=3, candidates=[2, 4]),))
    assert ok.stages[0].name == "mixed_precision"


def test_budgets_resolve_from_ratio_and_average_bits(trained: Trained) -> None:
    model, data = _trained_mlp(trained)
    batches = training_batches(data, 1, 0)
    weights = sum(model.get_submodule(n).weight.numel() for n in LAYERS)
    avg = choose_bits(model, MixedPrecisionConfig(average_bits=3.5, cost="packed"), batches,
                      seed=0)
    assert avg.allocation.budget == math.floor(3.5 * weights / 8)
    assert avg.allocation.bytes <= avg.allocation.budget
    assert sum(model.get_submodule(n).weight.numel() * b
               for n, b in avg.allocation.bits.items()) <= 3.5 * weights
    ratio = choose_bits(model, MixedPrecisionConfig(budget_ratio=1.0, cost="packed",
                                                    keep_last=True), batches, seed=0)
    assert ratio.allocation.budget == weights  # every layer at 8 bits: one byte a weight
    assert set(ratio.allocation.bits.values()) == {8} and ratio.costs["layers.fc3"] == {8: 48}


@pytest.mark.parametrize("cost", ["packed", "encoded"])
def test_budget_is_respected_by_the_real_nnc_bytes(trained: Trained, cost: str,
                                                   tmp_path: Path) -> None:
    model, data = _trained_mlp(trained)
    config = MixedPrecisionConfig(average_bits=3, cost=cost, epochs=1, lr=1e-3)
    budget = choose_bits(model, config, training_batches(data, 1, 0), seed=0).allocation.budget
    ctx = Context(data, progress=False)
    out = mixed_precision(model, config, ctx)
    path = tmp_path / "m.nnc"
    nc.save(out, path)
    info = formats.inspect(path)
    codes = {t.name: t for t in info.tensors if t.dtype == "int8"}
    assert set(codes) == {f"{n}.weight" for n in LAYERS}
    stored = sum(t.stored_bytes for t in codes.values())
    # the budget covers the codes' payload; each tensor's table entry is header overhead
    assert stored <= budget * (1.0 if cost == "packed" else 1.02), (stored, budget)
    assert info.total_bytes - info.header_bytes >= stored
    bits = {n: out.get_submodule(n).weight_bits for n in LAYERS}
    assert len(set(bits.values())) > 1  # mixed, not uniform
    log = "\n".join(ctx.log)
    assert "B predicted" in log and "weight codes stored after training" in log
    for name, b in bits.items():
        assert f"{name}: {b} bits" in log
    again = nc.load(path)
    x = torch.randn(5, 1, 12)
    with torch.no_grad():
        assert torch.equal(again(x), out(x))


def test_mixed_precision_is_deterministic_with_a_seed(trained: Trained) -> None:
    model, data = _trained_mlp(trained)
    config = MixedPrecisionConfig(average_bits=3, epochs=1, lr=1e-3, seed=3, samples=4)
    runs = []
    for _ in range(2):
        ctx = Context(data, seed=99, progress=False)
        out = mixed_precision(copy.deepcopy(model), config, ctx)
        runs.append((ctx.log, out.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    batches = training_batches(data, 2, 0)
    a, b = (choose_bits(model, config, batches, seed=s).traces for s in (0, 1))
    assert a == choose_bits(model, config, batches, seed=0).traces and a != b


def test_accuracy_sensitivity_restores_the_weights(trained: Trained) -> None:
    model, data = _trained_mlp(trained)
    before = copy.deepcopy(model.state_dict())
    config = MixedPrecisionConfig(average_bits=4, sensitivity="accuracy", candidates=[2, 8])
    choice = choose_bits(model, config, training_batches(data, 2, 0), seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not choice.traces
    for per in choice.scores.values():
        assert set(per) == {2, 8} and all(v >= 0 for v in per.values())
        assert per[2] >= per[8] - 1e-9


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the empty rows' plots
def test_pareto_points_and_the_report_section(trained: Trained, tmp_path: Path) -> None:
    model, data = _trained_mlp(trained)
    config = MixedPrecisionConfig(budget_ratio=1.0, epochs=1, lr=1e-3, samples=4)
    budget = uniform_bytes(model, data, 3, config)
    points = pareto(model, data, [budget], uniform=[3], config=config)
    assert [p.kind for p in points] == ["uniform", "mixed"]
    uni, mix = points
    assert dict(uni.bits) == dict.fromkeys(LAYERS, 3)
    assert mix.budget == budget and set(dict(mix.bits)) == set(LAYERS)
    assert all(0.0 <= p.accuracy <= 1.0 and p.bytes > p.code_bytes > 0 for p in points)
    assert mix.code_bytes <= budget * 1.02
    section = pareto_section({"mlp (tiny)": points}, tmp_path)
    assert (tmp_path / PARETO_PNG).stat().st_size > 1000
    assert f"]({PARETO_PNG})" in section and "uniform 3-bit" in section
    paths = write_report(tmp_path, "t", [], {}, sections=[section])
    assert PARETO_PNG in paths.markdown.read_text()


def test_recipe_stage_composes_after_pruning(trained: Trained, tmp_path: Path) -> None:
    model, data = _trained_mlp(trained)
    recipe = Recipe("prune-mixed", (
        Stage.technique("magnitude_prune", sparsity=0.7, steps=1, epochs_per_step=1),
        Stage.technique("mixed_precision", average_bits=2.5, epochs=1, lr=1e-3, samples=4)))
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    fc1 = result.model.get_submodule("layers.fc1")
    assert isinstance(fc1, FrozenLowBitLinear)
    assert float((fc1.weight == 0).float().mean()) >= 0.65  # pruned weights stayed code 0
    assert any("mixed_precision: layers.fc1:" in line for line in result.log)
    path = tmp_path / "pm.nnc"
    nc.save(result.model, path)
    stored = sum(t.stored_bytes for t in formats.inspect(path).tensors if t.dtype == "int8")
    weights = sum(result.model.get_submodule(n).weight.numel() for n in LAYERS)
    assert stored <= 1.02 * 2.5 * weights / 8  # the encoded cost sees the sparsity
