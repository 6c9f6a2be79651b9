"""The ``mixed_precision`` technique: per-layer weight widths for a size budget (HAWQ).

Dong, Yao, Gholami, Mahoney & Keutzer (2019), "HAWQ: Hessian AWare Quantization of neural
networks with mixed-precision"; the measure of HAWQ-V2 (Dong et al. 2020) and the
objective of HAWQ-V3 (Yao et al. 2021): choose each quantized layer's weight width ``b_l``
from ``candidates`` to minimise ``sum_l Omega_l(b_l)`` subject to ``sum_l bytes_l(b_l) <=
budget``, with ``Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` (Hutchinson's trace
estimate; :mod:`nncompress.quant.mixed_sensitivity`) or, with ``sensitivity: accuracy``,
the measured accuracy drop of quantizing that layer alone at ``b`` bits.

Steps of :func:`mixed_precision`:

1. on a copy of the model (the model itself is not touched until step 4): the layers the
   ``lowbit`` technique would quantize (:func:`~nncompress.quant.lowbit.plan_layers`, minus
   ``exclude``; ``keep_first`` / ``keep_last`` pin the first / last at 8 bits), the bytes
   each costs at each width (``cost: encoded``: the codes in the smallest lossless
   encoding the container would pick, :func:`~nncompress.quant.lowbit.code_bytes`, which
   sees pruning and entropy coding; ``packed``: ``ceil(n_l * b / 8)``, an upper bound of
   what is stored), and the budget (``budget_bytes``; ``budget_ratio`` of every layer at
   8 bits; or ``average_bits`` per weight: ``floor(average_bits * sum n_l / 8)``). A
   budget below every layer at its smallest width raises ``ConstraintError`` here;
2. the sensitivity table ``Omega_l(b)`` on a few training batches (seeded);
3. the exact allocation (:func:`allocate`);
4. the ``lowbit`` technique with those widths (``bits: {layer: b}``), its fine-tuning and
   freezing; the chosen widths, the predicted bytes and the bytes actually stored after
   training go to the log.

Only weight widths are chosen: with ``activation_bits`` every quantized layer's inputs get
that width (as in ``lowbit``), which the sensitivity measure does not include. The budget
covers the quantized layers' weight codes only: biases, steps, float layers and
the file's header come on top (the same for every allocation). With ``cost: encoded`` the
bytes are those of the codes the quantizer starts from; fine-tuning moves a few codes,
so entropy-coded sizes can drift slightly (the log says by how much); ``packed`` bounds
them exactly. :func:`pareto` measures test accuracy against file bytes for several budgets
and uniform widths (:mod:`nncompress.quant.mixed_pareto`; plotted by
:mod:`nncompress.report.pareto`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from nncompress import inputs
from nncompress.data import Dataset
from nncompress.errors import ConstraintError, RecipeError
from nncompress.measure.quality import soft_labels
from nncompress.quant.lowbit import KEEP_BITS, LowBitConfig, lowbit, plan_layers
from nncompress.quant.lsq import MAX_BITS, MIN_BITS
from nncompress.quant.mixed_sensitivity import (
    Batch,
    accuracy_drops,
    hessian_traces,
    perturbations,
    quantize,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["Allocation", "MixedChoice", "MixedPrecisionConfig", "allocate", "choose_bits",
           "lowbit_config", "minimum_bytes", "mixed_precision", "probe_copy",
           "stored_code_bytes", "training_batches", "uniform_bits"]

Bits = Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)]
Patterns = Annotated[tuple[str, ...], Field(strict=False)]
Widths = Annotated[tuple[Bits, ...], Field(strict=False, min_length=1)]
Table = dict[str, dict[int, int]]
_BUDGETS = ("budget_bytes", "budget_ratio", "average_bits")


class MixedPrecisionConfig(TechniqueConfig):
    """``mixed_precision`` parameters.

    The budget, exactly one of: ``budget_bytes`` (bytes of the quantized layers' weight
    codes), ``budget_ratio`` (of those bytes with every layer at 8 bits) or
    ``average_bits`` (per weight). ``candidates``: the widths to choose from;
    ``sensitivity``: ``hessian`` (HAWQ-V2's Omega) or ``accuracy`` (measured drop);
    ``samples``: Rademacher vectors per batch; ``batches``: training batches measured;
    ``cost``: ``encoded`` or ``packed`` (see the module); ``keep_first`` / ``keep_last``:
    pin the first / last quantized layer at 8 bits. The rest are the ``lowbit``
    technique's (``activation_bits``, ``quantizer``, ``exclude``, ``init``,
    ``calibration``, ``epochs``, ``lr``); ``seed``: None uses the run's seed.
    """

    budget_bytes: int | None = Field(default=None, ge=1)
    budget_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    average_bits: float | None = Field(default=None, ge=1.0, le=MAX_BITS)
    candidates: Widths = (2, 3, 4, 6, 8)
    sensitivity: Literal["hessian", "accuracy"] = "hessian"
    samples: int = Field(default=16, ge=1, le=10_000)
    batches: int = Field(default=2, ge=1, le=1_000)
    cost: Literal["encoded", "packed"] = "encoded"
    keep_first: bool = False
    keep_last: bool = False
    activation_bits: Bits | None = None
    quantizer: Literal["linear", "log"] = "linear"
    exclude: Patterns = ()
    init: Literal["lsq", "mse"] = "mse"
    calibration: int = Field(default=256, ge=1, le=1_000_000)
    epochs: int = Field(default=3, ge=0, le=10_000)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    seed: int | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> MixedPrecisionConfig:
        given = [k for k in _BUDGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(_BUDGETS)}; got "
                             f"{', '.join(given) or 'none'}")
        return self


@dataclass(frozen=True)
class Allocation:
    """Chosen widths ``{layer: bits}``, their total bytes, summed sensitivity and the
    budget they were chosen for."""

    bits: dict[str, int]
    bytes: int
    score: float
    budget: int


def minimum_bytes(costs: Mapping[str, Mapping[int, int]]) -> int:
    """Bytes of the cheapest configuration (every layer at its cheapest width)."""
    return sum(min(c.values()) for c in costs.values())


def allocate(costs: Mapping[str, Mapping[int, int]], scores: Mapping[str, Mapping[int, float]],
             budget: int) -> Allocation:
    """The widths minimising ``sum scores[l][b_l]`` with ``sum costs[l][b_l] <= budget``,
    exactly (``costs``: ``{layer: {bits: bytes}}``, the allowed widths of each layer).

    A knapsack with one choice per layer, solved by dynamic programming over the layers
    that keeps only the Pareto frontier of partial configurations (bytes, score): one
    with more bytes and no lower score than another can never be completed better.
    Partial configurations that cannot fit the cheapest completion are dropped. Time
    ``O(L * B * P * log(B * P))``, memory ``O(L * P)``, for ``L`` layers, ``B`` widths and
    ``P <= min(B**L, budget + 1)`` frontier states (their bytes are distinct integers);
    brute force is ``O(B**L)``. Ties go to fewer bytes, then to the smaller widths tuple.
    """
    names = list(costs)
    if set(names) != set(scores):
        raise ValueError("costs and scores must name the same layers")
    rest = [0] * (len(names) + 1)
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(costs[names[i]].values())
    if rest[0] > budget:
        raise ConstraintError(f"mixed_precision: budget {budget} B is below the smallest "
                              f"configuration ({rest[0]} B)")
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, name in enumerate(names):
        room = budget - rest[i + 1]
        grown = sorted((c + cb, s + scores[name][b], (*chosen, b))
                       for c, s, chosen in frontier for b, cb in costs[name].items()
                       if c + cb <= room)
        frontier = []
        for state in grown:
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
    cost, score, chosen = min(frontier, key=lambda t: (t[1], t[0], t[2]))
    return Allocation(dict(zip(names, chosen, strict=True)), cost, score, budget)


@dataclass(frozen=True)
class MixedChoice:
    """What :func:`choose_bits` found: the allocation, the cost and sensitivity tables
    (``{layer: {bits: value}}``, the allowed widths only) and the Hessian traces
    ``{layer: Tr(H_l)}`` (empty for ``sensitivity: accuracy``)."""

    allocation: Allocation
    costs: Table
    scores: dict[str, dict[int, float]]
    traces: dict[str, float]


def _targets(model: nn.Module, config: MixedPrecisionConfig,
             x: inputs.Inputs) -> dict[str, tuple[int, ...]]:
    """``{layer: allowed widths}`` of the layers ``lowbit`` quantizes, in call order."""
    plans, _, _ = plan_layers(model, LowBitConfig(keep_first=False, keep_last=False,
                                                  exclude=config.exclude, recurrent=False), x)
    names = [p.name for p in plans]
    widths = tuple(sorted(set(config.candidates)))
    out = dict.fromkeys(names, widths)
    if config.keep_first:
        out[names[0]] = (KEEP_BITS,)
    if config.keep_last:
        out[names[-1]] = (KEEP_BITS,)
    return out


Quantized = dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


def _quantized(model: nn.Module, names: Sequence[str], widths: Sequence[int],
               config: MixedPrecisionConfig) -> Quantized:
    """``{layer: {bits: (codes, Q_b(W))}}`` (:func:`quantize`), computed once for the
    costs and the sensitivities."""
    return {n: {b: quantize(model.get_submodule(n).weight, b, quantizer=config.quantizer,
                            init=config.init) for b in widths} for n in names}


def _costs(quant: Quantized, config: MixedPrecisionConfig) -> Table:
    """``{layer: {bits: bytes}}`` by the config's cost model (``encoded``: the codes in
    their smallest lossless encoding, as :func:`~nncompress.quant.lowbit.code_bytes`)."""
    from nncompress.formats import choose_encoding

    if config.cost == "packed":
        return {n: {b: math.ceil(codes.numel() * b / 8) for b, (codes, _) in per.items()}
                for n, per in quant.items()}
    return {n: {b: choose_encoding(codes).size for b, (codes, _) in per.items()}
            for n, per in quant.items()}


def _budget(config: MixedPrecisionConfig, model: nn.Module, costs: Table) -> int:
    if config.budget_bytes is not None:
        return config.budget_bytes
    if config.budget_ratio is not None:
        return math.floor(config.budget_ratio * sum(c[KEEP_BITS] for c in costs.values()))
    weights = sum(model.get_submodule(n).weight.numel() for n in costs)
    return math.floor(float(config.average_bits or 0.0) * weights / 8)


def _scores(model: nn.Module, config: MixedPrecisionConfig, targets: Mapping[str, Sequence[int]],
            quant: Quantized, batches: Sequence[Batch],
            seed: int) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """The sensitivity table ``{layer: {bits: Omega}}`` and the traces (hessian only)."""
    values = {n: {b: quant[n][b][1] for b in targets[n]} for n in targets}
    if config.sensitivity == "accuracy":
        return accuracy_drops(model, values, batches), {}
    traces = hessian_traces(model, list(targets), batches, samples=config.samples, seed=seed)
    errors = perturbations(model, values)
    scores = {}
    for n, per in errors.items():
        mean = max(traces[n], 0.0) / model.get_submodule(n).weight.numel()
        scores[n] = {b: mean * e for b, e in per.items()}
    return scores, traces


def choose_bits(model: nn.Module, config: MixedPrecisionConfig, batches: Sequence[Batch], *,
                seed: int) -> MixedChoice:
    """Steps 1-3 of the module on ``model`` (whose weights it leaves as they were):
    targets, costs, budget (``ConstraintError`` before any sensitivity is measured when
    it cannot be met), sensitivities on ``batches`` and the exact allocation."""
    if not batches:
        raise RecipeError("mixed_precision: no training batches to measure sensitivity on")
    targets = _targets(model, config, inputs.concat([x for x, _ in batches]))
    widths = sorted({b for ws in targets.values() for b in ws} | {KEEP_BITS})
    quant = _quantized(model, list(targets), widths, config)
    table = _costs(quant, config)
    budget = _budget(config, model, table)
    costs = {n: {b: table[n][b] for b in targets[n]} for n in targets}
    smallest = minimum_bytes(costs)
    if smallest > budget:
        raise ConstraintError(
            f"mixed_precision: budget {budget} B is below the smallest configuration "
            f"({smallest} B: every layer at its smallest width of {list(config.candidates)})")
    scores, traces = _scores(model, config, targets, quant, batches, seed)
    return MixedChoice(allocate(costs, scores, budget), costs, scores, traces)


def training_batches(data: Dataset, count: int, seed: int) -> list[Batch]:
    """The first ``count`` training batches in the loader's order for ``seed``."""
    from nncompress.train import reseed_loader

    reseed_loader(data.train, seed)
    out: list[Batch] = []
    for x, y in data.train:
        out.append((x, y))
        if len(out) >= count:
            break
    return out


def probe_copy(model: nn.Module, ctx: Context) -> nn.Module:
    """A copy of ``model`` with the built-ins ``lowbit`` rewrites rewritten the same way."""
    from nncompress.modules import decompose

    probe, _ = decompose(copy.deepcopy(model), {k: v.clone() for k, v in ctx.masks.items()})
    return probe


def lowbit_config(config: MixedPrecisionConfig, bits: Mapping[str, int],
                  seed: int) -> LowBitConfig:
    """The ``lowbit`` config that trains ``bits`` (``{layer: b}``, every quantized layer)
    with ``config``'s training options."""
    return LowBitConfig(bits=dict(bits), keep_first=False, keep_last=False,
                        activation_bits=config.activation_bits, quantizer=config.quantizer,
                        exclude=config.exclude, init=config.init,
                        calibration=config.calibration, epochs=config.epochs, lr=config.lr,
                        seed=seed, recurrent=False)


def uniform_bits(model: nn.Module, config: MixedPrecisionConfig, x: inputs.Inputs,
                 bits: int) -> tuple[dict[str, int], int]:
    """Every quantized layer at ``bits`` (pinned layers at 8): ``{layer: bits}`` and the
    predicted bytes by the config's cost model (the budget at which mixed precision
    matches this uniform configuration)."""
    targets = _targets(model, config, x)
    chosen = {n: bits if len(ws) > 1 else ws[0] for n, ws in targets.items()}
    return chosen, sum(_costs(_quantized(model, [n], [b], config), config)[n][b]
                       for n, b in chosen.items())


def stored_code_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes the container stores for the named layers' weights (smallest encoding)."""
    from nncompress.formats import choose_encoding

    return sum(choose_encoding(model.get_submodule(n).weight.detach()).size for n in names)


def _note_choice(ctx: Context, config: MixedPrecisionConfig, choice: MixedChoice) -> None:
    alloc = choice.allocation
    how = ("Hessian trace" if config.sensitivity == "hessian" else "accuracy drop")
    ctx.note(f"mixed_precision: {how} sensitivity on {config.batches} training batch(es); "
             f"budget {alloc.budget} B of weight codes ({config.cost}); chosen "
             f"{alloc.bytes} B predicted, summed sensitivity {alloc.score:.4g}")
    for name, b in alloc.bits.items():
        trace = (f", Tr(H)={choice.traces[name]:.4g}" if name in choice.traces else "")
        ctx.note(f"mixed_precision: {name}: {b} bits, {choice.costs[name][b]} B predicted"
                 f"{trace}, sensitivity {choice.scores[name][b]:.4g}")


def mixed_precision(model: nn.Module, config: MixedPrecisionConfig, ctx: Context) -> nn.Module:
    """Choose per-layer weight widths for the budget, then run ``lowbit`` with them (see
    the module)."""
    seed = ctx.seed if config.seed is None else config.seed
    batches = soft_labels(training_batches(ctx.data, config.batches, seed),
                          ctx.teacher_model(model))
    choice = choose_bits(probe_copy(model, ctx), config, batches, seed=seed)
    _note_choice(ctx, config, choice)
    model = lowbit(model, lowbit_config(config, choice.allocation.bits, seed), ctx)
    stored = stored_code_bytes(model, list(choice.allocation.bits))
    ctx.note(f"mixed_precision: weight codes stored after training: {stored} B "
             f"(predicted {choice.allocation.bytes} B, budget {choice.allocation.budget} B)")
    return model


TECHNIQUES.register("mixed_precision", Technique(
    name="mixed_precision",
    category="bits-precision",
    paper="Dong, Yao, Gholami, Mahoney & Keutzer (2019): HAWQ: Hessian AWare Quantization "
          "of neural networks with mixed-precision; Dong et al. (2020): HAWQ-V2; Yao et al. "
          "(2021): HAWQ-V3",
    summary="Per-layer weight widths (default from 2, 3, 4, 6, 8 bits) minimising the "
            "summed Hessian-trace-weighted quantization error (or measured accuracy drop) "
            "under a byte budget, solved exactly; then low-bit fine-tuning with them.",
    config=MixedPrecisionConfig,
    apply=mixed_precision,
))
