"""C emitter of the ``gru`` / ``lstm`` ops (``c/int8_rnn.h``), the integer recurrent layers
of :mod:`nncompress.quant.int8_rnn` (GRU: Cho et al., 2014; LSTM: Hochreiter & Schmidhuber,
1997; integer arithmetic after Jacob et al., 2018).

Per sample the input ``x`` is ``[T, I]`` (the batch axis removed, whatever ``batch_first``),
``y`` ``[T, D*H]``, ``h_n`` / ``c_n`` ``[L*D, H]``. Each layer and direction is one
``nnc_rnn_dir`` call over the block's samples: the recurrent product then has one row per
sample, so a block of 8 samples reads ``w_hh`` once per step instead of 8 times.
"""

from __future__ import annotations

import torch

from nncompress.errors import UnsupportedLayerError
from nncompress.kernels.int8_codegen import Gen
from nncompress.kernels.int8_layout import pack_weights, pad_k
from nncompress.quant.program import Op

__all__ = ["emit_recurrent"]

_ROLES = ("w_ih", "w_hh", "b_ih", "b_hh", "m_ih", "s_ih", "m_hh", "s_hh")


def _prefix(op: Op) -> str:
    """The common prefix of ``op.consts``' keys (the role ``tanh`` names it)."""
    for key in op.consts:
        if key == "tanh" or key.endswith(".tanh"):
            return key[: -len("tanh")]
    raise UnsupportedLayerError(f"{op.kind} {op.source!r}: no 'tanh' table const")


def _side(gen: Gen, op: Op, p: dict[str, torch.Tensor], side: str, zx: int) -> list[str]:
    """C names of one side's (``ih`` / ``hh``) padded weights, folded bias, m, s."""
    w = p[f"w_{side}"].to(torch.int64)
    bias = p[f"b_{side}"].to(torch.int64) - (128 + zx) * w.sum(dim=1)
    if int(p[f"s_{side}"].abs().max()) > 62:
        raise UnsupportedLayerError(f"{op.kind} {op.source!r}: a shift beyond 62 bits")
    return [gen.const(f"w{side}", "int8_t", pack_weights(w)[0]),
            gen.const(f"b{side}", "int64_t", bias),
            gen.const(f"m{side}", "int32_t", p[f"m_{side}"]),
            gen.const(f"s{side}", "int32_t", p[f"s_{side}"])]


def emit_recurrent(gen: Gen, op: Op) -> None:
    a, lstm = op.attrs, op.kind == "lstm"
    x = op.inputs[0]
    xi = gen.infos[x]
    if len(xi.shape) != 2 or not xi.batched:
        raise UnsupportedLayerError(f"{op.kind} {op.source!r}: needs a batched [T, I] input "
                                    "per sample")
    t_len, in_f = xi.shape
    hidden, layers = a["hidden_size"], a["num_layers"]
    dirs = 2 if a["bidirectional"] else 1
    g = (4 if lstm else 3) * hidden
    prefix = _prefix(op)
    table = gen.p.consts[op.consts[prefix + "tanh"]].to(torch.int64)
    if table.shape != (257,):
        raise UnsupportedLayerError(f"{op.kind} {op.source!r}: tanh table of shape "
                                    f"{tuple(table.shape)} (need 257 entries)")
    pairs = (table[:-1] & 0xFFFF) | (table[1:] << 16)             # entries j and j + 1
    tab = gen.const("tanh", "int32_t", pairs.to(torch.int32))
    Y, HN = gen.out(op.outputs[0]), gen.out(op.outputs[1])
    CN = gen.out(op.outputs[2]) if lstm else "0"
    nb, rows = gen.block, gen.block * t_len
    kp_max, kp_h, g16 = max(pad_k(in_f), pad_k(dirs * hidden)), pad_k(hidden), -(-g // 16) * 16
    scratch = ", ".join([gen.scratch("uint8_t", rows * kp_max),
                         gen.scratch("int32_t", rows * g16), gen.scratch("int16_t", rows * g),
                         gen.scratch("uint8_t", nb * kp_h), gen.scratch("int16_t", nb * g),
                         gen.scratch("int32_t", nb * hidden), gen.scratch("int32_t", nb * hidden),
                         gen.scratch("int8_t", nb * hidden)])
    between = [gen.scratch("int8_t", rows * dirs * hidden) for _ in range(min(layers - 1, 2))]
    lines = [f"const nnc_rnn_scratch t_ = {{{scratch}}};"]
    for k in range(layers):
        src = gen.ptr(x) if k == 0 else between[(k - 1) % 2]
        dst = Y if k == layers - 1 else between[k % 2]
        k_in, zx = (in_f, gen.p.values[x].zero_point) if k == 0 else (dirs * hidden, 0)
        for d in range(dirs):
            p = {r: gen.p.consts[op.consts[f"{prefix}l{k}.d{d}.{r}"]] for r in _ROLES}
            w = _side(gen, op, p, "ih", zx) + _side(gen, op, p, "hh", 0)
            at = (k * dirs + d) * hidden
            lines.append(f"nnc_rnn_dir({int(lstm)}, {src}, nb, {t_len}, {k_in}, {pad_k(k_in)}, "
                         f"{hidden}, {kp_h}, {g16}, (nnc_rnn_weights){{{', '.join(w)}}}, "
                         f"{tab}, {d}, {dst}, {dirs * hidden}, {d * hidden}, {HN} + {at}, "
                         f"{CN + ' + ' + str(at) if lstm else '0'}, {layers * dirs * hidden}, "
                         "t_);")
    gen.headers.add("int8_rnn.h")
    gen.emit("{", *(f"    {ln}" for ln in lines), "}")
