"""C emitters of the arithmetic ops of an integer program, and :data:`EMITTERS`, the one
table from op kind to emitter (every kind of :data:`~nncompress.quant.program.OP_KINDS`).

Jacob et al. (2018): weights are int8, accumulation int32, requantization by fixed-point
multiplier and shift (``nnc_mbqm``). Dot products run as ``uint8 (x + 128) x int8 w`` on
weights packed for AVX-512 VNNI ``vpdpbusd`` (``pack_weights``; plain C where the CPU lacks
it); ``-(128 + zx) * sum(w)`` is folded into an int64 bias here, at generation. Linear /
conv ops whose weights are all +-1 (binary layers) keep them at 1 bit each
(:mod:`nncompress.kernels.int8_emit_binary`). Ops of one int8 input (clamp, lut, rescale,
dequantize) become 256-entry tables computed by the reference itself, exact by
construction; softmax reads exp from a 256-entry table of the differences its int8 input
can have.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nncompress.errors import UnsupportedLayerError
from nncompress.kernels.int8_codegen import Gen, c_float
from nncompress.kernels.int8_emit_binary import (
    binary_weights,
    emit_conv_bits,
    emit_linear_bits,
    emit_sign,
    sign_input,
)
from nncompress.kernels.int8_emit_move import (
    broadcast_operand,
    emit_concat,
    emit_const,
    emit_embedding,
    emit_move,
)
from nncompress.kernels.int8_emit_rnn import emit_recurrent
from nncompress.kernels.int8_layout import pack_weights, pad_k
from nncompress.quant import reference
from nncompress.quant.affine import QMAX, QMIN
from nncompress.quant.program import Op

__all__ = ["DIRECT_CONV_MAX_K", "EMITTERS"]

#: Grouped convolutions whose per-group dot product is shorter than this (depthwise) run as
#: direct loops; the others as im2col + the VNNI dot-product kernel.
DIRECT_CONV_MAX_K = 32


def _al64(n: int) -> int:
    return -(-n // 64) * 64


def _name(op: Op) -> str:
    return f"{op.kind} {op.source or op.outputs[0]!r}"


def _req(op: Op) -> str:
    """``lo, hi``: the clamp bounds of the op's requantization."""
    return f"{op.attrs.get('act_min', QMIN)}, {op.attrs.get('act_max', QMAX)}"


def _shift(op: Op, *shifts: int | torch.Tensor) -> None:
    for s in shifts:
        t = torch.as_tensor(s)
        if t.numel() and int(t.abs().max()) > 62:
            raise UnsupportedLayerError(f"{_name(op)}: a requantization shift beyond 62 bits")


def _zp(gen: Gen, name: str) -> int:
    return gen.p.values[name].zero_point


def _table(gen: Gen, op: Op) -> torch.Tensor:
    """The reference op on each of the 256 int8 input values."""
    return reference._step(gen.p, op, {op.inputs[0]: torch.arange(QMIN, QMAX + 1)})[0]


def emit_table(gen: Gen, op: Op) -> None:
    """clamp, lut, rescale, dequantize: ``y = table[x + 128]``."""
    x, y = op.inputs[0], op.outputs[0]
    _shift(op, op.attrs.get("s", 0))
    is_float = gen.infos[y].dtype == "float32"
    if gen.compact and op.kind == "dequantize":
        qx = gen.p.values[x]
        gen.headers.add("int8_compact.h")
        gen.emit(f"nnc_dequant({gen.ptr(x)}, {gen.out(y)}, {gen.count(y)}, {qx.zero_point}, "
                 f"{c_float(qx.scale)});")
        return
    tab = gen.const(op.kind, "float" if is_float else "int8_t", _table(gen, op))
    fn = "nnc_lutf" if is_float else "nnc_lut8"
    gen.emit(f"{fn}({gen.ptr(x)}, {gen.out(y)}, {gen.count(y)}, {tab});")


def emit_quantize(gen: Gen, op: Op) -> None:
    x, y = op.inputs[0], op.outputs[0]
    qo = gen.p.values[y]
    gen.emit(f"nnc_quantize({gen.ptr(x)}, {gen.out(y)}, {gen.count(y)}, {c_float(qo.scale)}, "
             f"{qo.zero_point});")


def _folded(gen: Gen, op: Op, zx: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights ``[O, K]``, the folded bias ``b - (128 + zx) * sum(w)`` (int64) and m, s
    (one per output) of a linear / conv op."""
    w = gen.p.consts[op.consts["w"]].to(torch.int64)
    w2 = w.reshape(w.shape[0], -1)
    bias = gen.p.consts[op.consts["b"]].to(torch.int64) if "b" in op.consts \
        else torch.zeros(w.shape[0], dtype=torch.int64)
    bias = bias - (128 + zx) * w2.sum(dim=1)
    m, s = gen.p.consts[op.consts["m"]], gen.p.consts[op.consts["s"]]
    _shift(op, s)
    if m.numel() != w.shape[0] or s.numel() != w.shape[0]:
        m, s = m.reshape(-1).expand(w.shape[0]), s.reshape(-1).expand(w.shape[0])
    return w2, bias, m, s


def _weights(gen: Gen, op: Op, zx: int) -> tuple[torch.Tensor, str, str, str, int]:
    """The weights ``[O, K]``, the C names of the folded int64 bias (:func:`_folded`), m
    and s, and whether the short requantization applies (``acc + bias`` provably within
    int32 for any input, every ``s <= 0``, ``m >= 0``)."""
    w2, bias, m, s = _folded(gen, op, zx)
    bound = 255 * w2.abs().sum(dim=1) + bias.abs()          # |sum (x + 128) w + bias|
    fast = int(bool((bound < 2**31).all() and (s <= 0).all() and (m >= 0).all()))
    return (w2, gen.const("bias", "int64_t", bias), gen.const("m", "int32_t", m),
            gen.const("s", "int32_t", s), fast)


def _bits(gen: Gen, op: Op) -> tuple[bool, bool, int]:
    """Whether the op's weights are stored at 1 bit (all +-1), whether its input comes from
    a ``sign`` op (XNOR-popcount), and the zero-point to fold into its bias (-128 folds
    nothing: the XNOR kernels compute the centred dot product themselves)."""
    bits = binary_weights(gen, op)
    xnor = bits and sign_input(gen, op.inputs[0])
    return bits, xnor, -128 if xnor else _zp(gen, op.inputs[0])


def emit_linear(gen: Gen, op: Op) -> None:
    x, y = op.inputs[0], op.outputs[0]
    xi = gen.infos[x]
    xi.sample_dim(-1)                                  # the features are not the batch
    bits, xnor, zx = _bits(gen, op)
    if gen.compact and not bits and _emit_linear_compact(gen, op, zx):
        return
    w2, B, M, S, fast = _weights(gen, op, zx)
    if bits:
        emit_linear_bits(gen, op, w2, (B, M, S, fast), f"{_zp(gen, y)}, {_req(op)}", xnor)
        return
    out_f, in_f = w2.shape
    packed, kp, c16 = pack_weights(w2)
    W = gen.const("w", "int8_t", packed)
    rows = xi.numel // in_f
    block_rows = rows * (gen.block if xi.batched else 1)
    U, ACC = gen.scratch("uint8_t", block_rows * kp), gen.scratch("int32_t", block_rows * c16)
    R = gen.count(x, rows)
    gen.emit(f"nnc_to_u8({gen.ptr(x)}, {U}, {R}, {in_f}, {kp});",
             f"nnc_gemm({U}, {R}, {kp}, {W}, {c16}, {ACC});",
             f"nnc_requant({ACC}, {R}, {out_f}, {c16}, {B}, {M}, {S}, {_zp(gen, y)}, "
             f"{_req(op)}, {gen.out(y)}, {out_f}, 1, {fast});")


def _emit_linear_compact(gen: Gen, op: Op, zx: int) -> bool:
    """The C export's Linear (``nnc_dense_c``): weights ``[O, K]`` unpadded, the folded
    bias (:func:`_folded`) as int32, multipliers as their high 16 bits, int8 shifts. False
    (the packed form is used) where a value does not fit those types."""
    x, y = op.inputs[0], op.outputs[0]
    w2, bias, m, s = _folded(gen, op, zx)
    out_f, in_f = w2.shape
    m = m.to(torch.int64)
    fits = (int(bias.abs().max()) + 255 * 128 * in_f < 2**31 and bool((m % 65536 == 0).all())
            and bool((m >= 0).all()) and int(m.max()) < 2**31)
    if not fits:
        return False
    gen.headers.add("int8_compact.h")
    W = gen.const("w", "int8_t", w2)
    B, M = gen.const("bias", "int32_t", bias), gen.const("mh", "int16_t", m // 65536)
    S = gen.const("s", "int8_t", s)
    rows = gen.infos[x].numel // in_f
    gen.emit(f"nnc_dense_c({gen.ptr(x)}, {gen.count(x, rows)}, {in_f}, {W}, {out_f}, {B}, {M}, "
             f"{S}, {_zp(gen, y)}, {_req(op)}, {gen.out(y)});")
    return True


def _spatial(gen: Gen, op: Op, kernel: list[int]) -> dict[str, int]:
    """Sizes of a 1-D/2-D conv or pool as 2-D (1-D: height 1), channels-first per sample."""
    xi, yi = gen.infos[op.inputs[0]], gen.infos[op.outputs[0]]
    nd = len(kernel)
    if xi.batch_axis != 0 or yi.batch_axis != 0 or nd not in (1, 2):
        raise UnsupportedLayerError(f"{_name(op)}: needs [batch, channels, *spatial] (1-D or 2-D)")

    def two(value: int | list[int] | None, default: int) -> list[int]:
        v = [value] * nd if isinstance(value, int) else list(value or [])
        return [default, *v] if nd == 1 else v

    a = op.attrs
    kh, kw = two(kernel, 1)
    sh, sw = two(a.get("stride") or kernel, 1)
    ph, pw = two(a.get("padding", 0), 0)
    dh, dw = two(a.get("dilation", 1), 1)
    (h, w), (oh, ow) = two(list(xi.shape[1:]), 1), two(list(yi.shape[1:]), 1)
    return dict(c=xi.shape[0], h=h, w=w, oh=oh, ow=ow, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw,
                dh=dh, dw=dw, o=yi.shape[0])


def emit_conv(gen: Gen, op: Op) -> None:
    x, y = op.inputs[0], op.outputs[0]
    w = gen.p.consts[op.consts["w"]]
    d = _spatial(gen, op, list(w.shape[2:]))
    groups, zx = op.attrs["groups"], _zp(gen, x)
    bits, xnor, fold = _bits(gen, op)
    if bits:
        w2, B, M, S, fast = _weights(gen, op, fold)
        emit_conv_bits(gen, op, d, w2, (B, M, S, fast), f"{_zp(gen, y)}, {_req(op)}", xnor)
        return
    cg, og = d["c"] // groups, d["o"] // groups
    hp, wp, p = d["h"] + 2 * d["ph"], d["w"] + 2 * d["pw"], d["oh"] * d["ow"]
    k = cg * d["kh"] * d["kw"]
    geo = f"{d['kh']}, {d['kw']}, {d['sh']}, {d['sw']}, {d['dh']}, {d['dw']}, {d['oh']}, {d['ow']}"
    XP = gen.scratch("uint8_t", d["c"] * hp * wp)
    gen.out(y)
    zo = _zp(gen, y)
    lines = [f"nnc_pad_u8({gen.at(x)}, {d['c']}, {d['h']}, {d['w']}, {d['ph']}, {d['pw']}, "
             f"(uint8_t){zx + 128}, {XP});"]
    w2, B, M, S, fast = _weights(gen, op, zx)
    if groups > 1 and k < DIRECT_CONV_MAX_K:
        W, ACC = gen.const("w", "int8_t", w2), gen.scratch("int32_t", p)
        lines.append(f"nnc_conv_direct({XP}, {hp}, {wp}, {cg}, {og}, {W}, {d['o']}, {geo}, {B}, "
                     f"{M}, {S}, {zo}, {_req(op)}, {ACC}, {gen.at(y)});")
    else:
        packed, kp, c16 = pack_weights(w2, groups)
        W = gen.const("w", "int8_t", packed)
        U, ACC = gen.scratch("uint8_t", p * kp), gen.scratch("int32_t", p * c16)
        lines += [f"for (int32_t grp = 0; grp < {groups}; grp++) {{",
                  f"    nnc_im2col({XP}, {hp}, {wp}, grp * {cg}, {cg}, {geo}, {kp}, {U});",
                  f"    nnc_gemm({U}, {p}, {kp}, {W} + (size_t)grp * {c16 * kp}, {c16}, {ACC});",
                  f"    nnc_requant({ACC}, {p}, {og}, {c16}, {B} + grp * {og}, {M} + grp * {og}, "
                  f"{S} + grp * {og}, {zo}, {_req(op)}, {gen.at(y)} + (size_t)grp * {og * p}, "
                  f"1, {p}, {fast});", "}"]
    gen.per_sample(y, lines)


def emit_pool(gen: Gen, op: Op) -> None:
    x, y = op.inputs[0], op.outputs[0]
    d = _spatial(gen, op, list(op.attrs["kernel"]))
    geo = (f"{d['c']} * {gen.samples(y)}, {d['h']}, {d['w']}, {d['kh']}, {d['kw']}, {d['sh']}, "
           f"{d['sw']}, {d['ph']}, {d['pw']}, {d['oh']}, {d['ow']}")
    if op.kind == "maxpool":
        gen.emit(f"nnc_maxpool({gen.ptr(x)}, {geo}, {gen.out(y)});")
        return
    _shift(op, op.attrs["s"])
    gen.emit(f"nnc_avgpool({gen.ptr(x)}, {geo}, {_zp(gen, x)}, {op.attrs['m']}, "
             f"{op.attrs['s']}, {_zp(gen, y)}, {_req(op)}, {gen.out(y)});")


def emit_mean(gen: Gen, op: Op) -> None:
    x, y = op.inputs[0], op.outputs[0]
    xi, dims = gen.infos[x], op.attrs["dims"]
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        raise UnsupportedLayerError(f"{_name(op)}: a mean over no dims (over the batch)")
    red = sorted({xi.sample_dim(d) for d in dims})
    kept = [d for d in range(len(xi.shape)) if d not in red]
    nk, nr = math.prod(xi.shape[d] for d in kept), math.prod(xi.shape[d] for d in red)
    idx = torch.arange(xi.numel).reshape(xi.shape).permute(kept + red).reshape(nk, nr)
    K, R = gen.const("kept", "int32_t", idx[:, 0]), gen.const("red", "int32_t", idx[0] - idx[0, 0])
    _shift(op, op.attrs["s"])
    gen.out(y)
    gen.per_sample(y, [f"nnc_mean({gen.at(x)}, {K}, {nk}, {R}, {nr}, {_zp(gen, x)}, "
                       f"{op.attrs['m']}, {op.attrs['s']}, {_zp(gen, y)}, {_req(op)}, "
                       f"{gen.at(y)});"])


def emit_matmul(gen: Gen, op: Op) -> None:
    from nncompress.kernels.int8_layout import ValueInfo, index_tensor, sample_gather
    (a, b), y = op.inputs, op.outputs[0]
    ai, bi, yi = gen.infos[a], gen.infos[b], gen.infos[y]
    for info in (ai, bi, yi):
        if info.batch_axis is not None and info.batch_axis >= len(info.full) - 2:
            raise UnsupportedLayerError(f"{_name(op)}: the batch is a matrix dimension")
    mm, kk = ai.full[-2:]
    nn = bi.full[-1]
    lead = ValueInfo(y, "int8", yi.shape[:-2], yi.batch_axis, yi.full[:-2])
    offs = [sample_gather(torch.broadcast_to(index_tensor(i)[..., 0, 0], lead.full), lead,
                          i.batched, _name(op)) for i in (ai, bi)]
    count = math.prod(lead.shape)
    AO, BO = gen.const("aoff", "int32_t", offs[0]), gen.const("boff", "int32_t", offs[1])
    _shift(op, op.attrs["s"])
    kp, n16 = pad_k(kk), -(-nn // 16) * 16
    SCR = gen.scratch("uint8_t", _al64(mm * kp) + _al64(n16 * kp) + _al64(mm * n16 * 4)
                      + _al64(n16 * 8) + 8 * nn)      # nnc_matmul's scratch layout
    gen.out(y)
    gen.per_sample(y, [f"for (int32_t l = 0; l < {count}; l++)",
                       f"    nnc_matmul({gen.at(a)} + {AO}[l], {_zp(gen, a)}, {gen.at(b)} + "
                       f"{BO}[l], {_zp(gen, b)}, {mm}, {kk}, {nn}, {op.attrs['m']}, "
                       f"{op.attrs['s']}, {_zp(gen, y)}, {_req(op)}, {SCR}, "
                       f"{gen.at(y)} + (size_t)l * {mm * nn});"])


def emit_binary(gen: Gen, op: Op) -> None:
    """add (TensorFlow Lite's int8 add, per-value tables) and mul, broadcasting."""
    (a, b), y = op.inputs, op.outputs[0]
    t = op.attrs
    (pa, da, la), (pb, db, lb) = (broadcast_operand(gen, v, y, _name(op)) for v in (a, b))
    if op.kind == "add":
        _shift(op, t["sa"], t["sb"], t["so"])
        args = (f"{_zp(gen, a)}, {t['ma']}, {t['sa']}, {_zp(gen, b)}, {t['mb']}, {t['sb']}, "
                f"{t['mo']}, {t['so']}")
    else:
        _shift(op, t["s"])
        args = f"{_zp(gen, a)}, {_zp(gen, b)}, {t['m']}, {t['s']}"
    Y = gen.out(y)
    tail = f"{args}, {_zp(gen, y)}, {_req(op)}"
    if da and db:
        gen.emit(f"nnc_{op.kind}({gen.ptr(a)}, {gen.ptr(b)}, {gen.count(y)}, {tail}, {Y});")
        return
    n = gen.infos[y].numel
    gen.per_sample(y, [*la, *lb, f"nnc_{op.kind}({pa}, {pb}, {n}, {tail}, {gen.at(y)});"])


def emit_float(gen: Gen, op: Op) -> None:
    """layer_norm / softmax in double (``int8_float.h``)."""
    x, y = op.inputs[0], op.outputs[0]
    xi, args, qo, qx = gen.infos[x], op.attrs["args"], gen.p.values[y], gen.p.values[x]
    gen.headers.add("int8_float.h")
    Y = gen.out(y)
    if op.attrs["fn"] == "softmax":
        d = xi.sample_dim(args["dim"])
        outer, inner = math.prod(xi.shape[:d]), math.prod(xi.shape[d + 1:])
        # exp(x_i - max) takes 256 values: exp(-k * scale) for k = q_max - q_i
        table = [math.exp(-k * qx.scale) for k in range(QMAX - QMIN + 1)]
        E = gen.const("exp", "double", torch.tensor(table, dtype=torch.float64))
        gen.emit(f"nnc_softmax({gen.ptr(x)}, {gen.count(x, outer)}, {xi.shape[d]}, {inner}, "
                 f"{E}, {c_float(qo.scale)}, {qo.zero_point}, {Y});")
        return
    n = math.prod(args["shape"])
    for dim in range(-len(args["shape"]), 0):
        xi.sample_dim(dim)
    wb = {"weight": torch.ones(n), "bias": torch.zeros(n)}      # absent: exact no-ops
    for k in wb:
        if k in op.consts:
            wb[k] = gen.p.consts[op.consts[k]].reshape(-1)
    W, B = gen.const("lnweight", "float", wb["weight"]), gen.const("lnbias", "float", wb["bias"])
    sx = float(torch.tensor(qx.scale, dtype=torch.float32))     # the reference's float32 scale
    gen.emit(f"nnc_layer_norm({gen.ptr(x)}, {gen.count(x, xi.numel // n)}, {n}, {qx.zero_point}, "
             f"{sx.hex()}, {W}, {B}, {float(args['eps'])!r}, {c_float(qo.scale)}, "
             f"{qo.zero_point}, {Y});")


#: op kind -> emitter: the one table the generator reads.
EMITTERS: dict[str, Callable[[Gen, Op], None]] = {
    "quantize": emit_quantize, "dequantize": emit_table, "linear": emit_linear,
    "conv": emit_conv, "matmul": emit_matmul, "add": emit_binary, "mul": emit_binary,
    "rescale": emit_table, "concat": emit_concat, "clamp": emit_table, "lut": emit_table,
    "maxpool": emit_pool, "avgpool": emit_pool, "mean": emit_mean, "reshape": emit_move,
    "transpose": emit_move, "permute": emit_move, "flatten": emit_move, "index": emit_move,
    "unsqueeze": emit_move, "squeeze": emit_move, "const": emit_const,
    "embedding": emit_embedding, "gru": emit_recurrent, "lstm": emit_recurrent,
    "float": emit_float, "sign": emit_sign,
}
