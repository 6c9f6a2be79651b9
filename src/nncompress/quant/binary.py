"""The ``binarize`` technique: 1-bit weights (and optionally activations) for Linear and
convolution layers; importing this module registers it and the frozen layer types.

Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016), "Binarized neural networks:
training deep neural networks with weights and activations constrained to +1 or -1"
(BinaryConnect / BNN) and Rastegari, Ordonez, Redmon & Farhadi (2016), "XNOR-Net:
ImageNet classification using binary convolutional neural networks".

1. Analysis, before anything changes: one forward pass on real samples lists the weight
   layers in the order they run. Plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` called
   as modules (zero padding) can be binarized; every other layer with weights (recurrent
   layers, attention, embeddings, norms, factorised or already-binary layers) is named in
   the log with the reason it stays in float. The first / last binarizable layers stay in
   float with ``keep_first`` / ``keep_last`` (BNN and XNOR-Net keep both). A config that
   leaves nothing to binarize raises before the model is touched.
2. Swap: each selected layer becomes a :class:`~nncompress.quant.binary_layers.BinaryLinear`
   (or Conv) whose latent float weights start from the trained ones. With ``activations``
   its input is binarized as ``sign(x - t)``, ``t`` per input feature / channel started at
   the input's mean over a few training batches and then learned -- except for the layer
   the data reaches first (the first weight layer run), whose input stays real, as in BNN.
3. Train ``epochs`` with ``ctx.fine_tune`` at ``lr`` (STE; latent weights clipped to
   [-1, 1] at every training step; stochastic binarization seeded by ``seed``).
4. Freeze: every binary layer becomes its ``Frozen*`` form (int8 +-1 weights, stored at 1
   bit per weight by the container's 2-value codebook, plus float ``alpha`` / ``bias`` /
   ``threshold``). Layers with binary inputs run the XNOR-popcount kernel in eval on CPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from nncompress import inputs
from nncompress.data import example_input
from nncompress.errors import ConstraintError, UnsupportedLayerError
from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    bool_arg,
    int_arg,
    ints_arg,
    padding_arg,
    positive_arg,
)
from nncompress.kernels import xnor
from nncompress.quant.binary_layers import (
    BinaryConv1d,
    BinaryConv2d,
    BinaryLinear,
    FrozenBinaryConv1d,
    FrozenBinaryConv2d,
    FrozenBinaryLinear,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["BINARY_FORMS", "BinarizeConfig", "BinaryPlan", "binarize", "plan_binarization"]

#: layer type -> its training (latent-weight) binary form; exact types only.
BINARY_FORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: BinaryLinear, nn.Conv1d: BinaryConv1d, nn.Conv2d: BinaryConv2d}
_BINARY = (BinaryLinear, BinaryConv1d, BinaryConv2d, FrozenBinaryLinear, FrozenBinaryConv1d,
           FrozenBinaryConv2d)
#: why a layer type with weights stays in float (matched along the MRO, first hit wins).
_REASONS: tuple[tuple[type[nn.Module], str], ...] = (
    (_BINARY, "already binary"),  # type: ignore[misc]
    (nn.RNNBase, "recurrent layer: no binary form (its gates need real-valued products)"),
    (nn.RNNCellBase, "recurrent cell: no binary form"),
    (nn.MultiheadAttention, "attention: no binary form"),
    (nn.Embedding, "embedding: a look-up, no products to binarize"),
    (nn.EmbeddingBag, "embedding: a look-up, no products to binarize"),
    (nn.modules.batchnorm._NormBase, "normalisation layer, kept in float"),
    (nn.LayerNorm, "normalisation layer, kept in float"),
    (nn.GroupNorm, "normalisation layer, kept in float"),
)
CALIBRATION_BATCHES = 4


class BinarizeConfig(TechniqueConfig):
    """``activations``: binarize layer inputs too (BNN / XNOR-Net; runs the XNOR kernel),
    else weights only (BinaryConnect). ``scaling``: per-output-channel ``alpha = mean|W|``.
    ``stochastic``: hard-sigmoid stochastic binarization while training. ``keep_first`` /
    ``keep_last``: leave the first / last binarizable layer in float. ``epochs``, ``lr``,
    ``lr_schedule``: training with the straight-through estimator (cosine annealing lets
    the last epochs settle the signs); ``seed``: the stochastic draws."""

    activations: bool = True
    scaling: bool = True
    stochastic: bool = False
    keep_first: bool = True
    keep_last: bool = True
    epochs: int = Field(default=3, ge=0, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


@dataclass(frozen=True)
class BinaryPlan:
    """What :func:`plan_binarization` found: ``selected`` layer names in run order with
    ``real_input`` those whose input is the data (weights-only there); ``kept`` / ``skipped``:
    ``(name, reason)`` of layers left in float."""

    selected: tuple[str, ...]
    real_input: frozenset[str]
    kept: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]


def _reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be binarized, or ``None`` if it can."""
    if type(module) in BINARY_FORMS:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            return f"padding_mode {module.padding_mode!r}: the binary forms pad with zeros"
        return None
    for cls, why in _REASONS:
        if isinstance(module, cls):
            return why
    return f"type {type(module).__name__} has no binary form"


def _run_order(model: nn.Module, x: inputs.Inputs) -> tuple[list[str], set[str]]:
    """Names of modules owning weights, in the order their first calls finished, and the
    binarizable ones whose call began before any weight layer had run (data inputs)."""
    order: list[str] = []
    data_fed: set[str] = set()
    handles = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue

        def before(_m: nn.Module, _a: tuple, name: str = name) -> None:
            if not order:
                data_fed.add(name)

        def after(_m: nn.Module, _a: tuple, _o: object, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles += [module.register_forward_pre_hook(before),
                    module.register_forward_hook(after)]
    inputs.observe(model, [x], handles)
    return order, data_fed


def plan_binarization(model: nn.Module, x: inputs.Inputs,
                      config: BinarizeConfig) -> BinaryPlan:
    """Which layers ``config`` binarizes in ``model`` (analysis only; nothing changes)."""
    order, data_fed = _run_order(model, x)
    modules = dict(model.named_modules())
    skipped = [(n, why) for n in order if (why := _reason(modules[n])) is not None]
    for name, module in modules.items():
        if type(module) in BINARY_FORMS and name not in order:
            skipped.append((name, "never called as a module (its parent uses its weight "
                                  "directly)"))
    candidates = [n for n in order if _reason(modules[n]) is None]
    kept: list[tuple[str, str]] = []
    if candidates and config.keep_first:
        kept.append((candidates.pop(0), "first layer kept in float (keep_first)"))
    if candidates and config.keep_last:
        kept.append((candidates.pop(), "last layer kept in float (keep_last)"))
    return BinaryPlan(tuple(candidates), frozenset(data_fed & set(candidates)),
                      tuple(kept), tuple(skipped))


def _refuse(model: nn.Module, plan: BinaryPlan) -> None:
    if plan.selected:
        return
    what = type(model).__name__
    if not plan.kept:
        raise UnsupportedLayerError(f"binarize: model {what} has no Linear/Conv1d/Conv2d "
                                    "layer it can binarize")
    names = ", ".join(n for n, _ in plan.kept)
    raise ConstraintError(f"binarize selects nothing in model {what}: its only binarizable "
                          f"layers ({names}) are kept by keep_first/keep_last")


def _calibrate(model: nn.Module, ctx: Context, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-feature (Linear) / per-channel (Conv) mean input of each named layer over the
    first :data:`CALIBRATION_BATCHES` training batches in the loader's order for ``ctx.seed``
    (eval mode, no gradients; labels are never read)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().float()
            flat = x.reshape(-1, x.shape[-1]) if isinstance(m, nn.Linear) else \
                x.transpose(0, 1).reshape(x.shape[1], -1).T
            sums[name] = sums.get(name, 0) + flat.sum(dim=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    from nncompress.train import reseed_loader

    reseed_loader(ctx.data.train, ctx.seed)   # the same batches whatever ran before
    batches = (x for x, _y in itertools.islice(ctx.data.train, CALIBRATION_BATCHES))
    inputs.observe(model, batches, handles)
    return {n: sums[n] / max(counts[n], 1) for n in names if n in sums}


def _latent(module: nn.Module, activations: bool, config: BinarizeConfig,
            seed: int) -> nn.Module:
    """The training binary form of ``module`` with its trained weights copied in."""
    options = dict(activations=activations, scaling=config.scaling,
                   stochastic=config.stochastic, seed=seed)
    m = module
    if isinstance(m, nn.Linear):
        new: nn.Module = BinaryLinear(m.in_features, m.out_features, m.bias is not None,
                                      **options)
    else:
        new = BINARY_FORMS[type(m)](m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                    m.padding, m.dilation, m.groups, m.bias is not None,
                                    **options)
    new.load_state_dict(m.state_dict(), strict=False)
    return new.to(m.weight.device)


def _note_plan(ctx: Context, plan: BinaryPlan) -> None:
    for name, why in (*plan.kept, *plan.skipped):
        ctx.note(f"binarize: {name} not binarized: {why}")


def binarize(model: nn.Module, config: BinarizeConfig, ctx: Context) -> nn.Module:
    """Binarize the selected Linear / Conv layers of ``model`` in place, train them with
    the straight-through estimator, and freeze them to 1-bit weights (see the module doc)."""
    plan = plan_binarization(model, example_input(ctx.data, 8), config)
    _refuse(model, plan)
    _note_plan(ctx, plan)
    binary_in = [n for n in plan.selected if config.activations and n not in plan.real_input]
    means = _calibrate(model, ctx, binary_in)
    for i, name in enumerate(plan.selected):
        latent = _latent(model.get_submodule(name), name in binary_in, config,
                         config.seed * 1009 + i)
        if name in means and latent.threshold is not None:
            with torch.no_grad():
                latent.threshold.copy_(means[name])
        model.set_submodule(name, latent)
        if ctx.masks.pop(f"{name}.weight", None) is not None:
            ctx.note(f"binarize: {name}: its pruning mask is dropped (a binary weight is "
                     "+-1, never 0)")
    ctx.fine_tune(model, epochs=config.epochs, lr=config.lr, desc="binarize",
                  lr_schedule=config.lr_schedule)
    for name in plan.selected:
        model.set_submodule(name, model.get_submodule(name).freeze())
    _note_result(ctx, plan, binary_in)
    return model


def _note_result(ctx: Context, plan: BinaryPlan, binary_in: list[str]) -> None:
    weights_only = [n for n in plan.selected if n not in binary_in]
    if binary_in:
        status = xnor.kernel_status()
        ctx.note(f"binarize: 1-bit weights and inputs (XNOR-popcount, kernel: {status}): "
                 f"{', '.join(binary_in)}")
    if weights_only:
        ctx.note(f"binarize: 1-bit weights, real-valued inputs: {', '.join(weights_only)}")


TECHNIQUES.register("binarize", Technique(
    name="binarize",
    category="bits-precision",
    paper="Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016): Binarized neural "
          "networks; Rastegari, Ordonez, Redmon & Farhadi (2016): XNOR-Net",
    summary="1-bit weights (and inputs) for Linear/Conv layers, trained with the "
            "straight-through estimator; XNOR-popcount kernel at inference.",
    config=BinarizeConfig,
    apply=binarize,
))

_FROZEN_CONV = {"in_channels": positive_arg, "out_channels": positive_arg,
                "kernel_size": ints_arg, "stride": ints_arg, "padding": padding_arg,
                "dilation": ints_arg, "groups": positive_arg, "bias": bool_arg,
                "activations": bool_arg}
LAYER_TYPES.register("FrozenBinaryLinear", LayerType(FrozenBinaryLinear, {
    "in_features": int_arg, "out_features": int_arg, "bias": bool_arg,
    "activations": bool_arg}))
LAYER_TYPES.register("FrozenBinaryConv1d", LayerType(FrozenBinaryConv1d, dict(_FROZEN_CONV)))
LAYER_TYPES.register("FrozenBinaryConv2d", LayerType(FrozenBinaryConv2d, dict(_FROZEN_CONV)))
