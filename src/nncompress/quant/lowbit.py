"""The ``lowbit`` technique: Linear / Conv layers at 2-8 bits, trained, frozen to integer codes.

Hubara, Courbariaux, Soudry, El-Yaniv & Bengio (2017), "Quantized neural networks:
training neural networks with low precision weights and activations" (the family), with
the step learned by LSQ (Esser, McKinstry, Bablani, Appuswamy & Modha, 2020, "Learned step
size quantization") or power-of-two levels (Miyashita, Lee & Murmann, 2016, "Convolutional
neural networks using logarithmic data representation"); see :mod:`nncompress.quant.lsq`.

Steps of :func:`lowbit`:

1. built-ins that read their weights directly are rewritten (``modules.decompose``);
2. the plan (:func:`plan_layers`, nothing changed yet): every ``nn.Linear`` /
   ``nn.Conv1d`` / ``nn.Conv2d`` (exact types) the model's forward calls, minus
   ``exclude``; the first and last of them in call order at 8 bits with uniform levels
   (``keep_first`` / ``keep_last``; a power-of-two quantizer gains range, not precision,
   from more bits), ``bits: {layer: b}`` overriding any layer's weight bits; an input
   quantizer is unsigned when the layer's calibration inputs are all non-negative (after a
   ReLU), signed otherwise. The ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` layers it calls get
   ``bits.get(name, weight_bits)`` weight matrices, one step per matrix, biases, state and
   inputs float (:mod:`nncompress.quant.lowbit_rnn`: frozen back to the plain layer with
   its matrices on the grid, which the container stores as a codebook). Layers it does
   not handle (embeddings, norms, other parameters) stay float and are named in the log
   with the reason; an empty selection raises before the model is touched;
3. the layers become their low-bit training forms (weight steps from the weights, input
   steps from a calibration batch of training samples), the model is fine-tuned with
   ``ctx.fine_tune`` (pruning masks stay applied, so a pruned weight stays code 0) and
   each layer is frozen to int8 codes + steps (:mod:`nncompress.quant.lowbit_layers`).

Importing this module registers the frozen layer types in
:data:`nncompress.formats.layer_types.LAYER_TYPES` and the technique in ``TECHNIQUES``.
:func:`code_bytes` gives what a ``{layer: bits}`` configuration costs on disk (for mixed
precision).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from nncompress import inputs
from nncompress.errors import FormatError, RecipeError, UnsupportedLayerError
from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    bool_arg,
    choice_arg,
    int_arg,
    ints_arg,
    optional_arg,
    padding_arg,
    positive_arg,
)
from nncompress.quant import lowbit_rnn
from nncompress.quant.lowbit_layers import (
    LOW_BIT_OF,
    FrozenLowBitConv1d,
    FrozenLowBitConv2d,
    FrozenLowBitLinear,
    LowBitConv1d,
    LowBitConv2d,
    LowBitLinear,
    describe_bits,
    from_float,
)
from nncompress.quant.lowbit_rnn import RECURRENT
from nncompress.quant.lsq import INITS, MAX_BITS, MIN_BITS, QUANTIZERS, make_quantizer
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["FrozenLowBitConv1d", "FrozenLowBitConv2d", "FrozenLowBitLinear", "LayerPlan",
           "LowBitConfig", "LowBitConv1d", "LowBitConv2d", "LowBitLinear", "code_bytes",
           "lowbit", "plan_layers"]

Bits = Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)]
Patterns = Annotated[tuple[str, ...], Field(strict=False)]
KEEP_BITS = 8
#: Why a parameter-owning module stays float (first isinstance match).
FLOAT_REASONS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.RNNBase, nn.RNNCellBase), "recurrent layer: excluded, recurrent: false, or not "
                                   "exactly an nn.GRU / nn.LSTM / nn.RNN"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding table"),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm),
     "normalisation parameters"),
    ((nn.MultiheadAttention,), "attention with packed projections"),
    (tuple(LOW_BIT_OF), "excluded or not called by the model's forward"),
)


class LowBitConfig(TechniqueConfig):
    """``lowbit`` parameters.

    ``weight_bits`` / ``activation_bits`` (None: float inputs): 2..8; ``quantizer``:
    ``linear`` (LSQ) or ``log`` (powers of two); ``keep_first`` / ``keep_last``: the first /
    last quantized layer in call order at 8 bits, uniform; ``bits``: ``{layer: weight bits}``
    overriding all of these for a layer; ``exclude``: fnmatch patterns of layers left
    float; ``init``: the steps' start (``lsq`` rule or least-squared-error ``mse``);
    ``calibration``: training samples that set the input steps and signs; ``epochs`` /
    ``lr``: fine-tuning with fake quantization; ``seed``: None uses the run's seed;
    ``recurrent``: the weight matrices of ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` layers go to
    ``weight_bits`` too (False: they stay float, as ``mixed_precision``'s allocation,
    which covers Linear / Conv layers only, keeps them).
    """

    weight_bits: Bits = 4
    activation_bits: Bits | None = None
    quantizer: Literal["linear", "log"] = "linear"
    keep_first: bool = True
    keep_last: bool = True
    bits: dict[str, Bits] = Field(default_factory=dict)
    exclude: Patterns = ()
    init: Literal["lsq", "mse"] = "mse"
    calibration: int = Field(default=256, ge=1, le=1_000_000)
    epochs: int = Field(default=3, ge=0, le=10_000)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    seed: int | None = None
    recurrent: bool = True


@dataclass(frozen=True)
class LayerPlan:
    """One layer to quantize: its quantizer kind, weight bits, input bits (None: float) and
    input sign."""

    name: str
    quantizer: str
    weight_bits: int
    activation_bits: int | None
    act_signed: bool


def _calls(model: nn.Module, names: list[str], x: inputs.Inputs) -> dict[str, bool]:
    """``{name: inputs all non-negative}`` of the listed layers the forward calls, in call
    order (first call)."""
    seen: dict[str, bool] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            nonneg = first is not None and (not first.numel() or bool(first.min() >= 0))
            seen[name] = seen.get(name, True) and nonneg
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    inputs.observe(model, [x], handles)
    return seen


def _float_notes(model: nn.Module, chosen: set[str]) -> list[str]:
    """One line per reason naming the parameter-owning modules that stay float."""
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if name in chosen or not own:
            continue
        reason = next((why for types, why in FLOAT_REASONS if isinstance(module, types)),
                      f"{type(module).__name__} parameters {', '.join(own)}")
        groups.setdefault(reason, []).append(name or "<model>")
    return [f"stays float ({why}): {', '.join(names)}" for why, names in groups.items()]


def _selected(model: nn.Module, types: Any, config: LowBitConfig) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in types
            and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]


def plan_layers(model: nn.Module, config: LowBitConfig, x: inputs.Inputs
                ) -> tuple[list[LayerPlan], list[str], list[str]]:
    """(the Linear / Conv layers to quantize in call order, notes on what stays float, the
    ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` layers (exact types; ``config.recurrent``) whose
    weight matrices go low-bit beside them, in call order), from one forward of ``x``;
    raises ``UnsupportedLayerError`` for an empty selection and ``RecipeError`` for a
    ``bits`` entry naming no selected layer, before anything is changed."""
    candidates = _selected(model, LOW_BIT_OF, config)
    rnns = _selected(model, RECURRENT, config) if config.recurrent else []
    seen = _calls(model, candidates + rnns, x)
    called = {n: nonneg for n, nonneg in seen.items() if n not in rnns}
    recurrent = [n for n in seen if n in rnns]
    if not called and not recurrent:
        found = sorted({type(m).__name__ for m in model.modules()
                        if next(m.parameters(recurse=False), None) is not None})
        raise UnsupportedLayerError(
            f"lowbit: no Linear/Conv1d/Conv2d layer of the model is called by its forward "
            f"(exclude={list(config.exclude)}; parameter-owning layer types: "
            f"{', '.join(found) or 'none'})")
    unknown = sorted(set(config.bits) - set(called) - set(recurrent))
    if unknown:
        raise RecipeError(f"lowbit: bits names {unknown[0]!r}, not a quantized layer of the "
                          f"model; quantized layers: {', '.join([*called, *recurrent])}")
    order = list(called)
    plans = []
    for i, name in enumerate(order):
        kept = (config.keep_first and i == 0) or (config.keep_last and i == len(order) - 1)
        act = config.activation_bits
        plans.append(LayerPlan(
            name, "linear" if kept else config.quantizer,
            config.bits.get(name, KEEP_BITS if kept else config.weight_bits),
            None if act is None else (KEEP_BITS if kept else act), not called[name]))
    return plans, _float_notes(model, set(order) | set(recurrent)), recurrent


def _calibration(ctx: Context, count: int, seed: int) -> inputs.Inputs:
    """Up to ``count`` training samples (the loader's order for ``seed``)."""
    from nncompress.train import reseed_loader

    reseed_loader(ctx.data.train, seed)
    parts, have = [], 0
    for x, _ in ctx.data.train:
        parts.append(x)
        have += inputs.batch_size(x)
        if have >= count:
            break
    if not parts:
        raise RecipeError(f"lowbit: the train loader of {ctx.data.name!r} yields no samples "
                          "to calibrate on")
    return inputs.take(inputs.concat(parts), count)


def lowbit(model: nn.Module, config: LowBitConfig, ctx: Context) -> nn.Module:
    """Quantize the Linear / Conv layers to low-bit codes, fine-tune, freeze (see module)."""
    from nncompress.prune.structured import rewrite_builtins

    seed = ctx.seed if config.seed is None else config.seed
    model = rewrite_builtins(model, ctx.masks, ctx.note, "lowbit")
    batch = _calibration(ctx, config.calibration, seed)
    plans, notes, recurrent = plan_layers(model, config, batch)
    for line in notes:
        ctx.note(f"lowbit: {line}")
    for name in recurrent:
        lowbit_rnn.to_training(model.get_submodule(name),
                               weight_bits=config.bits.get(name, config.weight_bits),
                               quantizer=config.quantizer, init=config.init)
    for plan in plans:
        model.set_submodule(plan.name, from_float(
            model.get_submodule(plan.name), weight_bits=plan.weight_bits,
            activation_bits=plan.activation_bits, quantizer=plan.quantizer,
            act_signed=plan.act_signed, init=config.init))
    model.eval()
    with torch.no_grad():  # input steps from the calibration batch (quantized upstream)
        inputs.call(model, batch)
    dataclasses.replace(ctx, seed=seed).fine_tune(model, epochs=config.epochs, lr=config.lr,
                                                  desc="low-bit fine-tune")
    for plan in plans:
        layer: Any = model.get_submodule(plan.name)
        frozen = layer.freeze()
        model.set_submodule(plan.name, frozen)
        ctx.note(f"lowbit: {plan.name}: {describe_bits(frozen)}")
    for name in recurrent:
        layer = model.get_submodule(name)
        bits, kind = layer.weight_bits, layer.quantizer
        lowbit_rnn.freeze(layer)
        ctx.note(f"lowbit: {name}: {bits}-bit {kind} weight matrices ({type(layer).__name__};"
                 " biases, state and inputs float)")
    return model.eval()


def code_bytes(model: nn.Module, bits: Mapping[str, int], *, quantizer: str = "linear",
               init: str = "mse") -> dict[str, int]:
    """Bytes on disk of each named layer's weight codes at its ``bits`` (``{name: b}``):
    the weight quantized with a freshly initialised step and stored as the container would
    (its smallest lossless encoding: ``intk``, sparse or entropy-coded). Steps and biases
    are not included (a few bytes per layer, the same at any width)."""
    from nncompress.formats import choose_encoding

    if quantizer not in QUANTIZERS or init not in INITS:
        raise RecipeError(f"quantizer {quantizer!r} / init {init!r}: known "
                          f"{', '.join(QUANTIZERS)} / {', '.join(INITS)}")
    out = {}
    for name, b in bits.items():
        layer = dict(model.named_modules()).get(name)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise RecipeError(f"code_bytes: {name!r} is not a layer with a float weight")
        q = make_quantizer(quantizer, b, signed=True, init=init)
        q.initialise(weight)
        out[name] = choose_encoding(q.codes(weight.detach()).to(torch.int8)).size
    return out


def _bits_arg(value: Any, what: str) -> int:
    number = int_arg(value, what)
    if not MIN_BITS <= number <= MAX_BITS:
        raise FormatError(f"{what} must be between {MIN_BITS} and {MAX_BITS}, got {number}")
    return number


_LOW_BIT = {"weight_bits": _bits_arg, "activation_bits": optional_arg(_bits_arg),
            "quantizer": choice_arg(*QUANTIZERS), "act_signed": bool_arg}
_CONV = {"in_channels": int_arg, "out_channels": int_arg, "kernel_size": ints_arg,
         "stride": ints_arg, "padding": padding_arg, "dilation": ints_arg,
         "groups": positive_arg, "bias": bool_arg,
         "padding_mode": choice_arg("zeros", "reflect", "replicate", "circular"), **_LOW_BIT}
# the key order of each args dict is the order of a compact record's args: never reorder
LAYER_TYPES.register("FrozenLowBitLinear", LayerType(FrozenLowBitLinear, {
    "in_features": int_arg, "out_features": int_arg, "bias": bool_arg, **_LOW_BIT}))
LAYER_TYPES.register("FrozenLowBitConv1d", LayerType(FrozenLowBitConv1d, dict(_CONV)))
LAYER_TYPES.register("FrozenLowBitConv2d", LayerType(FrozenLowBitConv2d, dict(_CONV)))

TECHNIQUES.register("lowbit", Technique(
    name="lowbit",
    category="bits-precision",
    paper="Hubara, Courbariaux, Soudry, El-Yaniv & Bengio (2017): Quantized neural "
          "networks; Esser, McKinstry, Bablani, Appuswamy & Modha (2020): Learned step size "
          "quantization; Miyashita, Lee & Murmann (2016): Convolutional neural networks "
          "using logarithmic data representation",
    summary="Linear/Conv weights (and optionally inputs) at 2-8 bits, uniform with an "
            "LSQ-learned step or powers of two; fake-quantized fine-tuning, then int8 codes "
            "stored at k bits an element.",
    config=LowBitConfig,
    apply=lowbit,
))
