"""The integer program: what an int8 model is, independent of how it is executed.

A :class:`Program` is a straight-line list of :class:`Op` over named values. Every value
has a :class:`~nncompress.quant.affine.QType` (int8 affine, float32 or int64 ids); every
constant (weights, int32 biases, fixed-point multipliers and shifts, lookup tables) is a
named tensor in ``Program.consts``. Three executors implement the same semantics:
:mod:`nncompress.quant.reference` (integer torch ops: the specification), the C engine
(:mod:`nncompress.kernels.int8`, the fast path) and the ONNX export. The semantics of
each op kind are in :data:`OP_KINDS` (one table) and spelled out in
``docs/INT8.md``; ``mbqm(acc, m, s)`` below is
:func:`~nncompress.quant.affine.multiply_by_quantized_multiplier` (Jacob et al., 2018).

Kinds (``x``: first input, ``zx``: its zero-point, ``zo``: the output's; ``clamp`` to
``[act_min, act_max]`` (attrs) else [-128, 127]):

- ``quantize`` float32 -> int8: ``clamp(rint(x / so) + zo)`` (the model's input edge).
- ``dequantize`` int8 -> float32: ``float32(x - zx) * float32(sx)``.
- ``linear`` ``[..., I]`` -> ``[..., O]``, consts ``w`` int8 [O, I], ``b`` int32 [O]
  (optional), ``m``/``s`` int32 [O]: ``clamp(zo + mbqm(sum_i (x_i - zx) w[o, i] + b[o],
  m[o], s[o]))``.
- ``conv`` ``[B, C, *S]`` -> ``[B, O, *S']`` (1-D or 2-D, attrs ``stride``, ``padding``,
  ``dilation``, ``groups``; padded positions hold ``zx``, real zero), consts as linear with
  ``w`` int8 [O, C / groups, *K].
- ``matmul`` a ``[..., M, K]`` @ b ``[..., K, N]`` (both int8, batch dims broadcast):
  ``clamp(zo + mbqm(sum_k (a - za)(b - zb), m, s))``, attrs ``m``, ``s``.
- ``add`` a + b (broadcast): ``left = 2^20``; ``ta = mbqm((a - za) * left, ma, sa)``,
  ``tb`` alike, ``clamp(zo + mbqm(ta + tb, mo, so))`` (TensorFlow Lite's int8 add);
  attrs ``ma, sa, mb, sb, mo, so``.
- ``mul`` a * b elementwise: ``clamp(zo + mbqm((a - za)(b - zb), m, s))``.
- ``rescale``: ``clamp(zo + mbqm(sign * (x - zx), m, s))``, attrs ``m``, ``s``, ``sign`` (+-1):
  multiplication by a constant, or a change of scale.
- ``concat`` along ``axis``: each input rescaled as ``rescale`` with its ``m``/``s`` from
  attrs ``ms``/``ss`` (lists, one per input) then joined.
- ``clamp``: ``clamp(x, act_min, act_max)`` (ReLU: ``act_min = zx``), same qtype.
- ``lut``: ``table[x + 128]``, const ``table`` int8 [256]: any elementwise function of one
  int8 value (GELU, sigmoid, tanh, ...), exact.
- ``maxpool`` (1-D/2-D, attrs ``kernel``, ``stride``, ``padding``; padding never wins),
  ``avgpool`` (count includes padding: ``clamp(zo + mbqm(sum (x - zx), m, s))``) and
  ``mean`` over attrs ``dims`` (``keepdim``), the same formula over the reduced elements.
- shape ops on any dtype, qtype unchanged: ``reshape`` (attr ``shape``: ints, ``-1``, or
  ``["dim", value, d]`` = that value's size along ``d`` at run time), ``transpose``
  (``dims``: 2 ints), ``permute`` (``dims``), ``flatten`` (``start``, ``end``), ``index``
  (``items``: ints, ``["slice", start, stop, step]`` with nulls, or ``"..."``),
  ``unsqueeze``/``squeeze`` (``dim``).
- ``const``: no input; the output is const ``value`` (int8 with the output's qtype).
- ``embedding``: int64 ids -> int8 rows of const ``table`` int8 [N, D].
- ``gru`` / ``lstm``: see :mod:`nncompress.quant.int8_rnn` (consts per layer and direction).
- ``sign``: int8 -> int8 +-1 (scale 1, zero-point 0): ``1 if x >= t[c] else -1`` with
  ``c`` the index along attr ``axis`` (of the batched tensor) and const ``t`` int16 [C]
  (integer thresholds in [-128, 128]): a binary layer's input binarization (BNN / XNOR-Net,
  :mod:`nncompress.quant.convert_binary`). A ``linear`` / ``conv`` whose int8 weights are
  all +-1 is a binary layer too: the C engine stores it at 1 bit per weight.
- ``float``: the one escape: ``fn`` in ``layer_norm`` (consts ``weight``, ``bias`` float32;
  attrs ``shape``, ``eps``) or ``softmax`` (attr ``dim``); computed in float32 on the
  dequantized input and quantized to the output's qtype. Every use is reported by
  :meth:`Program.float_ops`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nncompress.quant.affine import QType

__all__ = ["OP_KINDS", "Op", "OpKind", "Program"]


@dataclass(frozen=True)
class OpKind:
    """What one op kind takes: input count (``-1``: any >= 1), attr names, required and
    optional const names (with their dtypes), output count."""

    inputs: int
    attrs: tuple[str, ...] = ()
    consts: Mapping[str, str] = field(default_factory=dict)
    optional_consts: Mapping[str, str] = field(default_factory=dict)
    outputs: int = 1


_ACT = ("act_min", "act_max")
_REQ = {"w": "int8", "m": "int32", "s": "int32"}
_RNN_ATTRS = ("hidden_size", "num_layers", "bidirectional", "batch_first")

#: kind -> OpKind: the one table every executor and the validator read.
OP_KINDS: dict[str, OpKind] = {
    "quantize": OpKind(1),
    "dequantize": OpKind(1),
    "linear": OpKind(1, _ACT, _REQ, {"b": "int32"}),
    "conv": OpKind(1, ("stride", "padding", "dilation", "groups", *_ACT), _REQ, {"b": "int32"}),
    "matmul": OpKind(2, ("m", "s", *_ACT)),
    "add": OpKind(2, ("ma", "sa", "mb", "sb", "mo", "so", *_ACT)),
    "mul": OpKind(2, ("m", "s", *_ACT)),
    "rescale": OpKind(1, ("m", "s", "sign", *_ACT)),
    "concat": OpKind(-1, ("axis", "ms", "ss")),
    "clamp": OpKind(1, _ACT),
    "lut": OpKind(1, (), {"table": "int8"}),
    "maxpool": OpKind(1, ("kernel", "stride", "padding")),
    "avgpool": OpKind(1, ("kernel", "stride", "padding", "m", "s")),
    "mean": OpKind(1, ("dims", "keepdim", "m", "s")),
    "reshape": OpKind(1, ("shape",)),
    "transpose": OpKind(1, ("dims",)),
    "permute": OpKind(1, ("dims",)),
    "flatten": OpKind(1, ("start", "end")),
    "index": OpKind(1, ("items",)),
    "unsqueeze": OpKind(1, ("dim",)),
    "squeeze": OpKind(1, ("dim",)),
    "const": OpKind(0, (), {"value": "int8"}),
    "embedding": OpKind(1, (), {"table": "int8"}),
    "sign": OpKind(1, ("axis",), {"t": "int16"}),
    # consts of the recurrent ops are named "<layer>.<direction>.<name>"; see int8_rnn
    "gru": OpKind(1, _RNN_ATTRS, outputs=2),
    "lstm": OpKind(1, _RNN_ATTRS, outputs=3),
    "float": OpKind(1, ("fn", "args")),
}
FLOAT_FNS = ("layer_norm", "softmax")


@dataclass(frozen=True)
class Op:
    """One step: ``kind`` (a key of :data:`OP_KINDS`), value names in and out, JSON attrs,
    and ``consts``: role -> name in :attr:`Program.consts`. ``source`` names the layer or
    node of the float model it came from (for logs and errors)."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    consts: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        """The op as JSON; consts named ``<first output>.<role>`` (the converter's
        naming) are written as the list of their roles (a shorter record)."""
        out = self.outputs[0] if self.outputs else ""
        implicit = all(name == f"{out}.{role}" for role, name in self.consts.items())
        consts: Any = list(self.consts) if implicit and self.consts else self.consts
        return {"kind": self.kind, "in": list(self.inputs), "out": list(self.outputs),
                "attrs": self.attrs, "consts": consts, "source": self.source}


@dataclass
class Program:
    """An integer program: input and output value names, the qtype of every value, the
    ops in execution order and the constant tensors they use.

    Inputs are float32 (quantized by a ``quantize`` op) or int64 ids; outputs are float32
    (the last ops are ``dequantize``).
    """

    inputs: list[str]
    outputs: list[str]
    values: dict[str, QType]
    ops: list[Op]
    consts: dict[str, torch.Tensor]

    def float_ops(self) -> list[Op]:
        """The ops computed in float (``float`` kind), each with its source layer."""
        return [op for op in self.ops if op.kind == "float"]

    def weight_bytes(self) -> int:
        """Bytes of every constant tensor as stored (int8 weights: 1 byte each)."""
        return sum(t.numel() * t.element_size() for t in self.consts.values())

    def to_json(self) -> str:
        """The structure (everything but the const tensors) as compact JSON."""
        return json.dumps({
            "inputs": self.inputs, "outputs": self.outputs,
            "values": {k: v.to_json() for k, v in self.values.items()},
            "ops": [op.to_json() for op in self.ops],
        }, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, consts: Mapping[str, torch.Tensor]) -> Program:
        """A program from :meth:`to_json`'s text and its consts, every field validated
        (a hostile file gives a one-line FormatError); see :func:`validate`."""
        from nncompress.quant.program_check import parse_program
        return parse_program(text, consts)

    def validate(self) -> None:
        """Check the program is well formed (FormatError naming the first fault)."""
        from nncompress.quant.program_check import check_program
        check_program(self)
