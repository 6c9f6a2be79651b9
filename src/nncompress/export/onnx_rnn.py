"""The ``gru`` / ``lstm`` ops of an integer program in ONNX, unrolled over time, exactly as
:func:`nncompress.quant.int8_rnn.reference` computes them.

GRU: Cho et al. (2014); LSTM: Hochreiter & Schmidhuber (1997); integer-only after Jacob et
al. (2018): int8 gate matrices in ``MatMulInteger`` (uint8 x uint8 as everywhere in the
export), int32 accumulators, the fixed-point requantization to Q.10 pre-activations
(saturated to int16), gates from the int16 tanh table (``Gather``) linearly interpolated,
int16 Q0.15 state and ``RoundingDivideByPOT`` products in int64 -- every step of
:mod:`nncompress.quant.int8_rnn`'s docstring, in the same order, with its constants. The
input side ``x @ w_ih`` of all time steps is one ``MatMulInteger``; the recurrent side is
unrolled, so the exported model has the sequence length of the sample shape it was
exported with (the batch stays dynamic).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from nncompress.export.onnx_graph import OFFSET, Graph
from nncompress.export.onnx_ops import Emit
from nncompress.quant.int8_rnn import (
    CELL_SHIFT,
    PRE_FRAC_BITS,
    STATE_FRAC_BITS,
    TABLE_STEP_BITS,
)
from nncompress.quant.program import Op

__all__ = ["emit_rnn"]

_STATE_BITS = STATE_FRAC_BITS
_I16 = (-(2**15), 2**15 - 1)
_I32 = (-(2**31), 2**31 - 1)


class _Dir:
    """The ONNX tensors of one layer and direction's consts and the shared tables."""

    def __init__(self, e: Emit, op: Op, prefix: str, role: str) -> None:
        self.e, self.g = e, e.g
        c = {n: e.program.consts[op.consts[f"{prefix}{role}.{n}"]].numpy()
             for n in ("w_ih", "w_hh", "b_ih", "b_hh", "m_ih", "s_ih", "m_hh", "s_hh")}
        self.c = c
        self.w_ih = self.g.const(c["w_ih"].T.astype(np.int16) + OFFSET, np.uint8, "w_ih")
        self.w_hh = self.g.const(c["w_hh"].T.astype(np.int16) + OFFSET, np.uint8, "w_hh")
        table = e.program.consts[op.consts[prefix + "tanh"]].numpy().astype(np.int64)
        self.lo = self.g.const(table[:-1], np.int64, "tanh")
        self.step = self.g.const(table[1:] - table[:-1], np.int64, "tanh_step")

    def pre(self, acc32: str | None, side: str) -> str:
        """``sat16(mbqm(acc + b, m, s))`` (``acc32`` None: a zero accumulator)."""
        g, c = self.g, self.c
        bias = g.const(c[f"b_{side}"].astype(np.int64))
        acc = bias if acc32 is None else g.node(
            "Add", [g.cast(acc32, TensorProto.INT64), bias], "acc")
        out = g.mbqm(acc, c[f"m_{side}"], c[f"s_{side}"])
        return g.node("Clip", [out, g.const(_I16[0]), g.const(_I16[1])], "sat16")

    def odd_lookup(self, p: str, frac_bits: int) -> str:
        """``sign(p) * tanh(|p| / 2^frac_bits)`` in Q0.15: the table entry below ``|p|``
        plus the rounded linear interpolation to the next (int8_rnn's ``_odd_lookup``)."""
        g, k = self.g, frac_bits - TABLE_STEP_BITS
        a = g.node("Min", [g.node("Abs", [p]), g.const((8 << frac_bits) - 1)], "a")
        j = g.node("Div", [a, g.const(1 << k)], "j")
        frac = g.node("Mod", [a, g.const(1 << k)], "frac")
        lo = g.node("Gather", [self.lo, j], "lo")
        step = g.node("Gather", [self.step, j], "step")
        v = g.node("Add", [lo, self.rdpot(g.node("Mul", [step, frac]), k)], "v")
        negative = g.node("Less", [p, g.const(0)], "neg")
        return g.node("Where", [negative, g.node("Neg", [v]), v], "odd")

    def tanh(self, p: str) -> str:
        return self.odd_lookup(p, PRE_FRAC_BITS)

    def sigmoid(self, p: str) -> str:
        """``(tanh(p / 2) + 2^15) >> 1`` (the sum is positive: ``Div`` floors it)."""
        t = self.odd_lookup(p, PRE_FRAC_BITS + 1)
        return self.g.node("Div", [self.g.node("Add", [t, self.g.const(1 << _STATE_BITS)]),
                                   self.g.const(2)], "sigmoid")

    def rdpot(self, x: str, n: int) -> str:
        return self.g.rounding_divide_by_pot(x, np.asarray(n, dtype=np.int64))

    def mul_rdpot(self, a: str, b: str, n: int = _STATE_BITS) -> str:
        return self.rdpot(self.g.node("Mul", [a, b], "prod"), n)


def _split(g: Graph, x: str, parts: int) -> list[str]:
    """``x`` cut into ``parts`` equal chunks along the last axis (the gate rows)."""
    names = [g.fresh("gate") for _ in range(parts)]
    g.nodes.append(helper.make_node("Split", [x], names, axis=-1))
    return names


def _gru_cell(d: _Dir, gx: str, gh: str, h: str) -> tuple[str, ...]:
    g = d.g
    xr, xz, xn = _split(g, gx, 3)
    hr, hz, hn = _split(g, gh, 3)
    r = d.sigmoid(g.node("Add", [xr, hr]))
    z = d.sigmoid(g.node("Add", [xz, hz]))
    n = d.tanh(g.node("Add", [xn, d.mul_rdpot(r, hn)]))
    return (g.node("Add", [n, d.mul_rdpot(z, g.node("Sub", [h, n]))], "h"),)


def _lstm_cell(d: _Dir, gx: str, gh: str, h: str, c: str) -> tuple[str, ...]:
    g = d.g
    pi, pf, pg, po = _split(g, g.node("Add", [gx, gh], "pre"), 4)
    i, f, gg, o = d.sigmoid(pi), d.sigmoid(pf), d.tanh(pg), d.sigmoid(po)
    c = g.node("Add", [d.mul_rdpot(f, c), d.mul_rdpot(i, gg)], "c")
    c = g.node("Clip", [c, g.const(_I32[0]), g.const(_I32[1])], "c")
    tc = d.tanh(d.rdpot(c, _STATE_BITS - PRE_FRAC_BITS))
    return d.mul_rdpot(o, tc), c


def _to8(g: Graph, x: str, shift: int, d: _Dir) -> str:
    return g.node("Clip", [d.rdpot(x, shift), g.const(-128), g.const(127)], "q8")


def _direction(d: _Dir, x_u8: str, zx: int, steps: int, time_axis: int, kind: str,
               reverse: bool) -> tuple[list[str], str, str]:
    """``y8`` per step (int64 ``[B, H]``), the last ``h8`` and the last cell as int8."""
    g = d.g
    acc = g.node("MatMulInteger", [x_u8, d.w_ih, g.const(zx + OFFSET, np.uint8),
                                   g.const(OFFSET, np.uint8)], "x_ih")
    gx_all = d.pre(acc, "ih")
    zero = g.const(0)
    state: tuple[str, ...] = (zero,) if kind == "gru" else (zero, zero)
    h8_u8: str | None = None
    h8 = zero
    ys: list[str] = [zero] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        gx = g.node("Gather", [gx_all, g.const(t)], "gx", axis=time_axis)
        acc_h = None if h8_u8 is None else g.node(
            "MatMulInteger", [h8_u8, d.w_hh, g.const(OFFSET, np.uint8),
                              g.const(OFFSET, np.uint8)], "h_hh")
        gh = d.pre(acc_h, "hh")
        state = _gru_cell(d, gx, gh, *state) if kind == "gru" else \
            _lstm_cell(d, gx, gh, *state)
        h8 = _to8(g, state[0], _STATE_BITS - 7, d)
        h8_u8 = g.cast(g.node("Add", [h8, g.const(OFFSET)]), TensorProto.UINT8)
        ys[t] = h8
    c8 = _to8(g, state[1], CELL_SHIFT, d) if kind == "lstm" else zero
    return ys, h8, c8


def _role_prefix(op: Op) -> str:
    """The prefix every key of ``op.consts`` carries before its role, read off the first
    layer's ``l0.d0.w_ih`` ("" when the keys are the bare roles)."""
    for key in op.consts:
        if key.endswith("l0.d0.w_ih"):
            return key[: -len("l0.d0.w_ih")]
    return ""


def emit_rnn(e: Emit, op: Op) -> list[str]:
    """The ONNX tensors (uint8 + 128) of the op's ``y, h_n`` (+ ``c_n``)."""
    a, g = op.attrs, e.g
    shape = e.shapes[op.inputs[0]]
    time_axis = 1 if a["batch_first"] else 0
    steps = shape[time_axis]
    if steps is None:
        raise e.refuse(op, "its sequence length follows the batch size")
    prefix = _role_prefix(op)
    x_u8, zx = e.x(op), e.q(op.inputs[0]).zero_point
    h_n: list[str] = []
    c_n: list[str] = []
    for k in range(int(a["num_layers"])):
        outs = []
        for dr in range(2 if a["bidirectional"] else 1):
            d = _Dir(e, op, prefix, f"l{k}.d{dr}")
            ys, h8, c8 = _direction(d, x_u8, zx, steps, time_axis, op.kind, dr == 1)
            stacked = [g.node("Unsqueeze", [y, g.const([time_axis])]) for y in ys]
            outs.append(g.node("Concat", stacked, "y", axis=time_axis))
            h_n.append(h8)
            c_n.append(c8)
        y = g.node("Concat", outs, "y", axis=-1) if len(outs) > 1 else outs[0]
        x_u8 = g.cast(g.node("Add", [y, g.const(OFFSET)]), TensorProto.UINT8)
        zx = 0
    results = [x_u8, _stack_u8(g, h_n)]
    return [*results, _stack_u8(g, c_n)] if op.kind == "lstm" else results


def _stack_u8(g: Graph, parts: list[str]) -> str:
    stacked = g.node("Concat", [g.node("Unsqueeze", [p, g.const([0])]) for p in parts],
                     "stack", axis=0)
    return g.cast(g.node("Add", [stacked, g.const(OFFSET)]), TensorProto.UINT8)
