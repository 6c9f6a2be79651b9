"""How each op kind of an integer :class:`~nncompress.quant.program.Program` is written in
ONNX (one table, :data:`EMITTERS`), matching :mod:`nncompress.quant.reference` bit for bit.

Int8 values are uint8 tensors holding ``q + 128`` (see :mod:`nncompress.export.onnx_graph`),
so a zero-point ``z`` becomes ``z + 128`` and a lookup table is indexed by the held value
directly. Integer products run in ``MatMulInteger`` / ``ConvInteger`` (uint8 x uint8,
int32 accumulators, Jacob et al. 2018 eq. 4); every requantization is the exact int64
fixed-point chain of :meth:`Graph.mbqm`. The ``float`` ops (layer norm, softmax) run in
float32 between a dequantize and a quantize, as the reference does; ONNX Runtime's kernels
round differently from torch's in the last float bits, so those ops are exact only to
one step of their output's scale (tested).

Shape-dependent ops (transpose, index, flatten, squeeze, pooling) read the value shapes
found by running the reference once (:class:`Emit` ``shapes``, ``None`` for a dimension
that follows the batch size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from nncompress.errors import UnsupportedLayerError
from nncompress.export.onnx_graph import OFFSET, Graph
from nncompress.quant.affine import QType
from nncompress.quant.program import Op, Program

__all__ = ["EMITTERS", "Emit"]

_LEFT = 1 << 20      # the add op's left shift (TensorFlow Lite's int8 add)
_INT64_MAX = 2**63 - 1


@dataclass
class Emit:
    """What an emitter reads: the graph, the program, each value's shape (``None`` for a
    batch-dependent dimension) and the ONNX tensor that holds each program value."""

    g: Graph
    program: Program
    shapes: dict[str, tuple[int | None, ...]]
    names: dict[str, str]

    def x(self, op: Op, i: int = 0) -> str:
        return self.names[op.inputs[i]]

    def q(self, value: str) -> QType:
        return self.program.values[value]

    def const(self, op: Op, role: str) -> np.ndarray:
        return self.program.consts[op.consts[role]].detach().cpu().numpy()

    def rank(self, value: str) -> int:
        return len(self.shapes[value])

    def refuse(self, op: Op, why: str) -> UnsupportedLayerError:
        where = f" (from {op.source})" if op.source else ""
        return UnsupportedLayerError(f"cannot export op {op.kind!r}{where} to ONNX: {why}")


Emitter = Callable[[Emit, Op], list[str]]


def _zp(e: Emit, value: str) -> int:
    return e.q(value).zero_point


def _u8_zp(e: Emit, value: str) -> str:
    return e.g.const(_zp(e, value) + OFFSET, np.uint8, "zp")


def _out(e: Emit, op: Op, acc: str, m: Any, s: Any) -> list[str]:
    return [e.g.requantize(acc, _zp(e, op.outputs[0]), m, s, op.attrs)]


def _bias_and_requant(e: Emit, op: Op, acc32: str, shape: tuple[int, ...]) -> list[str]:
    acc = e.g.cast(acc32, TensorProto.INT64)
    if "b" in op.consts:
        acc = e.g.node("Add", [acc, e.g.const(e.const(op, "b").reshape(shape))], "bias")
    m, s = e.const(op, "m").reshape(shape), e.const(op, "s").reshape(shape)
    return _out(e, op, acc, m, s)


def _weight_u8(e: Emit, w: np.ndarray) -> str:
    return e.g.const(w.astype(np.int16) + OFFSET, np.uint8, "w")


def _linear(e: Emit, op: Op) -> list[str]:
    w = e.const(op, "w")                                           # [O, I]
    acc = e.g.node("MatMulInteger", [e.x(op), _weight_u8(e, w.T), _u8_zp(e, op.inputs[0]),
                                     e.g.const(OFFSET, np.uint8)], "linear")
    return _bias_and_requant(e, op, acc, (w.shape[0],))


def _conv(e: Emit, op: Op) -> list[str]:
    a, w = op.attrs, e.const(op, "w")                              # [O, C/g, *K]
    nd = w.ndim - 2
    acc = e.g.node("ConvInteger", [e.x(op), _weight_u8(e, w), _u8_zp(e, op.inputs[0]),
                                   e.g.const(OFFSET, np.uint8)], "conv",
                   strides=list(a["stride"]), pads=list(a["padding"]) * 2,
                   dilations=list(a["dilation"]), group=int(a["groups"]),
                   kernel_shape=list(w.shape[2:]))
    return _bias_and_requant(e, op, acc, (1, w.shape[0]) + (1,) * nd)


def _matmul(e: Emit, op: Op) -> list[str]:
    acc = e.g.node("MatMulInteger", [e.x(op, 0), e.x(op, 1), _u8_zp(e, op.inputs[0]),
                                     _u8_zp(e, op.inputs[1])], "matmul")
    return _out(e, op, e.g.cast(acc, TensorProto.INT64), op.attrs["m"], op.attrs["s"])


def _add(e: Emit, op: Op) -> list[str]:
    a = op.attrs
    terms = []
    for i, (m, s) in enumerate(((a["ma"], a["sa"]), (a["mb"], a["sb"]))):
        left = e.g.node("Mul", [e.g.centred(e.x(op, i), _zp(e, op.inputs[i])),
                                e.g.const(_LEFT)], "left")
        terms.append(e.g.mbqm(left, m, s))
    return _out(e, op, e.g.node("Add", terms, "sum"), a["mo"], a["so"])


def _mul(e: Emit, op: Op) -> list[str]:
    prod = e.g.node("Mul", [e.g.centred(e.x(op, i), _zp(e, op.inputs[i])) for i in (0, 1)],
                    "prod")
    return _out(e, op, prod, op.attrs["m"], op.attrs["s"])


def _rescale(e: Emit, op: Op) -> list[str]:
    x = e.g.centred(e.x(op), _zp(e, op.inputs[0]))
    if op.attrs["sign"] < 0:
        x = e.g.node("Neg", [x], "neg")
    return _out(e, op, x, op.attrs["m"], op.attrs["s"])


def _concat(e: Emit, op: Op) -> list[str]:
    a, zo = op.attrs, _zp(e, op.outputs[0])
    parts = []
    for value, name, m, s in zip(op.inputs, (e.names[v] for v in op.inputs), a["ms"], a["ss"],
                                 strict=True):
        identity = (m, s) == (2**30, 1) and _zp(e, value) == zo and "act_min" not in a \
            and "act_max" not in a
        parts.append(name if identity else e.g.requantize(e.g.centred(name, _zp(e, value)),
                                                          zo, m, s, a))
    return [e.g.node("Concat", parts, "concat", axis=int(a["axis"]))]


def _clamp(e: Emit, op: Op) -> list[str]:
    lo, hi = op.attrs.get("act_min", -128), op.attrs.get("act_max", 127)
    return [e.g.node("Clip", [e.x(op), e.g.const(lo + OFFSET, np.uint8),
                              e.g.const(hi + OFFSET, np.uint8)], "clamp")]


def _lut(e: Emit, op: Op) -> list[str]:
    table = _weight_u8(e, e.const(op, "table"))
    return [e.g.node("Gather", [table, e.g.cast(e.x(op), TensorProto.INT64)], "lut")]


def _maxpool(e: Emit, op: Op) -> list[str]:
    a = op.attrs
    return [e.g.node("MaxPool", [e.x(op)], "maxpool", kernel_shape=list(a["kernel"]),
                     strides=list(a["stride"]), pads=list(a["padding"]) * 2)]


def _avgpool(e: Emit, op: Op) -> list[str]:
    """The window sums of ``q - zx`` (padding holds ``zx``) as a depthwise ``ConvInteger``
    with a kernel of ones, then the requantization."""
    a, channels = op.attrs, e.shapes[op.inputs[0]][1]
    if channels is None:
        raise e.refuse(op, "its channel count follows the batch size")
    ones = np.ones((channels, 1, *a["kernel"]), dtype=np.uint8)
    acc = e.g.node("ConvInteger", [e.x(op), e.g.const(ones, np.uint8, "ones"),
                                   _u8_zp(e, op.inputs[0])], "avgsum",
                   strides=list(a["stride"]), pads=list(a["padding"]) * 2, group=channels,
                   kernel_shape=list(a["kernel"]))
    return _out(e, op, e.g.cast(acc, TensorProto.INT64), a["m"], a["s"])


def _mean(e: Emit, op: Op) -> list[str]:
    a = op.attrs
    dims = a["dims"] if isinstance(a["dims"], list) else [a["dims"]]
    total = e.g.node("ReduceSum", [e.g.centred(e.x(op), _zp(e, op.inputs[0])),
                                   e.g.const(dims)], "sum", keepdims=int(bool(a["keepdim"])))
    return _out(e, op, total, a["m"], a["s"])


def _const(e: Emit, op: Op) -> list[str]:
    return [e.g.node("Identity", [_weight_u8(e, e.const(op, "value"))], "const")]


def _embedding(e: Emit, op: Op) -> list[str]:
    return [e.g.node("Gather", [_weight_u8(e, e.const(op, "table")), e.x(op)], "embedding")]


def _float(e: Emit, op: Op) -> list[str]:
    """Dequantize, the float32 op, quantize -- the reference's three steps."""
    qx, qo = e.q(op.inputs[0]), e.q(op.outputs[0])
    real = e.g.dequantize(e.x(op), qx.scale, qx.zero_point)
    args = op.attrs["args"]
    if op.attrs["fn"] == "softmax":
        out = e.g.node("Softmax", [real], "softmax", axis=int(args["dim"]))
    elif op.attrs["fn"] == "layer_norm":
        shape = [int(d) for d in args["shape"]]
        weight = e.const(op, "weight") if "weight" in op.consts else np.ones(shape)
        bias = e.const(op, "bias") if "bias" in op.consts else np.zeros(shape)
        out = e.g.node("LayerNormalization", [real, e.g.const(weight, np.float32, "ln_w"),
                                              e.g.const(bias, np.float32, "ln_b")],
                       "layernorm", axis=-len(shape), epsilon=float(args["eps"]))
    else:
        raise e.refuse(op, f"unknown float function {op.attrs['fn']!r}")
    return [e.g.quantize(out, qo.scale, qo.zero_point)]


def _sign(e: Emit, op: Op) -> list[str]:
    """``1 if q >= t[c] else -1`` along ``axis``: held ``q + 128`` compared with ``t + 128``
    in int32, the result held as 129 / 127."""
    rank = e.rank(op.inputs[0])
    axis = int(op.attrs["axis"]) % rank
    t = e.const(op, "t").astype(np.int32) + OFFSET
    thr = e.g.const(t.reshape((-1,) + (1,) * (rank - 1 - axis)), np.int32, "thr")
    ge = e.g.node("GreaterOrEqual", [e.g.cast(e.x(op), TensorProto.INT32), thr], "ge")
    return [e.g.node("Where", [ge, e.g.const(OFFSET + 1, np.uint8),
                               e.g.const(OFFSET - 1, np.uint8)], "sign")]


def _quantize(e: Emit, op: Op) -> list[str]:
    qo = e.q(op.outputs[0])
    return [e.g.quantize(e.x(op), qo.scale, qo.zero_point)]


def _dequantize(e: Emit, op: Op) -> list[str]:
    qx = e.q(op.inputs[0])
    return [e.g.dequantize(e.x(op), qx.scale, qx.zero_point)]


# ----------------------------------------------------------------------------- shapes


def _positive(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _transpose(e: Emit, op: Op) -> list[str]:
    rank = e.rank(op.inputs[0])
    perm = list(range(rank))
    i, j = (_positive(int(d), rank) for d in op.attrs["dims"])
    perm[i], perm[j] = perm[j], perm[i]
    return [e.g.node("Transpose", [e.x(op)], "transpose", perm=perm)]


def _permute(e: Emit, op: Op) -> list[str]:
    rank = e.rank(op.inputs[0])
    perm = [_positive(int(d), rank) for d in op.attrs["dims"]]
    return [e.g.node("Transpose", [e.x(op)], "permute", perm=perm)]


def _shape_part(e: Emit, x: str, start: int, end: int | None = None) -> str:
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    return e.g.node("Shape", [x], "shape", **attrs)


def _flatten(e: Emit, op: Op) -> list[str]:
    rank = e.rank(op.inputs[0])
    start, end = _positive(op.attrs["start"], rank), _positive(op.attrs["end"], rank)
    if rank == 0 or start >= end:
        return [e.g.node("Identity", [e.x(op)], "flatten")]
    parts = [e.g.const([-1])]
    if start > 0:
        parts.insert(0, _shape_part(e, e.x(op), 0, start))
    if end + 1 < rank:
        parts.append(_shape_part(e, e.x(op), end + 1))
    shape = e.g.node("Concat", parts, "flat_shape", axis=0) if len(parts) > 1 else parts[0]
    return [e.g.node("Reshape", [e.x(op), shape], "flatten")]


def _reshape(e: Emit, op: Op) -> list[str]:
    items = op.attrs["shape"]
    if any(item == 0 for item in items if not isinstance(item, list)):
        raise e.refuse(op, "a literal 0 in its shape (ONNX reads 0 as 'copy this dimension')")
    if all(not isinstance(item, list) for item in items):
        return [e.g.node("Reshape", [e.x(op), e.g.const(items)], "reshape")]
    parts = []
    for item in items:
        if isinstance(item, list):                     # ["dim", value, d]
            d = int(item[2])
            parts.append(_shape_part(e, e.names[item[1]], d, None if d == -1 else d + 1))
        else:
            parts.append(e.g.const([int(item)]))
    shape = e.g.node("Concat", parts, "shape", axis=0)
    return [e.g.node("Reshape", [e.x(op), shape], "reshape")]


def _index(e: Emit, op: Op) -> list[str]:
    """Python indexing (ints, positive-step slices, ``...``, None) as Slice, Squeeze and
    Unsqueeze."""
    items, rank = list(op.attrs["items"]), e.rank(op.inputs[0])
    if "..." in items:
        at = items.index("...")
        used = sum(1 for it in items if it != "..." and it is not None)
        items[at:at + 1] = [["slice", None, None, None]] * (rank - used)
    starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    axis = out = 0
    for item in items:
        if item is None:
            unsqueeze.append(out)
            out += 1
            continue
        if isinstance(item, list):
            step = 1 if item[3] is None else int(item[3])
            if step < 1:
                raise e.refuse(op, f"slice step {step}")
            starts.append(0 if item[1] is None else int(item[1]))
            ends.append(_INT64_MAX if item[2] is None else int(item[2]))
            steps.append(step)
            out += 1
        else:
            i = int(item)
            starts.append(i)
            ends.append(_INT64_MAX if i == -1 else i + 1)
            steps.append(1)
            squeeze.append(axis)
        axes.append(axis)
        axis += 1
    x = e.x(op)
    if axes:
        x = e.g.node("Slice", [x, e.g.const(starts), e.g.const(ends), e.g.const(axes),
                               e.g.const(steps)], "slice")
    if squeeze:
        x = e.g.node("Squeeze", [x, e.g.const(squeeze)], "squeeze")
    if unsqueeze:
        x = e.g.node("Unsqueeze", [x, e.g.const(unsqueeze)], "unsqueeze")
    return [x if x != e.x(op) else e.g.node("Identity", [x], "index")]


def _unsqueeze(e: Emit, op: Op) -> list[str]:
    return [e.g.node("Unsqueeze", [e.x(op), e.g.const([int(op.attrs["dim"])])], "unsqueeze")]


def _squeeze(e: Emit, op: Op) -> list[str]:
    """torch's ``squeeze(dim)``: drops the dimension only where its size is 1."""
    shape = e.shapes[op.inputs[0]]
    dim = _positive(int(op.attrs["dim"]), len(shape)) if shape else 0
    if shape and shape[dim] is None:
        raise e.refuse(op, "it squeezes the batch dimension (its result depends on the "
                           "batch size)")
    if not shape or shape[dim] != 1:
        return [e.g.node("Identity", [e.x(op)], "squeeze")]
    return [e.g.node("Squeeze", [e.x(op), e.g.const([dim])], "squeeze")]


def _rnn(e: Emit, op: Op) -> list[str]:
    from nncompress.export.onnx_rnn import emit_rnn  # it imports Emit from here

    return emit_rnn(e, op)


#: op kind -> how it is written in ONNX (kinds missing here are refused by name).
EMITTERS: dict[str, Emitter] = {
    "quantize": _quantize, "dequantize": _dequantize, "linear": _linear, "conv": _conv,
    "matmul": _matmul, "add": _add, "mul": _mul, "rescale": _rescale, "concat": _concat,
    "clamp": _clamp, "lut": _lut, "maxpool": _maxpool, "avgpool": _avgpool, "mean": _mean,
    "reshape": _reshape, "transpose": _transpose, "permute": _permute, "flatten": _flatten,
    "index": _index, "unsqueeze": _unsqueeze, "squeeze": _squeeze, "const": _const,
    "embedding": _embedding, "float": _float, "gru": _rnn, "lstm": _rnn, "sign": _sign,
}
