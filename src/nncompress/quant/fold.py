"""Batch-normalisation folding.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018), "Quantization and
training of neural networks for efficient integer-arithmetic-only inference", section 3.2:
in inference a BatchNorm after a convolution is an affine map per output channel, so it
folds into that layer's weights and bias::

    scale = gamma / sqrt(running_var + eps)                       # [C_out]
    W'    = W * scale  (along the output-channel dimension)      # W [C_out, ...]
    b'    = (b - running_mean) * scale + beta                    # b = 0 when absent

The BatchNorm becomes ``nn.Identity`` (recorded as such in the .nnc file). For small
models a CPU spends much of a batch-1 call in per-layer overhead, so one layer fewer per
block is a real latency gain; the outputs are unchanged up to float rounding. Pairs are
found by tracing which module produced each BatchNorm's input, and a fold is kept only if
the model's outputs still match (a convolution whose output also feeds another branch
cannot be folded and is reported).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nncompress import inputs
from nncompress.data import example_input
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["FoldBatchNormConfig", "fold_batchnorm", "fold_pairs"]

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
TOLERANCE = 1e-4  # max |difference| of outputs, relative to the outputs' max |value|


class FoldBatchNormConfig(TechniqueConfig):
    """``fold_batchnorm`` has no parameters: every foldable pair is folded."""


def fold_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where the BatchNorm's input is the layer's output."""
    produced: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, FOLDABLE):
            def after(_m: nn.Module, _a: tuple, out: torch.Tensor, name: str = name) -> None:
                produced[id(out)] = name
                keep_alive.append(out)
            handles.append(module.register_forward_hook(after))
        elif isinstance(module, NORMS) and module.track_running_stats:
            def before(_m: nn.Module, args: tuple, name: str = name) -> None:
                source = produced.get(id(args[0]))
                if source is not None:
                    pairs.append((source, name))
            handles.append(module.register_forward_pre_hook(before))
    inputs.observe(model, [x], handles)
    return pairs


def _fold_one(layer: nn.Module, bn: nn.Module) -> None:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else (
            1.0 / torch.sqrt(bn.running_var + bn.eps))
        shift = bn.bias if bn.affine else torch.zeros_like(scale)
        if hasattr(layer, "fold_affine"):   # frozen binary layers: into alpha and the signs
            layer.fold_affine(scale, shift - bn.running_mean * scale)
            return
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.reshape(shape).to(layer.weight.dtype))
        new_bias = (bias - bn.running_mean) * scale + shift
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def _outputs(model: nn.Module, x: inputs.Inputs) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = inputs.call(model, x)
    model.train(was_training)
    return out


def fold_batchnorm(model: nn.Module, config: FoldBatchNormConfig, ctx: Context) -> nn.Module:
    """Fold every BatchNorm into the layer feeding it, in place (Jacob et al., 2018)."""
    x = example_input(ctx.data, 8)
    pairs = fold_pairs(model, x)
    if not pairs:  # a no-op, so recipes ending in a fold also serve models without BN
        ctx.note("fold_batchnorm: nothing to fold (no BatchNorm fed directly by a "
                 "Conv1d/Conv2d/Linear layer)")
        return model
    reference = _outputs(model, x)
    scale = float(reference.abs().max()) or 1.0
    for layer_name, bn_name in pairs:
        trial = copy.deepcopy(model)
        _fold_one(trial.get_submodule(layer_name), trial.get_submodule(bn_name))
        trial.set_submodule(bn_name, nn.Identity())
        if float((_outputs(trial, x) - reference).abs().max()) > TOLERANCE * scale:
            ctx.note(f"fold_batchnorm: {bn_name} not folded into {layer_name}: the "
                     f"layer's output is also used elsewhere")
            continue
        model.set_submodule(layer_name, trial.get_submodule(layer_name))
        model.set_submodule(bn_name, nn.Identity())
        ctx.note(f"fold_batchnorm: {bn_name} folded into {layer_name}")
    return model


TECHNIQUES.register("fold_batchnorm", Technique(
    name="fold_batchnorm",
    category="miscellaneous",
    paper="Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018): "
          "Quantization and training of neural networks for efficient "
          "integer-arithmetic-only inference (section 3.2, batch-norm folding)",
    summary="Fold each BatchNorm into the convolution/linear layer feeding it; one layer "
            "fewer per block at inference, same outputs.",
    config=FoldBatchNormConfig,
    apply=fold_batchnorm,
))
