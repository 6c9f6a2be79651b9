"""Integer GRU and LSTM: the ``gru`` / ``lstm`` ops of an integer :class:`Program`.

Integer-arithmetic-only inference after Jacob et al. (2018) ("Quantization and training of
neural networks for efficient integer-arithmetic-only inference"): int8 gate matrices,
int32 accumulators, fixed-point requantization (``mbqm`` =
:func:`~nncompress.quant.affine.multiply_by_quantized_multiplier`, ``rdpot(v, n)`` =
:func:`~nncompress.quant.affine.rounding_divide_by_pot`: ``v / 2^n`` rounded to nearest,
ties away from zero, ``>>`` an arithmetic shift); the gate nonlinearities come from one
257-entry int16 table of tanh, interpolated, on Q.10 pre-activations; the state is int16
Q0.15, in the spirit of TensorFlow Lite's integer LSTM (Q3.12 pre-activations, Q0.15
gates). GRU: Cho et al. (2014); LSTM: Hochreiter & Schmidhuber (1997); gate order and
equations exactly as ``torch.nn.GRU`` / ``torch.nn.LSTM`` (GRU rows ``r, z, n``; LSTM rows
``i, f, g, o``).

Supported: ``nn.GRU`` and ``nn.LSTM``, any ``num_layers``, ``bidirectional``,
``batch_first``, with or without biases (absent biases are stored as zeros); dropout is
an eval-time no-op. Refused (:class:`~nncompress.errors.UnsupportedLayerError`): LSTM
``proj_size > 0``, ``nn.RNN`` (tanh / relu), a non-int8 input.

Op ``gru`` (outputs ``y, h_n``) / ``lstm`` (``y, h_n, c_n``); attrs ``hidden_size`` H,
``num_layers`` L, ``bidirectional`` (D = 2 else 1), ``batch_first``, ``input_size``.
Input ``x`` int8 ``[B, T, I]`` (``[T, B, I]`` if not batch_first) with zero-point ``zx``.
Consts (``op.consts`` key -> name in ``Program.consts``; each key is a role below, all
keys optionally preceded by one common prefix, e.g. ``"layers.0."``), per layer ``k`` and
direction ``d`` (0 forward, 1 reverse), G = 3 (GRU) or 4 (LSTM): ``lk.dd.w_ih`` int8
[G*H, In], ``lk.dd.w_hh`` int8 [G*H, H] (symmetric, [-127, 127], a scale per row or per
gate matrix), ``lk.dd.b_ih`` / ``lk.dd.b_hh`` int32 [G*H], ``lk.dd.m_ih`` / ``lk.dd.s_ih``
/ ``lk.dd.m_hh`` / ``lk.dd.s_hh`` int32 [G*H] (``m`` with 15 significant bits); shared by
all layers: ``tanh`` int16 [257], ``tanh[j] = min(round(tanh(j / 32) * 2^15), 32767)``,
nondecreasing from 0. Per step, all integer (int32 suffices except the LSTM ``f * c``:
int64):

1. ``gx = sat16(mbqm(sum_i (x_i - zx) w_ih[r, i] + b_ih[r], m_ih[r], s_ih[r]))`` and
   ``gh = sat16(mbqm(sum_j h8_j w_hh[r, j] + b_hh[r], m_hh[r], s_hh[r]))``: both Q.10
   (real = value / 1024), ``sat16`` clamps to [-32768, 32767]. The input side of every
   time step can be computed up front. Layer 0 reads ``x`` (its ``zx``); layer k > 0 reads
   the previous layer's ``y8`` (both directions concatenated, zero-point 0).
2. ``L(p, f)`` = ``sign(p) * v`` with ``a = min(|p|, 2^(f + 3) - 1)``, ``k = f - 5``,
   ``j = a >> k``, ``v = tanh[j] + rdpot((tanh[j+1] - tanh[j]) * (a & (2^k - 1)), k)``:
   tanh of ``p / 2^f`` in Q0.15, linearly interpolated. Gates of a Q.10 pre-activation:
   ``Tn(p) = L(p, 10)``, ``S(p) = (L(p, 11) + 32768) >> 1`` (sigmoid(x) = (1 + tanh(x/2))
   / 2). Both within 4 Q0.15 steps of the float functions, monotone, in [-32767, 32767]
   and [0, 32767].
3. GRU (h Q0.15 int16): ``r = S(gx_r + gh_r)``, ``z = S(gx_z + gh_z)``,
   ``n = Tn(gx_n + rdpot(r * gh_n, 15))``, ``h' = n + rdpot(z * (h - n), 15)``.
   LSTM (h Q0.15, c int32 scale 2^-15): ``i, f, o = S(gx + gh)`` of their rows,
   ``g = Tn(gx_g + gh_g)``, ``c' = sat32(rdpot(f * c, 15) + rdpot(i * g, 15))`` (``f * c``
   in int64), ``h' = rdpot(o * Tn(rdpot(c', 5)), 15)``.
4. ``h8 = clamp(rdpot(h', 8), -128, 127)``: the int8 Q0.7 state fed to ``w_hh`` at the
   next step and the output ``y`` at this step (scale 2^-7, zero-point 0).

Initial ``h = c = 0`` (so ``h8 = 0``). The reverse direction runs over reversed time and
its ``y`` is stored at the original time index; ``y`` is ``[B, T, D*H]`` (``[T, B, D*H]``
if not batch_first), forward then reverse along the last dim. ``h_n`` int8 ``[L*D, B, H]``
(the last ``h8`` of each layer and direction, layer-major, as torch orders it, never batch
first); LSTM ``c_n`` int8 ``[L*D, B, H]`` = ``clamp(rdpot(c, 11), -128, 127)``, scale 2^-4
(range [-8, 8)). The table costs 514 bytes per op (identical in every op: a converter may
point all ops at one copy).

Measured alternatives (``bench/int8_rnn.py``): ``reference(..., gates="float")``: the same
int8 matrices and int32 accumulators, then ``gx = acc * scale`` in float32 (scale from
``m``, ``s``), float32 sigmoid / tanh and state, ``h8 = clamp(round(128 h))``;
``gates="table"``: direct 4096-entry sigmoid and tanh tables at step 1/256 (16 KiB).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.quant.affine import (
    WMAX,
    QType,
    fixed_point,
    quantize_tensor,
    rounding_divide_by_pot,
    weight_scales,
)
from nncompress.quant.affine import multiply_by_quantized_multiplier as mbqm
from nncompress.quant.program import Op, Program

__all__ = ["CELL_QTYPE", "GATES", "OUT_QTYPE", "PRE_FRAC_BITS", "TABLE_SIZE", "const_roles",
           "convert_rnn", "gate_sigmoid", "gate_tanh", "lut_tables", "reference"]

#: gate rows per hidden unit: GRU (r, z, n), LSTM (i, f, g, o)
GATES = {"gru": 3, "lstm": 4}
PRE_FRAC_BITS = 10                      # pre-activations in Q.10 (int16: [-32, 32))
TABLE_STEP_BITS = 5                     # the tanh table's step: 2^-5
TABLE_SIZE = (8 << TABLE_STEP_BITS) + 1  # 257 entries: tanh over [0, 8]
STATE_FRAC_BITS = 15                    # h, gate values Q0.15; c scale 2^-15
MULTIPLIER_BITS = 15                    # significant bits of each m (as the converter's)
CELL_SHIFT = 11                         # c (2^-15) -> c_n int8 (2^-4)
OUT_QTYPE = QType("int8", 2.0 ** -7, 0)   # y, h_n: Q0.7
CELL_QTYPE = QType("int8", 2.0 ** -4, 0)  # LSTM c_n
_I16 = (-(2**15), 2**15 - 1)
_I32 = (-(2**31), 2**31 - 1)
_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh", "m_ih", "s_ih", "m_hh", "s_hh")


def lut_tables() -> dict[str, torch.Tensor]:
    """The gate table: ``tanh`` int16 [257], entry ``j`` = ``min(round(tanh(j / 32) *
    2^15), 32767)`` (Q0.15, rounded half to even)."""
    x = torch.arange(TABLE_SIZE, dtype=torch.float64) / 2**TABLE_STEP_BITS
    one = 2.0 ** STATE_FRAC_BITS
    return {"tanh": torch.round(torch.tanh(x) * one).clamp(max=one - 1).to(torch.int16)}


def _kind(module: nn.Module, prefix: str) -> str:
    """``"gru"`` / ``"lstm"``, or a one-line refusal naming the layer."""
    name = prefix.rstrip(".") or "<rnn>"
    if isinstance(module, nn.GRU):
        return "gru"
    if isinstance(module, nn.LSTM):
        if module.proj_size > 0:
            raise UnsupportedLayerError(f"layer {name!r}: int8 LSTM with proj_size="
                                        f"{module.proj_size} is not supported (only 0)")
        return "lstm"
    raise UnsupportedLayerError(f"layer {name!r}: int8 recurrent layer "
                                f"{type(module).__name__} is not supported (GRU, LSTM only)")


def _row_scales(w: torch.Tensor, gates: int, per_channel: bool) -> torch.Tensor:
    """Symmetric int8 scales per row, or one per gate matrix repeated over its rows
    (float64 ``[G*H]``)."""
    if per_channel:
        return weight_scales(w)
    blocks = w.detach().reshape(gates, -1)
    return weight_scales(blocks).repeat_interleave(w.shape[0] // gates)


def _direction(w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None,
               b_hh: torch.Tensor | None, x_scale: float, gates: int, per_channel: bool
               ) -> dict[str, torch.Tensor]:
    """The int8 / int32 consts of one layer and direction (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for side, w, b, in_scale in (("ih", w_ih, b_ih, x_scale), ("hh", w_hh, b_hh,
                                                                OUT_QTYPE.scale)):
        sw = _row_scales(w, gates, per_channel)               # float64 [G*H]
        acc_scale = sw * in_scale
        out[f"w_{side}"] = quantize_tensor(w, sw[:, None], 0, -WMAX, WMAX).to(torch.int8)
        real_b = torch.zeros(w.shape[0]) if b is None else b.detach()
        out[f"b_{side}"] = quantize_tensor(real_b, acc_scale, 0, *_I32).to(torch.int32)
        m, s = fixed_point(acc_scale * 2**PRE_FRAC_BITS, bits=MULTIPLIER_BITS)
        out[f"m_{side}"], out[f"s_{side}"] = m, s
    return out


def convert_rnn(module: nn.GRU | nn.LSTM, x_qtype: QType, prefix: str, *,
                per_channel: bool = True
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[QType]]:
    """The consts (names ``prefix + role``), attrs and output qtypes (``[y, h_n]``, + ``c_n``
    for an LSTM) of the ``gru`` / ``lstm`` op computing ``module`` on an int8 input of type
    ``x_qtype``. Weight scales per row, or with ``per_channel=False`` one per gate matrix
    (the same op: ``m`` / ``s`` then repeat within each gate, which the container packs
    to almost nothing). Raises UnsupportedLayerError for what the module docstring
    refuses."""
    kind = _kind(module, prefix)
    if x_qtype.dtype != "int8":
        raise UnsupportedLayerError(f"layer {prefix.rstrip('.') or '<rnn>'!r}: int8 {kind} "
                                    f"needs an int8 input, got {x_qtype.dtype}")
    dirs = 2 if module.bidirectional else 1
    consts: dict[str, torch.Tensor] = {}
    for k in range(module.num_layers):
        x_scale = x_qtype.scale if k == 0 else OUT_QTYPE.scale
        for d in range(dirs):
            sfx = f"l{k}" + ("_reverse" if d else "")
            params = [getattr(module, f"{n}_{sfx}", None)
                      for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            for name, t in _direction(*params, x_scale, GATES[kind], per_channel).items():
                consts[f"{prefix}l{k}.d{d}.{name}"] = t
    for name, t in lut_tables().items():
        consts[f"{prefix}{name}"] = t
    attrs = {"hidden_size": module.hidden_size, "num_layers": module.num_layers,
             "bidirectional": bool(module.bidirectional), "batch_first": bool(module.batch_first),
             "input_size": module.input_size}
    qtypes = [OUT_QTYPE, OUT_QTYPE] + ([CELL_QTYPE] if kind == "lstm" else [])
    return consts, attrs, qtypes


def const_roles(consts: dict[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """``Op.consts`` for :func:`convert_rnn`'s consts: role (name less ``prefix``) -> name."""
    return {name[len(prefix):]: name for name in consts}


# --------------------------------------------------------------------------- reference

def _rdpot(v: torch.Tensor, n: int) -> torch.Tensor:
    return rounding_divide_by_pot(v, torch.tensor(n))


def _requant16(acc: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return mbqm(acc, m, s).clamp(*_I16)


def _to8(h: torch.Tensor) -> torch.Tensor:
    return _rdpot(h, STATE_FRAC_BITS - 7).clamp(-128, 127)


def _odd_lookup(table: torch.Tensor, p: torch.Tensor, arg_frac_bits: int) -> torch.Tensor:
    """``sign(p) * tanh(|p| / 2^arg_frac_bits)`` in Q0.15 from the table, interpolated
    linearly; ``|p|`` is clamped below ``8 * 2^arg_frac_bits``."""
    k = arg_frac_bits - TABLE_STEP_BITS
    a = p.abs().clamp(max=(8 << arg_frac_bits) - 1).contiguous()
    j = torch.bitwise_right_shift(a, k)
    lo = table[j]
    v = lo + _rdpot((table[j + 1] - lo) * torch.bitwise_and(a, (1 << k) - 1), k)
    return torch.where(p < 0, -v, v)


def gate_tanh(table: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``tanh`` of a Q.10 pre-activation (int64) in Q0.15 by the module's table."""
    return _odd_lookup(table.to(torch.int64), p, PRE_FRAC_BITS)


def gate_sigmoid(table: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x) = (1 + tanh(x / 2)) / 2`` of a Q.10 pre-activation in Q0.15 (the same
    table read at half the argument, floor of the halving)."""
    t = _odd_lookup(table.to(torch.int64), p, PRE_FRAC_BITS + 1)
    return torch.bitwise_right_shift(t + (1 << STATE_FRAC_BITS), 1)


class _DirectTables:
    """The measured alternative ``gates="table"``: sigmoid and tanh read without
    interpolation from 4096-entry tables over [-8, 8) at step 1/256 (16 KiB of int16),
    indexed by ``rdpot(p, 2)``."""

    def __init__(self) -> None:
        x = torch.arange(-2048, 2048, dtype=torch.float64) / 256
        one = 2.0 ** STATE_FRAC_BITS
        self.sig = torch.round(torch.sigmoid(x) * one).clamp(0, one - 1).to(torch.int64)
        self.tanh_ = torch.round(torch.tanh(x) * one).clamp(1 - one, one - 1).to(torch.int64)

    def _index(self, p: torch.Tensor) -> torch.Tensor:
        return (_rdpot(p, PRE_FRAC_BITS - 8).clamp(-2048, 2047) + 2048).contiguous()

    def sigmoid(self, p: torch.Tensor) -> torch.Tensor:
        return self.sig[self._index(p)]

    def tanh(self, p: torch.Tensor) -> torch.Tensor:
        return self.tanh_[self._index(p)]


class _Lut:
    """The gate functions of one op on Q.10 pre-activations (int64 tensors)."""

    def __init__(self, tanh: torch.Tensor) -> None:
        self.table = tanh.to(torch.int64)

    def sigmoid(self, p: torch.Tensor) -> torch.Tensor:
        return gate_sigmoid(self.table, p)

    def tanh(self, p: torch.Tensor) -> torch.Tensor:
        return gate_tanh(self.table, p)


def _gru_lut(gx: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, ...], lut: _Lut
             ) -> tuple[torch.Tensor, ...]:
    (h,) = state
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = lut.sigmoid(xr + hr), lut.sigmoid(xz + hz)
    n = lut.tanh(xn + _rdpot(r * hn, STATE_FRAC_BITS))
    return (n + _rdpot(z * (h - n), STATE_FRAC_BITS),)


def _lstm_lut(gx: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, ...], lut: _Lut
              ) -> tuple[torch.Tensor, ...]:
    _, c = state
    pi, pf, pg, po = (gx + gh).chunk(4, -1)
    i, f, g, o = lut.sigmoid(pi), lut.sigmoid(pf), lut.tanh(pg), lut.sigmoid(po)
    c = (_rdpot(f * c, STATE_FRAC_BITS) + _rdpot(i * g, STATE_FRAC_BITS)).clamp(*_I32)
    tc = lut.tanh(_rdpot(c, STATE_FRAC_BITS - PRE_FRAC_BITS))
    return _rdpot(o * tc, STATE_FRAC_BITS), c


def _gru_float(gx: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, ...], lut: Any
               ) -> tuple[torch.Tensor, ...]:
    (h,) = state
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,)


def _lstm_float(gx: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, ...], lut: Any
                ) -> tuple[torch.Tensor, ...]:
    _, c = state
    pi, pf, pg, po = (gx + gh).chunk(4, -1)
    c = torch.sigmoid(pf) * c + torch.sigmoid(pi) * torch.tanh(pg)
    return torch.sigmoid(po) * torch.tanh(c), c


class _Mode:
    """How one gates mode turns accumulators into pre-activations and states into int8."""

    def __init__(self, gates: str, kind: str, lut: _Lut | _DirectTables) -> None:
        self.float = gates == "float"
        cells = {("gru", False): _gru_lut, ("lstm", False): _lstm_lut,
                 ("gru", True): _gru_float, ("lstm", True): _lstm_float}
        self.cell = cells[(kind, self.float)]
        self.lut = lut

    def pre(self, acc: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if not self.float:
            return _requant16(acc, m, s)
        scale = m.double() * torch.pow(2.0, s.double() - 31 - PRE_FRAC_BITS)
        return acc.to(torch.float32) * scale.to(torch.float32)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32 if self.float else torch.int64)

    def h8(self, h: torch.Tensor) -> torch.Tensor:
        if not self.float:
            return _to8(h)
        return torch.round(h * 128).clamp(-128, 127).to(torch.int64)

    def c8(self, c: torch.Tensor) -> torch.Tensor:
        if not self.float:
            return _rdpot(c, CELL_SHIFT).clamp(-128, 127)
        return torch.round(c / CELL_QTYPE.scale).clamp(-128, 127).to(torch.int64)


def _run_direction(x: torch.Tensor, zx: int, p: dict[str, torch.Tensor], mode: _Mode,
                   kind: str, reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer and direction over ``x`` int64 ``[T, B, In]``: ``y8 [T, B, H]``, the last
    ``h8 [B, H]`` and the last cell as int8 ``[B, H]`` (zeros for a GRU)."""
    t_len, batch = x.shape[:2]
    hidden = p["w_hh"].shape[1]
    gx_all = mode.pre((x - zx) @ p["w_ih"].T + p["b_ih"], p["m_ih"], p["s_ih"])
    state = tuple(mode.zeros((batch, hidden)) for _ in range(1 if kind == "gru" else 2))
    h8 = torch.zeros(batch, hidden, dtype=torch.int64)
    ys = [h8] * t_len
    for t in (reversed(range(t_len)) if reverse else range(t_len)):
        gh = mode.pre(h8 @ p["w_hh"].T + p["b_hh"], p["m_hh"], p["s_hh"])
        state = mode.cell(gx_all[t], gh, state, mode.lut)
        h8 = mode.h8(state[0])
        ys[t] = h8
    c8 = mode.c8(state[1]) if kind == "lstm" else torch.zeros_like(h8)
    return torch.stack(ys), h8, c8


def _role_prefix(op: Op) -> str:
    """The one prefix every key of ``op.consts`` carries before its role ("" or the
    converter's, e.g. ``"layers.0."``), read off the ``tanh`` role."""
    for key in op.consts:
        if key == "tanh" or key.endswith(".tanh"):
            return key[: -len("tanh")]
    raise KeyError(f"{op.kind} op {op.source!r} has no 'tanh' table const")


def reference(program: Program, op: Op, x: torch.Tensor, x_qtype: QType, *,
              gates: str = "lut") -> list[torch.Tensor]:
    """The outputs (int64 tensors holding int8 values: ``y, h_n`` (+ ``c_n``)) of a ``gru`` /
    ``lstm`` op on ``x`` (int64 holding int8, zero initial state), exactly as the module
    docstring specifies. Measured alternatives (not what the C engine or ONNX export
    implement): ``gates="float"`` computes gates and state in float32, ``gates="table"``
    reads the gates from full 4096-entry sigmoid / tanh tables (:class:`_DirectTables`)."""
    if gates not in ("lut", "table", "float"):
        raise ValueError(f"gates must be 'lut', 'table' or 'float', got {gates!r}")
    a, kind = op.attrs, op.kind

    prefix = _role_prefix(op)

    def const(role: str) -> torch.Tensor:
        return program.consts[op.consts[prefix + role]].to(torch.int64)

    lut = _DirectTables() if gates == "table" else _Lut(const("tanh"))
    mode = _Mode(gates, kind, lut)
    seq = x.to(torch.int64)
    if a["batch_first"]:
        seq = seq.transpose(0, 1)
    zx, h_n, c_n = x_qtype.zero_point, [], []
    for k in range(a["num_layers"]):
        outs = []
        for d in range(2 if a["bidirectional"] else 1):
            p = {n: const(f"l{k}.d{d}.{n}") for n in _NAMES}
            y, h8, c8 = _run_direction(seq, zx, p, mode, kind, reverse=d == 1)
            outs.append(y)
            h_n.append(h8)
            c_n.append(c8)
        seq, zx = torch.cat(outs, dim=-1), OUT_QTYPE.zero_point
    y = seq.transpose(0, 1) if a["batch_first"] else seq
    result = [y, torch.stack(h_n)]
    return [*result, torch.stack(c_n)] if kind == "lstm" else result
