"""Integer GRU / LSTM ops (Jacob et al. 2018 arithmetic; int16 Q0.15 gates by lookup tables):
the reference against torch's float modules, against a scalar reading of the docstring's
spec, the tables, the program path and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.quant import reference as program_reference
from nncompress.quant.affine import QType, activation_qtype, quantize_tensor
from nncompress.quant.int8_rnn import (
    CELL_QTYPE,
    OUT_QTYPE,
    const_roles,
    convert_rnn,
    gate_sigmoid,
    gate_tanh,
    lut_tables,
    reference,
)
from nncompress.quant.program import Op, Program

LSB = 2.0 ** -7   # y / h_n step
PREFIX = "rnn."


def make_rnn(cls: type[nn.Module], layers: int, bidirectional: bool, batch_first: bool,
             seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return cls(5, 16, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
               **kw).eval()


def program_for(module: nn.Module, qx: QType) -> tuple[Program, Op]:
    kind = "gru" if isinstance(module, nn.GRU) else "lstm"
    consts, attrs, qtypes = convert_rnn(module, qx, PREFIX)
    outs = ("y", "h_n", "c_n")[:len(qtypes)]
    op = Op(kind, ("xq",), outs, attrs, const_roles(consts, PREFIX), source="rnn")
    values = {"xq": qx, **dict(zip(outs, qtypes, strict=True))}
    return Program(["xq"], list(outs), values, [op], consts), op


def quantized_input(shape: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, QType,
                                                                    torch.Tensor]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    qx = activation_qtype(float(x.min()), float(x.max()))
    xq = quantize_tensor(x, qx.scale, qx.zero_point)
    return xq, qx, (xq - qx.zero_point).float() * qx.scale


CASES = [(nn.GRU, 1, False, True), (nn.GRU, 2, True, False), (nn.GRU, 3, True, True),
         (nn.LSTM, 1, False, True), (nn.LSTM, 2, True, False), (nn.LSTM, 3, False, False)]


@pytest.mark.parametrize(("cls", "layers", "bidirectional", "batch_first"), CASES)
def test_reference_matches_float_module(cls: type[nn.Module], layers: int, bidirectional: bool,
                                        batch_first: bool) -> None:
    """Measured max |y - y_float| <= 0.98 LSB (2^-7) on these cases; asserted <= 2 LSB."""
    module = make_rnn(cls, layers, bidirectional, batch_first)
    shape = (4, 9, 5) if batch_first else (9, 4, 5)
    xq, qx, x_real = quantized_input(shape)
    program, op = program_for(module, qx)
    outs = reference(program, op, xq, qx)
    with torch.no_grad():
        y, state = module(x_real)
    h = state[0] if isinstance(state, tuple) else state
    dirs = 2 if bidirectional else 1
    assert outs[0].shape == y.shape and outs[1].shape == (layers * dirs, 4, 16)
    assert all(o.dtype == torch.int64 and o.min() >= -128 and o.max() <= 127 for o in outs)
    assert (outs[0] * LSB - y).abs().max() <= 2 * LSB
    assert (outs[1] * LSB - h).abs().max() <= 2 * LSB
    if cls is nn.LSTM:
        assert (outs[2] * CELL_QTYPE.scale - state[1]).abs().max() <= CELL_QTYPE.scale
    for gates in ("float", "table"):
        other = reference(program, op, xq, qx, gates=gates)
        assert (other[0] - outs[0]).abs().max() <= 2


def test_table_and_gates_monotone_and_close() -> None:
    """The table within 1 Q0.15 step of tanh; the interpolated gates, on every int16 Q.10
    input, monotone and within 4 steps (measured: 3.75 tanh, 2.4 sigmoid)."""
    (table,) = lut_tables().values()
    assert table.dtype == torch.int16 and table.shape == (257,) and table[0] == 0
    assert (table[1:] >= table[:-1]).all()
    x = torch.arange(257, dtype=torch.float64) / 32
    assert (table.double() - torch.tanh(x) * 2**15).abs().max() <= 1.0
    p = torch.arange(-(2**15), 2**15)
    for gate, fn, lo in ((gate_tanh, torch.tanh, -32767), (gate_sigmoid, torch.sigmoid, 0)):
        q = gate(table, p)
        assert (q[1:] >= q[:-1]).all() and q.min() == lo and q.max() == 32767
        assert (q.double() - fn(p.double() / 1024) * 2**15).abs().max() <= 4.0
    assert gate_tanh(table, torch.tensor(0)) == 0
    assert gate_sigmoid(table, torch.tensor(0)) == 2**14


# ---- a scalar reading of the module docstring (pure Python ints), one batch row

def _srdhm(a: int, b: int) -> int:
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    v = ab + nudge
    return v // 2**31 if v >= 0 else -((-v) // 2**31)    # truncating division


def _rdpot(x: int, n: int) -> int:
    mask = (1 << n) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> n) + (1 if (x & mask) > threshold else 0)


def _mbqm(acc: int, m: int, s: int) -> int:
    left, right = max(s, 0), max(-s, 0)
    shifted = max(-(2**31), min(2**31 - 1, acc * (1 << left)))
    return _rdpot(_srdhm(shifted, m), right)


def _lookup(tab: list[int], p: int, f: int) -> int:
    a, k = min(abs(p), 2 ** (f + 3) - 1), f - 5
    j = a >> k
    v = tab[j] + _rdpot((tab[j + 1] - tab[j]) * (a & ((1 << k) - 1)), k)
    return -v if p < 0 else v


def _scalar_direction(kind: str, xs: list[list[int]], zx: int, c: dict[str, list],
                      tab: list[int]) -> list[list[int]]:
    """One direction of one layer over a list of int8 input vectors: the h8 of each step."""
    rows, hidden = len(c["w_hh"]), len(c["w_hh"][0])
    sig = lambda p: (_lookup(tab, p, 11) + 32768) >> 1  # noqa: E731
    tnh = lambda p: _lookup(tab, p, 10)  # noqa: E731
    sat16 = lambda v: max(-32768, min(32767, v))  # noqa: E731
    h, cell, h8, ys = [0] * hidden, [0] * hidden, [0] * hidden, []
    for x in xs:
        gx = [sat16(_mbqm(sum((xi - zx) * w for xi, w in zip(x, c["w_ih"][r], strict=True))
                          + c["b_ih"][r], c["m_ih"][r], c["s_ih"][r])) for r in range(rows)]
        gh = [sat16(_mbqm(sum(hj * w for hj, w in zip(h8, c["w_hh"][r], strict=True))
                          + c["b_hh"][r], c["m_hh"][r], c["s_hh"][r])) for r in range(rows)]
        for u in range(hidden):
            p = [gx[g * hidden + u] for g in range(rows // hidden)]
            q = [gh[g * hidden + u] for g in range(rows // hidden)]
            if kind == "gru":
                r, z = sig(p[0] + q[0]), sig(p[1] + q[1])
                n = tnh(p[2] + _rdpot(r * q[2], 15))
                h[u] = n + _rdpot(z * (h[u] - n), 15)
            else:
                i, f, g, o = sig(p[0] + q[0]), sig(p[1] + q[1]), tnh(p[2] + q[2]), \
                    sig(p[3] + q[3])
                cell[u] = _rdpot(f * cell[u], 15) + _rdpot(i * g, 15)
                h[u] = _rdpot(o * tnh(_rdpot(cell[u], 5)), 15)
        h8 = [max(-128, min(127, _rdpot(v, 8))) for v in h]
        ys.append(h8)
    return ys


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_reference_equals_scalar_spec(cls: type[nn.Module]) -> None:
    """The docstring's spec read step by step on Python ints == the vectorised reference."""
    module = make_rnn(cls, 1, True, True, seed=3)
    xq, qx, _ = quantized_input((2, 6, 5), seed=4)
    program, op = program_for(module, qx)
    y = reference(program, op, xq, qx)[0]
    kind = op.kind
    tab = program.consts[PREFIX + "tanh"].tolist()
    for d in (0, 1):
        c = {n: program.consts[f"{PREFIX}l0.d{d}.{n}"].tolist()
             for n in ("w_ih", "w_hh", "b_ih", "b_hh", "m_ih", "s_ih", "m_hh", "s_hh")}
        for b in range(2):
            xs = xq[b].tolist()
            ys = _scalar_direction(kind, xs[::-1] if d else xs, qx.zero_point, c, tab)
            ys = ys[::-1] if d else ys
            assert torch.equal(y[b, :, d * 16:(d + 1) * 16], torch.tensor(ys))


def test_program_path_and_no_bias() -> None:
    """Through the program executor (quantize -> gru -> dequantize), a GRU without biases."""
    module = make_rnn(nn.GRU, 1, False, True, bias=False)
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(2))
    qx = activation_qtype(float(x.min()), float(x.max()))
    consts, attrs, qtypes = convert_rnn(module, qx, PREFIX)
    assert all(name.startswith(PREFIX) for name in consts)
    assert consts[PREFIX + "l0.d0.b_ih"].abs().sum() == 0
    assert consts[PREFIX + "l0.d0.w_ih"].dtype == torch.int8
    ops = [Op("quantize", ("x",), ("xq",)),
           Op("gru", ("xq",), ("y", "h"), attrs, {k: k for k in consts}),  # prefixed roles
           Op("dequantize", ("y",), ("out",))]
    values = {"x": QType("float32"), "xq": qx, "y": qtypes[0], "h": qtypes[1],
              "out": QType("float32")}
    (out,) = program_reference.run(Program(["x"], ["out"], values, ops, consts), x)
    with torch.no_grad():
        y = module(x)[0]
    assert qtypes[0] == OUT_QTYPE
    assert (out - y).abs().max() <= 2 * LSB


def test_refusals_name_the_layer() -> None:
    qx = QType("int8", 0.05, 0)
    with pytest.raises(UnsupportedLayerError, match=r"enc\.lstm.*proj_size=4"):
        convert_rnn(nn.LSTM(5, 8, proj_size=4), qx, "enc.lstm.")
    with pytest.raises(UnsupportedLayerError, match=r"enc\.rnn.*RNN"):
        convert_rnn(nn.RNN(5, 8), qx, "enc.rnn.")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedLayerError, match="float32"):
        convert_rnn(nn.GRU(5, 8), QType("float32"), "enc.gru.")
    module = make_rnn(nn.GRU, 1, False, True)
    program, op = program_for(module, qx)
    with pytest.raises(ValueError, match="int16"):
        reference(program, op, torch.zeros(1, 2, 5, dtype=torch.int64), qx, gates="int16")


def test_shared_table_keys() -> None:
    """Two ops whose table role points at one shared const run as with their own."""
    module = make_rnn(nn.LSTM, 1, False, True)
    xq, qx, _ = quantized_input((2, 5, 5))
    program, op = program_for(module, qx)
    program.consts["shared.tanh"] = program.consts.pop(PREFIX + "tanh")
    shared = Op(op.kind, op.inputs, op.outputs, op.attrs,
                {**op.consts, "tanh": "shared.tanh"})
    program_b, op_b = program_for(module, qx)
    for a, b in zip(reference(program, shared, xq, qx), reference(program_b, op_b, xq, qx),
                    strict=True):
        assert torch.equal(a, b)


def test_per_gate_scales() -> None:
    """per_channel=False: one scale per gate matrix (m / s constant within each gate's rows),
    still within 2 LSB of the float module."""
    module = make_rnn(nn.GRU, 2, True, True)
    xq, qx, x_real = quantized_input((4, 9, 5))
    consts, attrs, qtypes = convert_rnn(module, qx, PREFIX, per_channel=False)
    for side in ("ih", "hh"):
        m = consts[f"{PREFIX}l1.d0.m_{side}"].reshape(3, 16)
        assert (m == m[:, :1]).all() and m[:, 0].unique().numel() > 1
        w = consts[f"{PREFIX}l1.d0.w_{side}"].reshape(3, -1)
        assert (w.abs().amax(dim=1) == 127).all()
    op = Op("gru", ("xq",), ("y", "h_n"), attrs, const_roles(consts, PREFIX))
    program = Program(["xq"], ["y", "h_n"], {"xq": qx, "y": qtypes[0], "h_n": qtypes[1]},
                      [op], consts)
    with torch.no_grad():
        y = module(x_real)[0]
    assert (reference(program, op, xq, qx)[0] * LSB - y).abs().max() <= 2 * LSB
