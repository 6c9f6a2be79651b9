"""The one table of conversion rules: module type / function / method name -> rule.

A rule ``(builder, node) -> None`` emits the node's integer ops through the
:class:`~nncompress.quant.convert_rules.Builder` (see that module for the arithmetic).
Anything not in :data:`RULES` is refused by name before a program is returned.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nncompress.quant.affine import QMAX, QType, activation_qtype, quantize_tensor, weight_scales
from nncompress.quant.convert_binary import BINARY_RULES
from nncompress.quant.convert_functional import FUNCTIONAL_RULES
from nncompress.quant.convert_lowbit import LOWBIT_RULES
from nncompress.quant.convert_rules import (
    ADD,
    ALIAS,
    LUT,
    MATMUL,
    MUL,
    RELU,
    SOFTMAX,
    Builder,
    DimRef,
    ShapeRef,
)

__all__ = ["RULES"]

Rule = Callable[[Builder, fx.Node], None]


def _module(b: Builder, node: fx.Node) -> nn.Module:
    return b.gm.get_submodule(node.target)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ints(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * n


def _linear(b: Builder, node: fx.Node) -> None:
    b.weighted(node, "linear", _module(b, node), {})


def _conv(b: Builder, node: fx.Node) -> None:
    conv = _module(b, node)
    b.weighted(node, "conv", conv, b.conv_attrs(node, conv))


def _relu(b: Builder, node: fx.Node) -> None:
    x = b.value(node, node.args[0])
    qx = b.values[x]
    b.emit("clamp", node, [x], qx, {"act_min": qx.zero_point, "act_max": QMAX})


def _lut(b: Builder, node: fx.Node) -> None:
    key = type(_module(b, node)) if node.op == "call_module" else node.target
    module = _module(b, node) if node.op == "call_module" else None
    fn = LUT[key](module)
    if node.op != "call_module" and (len(node.args) > 1 or node.kwargs):
        extra = dict(node.kwargs)
        b.lut(node, lambda t: fn(t, *node.args[1:], **extra))
    else:
        b.lut(node, fn)


def _alias(b: Builder, node: fx.Node) -> None:
    b.env[node.name] = b.value(node, node.args[0])


def _shape_op(kind: str, attrs: Callable[[Builder, fx.Node], dict]) -> Rule:
    def rule(b: Builder, node: fx.Node) -> None:
        x = b.value(node, node.args[0])
        b.emit(kind, node, [x], b.values[x], attrs(b, node))
    return rule


def _flatten_attrs(b: Builder, node: fx.Node) -> dict:
    nd = b.ndim(node.args[0].name)
    if node.op == "call_module":
        m = _module(b, node)
        start, end = m.start_dim, m.end_dim
    else:
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    return {"start": start % nd, "end": end % nd}


def _dims(node: fx.Node) -> list[Any]:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return list(dims)


def _reshape_attrs(b: Builder, node: fx.Node) -> dict:
    shape: list[Any] = []
    for d in _dims(node):
        got = b.env.get(d.name) if isinstance(d, fx.Node) else d
        if isinstance(got, DimRef):
            shape.append(["dim", got.value, got.dim])
        elif isinstance(got, int):
            shape.append(got)
        else:
            b.fail(node, f"reshapes to a size the converter cannot follow ({d})")
    return {"shape": shape}


def _permute_attrs(b: Builder, node: fx.Node) -> dict:
    nd = b.ndim(node.args[0].name)
    return {"dims": [int(d) % nd for d in _dims(node)]}


def _transpose_attrs(b: Builder, node: fx.Node) -> dict:
    nd = b.ndim(node.args[0].name)
    return {"dims": [int(node.args[1]) % nd, int(node.args[2]) % nd]}


def _any_value(b: Builder, node: fx.Node, arg: Any) -> str:
    """The value name of a tensor argument of any dtype (shapes of int64 ids are fine)."""
    got = b.env.get(arg.name) if isinstance(arg, fx.Node) else None
    if not isinstance(got, str):
        b.fail(node, f"reads the shape of {getattr(arg, 'name', arg)!r}, not a tensor here")
    return got


def _getattr(b: Builder, node: fx.Node) -> None:
    if node.args[1] != "shape":
        b.fail(node, f"reads attribute {node.args[1]!r}")
    b.env[node.name] = ShapeRef(_any_value(b, node, node.args[0]), b.ndim(node.args[0].name))


def _size(b: Builder, node: fx.Node) -> None:
    x = _any_value(b, node, node.args[0])
    dim = _arg(node, 1, "dim")
    nd = b.ndim(node.args[0].name)
    b.env[node.name] = ShapeRef(x, nd) if dim is None else DimRef(x, dim % nd)


def _index_item(item: Any) -> Any:
    if item is Ellipsis:
        return "..."
    if isinstance(item, slice):
        return ["slice", item.start, item.stop, item.step]
    if item is None or isinstance(item, int):
        return item
    raise TypeError(item)


def _getitem(b: Builder, node: fx.Node) -> None:
    src, key = b.env.get(node.args[0].name), node.args[1]
    if isinstance(src, tuple):
        b.env[node.name] = src[key]
    elif isinstance(src, ShapeRef):
        b.env[node.name] = DimRef(src.value, key % src.ndim)
    else:
        x = b.value(node, node.args[0])
        items = key if isinstance(key, tuple) else (key,)
        try:
            attrs = {"items": [_index_item(i) for i in items]}
        except TypeError:
            b.fail(node, f"indexes with {key!r}; only ints, slices, None and ... are converted")
        b.emit("index", node, [x], b.values[x], attrs)


def _tensor_args(node: fx.Node) -> tuple[Any, Any]:
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def _add(b: Builder, node: fx.Node) -> None:
    lhs, rhs = _tensor_args(node)
    b.add(node, b.operand(node, lhs), b.operand(node, rhs))


def _number(arg: Any) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def _mul(b: Builder, node: fx.Node) -> None:
    lhs, rhs = _tensor_args(node)
    if _number(lhs) or _number(rhs):
        tensor, factor = (rhs, lhs) if _number(lhs) else (lhs, rhs)
        return b.rescale(node, b.value(node, tensor), float(factor))
    b.product(node, "mul", b.operand(node, lhs), b.operand(node, rhs))
    return None


def _div(b: Builder, node: fx.Node) -> None:
    lhs, rhs = _tensor_args(node)
    if not _number(rhs) or rhs == 0:
        b.fail(node, "divides by a tensor or zero; only division by a nonzero constant converts")
    b.rescale(node, b.value(node, lhs), 1.0 / float(rhs))


def _matmul(b: Builder, node: fx.Node) -> None:
    lhs, rhs = _tensor_args(node)
    b.product(node, "matmul", b.value(node, lhs), b.value(node, rhs))


def _cat(b: Builder, node: fx.Node) -> None:
    parts = [b.value(node, a) for a in node.args[0]]
    axis = _arg(node, 1, "dim", 0) % b.ndim(node.name)
    qo = b.qtype(node.name)
    ms, ss = [], []
    for p in parts:
        from nncompress.quant.affine import quantize_multiplier
        m, s = quantize_multiplier(b.values[p].scale / qo.scale)
        ms.append(m)
        ss.append(s)
    b.emit("concat", node, parts, qo, {"axis": axis, "ms": ms, "ss": ss})


def _mean(b: Builder, node: fx.Node) -> None:
    dims = _arg(node, 1, "dim")
    if dims is None:
        b.fail(node, "takes the mean of every element; give dims")
    dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
    b.mean(node, b.value(node, node.args[0]), dims, bool(_arg(node, 2, "keepdim", False)))


def _adaptive_avg(b: Builder, node: fx.Node) -> None:
    m = _module(b, node)
    nd = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
    if any(o not in (1, None) for o in _ints(m.output_size, nd)):
        b.fail(node, f"pools to output size {m.output_size}; only 1 (global pooling) converts")
    b.mean(node, b.value(node, node.args[0]), list(range(-nd, 0)), True)


def _pool(b: Builder, node: fx.Node) -> None:
    m = _module(b, node)
    nd = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
    x = b.value(node, node.args[0])
    kernel = _ints(m.kernel_size, nd)
    stride = _ints(m.stride if m.stride is not None else m.kernel_size, nd)
    padding = _ints(m.padding, nd)
    if m.ceil_mode:
        b.fail(node, "uses ceil_mode=True")
    attrs = {"kernel": kernel, "stride": stride, "padding": padding}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        if any(d != 1 for d in _ints(m.dilation, nd)) or m.return_indices:
            b.fail(node, "uses dilation or return_indices")
        return b.emit("maxpool", node, [x], b.values[x], attrs)
    if any(padding) and not m.count_include_pad:
        b.fail(node, "pads without counting the padding (count_include_pad=False)")
    if nd == 2 and getattr(m, "divisor_override", None):
        b.fail(node, "uses divisor_override")
    from nncompress.quant.affine import quantize_multiplier
    qx, qo = b.values[x], b.qtype(node.name)
    count = 1
    for k in kernel:
        count *= k
    mm, s = quantize_multiplier(qx.scale / (count * qo.scale))
    b.emit("avgpool", node, [x], qo, {**attrs, "m": mm, "s": s, "act_min": -128,
                                      "act_max": QMAX})
    return None


def _softmax(b: Builder, node: fx.Node) -> None:
    dim = _module(b, node).dim if node.op == "call_module" else _arg(node, 1, "dim")
    if dim is None:
        b.fail(node, "has no softmax dim")
    b.float_op(node, "softmax", {"dim": int(dim) % b.ndim(node.name)}, {},
               activation_qtype(0.0, 1.0), "softmax needs an exponential and a division "
               "(no integer kernel yet)")


def _layer_norm(b: Builder, node: fx.Node) -> None:
    m = _module(b, node)
    consts = {}
    # parameters rounded to float16 (stored in 2 bytes; the normalised output is then
    # quantized to int8, so the rounding is far below one output step)
    if m.weight is not None:
        consts["weight"] = m.weight.detach().half().float()
    if m.bias is not None:
        consts["bias"] = m.bias.detach().half().float()
    b.float_op(node, "layer_norm", {"shape": list(m.normalized_shape), "eps": float(m.eps)},
               consts, b.qtype(node.name), "layer normalisation needs a square root and a "
               "division (no integer kernel yet)")


def _embedding(b: Builder, node: fx.Node) -> None:
    m = _module(b, node)
    ids = b.env.get(node.args[0].name)
    if not isinstance(ids, str) or b.values[ids].dtype != "int64" or m.max_norm is not None:
        b.fail(node, "needs int64 ids and no max_norm")
    scale = float(weight_scales(m.weight, per_channel=False)[0])
    table = quantize_tensor(m.weight.detach(), scale, 0, -127, 127).to(torch.int8)
    b.emit("embedding", node, [ids], QType("int8", scale, 0), {}, {"table": table})


@dataclass(frozen=True)
class Zeros:
    """A ``torch.zeros(...)`` / ``zeros_like`` / ``new_zeros`` node: usable only as an RNN's
    initial state (any other consumer refuses it: it is not an int8 value)."""


def _zeros(b: Builder, node: fx.Node) -> None:
    b.env[node.name] = Zeros()


def _zero_state(b: Builder, hx: Any) -> bool:
    """Whether an RNN's initial state argument is zero: ``None`` (torch's default, which
    :class:`~nncompress.lowrank.layers.LowRankRNN` passes on), ``torch.zeros(...)``, or
    parameters / buffers that are all zeros (a tensor, or an LSTM's ``(h0, c0)``)."""
    if hx is None:
        return True
    parts = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    for part in parts:
        if isinstance(part, fx.Node) and isinstance(b.env.get(part.name), Zeros):
            continue
        t = b.attr_tensor(part)
        if t is None or bool(t.any()):
            return False
    return True


def _rnn(b: Builder, node: fx.Node) -> None:
    from nncompress.quant import int8_rnn
    m = _module(b, node)
    if not _zero_state(b, _arg(node, 1, "hx")) or set(node.kwargs) - {"hx"}:
        b.fail(node, "is given a nonzero initial state; only a zero initial state (None, as "
                     "LowRankRNN passes, or a zero buffer) converts")
    x = b.value(node, node.args[0])
    # one weight scale per gate matrix: as accurate as per row on the reference GRU/LSTM
    # (within 0.2 pt) and the file is 4.5x smaller than fp32 instead of 3.7x
    consts, attrs, qtypes = int8_rnn.convert_rnn(m, b.values[x], f"{node.target}.",
                                                 per_channel=False)
    kind = "lstm" if isinstance(m, nn.LSTM) else "gru"
    if not isinstance(m, (nn.GRU, nn.LSTM)):
        b.fail(node, "is an RNN kind the int8 converter does not handle (GRU and LSTM do)")
    outs = [f"{node.name}.{r}" for r in ("y", "h", "c")[: len(qtypes)]]
    for name, qt in zip(outs, qtypes, strict=True):
        b.values[name] = qt
    b.consts.update(consts)
    from nncompress.quant.program import Op
    b.ops.append(Op(kind, (x,), tuple(outs), attrs, {k: k for k in consts}, str(node.target)))
    b.env[node.name] = (outs[0], outs[1]) if kind == "gru" else (outs[0], (outs[1], outs[2]))


def _batchnorm(b: Builder, node: fx.Node) -> None:
    b.fail(node, "is a BatchNorm the fold_batchnorm stage could not fold into the layer "
                 "before it")


def _table() -> dict[Any, Rule]:
    rules: dict[Any, Rule] = {
        nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv,
        nn.Flatten: _shape_op("flatten", _flatten_attrs),
        torch.flatten: _shape_op("flatten", _flatten_attrs),
        "flatten": _shape_op("flatten", _flatten_attrs),
        "reshape": _shape_op("reshape", _reshape_attrs), "view": _shape_op("reshape",
                                                                            _reshape_attrs),
        torch.reshape: _shape_op("reshape", _reshape_attrs),
        "transpose": _shape_op("transpose", _transpose_attrs),
        torch.transpose: _shape_op("transpose", _transpose_attrs),
        "permute": _shape_op("permute", _permute_attrs),
        torch.permute: _shape_op("permute", _permute_attrs),
        "unsqueeze": _shape_op("unsqueeze", lambda b, n: {"dim": int(n.args[1])}),
        "squeeze": _shape_op("squeeze", lambda b, n: {"dim": int(n.args[1])}),
        getattr: _getattr, "size": _size,
        "dim": lambda b, n: b.env.__setitem__(n.name, b.ndim(n.args[0].name)),
        operator.getitem: _getitem,
        operator.truediv: _div, torch.div: _div, "div": _div,
        torch.cat: _cat, torch.concat: _cat, "mean": _mean, torch.mean: _mean,
        nn.AdaptiveAvgPool1d: _adaptive_avg, nn.AdaptiveAvgPool2d: _adaptive_avg,
        nn.MaxPool1d: _pool, nn.MaxPool2d: _pool, nn.AvgPool1d: _pool, nn.AvgPool2d: _pool,
        nn.LayerNorm: _layer_norm, nn.Embedding: _embedding, nn.RNNBase: _rnn,
        nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm,
        torch.zeros: _zeros, torch.zeros_like: _zeros, "new_zeros": _zeros,
    }
    rules.update(BINARY_RULES)    # the frozen binary layers (BNN / XNOR-Net)
    rules.update(FUNCTIONAL_RULES)   # F.linear / F.conv with parameters (low-rank layers)
    rules.update(LOWBIT_RULES)       # frozen low-bit layers (LSQ / power-of-two codes)
    for keys, rule in ((RELU, _relu), (ALIAS, _alias), (SOFTMAX, _softmax), (ADD, _add),
                       (MUL, _mul), (MATMUL, _matmul), (tuple(LUT), _lut)):
        for key in keys:
            rules[key] = rule
    return rules


RULES: dict[Any, Rule] = _table()
_ = F  # functional ops are keys of LUT/RELU/SOFTMAX
