"""C emitters of the data-movement ops of an integer program: shape ops (reshape, flatten,
squeeze, unsqueeze: an alias where the per-sample order is unchanged; transpose, permute,
index: a strided copy, or a gather table), broadcasting of elementwise operands, concat,
embedding and const. Each gather map comes from the reference op run on index tensors
(:func:`nncompress.kernels.int8_layout.op_gather`), so it is the reference's semantics."""

from __future__ import annotations

import math

import torch

from nncompress.errors import UnsupportedLayerError
from nncompress.kernels.int8_codegen import Gen
from nncompress.kernels.int8_layout import (
    index_tensor,
    op_gather,
    sample_gather,
    strided,
)
from nncompress.quant import reference
from nncompress.quant.program import Op

__all__ = ["broadcast_operand", "copy_lines", "emit_concat", "emit_const", "emit_embedding",
           "emit_move"]


def copy_lines(gen: Gen, ctype: str, src: str, dst: str, gather: torch.Tensor,
               shape: tuple[int, ...]) -> list[str]:
    """C lines copying ``dst[i] = src[gather[i]]`` over per-sample ``shape``: nested loops
    with literal strides when the map is affine, else a table."""
    n = int(gather.numel())
    if n == 0:
        return []
    st = strided(gather, shape)
    if st is None:
        tab = gen.const("gather", "int32_t", gather)
        return [f"for (int32_t i = 0; i < {n}; i++) ({dst})[i] = ({src})[{tab}[i]];"]
    if not st.shape:
        return [f"({dst})[0] = ({src})[{st.offset}];"]
    loops = "".join(f"for (int32_t i{j} = 0; i{j} < {size}; i{j}++) "
                    for j, size in enumerate(st.shape))
    index = " + ".join(f"i{j} * {step}" for j, step in enumerate(st.strides))
    return [f"{{ {ctype} *d_ = {dst}; const {ctype} *r_ = {src} + {st.offset};",
            f"  {loops}*d_++ = r_[{index}]; }}"]


def emit_move(gen: Gen, op: Op) -> None:
    """reshape / flatten / squeeze / unsqueeze / transpose / permute / index."""
    x, y = op.inputs[0], op.outputs[0]
    xi, yi = gen.infos[x], gen.infos[y]
    gather = op_gather(gen.p, op, gen.infos)
    st = strided(gather, yi.shape)
    if st is not None and st.identity and xi.numel == yi.numel:
        gen.alias(y, x)
        return
    gen.out(y)
    gen.per_sample(y, copy_lines(gen, yi.ctype, gen.at(x), gen.at(y), gather, yi.shape))


def broadcast_operand(gen: Gen, name: str, out: str, what: str) -> tuple[str, bool, list[str]]:
    """Operand ``name`` of an elementwise op with output ``out``, per sample ``s``: (pointer,
    whether it is the value itself in the output's layout, C lines materialising it)."""
    info, yi = gen.infos[name], gen.infos[out]
    full = torch.broadcast_to(index_tensor(info), yi.full)
    gather = sample_gather(full, yi, info.batched, what)
    st = strided(gather, yi.shape)
    if st is not None and st.identity and info.numel == yi.numel:
        return gen.at(name), info.batched == yi.batched, []
    buf = gen.scratch(info.ctype, yi.numel)
    return buf, False, copy_lines(gen, info.ctype, gen.at(name), buf, gather, yi.shape)


def _concat_table(gen: Gen, op: Op, k: int) -> torch.Tensor:
    """The reference's rescaling of input ``k`` into the output, on all 256 int8 values."""
    one = Op("concat", (op.inputs[k],), op.outputs[:1],
             {"axis": 0, "ms": [op.attrs["ms"][k]], "ss": [op.attrs["ss"][k]]})
    return reference._step(gen.p, one, {op.inputs[k]: torch.arange(-128, 128)})[0]


def emit_concat(gen: Gen, op: Op) -> None:
    y = op.outputs[0]
    yi = gen.infos[y]
    d = yi.sample_dim(op.attrs["axis"])
    outer, total = math.prod(yi.shape[:d]), math.prod(yi.shape[d:])
    Y = gen.out(y)
    offset = 0
    for k, x in enumerate(op.inputs):
        xi = gen.infos[x]
        if xi.batched != yi.batched:
            raise UnsupportedLayerError(f"concat {op.source!r}: inputs with and without a batch "
                                        "axis")
        chunk = math.prod(xi.shape[d:])
        tab = gen.const("concat", "int8_t", _concat_table(gen, op, k))
        rows = f"nb * {outer}" if yi.batched else str(outer)
        gen.emit(f"nnc_concat_part({gen.ptr(x)}, {rows}, {chunk}, {tab}, {total}, {offset}, "
                 f"{Y});")
        offset += chunk
    if offset != total:
        raise UnsupportedLayerError(f"concat {op.source!r}: parts of {offset} values do not fill "
                                    f"{total}")


def emit_embedding(gen: Gen, op: Op) -> None:
    x, y = op.inputs[0], op.outputs[0]
    table = gen.p.consts[op.consts["table"]]
    if table.dim() != 2:
        raise UnsupportedLayerError(f"embedding {op.source!r}: table of shape "
                                    f"{tuple(table.shape)} (need [N, D])")
    n, d = table.shape
    tab = gen.const("embed", "int8_t", table)
    Y = gen.out(y)
    gen.emit(f"if (nnc_embedding({gen.ptr(x)}, {gen.count(x)}, {tab}, {n}, {d}, {Y})) "
             "return 1;")


def emit_const(gen: Gen, op: Op) -> None:
    value = gen.p.consts[op.consts["value"]]
    gen.bind(op.outputs[0], gen.const("const", "int8_t", value))
