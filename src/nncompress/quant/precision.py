"""Each layer's numeric precision, for ``nncompress inspect`` and reports.

One table (:func:`layer_precisions`): an int8 model lists its program's ops (int8, or
float32 with the op kept in float); low-bit layers their weight / input bits and quantizer;
binarized layers their 1-bit weights (and inputs); any other layer holding a weight the
weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["LayerPrecision", "layer_precisions"]

_SHAPE_OPS = ("reshape", "transpose", "permute", "flatten", "index", "squeeze", "unsqueeze")


@dataclass(frozen=True)
class LayerPrecision:
    """One layer (or int8 op): its name, kind and precision in words."""

    layer: str
    kind: str
    precision: str


def _int8_rows(model: nn.Module) -> list[LayerPrecision]:
    rows = []
    for op in model.program.ops:
        if op.kind in _SHAPE_OPS:
            continue
        if op.kind == "float":
            precision = f"float32 ({op.attrs['fn']}) between int8 values"
        elif op.kind in ("quantize", "dequantize"):
            precision = "float32 <-> int8 at the model's edge"
        elif op.kind in ("gru", "lstm"):
            precision = ("int8 weights, int32 accumulators, int16 state, "
                         "interpolated int16 tanh/sigmoid table")
        elif op.kind in ("linear", "conv"):
            precision = "int8 weights (per-channel), int8 activations, int32 accumulator"
        else:
            precision = "int8"
        rows.append(LayerPrecision(op.source, op.kind, precision))
    return rows


def _binary(m: nn.Module) -> str:
    inputs = "1-bit inputs, XNOR-popcount" if getattr(m, "activations", False) else \
        "float inputs"
    return f"1-bit weights (sign x per-channel scale), {inputs}"


def _describe(m: nn.Module) -> str | None:
    """The precision of one module that owns a weight, or None if it owns none."""
    name = type(m).__name__
    if hasattr(m, "weight_bits") and hasattr(m, "quantizer"):
        from nncompress.quant.lowbit_layers import describe_bits
        return describe_bits(m)
    if "Binary" in name:
        return _binary(m)
    weight = m._parameters.get("weight")
    if weight is None:
        return None
    return str(weight.dtype).removeprefix("torch.")


def layer_precisions(model: nn.Module) -> list[LayerPrecision]:
    """The precision of every layer of ``model`` that holds weights (or of every op of an
    int8 model's program)."""
    if hasattr(model, "program") and hasattr(model.program, "ops"):
        return _int8_rows(model)
    rows = []
    for path, m in model.named_modules():
        described = _describe(m)
        if described is not None:
            rows.append(LayerPrecision(path or "(model)", type(m).__name__, described))
    return rows
