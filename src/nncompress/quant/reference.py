"""The integer reference executor: the specification of every op of a :class:`Program`.

Integer torch ops only between layers (int64 tensors, integer matmul, truncating division,
arithmetic shifts); floats appear at the program's edges (``quantize`` / ``dequantize``)
and in the ``float`` ops, which the program lists (:meth:`Program.float_ops`). The C engine
and the ONNX export are tested against this module bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nncompress.quant.affine import QMAX, QMIN, QType
from nncompress.quant.affine import multiply_by_quantized_multiplier as mbqm
from nncompress.quant.program import Op, Program

__all__ = ["run", "run_values", "shapes_at"]

Env = dict[str, torch.Tensor]
_LEFT = 20  # the add op's left shift (TensorFlow Lite's int8 add)


def _clamp(q: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    return q.clamp(attrs.get("act_min", QMIN), attrs.get("act_max", QMAX))


def _requant(acc: torch.Tensor, zo: int, m: Any, s: Any, attrs: dict[str, Any]) -> torch.Tensor:
    return _clamp(zo + mbqm(acc, torch.as_tensor(m), torch.as_tensor(s)), attrs)


def _linear(p: Program, op: Op, x: torch.Tensor, qx: QType, qo: QType) -> torch.Tensor:
    w = p.consts[op.consts["w"]].to(torch.int64)
    acc = (x - qx.zero_point) @ w.T
    if "b" in op.consts:
        acc = acc + p.consts[op.consts["b"]].to(torch.int64)
    return _requant(acc, qo.zero_point, p.consts[op.consts["m"]], p.consts[op.consts["s"]],
                    op.attrs)


def _windows(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int]) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[B, C, *S', *K]`` sliding windows (integer-safe im2col)."""
    nd = len(kernel)
    for d in range(nd):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    return x


def _pad(x: torch.Tensor, padding: Sequence[int], value: int) -> torch.Tensor:
    pads: list[int] = []
    for p in reversed(padding):
        pads += [p, p]
    return F.pad(x, pads, value=value) if any(padding) else x


def _conv(p: Program, op: Op, x: torch.Tensor, qx: QType, qo: QType) -> torch.Tensor:
    a = op.attrs
    w = p.consts[op.consts["w"]].to(torch.int64)          # [O, C/g, *K]
    nd, groups = w.dim() - 2, a["groups"]
    win = _windows(_pad(x, a["padding"], qx.zero_point) - qx.zero_point, w.shape[2:],
                   a["stride"], a["dilation"])           # [B, C, *S', *K]
    b, c = win.shape[:2]
    spatial = win.shape[2:2 + nd]
    win = win.reshape(b, groups, c // groups, *spatial, -1)  # [B, g, C/g, *S', prod K]
    win = win.movedim(2, -2).flatten(-2)                      # [B, g, *S', C/g * prod K]
    wg = w.reshape(groups, w.shape[0] // groups, -1)          # [g, O/g, C/g * prod K]
    acc = torch.einsum("bg...k,gok->bgo...", win, wg).flatten(1, 2)   # [B, O, *S']
    shape = (1, -1) + (1,) * nd
    if "b" in op.consts:
        acc = acc + p.consts[op.consts["b"]].to(torch.int64).reshape(shape)
    m = p.consts[op.consts["m"]].reshape(shape)
    s = p.consts[op.consts["s"]].reshape(shape)
    return _requant(acc, qo.zero_point, m, s, a)


def _pool(op: Op, x: torch.Tensor, qx: QType, qo: QType) -> torch.Tensor:
    a = op.attrs
    nd = len(a["kernel"])
    fill = QMIN - 1 if op.kind == "maxpool" else qx.zero_point
    win = _windows(_pad(x, a["padding"], fill), a["kernel"], a["stride"], [1] * nd)
    win = win.flatten(-nd)
    if op.kind == "maxpool":
        return win.amax(dim=-1)
    return _requant((win - qx.zero_point).sum(dim=-1), qo.zero_point, a["m"], a["s"], a)


def _add(op: Op, a: torch.Tensor, b: torch.Tensor, qa: QType, qb: QType, qo: QType
         ) -> torch.Tensor:
    t = op.attrs
    ta = mbqm((a - qa.zero_point) * (1 << _LEFT), torch.tensor(t["ma"]), torch.tensor(t["sa"]))
    tb = mbqm((b - qb.zero_point) * (1 << _LEFT), torch.tensor(t["mb"]), torch.tensor(t["sb"]))
    return _requant(ta + tb, qo.zero_point, t["mo"], t["so"], t)


def _index(x: torch.Tensor, items: list[Any]) -> torch.Tensor:
    key: list[Any] = []
    for item in items:
        if item == "...":
            key.append(Ellipsis)
        elif isinstance(item, list):
            key.append(slice(item[1], item[2], item[3]))
        elif item is None:
            key.append(None)
        else:
            key.append(int(item))
    return x[tuple(key)]


def _reshape(env: Env, x: torch.Tensor, shape: list[Any]) -> torch.Tensor:
    dims = [env[d[1]].shape[d[2]] if isinstance(d, list) else d for d in shape]
    return x.reshape(dims)


def _sign(p: Program, op: Op, x: torch.Tensor) -> torch.Tensor:
    """``1`` where ``x >= t[c]`` (``c`` along attr ``axis``), else ``-1``."""
    t = p.consts[op.consts["t"]].to(torch.int64)
    axis = op.attrs["axis"] % x.dim()
    return torch.where(x >= t.reshape((-1,) + (1,) * (x.dim() - 1 - axis)), 1, -1)


def _float(p: Program, op: Op, x: torch.Tensor, qx: QType, qo: QType) -> torch.Tensor:
    real = (x - qx.zero_point).to(torch.float32) * torch.tensor(qx.scale, dtype=torch.float32)
    args = op.attrs["args"]
    if op.attrs["fn"] == "softmax":
        out = torch.softmax(real, dim=args["dim"])
    else:  # layer_norm
        w = p.consts.get(op.consts.get("weight", ""))
        b = p.consts.get(op.consts.get("bias", ""))
        out = F.layer_norm(real, args["shape"], w, b, args["eps"])
    return torch.round(out / torch.tensor(qo.scale, dtype=torch.float32)).to(torch.int64) \
        .add(qo.zero_point).clamp(QMIN, QMAX)


def _step(p: Program, op: Op, env: Env) -> list[torch.Tensor]:
    """The outputs of one op (its inputs read from ``env``)."""
    xs = [env[n] for n in op.inputs]
    qs = [p.values[n] for n in op.inputs]
    qo = p.values[op.outputs[0]]
    kind, a = op.kind, op.attrs
    simple: dict[str, Callable[[], torch.Tensor]] = {
        "quantize": lambda: torch.round(xs[0].to(torch.float32) / torch.tensor(
            qo.scale, dtype=torch.float32)).to(torch.int64).add(qo.zero_point).clamp(QMIN, QMAX),
        "dequantize": lambda: (xs[0] - qs[0].zero_point).to(torch.float32)
        * torch.tensor(qs[0].scale, dtype=torch.float32),
        "linear": lambda: _linear(p, op, xs[0], qs[0], qo),
        "conv": lambda: _conv(p, op, xs[0], qs[0], qo),
        "matmul": lambda: _requant((xs[0] - qs[0].zero_point) @ (xs[1] - qs[1].zero_point),
                                   qo.zero_point, a["m"], a["s"], a),
        "add": lambda: _add(op, xs[0], xs[1], qs[0], qs[1], qo),
        "mul": lambda: _requant((xs[0] - qs[0].zero_point) * (xs[1] - qs[1].zero_point),
                                qo.zero_point, a["m"], a["s"], a),
        "rescale": lambda: _requant(a["sign"] * (xs[0] - qs[0].zero_point), qo.zero_point,
                                    a["m"], a["s"], a),
        "concat": lambda: torch.cat([
            _requant(x - q.zero_point, qo.zero_point, m, s, a)
            for x, q, m, s in zip(xs, qs, a["ms"], a["ss"], strict=True)], dim=a["axis"]),
        "clamp": lambda: _clamp(xs[0], a),
        "lut": lambda: p.consts[op.consts["table"]].to(torch.int64)[xs[0] - QMIN],
        "maxpool": lambda: _pool(op, xs[0], qs[0], qo),
        "avgpool": lambda: _pool(op, xs[0], qs[0], qo),
        "mean": lambda: _requant((xs[0] - qs[0].zero_point).sum(dim=a["dims"],
                                                                 keepdim=a["keepdim"]),
                                 qo.zero_point, a["m"], a["s"], a),
        "reshape": lambda: _reshape(env, xs[0], a["shape"]),
        "transpose": lambda: xs[0].transpose(*a["dims"]),
        "permute": lambda: xs[0].permute(*a["dims"]),
        "flatten": lambda: xs[0].flatten(a["start"], a["end"]),
        "index": lambda: _index(xs[0], a["items"]),
        "unsqueeze": lambda: xs[0].unsqueeze(a["dim"]),
        "squeeze": lambda: xs[0].squeeze(a["dim"]),
        "const": lambda: p.consts[op.consts["value"]].to(torch.int64),
        "embedding": lambda: p.consts[op.consts["table"]].to(torch.int64)[xs[0]],
        "float": lambda: _float(p, op, xs[0], qs[0], qo),
        "sign": lambda: _sign(p, op, xs[0]),
    }
    if kind in simple:
        return [simple[kind]()]
    from nncompress.quant import int8_rnn
    return int8_rnn.reference(p, op, xs[0], qs[0])


def run_values(program: Program, *args: torch.Tensor) -> Env:
    """Every value the program computes on ``args`` (int64 for integer values)."""
    env: Env = {}
    for name, x in zip(program.inputs, args, strict=True):
        qt = program.values[name]
        env[name] = x.to(torch.int64) if qt.dtype == "int64" else x.to(torch.float32)
    for op in program.ops:
        for name, out in zip(op.outputs, _step(program, op, env), strict=True):
            env[name] = out
    return env


def shapes_at(program: Program, sample_shapes: Sequence[Sequence[int]], batch: int
              ) -> dict[str, tuple[int, ...]]:
    """Every value's shape when the program runs on zero inputs of ``batch`` samples shaped
    ``sample_shapes`` (float32, or int64 for id inputs); the program's own exception if it
    cannot take them."""
    args = [torch.zeros((batch, *shape), dtype=torch.int64
                        if program.values[name].dtype == "int64" else torch.float32)
            for name, shape in zip(program.inputs, sample_shapes, strict=True)]
    return {k: tuple(v.shape) for k, v in run_values(program, *args).items()}


def run(program: Program, *args: torch.Tensor) -> list[torch.Tensor]:
    """The program's outputs (float32) on inputs ``args`` (float32 or int64 ids)."""
    env = run_values(program, *args)
    return [env[name] for name in program.outputs]
