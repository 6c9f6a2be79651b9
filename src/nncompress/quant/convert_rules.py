"""The conversion rules: fx node -> integer ops (one table per node kind).

Each rule reads the node's inputs (value names of int8 tensors, tuples of them, shape
references or Python constants), appends ops to the program and maps the node to its
output. Multipliers follow Jacob et al. (2018): a Linear's ``M[o] = S_x S_w[o] / S_out``
with the bias held in int32 at scale ``S_x S_w[o]``; an add uses TensorFlow Lite's
two-multiplier form; a mean divides by the element count inside its multiplier; an
elementwise function of one int8 value becomes a 256-entry lookup table (exact).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.quant.affine import (
    QMAX,
    QMIN,
    WMAX,
    QType,
    activation_qtype,
    fixed_point,
    quantize_multiplier,
    quantize_tensor,
    weight_scales,
)
from nncompress.quant.convert import Calibration
from nncompress.quant.program import Op, Program

__all__ = ["Builder"]

_INT32 = (-(2**31), 2**31 - 1)
_LEFT = 20


@dataclass(frozen=True)
class ShapeRef:
    value: str
    ndim: int


@dataclass(frozen=True)
class DimRef:
    value: str
    dim: int


def _lut_functions() -> dict[Any, Callable[[nn.Module | None], Callable]]:
    """Module type / function / method name -> (module -> elementwise float function)."""
    table: dict[Any, Callable[[nn.Module | None], Callable]] = {
        nn.GELU: lambda m: (lambda t: F.gelu(t, approximate=m.approximate)),
        nn.Sigmoid: lambda m: torch.sigmoid, nn.Tanh: lambda m: torch.tanh,
        nn.SiLU: lambda m: F.silu, nn.Hardswish: lambda m: F.hardswish,
        nn.Hardsigmoid: lambda m: F.hardsigmoid, nn.Mish: lambda m: F.mish,
        nn.ELU: lambda m: m, nn.LeakyReLU: lambda m: m, nn.Softplus: lambda m: m,
        nn.ReLU6: lambda m: m, nn.Hardtanh: lambda m: m,
        F.gelu: lambda m: F.gelu, torch.sigmoid: lambda m: torch.sigmoid,
        torch.tanh: lambda m: torch.tanh, F.silu: lambda m: F.silu,
        "sigmoid": lambda m: torch.sigmoid, "tanh": lambda m: torch.tanh,
    }
    return table


LUT = _lut_functions()
RELU = (nn.ReLU, F.relu, torch.relu, "relu")
ALIAS = (nn.Identity, nn.Dropout, "contiguous", "detach")
SOFTMAX = (nn.Softmax, F.softmax, torch.softmax, "softmax")
ADD = (operator.add, torch.add, "add")
MUL = (operator.mul, torch.mul, "mul")
MATMUL = (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")


def _ints(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


def _key(gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    return node.target


class Builder:
    """Accumulates the program while :func:`~nncompress.quant.convert.build_program`
    visits the nodes in order."""

    def __init__(self, gm: fx.GraphModule, cal: Calibration, *, per_channel: bool) -> None:
        self.gm, self.cal, self.per_channel = gm, cal, per_channel
        self.values: dict[str, QType] = {}
        self.ops: list[Op] = []
        self.consts: dict[str, torch.Tensor] = {}
        self.env: dict[str, Any] = {}
        self.log: list[str] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.names: dict[str, str] = {}
        self.used: list[str] = []   # nodes whose calibrated range the program uses

    # -- helpers ------------------------------------------------------------------------
    def fail(self, node: fx.Node, why: str) -> None:
        what = node.target if node.op == "call_module" else node.name
        kind = (type(self.gm.get_submodule(node.target)).__name__ if node.op == "call_module"
                else getattr(node.target, "__name__", str(node.target)))
        raise UnsupportedLayerError(f"int8 conversion: {what} ({kind}) {why}")

    def qtype(self, name: str) -> QType:
        self.used.append(name)
        if name not in self.cal.ranges:
            raise UnsupportedLayerError(f"int8 conversion: {name} was never reached by the "
                                        "calibration data")
        return activation_qtype(*self.cal.ranges[name])

    def ndim(self, node_name: str) -> int:
        return len(self.cal.shapes[node_name])

    def value(self, node: fx.Node, arg: Any) -> str:
        """The int8 value name an argument node maps to (else a one-line refusal)."""
        got = self.env.get(arg.name) if isinstance(arg, fx.Node) else None
        if not isinstance(got, str) or self.values[got].dtype != "int8":
            self.fail(node, f"takes {getattr(arg, 'name', arg)!r}, which is not an int8 "
                            "tensor here")
        return got

    def emit(self, kind: str, node: fx.Node, ins: list[str], qo: QType, attrs: dict | None = None,
             consts: dict[str, torch.Tensor] | None = None, out: str | None = None) -> str:
        out = self.short(out or node.name)
        self.values[out] = qo
        names = {}
        for role, tensor in (consts or {}).items():
            names[role] = f"{out}.{role}"
            self.consts[names[role]] = tensor
        src = node.target if node.op == "call_module" else node.name
        self.ops.append(Op(kind, tuple(ins), (out,), attrs or {}, names, str(src)))
        self.env[node.name] = out
        return out

    def short(self, name: str) -> str:
        """A short value name for node ``name`` (the program's JSON stays small; the
        source layer is kept in each op's ``source``)."""
        if name not in self.names:
            self.names[name] = f"v{len(self.names)}"
        return self.names[name]

    def sole_user(self, node: fx.Node, keys: tuple) -> fx.Node | None:
        users = list(node.users)
        if len(users) == 1 and _key(self.gm, users[0]) in keys:
            return users[0]
        return None

    def const_value(self, node: fx.Node, tensor: torch.Tensor, tag: str) -> str:
        t = tensor.detach().float()
        qt = activation_qtype(float(t.min()), float(t.max()))
        name = f"{node.name}.{tag}"
        q = quantize_tensor(t, qt.scale, qt.zero_point).to(torch.int8)
        self.values[name] = qt
        self.consts[f"{name}.value"] = q
        self.ops.append(Op("const", (), (name,), {}, {"value": f"{name}.value"}, node.name))
        return name

    def operand(self, node: fx.Node, arg: Any) -> str:
        """An int8 value for a tensor node, a parameter (get_attr) or a Python number."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return self.const_value(node, self.gm.get_parameter(arg.target)
                                    if arg.target in dict(self.gm.named_parameters())
                                    else self.gm.get_buffer(arg.target), arg.name)
        if isinstance(arg, (int, float)):
            return self.const_value(node, torch.tensor(float(arg)), "scalar")
        return self.value(node, arg)

    # -- dispatch -----------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.name in self.env:
            return
        if not node.users and node.op in ("call_function", "call_method", "call_module"):
            return   # dead code (e.g. the x.dim() an if decided on while tracing)
        if node.op == "placeholder":
            return self.placeholder(node)
        if node.op == "get_attr":
            self.env[node.name] = node          # materialised where it is used
            return None
        if node.op == "output":
            return self.output(node)
        from nncompress.quant.convert_ops import RULES
        key = _key(self.gm, node)
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target),
                                                   nn.RNNBase):
            key = nn.RNNBase
        rule = RULES.get(key)
        if rule is None:
            kind = "a module" if node.op == "call_module" else "an operation"
            self.fail(node, f"is {kind} the int8 converter has no integer rule for")
        return rule(self, node)

    def placeholder(self, node: fx.Node) -> None:
        if self.cal.dtypes.get(node.name, "float32") == "int64":
            self.values[node.name] = QType("int64")
            self.env[node.name] = node.name
        else:
            self.values[node.name] = QType("float32")
            self.emit("quantize", node, [node.name], self.qtype(node.name), out=f"{node.name}.q")
        self.inputs.append(node.name)

    def output(self, node: fx.Node) -> None:
        results = node.args[0]
        flat = list(results) if isinstance(results, (tuple, list)) else [results]
        for i, arg in enumerate(flat):
            src = self.value(node, arg)
            name = f"output{i}"
            self.values[name] = QType("float32")
            self.ops.append(Op("dequantize", (src,), (name,), {}, {}, "output"))
            self.outputs.append(name)

    def finish(self) -> tuple[Program, list[str]]:
        program = Program(self.inputs, self.outputs, self.values, self.ops, self.consts)
        return program, self.log

    # -- requantized layers -------------------------------------------------------------
    def attr_tensor(self, arg: Any) -> torch.Tensor | None:
        """The parameter or buffer a ``get_attr`` node reads (else None)."""
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return None
        got = self.gm
        for part in str(arg.target).split("."):
            got = getattr(got, part, None)
        return got.detach() if isinstance(got, torch.Tensor) else None

    def weighted(self, node: fx.Node, kind: str, layer: nn.Module, attrs: dict) -> None:
        self.weighted_tensors(node, kind, self.value(node, node.args[0]), layer.weight,
                              layer.bias, attrs)

    def weighted_tensors(self, node: fx.Node, kind: str, x: str, weight: torch.Tensor,
                         bias: torch.Tensor | None, attrs: dict) -> None:
        """A float ``weight`` [O, ...] and ``bias`` [O] quantized to int8 per output channel
        (or per tensor), then :meth:`requantized`."""
        w = weight.detach()
        # per-channel scales rounded up to a grid of 8 steps per octave (at most 9 % coarser,
        # 0.13 bit of int8 resolution): the channels' multipliers then take a few distinct
        # values, which the container stores in a few bits each instead of 15
        ws = weight_scales(w, self.per_channel).expand(w.shape[0])
        ws = torch.exp2(torch.ceil(torch.log2(ws) * 8 - 1e-9) / 8)
        shape = (-1,) + (1,) * (w.dim() - 1)
        wq = quantize_tensor(w, ws.reshape(shape), 0, -WMAX, WMAX).to(torch.int8)
        self.requantized(node, kind, x, wq, ws, None if bias is None else bias.detach(), attrs)

    def requantized(self, node: fx.Node, kind: str, x: str, wq: torch.Tensor,
                    ws: torch.Tensor, bias: torch.Tensor | None, attrs: dict) -> None:
        """A ``linear`` / ``conv`` op on int8 value ``x``: int8 weights ``wq`` [O, ...] at
        per-channel scales ``ws`` (float64 [O]), float ``bias`` [O] (int32 at scale
        ``S_x ws``); a ReLU right after the node is fused into the clamp."""
        qx = self.values[x]
        relu = self.sole_user(node, RELU)
        target = relu if relu is not None else node
        qo = self.qtype(target.name)
        m, s = fixed_point(qx.scale * ws / qo.scale, bits=15)
        consts = {"w": wq, "m": m, "s": s}
        if bias is not None:
            consts["b"] = quantize_tensor(bias, qx.scale * ws, 0, *_INT32).to(torch.int32)
        act_min = qo.zero_point if relu is not None else QMIN
        out = self.emit(kind, node, [x], qo, {**attrs, "act_min": act_min, "act_max": QMAX},
                        consts, out=target.name)
        if relu is not None:
            self.env[relu.name] = out
            self.log.append(f"int8: {relu.name} fused into {node.target}")

    def conv_attrs(self, node: fx.Node, conv: nn.Module) -> dict:
        """``stride``, ``padding``, ``dilation``, ``groups`` of a Conv1d/Conv2d (zero
        padding only; ``'same'`` with an odd total padding is refused)."""
        nd = conv.weight.dim() - 2
        if conv.padding_mode != "zeros":
            self.fail(node, f"uses padding_mode={conv.padding_mode!r}; only zeros is converted")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = [0] * nd
            else:  # "same" (stride 1): total padding d*(k-1), even only
                totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size,
                                                      strict=True)]
                if any(t % 2 for t in totals):
                    self.fail(node, "uses padding='same' with an even kernel (asymmetric "
                                    "padding)")
                padding = [t // 2 for t in totals]
        return {"stride": _ints(conv.stride, nd), "padding": _ints(padding, nd),
                "dilation": _ints(conv.dilation, nd), "groups": conv.groups}

    def lut(self, node: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        x = self.value(node, node.args[0])
        qx, qo = self.values[x], self.qtype(node.name)
        real = (torch.arange(QMIN, QMAX + 1, dtype=torch.float64) - qx.zero_point) * qx.scale
        with torch.no_grad():
            table = quantize_tensor(fn(real.float()).double(), qo.scale, qo.zero_point)
        self.emit("lut", node, [x], qo, {}, {"table": table.to(torch.int8)})

    def rescale(self, node: fx.Node, x: str, factor: float) -> None:
        qx, qo = self.values[x], self.qtype(node.name)
        m, s = quantize_multiplier(abs(factor) * qx.scale / qo.scale)
        self.emit("rescale", node, [x], qo, {"m": m, "s": s, "sign": 1 if factor >= 0 else -1,
                                             "act_min": QMIN, "act_max": QMAX})

    def add(self, node: fx.Node, a: str, b: str) -> None:
        qa, qb, qo = self.values[a], self.values[b], self.qtype(node.name)
        twice = 2 * max(qa.scale, qb.scale)
        ma, sa = quantize_multiplier(qa.scale / twice)
        mb, sb = quantize_multiplier(qb.scale / twice)
        mo, so = quantize_multiplier(twice / ((1 << _LEFT) * qo.scale))
        self.emit("add", node, [a, b], qo, {"ma": ma, "sa": sa, "mb": mb, "sb": sb, "mo": mo,
                                            "so": so, "act_min": QMIN, "act_max": QMAX})

    def product(self, node: fx.Node, kind: str, a: str, b: str) -> None:
        """``matmul`` / ``mul`` of two int8 values; a following multiplication or division
        by a positive constant is folded into the multiplier."""
        target, factor = node, 1.0
        scale = self.sole_user(node, (*MUL, operator.truediv, "div", torch.div))
        if kind == "matmul" and scale is not None:
            other = [a for a in scale.args if not isinstance(a, fx.Node)]
            if len(other) == 1 and isinstance(other[0], (int, float)) and other[0] > 0:
                factor = (1.0 / other[0] if _key(self.gm, scale) in (operator.truediv, "div",
                                                                     torch.div) else other[0])
                target = scale
        qa, qb, qo = self.values[a], self.values[b], self.qtype(target.name)
        m, s = quantize_multiplier(factor * qa.scale * qb.scale / qo.scale)
        out = self.emit(kind, node, [a, b], qo, {"m": m, "s": s, "act_min": QMIN,
                                                 "act_max": QMAX}, out=target.name)
        if target is not node:
            self.env[target.name] = out
            self.log.append(f"int8: {target.name} (x {factor:.6g}) folded into {node.name}")

    def mean(self, node: fx.Node, x: str, dims: list[int], keepdim: bool) -> None:
        shape = self.cal.shapes[node.args[0].name]
        dims = sorted(d % len(shape) for d in dims)
        count = math.prod(shape[d] for d in dims)
        qx, qo = self.values[x], self.qtype(node.name)
        m, s = quantize_multiplier(qx.scale / (count * qo.scale))
        self.emit("mean", node, [x], qo, {"dims": dims, "keepdim": keepdim, "m": m, "s": s,
                                          "act_min": QMIN, "act_max": QMAX})

    def float_op(self, node: fx.Node, fn: str, args: dict, consts: dict, qo: QType,
                 why: str) -> None:
        x = self.value(node, node.args[0])
        self.emit("float", node, [x], qo, {"fn": fn, "args": args}, consts)
        self.log.append(f"int8: {node.target if node.op == 'call_module' else node.name} "
                        f"({fn}) kept in float32 between a dequantize and a quantize: {why}")
