"""A small ONNX graph builder and the exact fixed-point arithmetic of Jacob et al. (2018)
written in ONNX integer ops.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018), "Quantization and
training of neural networks for efficient integer-arithmetic-only inference", section 2.2:
an int32 accumulator is brought to the output's scale by ``M = 2^-n M0``, computed as
gemmlowp's ``SaturatingRoundingDoublingHighMul`` followed by ``RoundingDivideByPOT``.
:func:`Graph.mbqm` reproduces :func:`nncompress.quant.affine.multiply_by_quantized_multiplier`
bit for bit with int64 ``Mul`` / ``Add`` / ``Div`` (ONNX integer division truncates toward
zero, as C does) and ``Where``:

- high mul: ``(a * M0 + nudge) / 2^31`` truncated, ``nudge = 2^30`` for a product >= 0,
  ``1 - 2^30`` otherwise (``a = M0 = INT32_MIN`` cannot occur: ``M0 >= 0``);
- rounding divide by ``2^e``, ties away from zero: ``(x + h) / 2^e`` truncated with
  ``h = 2^(e-1)`` for ``x >= 0`` and ``-2^(e-1)`` otherwise (``h = 0`` when ``e = 0``). This
  equals gemmlowp's ``(x >> e) + (x & mask > (mask >> 1) + (x < 0))``: both round
  ``|x| / 2^e`` half up and restore the sign.

Int8 values travel through the ONNX graph as **uint8 holding q + 128**: ONNX Runtime's
``MatMulInteger`` / ``ConvInteger`` then run uint8 x uint8, which MLAS computes with 16-bit
widening on every x86 path (its uint8 x int8 path may saturate int16 pair sums on AVX2
machines without VNNI; see ONNX Runtime's quantization notes), so the int32 accumulators
are exact everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OFFSET", "OPSET", "Graph"]

OPSET = 17          # LayerNormalization needs 17
IR_VERSION = 8      # the IR that opset 17 shipped with: read by every current runtime
OFFSET = 128        # int8 q is held as uint8 q + 128
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class Graph:
    """Nodes, initializers and fresh names of one ONNX graph under construction.

    Constants are deduplicated by dtype, shape and bytes, so the many scalar constants of
    the requantization chains are stored once.
    """

    def __init__(self, prefix: str = "t") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._count = 0
        self._prefix = prefix

    def fresh(self, hint: str = "") -> str:
        """A new unique tensor name."""
        self._count += 1
        return f"{self._prefix}{self._count}_{hint}" if hint else f"{self._prefix}{self._count}"

    def const(self, value: Any, dtype: Any = np.int64, hint: str = "c") -> str:
        """The name of an initializer holding ``value`` as ``dtype`` (deduplicated)."""
        arr = np.array(value, dtype=dtype, order="C")   # keeps 0-d scalars 0-d
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        name = self._consts.get(key)
        if name is None:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str = "", *, outputs: int = 1,
             **attrs: Any) -> str:
        """Append one node; returns its (first) output name."""
        names = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
        return names[0]

    def cast(self, x: str, to: int) -> str:
        return self.node("Cast", [x], "cast", to=to)

    # ----------------------------------------------------------------- int8 <-> int64

    def centred(self, x: str, zero_point: int) -> str:
        """``q - zero_point`` as int64 from the uint8 ``q + 128`` held in ``x``."""
        return self.node("Sub", [self.cast(x, TensorProto.INT64),
                                 self.const(zero_point + OFFSET)], "centred")

    def to_uint8(self, acc: str, zero_point: int, act_min: int, act_max: int) -> str:
        """``clamp(zero_point + acc, act_min, act_max)`` (int64 in) held as uint8 + 128."""
        shifted = self.node("Add", [acc, self.const(zero_point + OFFSET)], "zo")
        clipped = self.node("Clip", [shifted, self.const(act_min + OFFSET),
                                     self.const(act_max + OFFSET)], "clamp")
        return self.cast(clipped, TensorProto.UINT8)

    # ----------------------------------------------------------------- fixed point

    def mbqm(self, x: str, multiplier: Any, shift: Any) -> str:
        """:func:`~nncompress.quant.affine.multiply_by_quantized_multiplier` of the int64
        tensor ``x`` by constants ``multiplier`` / ``shift`` (broadcast against ``x``)."""
        m = np.asarray(multiplier, dtype=np.int64)
        s = np.asarray(shift, dtype=np.int64)
        left = np.maximum(s, 0)
        right = np.maximum(-s, 0)
        if np.any(left > 0):
            x = self.node("Mul", [x, self.const(np.left_shift(1, left))], "lshift")
        x = self.node("Clip", [x, self.const(_INT32_MIN), self.const(_INT32_MAX)], "sat32")
        return self.rounding_divide_by_pot(self.high_mul(x, m), right)

    def high_mul(self, x: str, m: np.ndarray) -> str:
        """gemmlowp's ``SaturatingRoundingDoublingHighMul(x, m)`` for ``m >= 0``."""
        ab = self.node("Mul", [x, self.const(m)], "ab")
        negative = self.node("Less", [ab, self.const(0)], "neg")
        nudge = self.node("Where", [negative, self.const(1 - 2**30), self.const(2**30)],
                          "nudge")
        return self.node("Div", [self.node("Add", [ab, nudge], "nudged"),
                                 self.const(2**31)], "high")

    def rounding_divide_by_pot(self, x: str, exponent: np.ndarray) -> str:
        """gemmlowp's ``RoundingDivideByPOT(x, exponent)`` (ties away from zero)."""
        if not np.any(exponent > 0):
            return x
        half = np.where(exponent > 0, np.left_shift(1, np.maximum(exponent - 1, 0)), 0)
        negative = self.node("Less", [x, self.const(0)], "neg")
        bias = self.node("Where", [negative, self.const(-half), self.const(half)], "half")
        return self.node("Div", [self.node("Add", [x, bias], "rounded"),
                                 self.const(np.left_shift(1, exponent))], "rshift")

    def requantize(self, acc: str, zero_point: int, multiplier: Any, shift: Any,
                   attrs: dict[str, Any]) -> str:
        """``clamp(zo + mbqm(acc, m, s))`` (the clamp from ``act_min`` / ``act_max`` in
        ``attrs``, else [-128, 127]) as uint8 + 128."""
        out = self.mbqm(acc, multiplier, shift)
        return self.to_uint8(out, zero_point, int(attrs.get("act_min", -128)),
                             int(attrs.get("act_max", 127)))

    # ----------------------------------------------------------------- float edges

    def quantize(self, x: str, scale: float, zero_point: int) -> str:
        """float32 -> int8 as the reference: ``clamp(int64(rint(x / float32(scale))) + zo)``
        (each step in the reference's order, so inf and NaN map alike), as uint8 + 128."""
        ratio = self.node("Div", [x, self.const(scale, np.float32, "scale")], "ratio")
        q = self.cast(self.node("Round", [ratio], "rint"), TensorProto.INT64)
        q = self.node("Add", [q, self.const(zero_point)], "q")
        q = self.node("Clip", [q, self.const(-128), self.const(127)], "clamp")
        return self.cast(self.node("Add", [q, self.const(OFFSET)], "u"), TensorProto.UINT8)

    def dequantize(self, x: str, scale: float, zero_point: int) -> str:
        """int8 (uint8 + 128) -> float32 as the reference: ``float32(q - zp) * float32(s)``."""
        centred = self.node("Sub", [self.cast(x, TensorProto.INT32),
                                    self.const(zero_point + OFFSET, np.int32)], "centred")
        return self.node("Mul", [self.cast(centred, TensorProto.FLOAT),
                                 self.const(scale, np.float32, "scale")], "real")

    def to_int8(self, x: str) -> str:
        """The uint8 ``q + 128`` held in ``x`` as the int8 ``q`` (for graph outputs)."""
        centred = self.node("Sub", [self.cast(x, TensorProto.INT32),
                                    self.const(OFFSET, np.int32)], "q")
        return self.cast(centred, TensorProto.INT8)
