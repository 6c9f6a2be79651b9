"""C emitters of binary layers (Courbariaux et al., 2016, "Binarized neural networks";
Rastegari et al., 2016, "XNOR-Net"): the ``sign`` op, and ``linear`` / ``conv`` ops whose
int8 weights are all +-1, stored at 1 bit per weight (``static const uint32_t`` words, see
``c/int8_binary.h``).

A binary op whose input is produced by a ``sign`` op (+-1, zero-point 0: known from the
program) runs XNOR-popcount on packed input bits; any other int8 input runs the same
``u = x + 128`` operand as the int8 kernels against the weight bits, so the bias the int8
emitter folds (``b - (128 + zx) sum(w)``) and its requantization apply unchanged. The
kernels are pasted into the source once, after ``int8_ops.h``, on first use.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nncompress.kernels.int8_codegen import Gen
from nncompress.quant.program import Op

__all__ = ["HEADER", "binary_weights", "emit_conv_bits", "emit_linear_bits", "emit_sign",
           "pack_signs", "sign_input"]

#: The kernel header of the binary layers (``kernels/c/``).
HEADER = "int8_binary.h"
_WORD = 32
#: The requantization a binary op shares with the int8 emitter: the C names of its folded
#: int64 bias, multipliers and shifts, and the fast-path flag.
Requant = tuple[str, str, str, int]


def binary_weights(gen: Gen, op: Op) -> bool:
    """Whether the op's int8 weights are all +-1 (stored at 1 bit each)."""
    w = gen.p.consts[op.consts["w"]]
    return w.numel() > 0 and bool((w.to(torch.int16).abs() == 1).all())


def sign_input(gen: Gen, value: str) -> bool:
    """Whether ``value`` is the output of a ``sign`` op (+-1 at zero-point 0)."""
    return any(op.kind == "sign" and value in op.outputs for op in gen.p.ops)


def pack_signs(w2: torch.Tensor) -> torch.Tensor:
    """``[O, K]`` +-1 -> ``[O, ceil(K / 32)]`` uint32 words held in int64: bit ``i`` of
    word ``j`` set where element ``32 j + i`` is negative; tail bits clear."""
    o, k = w2.shape
    words = -(-k // _WORD)
    neg = torch.zeros(o, words * _WORD, dtype=torch.int64)
    neg[:, :k] = (w2 < 0).to(torch.int64)
    shifts = torch.arange(_WORD, dtype=torch.int64)
    return (neg.reshape(o, words, _WORD) << shifts).sum(dim=-1)


def _use_header(gen: Gen) -> None:
    """Paste ``c/int8_binary.h`` once (after ``int8_ops.h``, before every op function)."""
    if HEADER not in gen.headers:
        gen.headers.add(HEADER)
        gen.decls.append((Path(__file__).resolve().parent / "c" / HEADER).read_text())


def _bits_const(gen: Gen, hint: str, words: torch.Tensor) -> str:
    """A ``static const uint32_t`` array of ``words`` (counted in the const bytes)."""
    _use_header(gen)
    items = [f"0x{int(v):08x}u" for v in words.reshape(-1).tolist()] or ["0u"]
    name = f"k{len(gen.decls)}_{hint}"
    rows = [", ".join(items[i:i + 12]) for i in range(0, len(items), 12)]
    gen.decls.append(f"static const uint32_t NNC_ALIGNED {name}[{len(items)}] = {{\n    "
                     + ",\n    ".join(rows) + "\n};")
    gen.const_bytes += 4 * len(items)
    return name


def emit_sign(gen: Gen, op: Op) -> None:
    """``y = x >= t[c] ? 1 : -1`` along the op's axis, per sample."""
    _use_header(gen)
    x, y = op.inputs[0], op.outputs[0]
    xi = gen.infos[x]
    d = xi.sample_dim(op.attrs["axis"])
    outer, inner = math.prod(xi.shape[:d]), math.prod(xi.shape[d + 1:])
    t = gen.const("thr", "int16_t", gen.p.consts[op.consts["t"]])
    gen.out(y)
    gen.per_sample(y, [f"nnc_sign({gen.at(x)}, {gen.at(y)}, {outer}, {xi.shape[d]}, {inner}, "
                       f"{t});"])


def emit_linear_bits(gen: Gen, op: Op, w2: torch.Tensor, req: Requant, tail: str,
                     xnor: bool) -> None:
    """A linear op on 1-bit weights ``w2`` ``[O, K]``; ``tail``: ``zo, lo, hi`` of its
    requantization; ``xnor``: the input is +-1 (bias unfolded), else any int8."""
    x, y = op.inputs[0], op.outputs[0]
    xi = gen.infos[x]
    out_f, in_f = w2.shape
    words = -(-in_f // _WORD)
    W = _bits_const(gen, "wbits", pack_signs(w2))
    rows = xi.numel // in_f
    block_rows = rows * (gen.block if xi.batched else 1)
    R, ACC = gen.count(x, rows), gen.scratch("int32_t", block_rows * out_f)
    B, M, S, fast = req
    if xnor:
        XB = f"(uint32_t *)(void *){gen.scratch('int32_t', block_rows * words)}"
        gen.emit(f"nnc_pack_signs({gen.ptr(x)}, {R}, {in_f}, {words}, {XB});",
                 f"nnc_xnor_gemm({XB}, {R}, {words}, {in_f}, {W}, {out_f}, {ACC});")
    else:
        U = gen.scratch("uint8_t", block_rows * in_f)
        gen.emit(f"nnc_to_u8({gen.ptr(x)}, {U}, {R}, {in_f}, {in_f});",
                 f"nnc_bgemm({U}, {R}, {in_f}, {W}, {words}, {out_f}, {ACC});")
    gen.emit(f"nnc_requant({ACC}, {R}, {out_f}, {out_f}, {B}, {M}, {S}, {tail}, "
             f"{gen.out(y)}, {out_f}, 1, {fast});")


def emit_conv_bits(gen: Gen, op: Op, d: dict[str, int], w2: torch.Tensor, req: Requant,
                   tail: str, xnor: bool) -> None:
    """A conv op on 1-bit weights ``w2`` ``[O, C/g * kh * kw]``; ``d``: its sizes as 2-D
    (``int8_emit._spatial``); ``tail`` and ``xnor`` as :func:`emit_linear_bits`."""
    x, y = op.inputs[0], op.outputs[0]
    groups = op.attrs["groups"]
    cg, og, p = d["c"] // groups, d["o"] // groups, d["oh"] * d["ow"]
    k = cg * d["kh"] * d["kw"]
    words = -(-k // _WORD)
    W = _bits_const(gen, "wbits", pack_signs(w2))
    ACC = gen.scratch("int32_t", p * og)
    B, M, S, fast = req
    geo = f"{d['kh']}, {d['kw']}, {d['sh']}, {d['sw']}, {d['dh']}, {d['dw']}, {d['oh']}, {d['ow']}"
    gen.out(y)
    requant = (f"    nnc_requant({ACC}, {p}, {og}, {og}, {B} + grp * {og}, {M} + grp * {og}, "
               f"{S} + grp * {og}, {tail}, {gen.at(y)} + (size_t)grp * {og * p}, 1, {p}, "
               f"{fast});")
    wrow = f"{W} + (size_t)grp * {og * words}"
    if xnor:
        XB = f"(uint32_t *)(void *){gen.scratch('int32_t', p * words)}"
        MB = f"(uint32_t *)(void *){gen.scratch('int32_t', p * words)}"
        lines = [f"for (int32_t grp = 0; grp < {groups}; grp++) {{",
                 f"    nnc_xnor_im2col({gen.at(x)}, grp * {cg}, {cg}, {d['h']}, {d['w']}, "
                 f"{d['ph']}, {d['pw']}, {geo}, {words}, {XB}, {MB});",
                 f"    nnc_xnor_gemm_masked({XB}, {MB}, {p}, {words}, {wrow}, {og}, {ACC});",
                 requant, "}"]
    else:
        zx = gen.p.values[x].zero_point
        hp, wp = d["h"] + 2 * d["ph"], d["w"] + 2 * d["pw"]
        XP, U = gen.scratch("uint8_t", d["c"] * hp * wp), gen.scratch("uint8_t", p * k)
        lines = [f"nnc_pad_u8({gen.at(x)}, {d['c']}, {d['h']}, {d['w']}, {d['ph']}, {d['pw']}, "
                 f"(uint8_t){zx + 128}, {XP});",
                 f"for (int32_t grp = 0; grp < {groups}; grp++) {{",
                 f"    nnc_im2col({XP}, {hp}, {wp}, grp * {cg}, {cg}, {geo}, {k}, {U});",
                 f"    nnc_bgemm({U}, {p}, {k}, {wrow}, {words}, {og}, {ACC});",
                 requant, "}"]
    gen.per_sample(y, lines)
