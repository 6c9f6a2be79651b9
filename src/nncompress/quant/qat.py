"""Quantization-aware training for the integer-only int8 model (Jacob et al., 2018, sec. 3).

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018): the float model is
trained with the quantization it will get simulated in its forward pass -- weights
fake-quantized (symmetric int8 per output channel) and every activation the integer
program will quantize passed through a fake quantizer whose range is an exponential moving
average of the batches' min/max -- with straight-through gradients; then it is converted
with the ranges learnt during training.

Here the fake quantizers sit exactly where :func:`nncompress.quant.convert.build_program`
quantizes (its :func:`~nncompress.quant.convert.quantization_points`: after a fused
Linear/Conv + ReLU, after an add, a LUT activation...), so training sees the program's
own rounding points. The weights trained are the model's own parameters (the traced
module shares them), so pruning masks from earlier stages keep applying. GRU/LSTM weights
are not fake-quantized during training (their int8 conversion is post-training; logged).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.quant.convert import (
    Calibration,
    calibrate,
    positional_model,
    quantization_points,
    trace,
)
from nncompress.quant.fakequant import FakeQuantize, fake_quant_weight
from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm
from nncompress.quant.int8 import Int8Model, QuantizeInt8Config, _batches, to_int8
from nncompress.technique import TECHNIQUES, Context, Technique

__all__ = ["QATInt8Config", "prepare_qat", "qat_int8"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


class _FakeQuantLayer(nn.Module):
    """A Linear / Conv whose forward uses its weight fake-quantized to int8 (per output
    channel, STE). It holds the *same* Parameter objects as the layer it stands for, at the
    same path, so training updates the original model and masks keep their names."""

    def __init__(self, layer: nn.Module, per_channel: bool) -> None:
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.per_channel = per_channel
        if isinstance(layer, nn.Linear):
            self._op = F.linear
        else:
            if layer.padding_mode != "zeros":
                raise UnsupportedLayerError(f"qat_int8: {type(layer).__name__} with "
                                            f"padding_mode={layer.padding_mode!r}")
            self._op = functools.partial(_CONV[type(layer)], stride=layer.stride,
                                         padding=layer.padding, dilation=layer.dilation,
                                         groups=layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, fake_quant_weight(self.weight, self.per_channel), self.bias)


def prepare_qat(model: nn.Module, cal: Calibration, example: tuple[torch.Tensor, ...], *,
                per_channel: bool = True, momentum: float = 0.01
                ) -> tuple[fx.GraphModule, dict[str, FakeQuantize]]:
    """The traced model with fake quantizers after every quantization point (ranges
    initialised from ``cal``) and fake-quantized Linear/Conv weights; and the quantizers by
    the node they follow."""
    gm = trace(model, example)
    points = quantization_points(gm, cal)
    nodes = {n.name: n for n in gm.graph.nodes}
    quantizers: dict[str, FakeQuantize] = {}
    for i, name in enumerate(points):
        fq = FakeQuantize(momentum=momentum)
        lo, hi = cal.ranges[name]
        fq.lo.fill_(lo)
        fq.hi.fill_(hi)
        fq.steps.fill_(1)
        target = f"_qat_fq{i}"
        gm.add_submodule(target, fq)
        node = nodes[name]
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        quantizers[name] = fq
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in (nn.Linear,
                                                                                 *_CONV):
            gm.set_submodule(node.target,
                             _FakeQuantLayer(gm.get_submodule(node.target), per_channel))
    gm.recompile()
    return gm, quantizers


class QATInt8Config(QuantizeInt8Config):
    """``quantize_int8``'s options plus the training: ``epochs``, ``lr`` and the
    fake quantizers' EMA ``momentum``."""

    epochs: int = Field(default=2, ge=1, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    momentum: float = Field(default=0.01, gt=0.0, le=1.0)


def _refuse_frozen(model: nn.Module) -> None:
    """Frozen low-bit / binary layers hold codes, not trainable weights: QAT cannot
    fake-quantize them (quantize_int8 converts them exactly)."""
    from nncompress.quant.binary_layers import _FrozenBinary
    from nncompress.quant.lowbit_layers import _Frozen

    for name, module in model.named_modules():
        if isinstance(module, (_Frozen, _FrozenBinary)):
            raise UnsupportedLayerError(
                f"qat_int8: layer {name!r} ({type(module).__name__}) is already quantized "
                "(frozen codes, nothing to train): use quantize_int8, which converts it exactly")


def qat_int8(model: nn.Module, config: QATInt8Config, ctx: Context) -> Int8Model:
    """Fold BatchNorm, calibrate, train with fake quantization, convert (Jacob et al., 2018)."""
    if isinstance(model, Int8Model):
        raise UnsupportedLayerError("qat_int8: the model is already an int8 model")
    _refuse_frozen(model)
    model = copy.deepcopy(model)   # nothing below may touch the model handed in on a refusal
    from nncompress.modules import decompose
    model, notes = decompose(model, ctx.masks)   # PyTorch attention built-ins -> plain layers
    for line in notes:
        ctx.note(line)
    fold_batchnorm(model, FoldBatchNormConfig(), ctx)
    batches = _batches(ctx, config.calibration_batches)
    example = positional_model(model, batches[0])
    gm = trace(model, example)   # refuses an untraceable model before any training
    options = {"percentile": config.percentile} if config.percentile is not None else {}
    cal = calibrate(gm, batches, config.observer, **options)
    qat, quantizers = prepare_qat(model, cal, example, per_channel=config.per_channel,
                                  momentum=config.momentum)
    rnns = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if rnns:
        ctx.note(f"qat_int8: {', '.join(rnns)} trained in float (their weights are "
                 "quantized after training, post-training)")
    ctx.note(f"qat_int8: {len(quantizers)} fake quantizers, {config.epochs} epochs at "
             f"lr {config.lr}")
    ctx.fine_tune(qat, epochs=config.epochs, lr=config.lr, desc="qat_int8")
    learnt = dict(cal.ranges)
    learnt.update({name: (float(fq.lo), float(fq.hi)) for name, fq in quantizers.items()})
    ctx.masks = {}
    return to_int8(model, ctx, calibration=Calibration(learnt, cal.shapes, cal.dtypes),
                   per_channel=config.per_channel)


TECHNIQUES.register("qat_int8", Technique(
    name="qat_int8",
    category="bits-precision",
    paper="Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018): "
          "Quantization and training of neural networks for efficient "
          "integer-arithmetic-only inference (section 3, training with simulated "
          "quantization)",
    summary="Quantization-aware training (fake-quantized weights and activations at the "
            "integer program's own rounding points, straight-through gradients), then the "
            "integer-only int8 model.",
    config=QATInt8Config,
    apply=qat_int8,
))
