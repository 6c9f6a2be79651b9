"""ONNX export of integer programs: ONNX Runtime == the integer reference, bit for bit.

Hand-built programs cover every op kind (odd sizes, batch 1 and 5); every value of each
program is exposed as a graph output and compared with ``reference.run_values``. The
fixed-point chain is also checked alone on extreme accumulators, and the float ops
(softmax, layer norm) against their stated bound of one output step.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from nncompress.errors import NNCError, UnsupportedLayerError
from nncompress.export.onnx_graph import IR_VERSION, OPSET, Graph
from nncompress.export.onnx_int8 import program_to_onnx, run_onnx
from nncompress.quant.affine import (
    QType,
    fixed_point,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from nncompress.quant.program import Op, Program
from nncompress.quant.reference import run_values

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


class ProgramBuilder:
    """Random int8 programs whose values spread over the int8 range: random qtypes, int8
    weights, int32 biases, and fixed-point multipliers chosen from the accumulators the
    partial program gives on a calibration batch (about 30 steps of spread each)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.values: dict[str, QType] = {}
        self.ops: list[Op] = []
        self.consts: dict[str, torch.Tensor] = {}
        self.inputs: list[str] = []
        self.calibration: list[torch.Tensor] = []

    def rand(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g))

    def qtype(self) -> QType:
        zp = int(torch.randint(-30, 31, (), generator=self.g))
        return QType("int8", self.rand(0.01, 0.1), zp)

    def value(self, qtype: QType | None = None) -> str:
        name = f"v{len(self.values)}"
        self.values[name] = qtype or self.qtype()
        return name

    def input(self, shape: tuple[int, ...], dtype: str = "float32") -> str:
        name = self.value(QType(dtype))
        self.inputs.append(name)
        self.calibration.append(
            torch.randint(0, 20, (64, *shape), generator=self.g) if dtype == "int64"
            else torch.randn((64, *shape), generator=self.g) * 2)
        return name

    def centred(self, value: str) -> torch.Tensor:
        """``q - zero_point`` of ``value`` on the calibration batch (float64)."""
        program = Program(self.inputs, [value], self.values, self.ops, self.consts)
        q = run_values(program, *self.calibration)[value]
        return (q - self.values[value].zero_point).double()

    def const(self, tensor: torch.Tensor) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = tensor
        return name

    def spread_mult(self, acc: torch.Tensor, channel_dim: int | None = None) -> tuple:
        """Multipliers giving ``acc`` a spread of about 30 steps (per channel along
        ``channel_dim``, else one ``(m, s)`` pair of ints)."""
        if channel_dim is None:
            return quantize_multiplier(30.0 / max(float(acc.std()), 1.0) * self.rand(0.7, 1.4))
        std = acc.movedim(channel_dim, 0).flatten(1).std(dim=1).clamp(min=1.0)
        jitter = torch.rand(std.shape, generator=self.g, dtype=torch.float64) * 0.7 + 0.7
        m, s = fixed_point(30.0 / std * jitter)
        return m, s

    def weights(self, *shape: int) -> torch.Tensor:
        return torch.randint(-127, 128, shape, generator=self.g, dtype=torch.int8)

    def op(self, kind: str, inputs: tuple[str, ...], attrs: dict | None = None,
           consts: dict[str, str] | None = None, out: QType | None = None) -> str:
        name = self.value(out)
        self.ops.append(Op(kind, inputs, (name,), attrs or {}, consts or {},
                           f"{kind}{len(self.ops)}"))
        return name

    def linear(self, x: str, out: int, bias: bool = True, **attrs: int) -> str:
        c = self.centred(x)
        w = self.weights(out, c.shape[-1])
        acc = c @ w.double().T
        consts = {"w": self.const(w)}
        if bias:
            b = torch.randint(-3000, 3000, (out,), generator=self.g, dtype=torch.int32)
            consts["b"] = self.const(b)
            acc = acc + b.double()
        m, s = self.spread_mult(acc, acc.dim() - 1)
        consts.update(m=self.const(m), s=self.const(s))
        return self.op("linear", (x,), attrs, consts)

    def conv(self, x: str, out: int, kernel: tuple[int, ...], **attrs: list[int] | int
             ) -> str:
        c = self.centred(x)
        w = self.weights(out, c.shape[1] // attrs["groups"], *kernel)
        conv = torch.nn.functional.conv1d if len(kernel) == 1 else \
            torch.nn.functional.conv2d
        acc = conv(c, w.double(), None, attrs["stride"], attrs["padding"], attrs["dilation"],
                   attrs["groups"])
        m, s = self.spread_mult(acc, 1)
        return self.op("conv", (x,), attrs, {"w": self.const(w), "m": self.const(m),
                                               "s": self.const(s)})

    def pool_sum(self, x: str, kernel: list[int], stride: list[int], padding: list[int]
                 ) -> str:
        c = self.centred(x)
        pool = torch.nn.functional.avg_pool1d if len(kernel) == 1 else \
            torch.nn.functional.avg_pool2d
        acc = pool(c, kernel, stride, padding, count_include_pad=True) * float(np.prod(kernel))
        m, s = self.spread_mult(acc)
        return self.op("avgpool", (x,), {"kernel": kernel, "stride": stride,
                                         "padding": padding, "m": m, "s": s})

    def scalar(self, kind: str, inputs: tuple[str, ...], acc: torch.Tensor, **attrs) -> str:
        m, s = self.spread_mult(acc)
        return self.op(kind, inputs, {"m": m, "s": s, **attrs})

    def program(self, outputs: list[str]) -> Program:
        return Program(self.inputs, outputs, self.values, self.ops, self.consts)


def check_exact(program: Program, *args: torch.Tensor) -> None:
    """Every value of ``program`` on ``args``: ONNX Runtime == reference, bit for bit."""
    shapes = [tuple(a.shape[1:]) for a in args]
    inner = [v for op in program.ops for v in op.outputs]
    model = program_to_onnx(program, shapes, expose=inner)
    onnx.checker.check_model(model, full_check=True)
    want = run_values(program, *args)
    names = [o.name for o in model.graph.output]
    for name, got in zip(names, run_onnx(model, *args), strict=True):
        ref = want[name].numpy()
        assert got.shape == ref.shape, name
        if program.values[name].dtype == "int8":
            assert got.dtype == np.int8
            np.testing.assert_array_equal(got.astype(np.int64), ref, err_msg=name)
        else:
            np.testing.assert_array_equal(got, ref, err_msg=name)


def batches(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((b, *shape), generator=g) * scale for b in (1, 5)]


# ----------------------------------------------------------------------------- programs


def _dequantize(b: ProgramBuilder, v: str) -> str:
    return b.op("dequantize", (v,), out=QType("float32"))


def mlp_program() -> Program:
    b = ProgramBuilder(1)
    q = b.op("quantize", (b.input((13,)),))
    h = b.linear(q, 7)
    zh = b.values[h].zero_point
    r = b.op("clamp", (h,), {"act_min": zh, "act_max": 127}, out=b.values[h])
    o = b.linear(r, 3, bias=False, act_min=-100, act_max=90)
    return b.program([_dequantize(b, o)])


def conv1d_program() -> Program:
    b = ProgramBuilder(2)
    q = b.op("quantize", (b.input((3, 17)),))
    c1 = b.conv(q, 5, (3,), stride=[2], padding=[1], dilation=[1], groups=1)
    p1 = b.op("maxpool", (c1,), {"kernel": [3], "stride": [2], "padding": [1]},
              out=b.values[c1])
    c2 = b.conv(p1, 5, (3,), stride=[1], padding=[2], dilation=[2], groups=5)
    a1 = b.pool_sum(c2, [3], [1], [1])
    mean = b.scalar("mean", (a1,), b.centred(a1).sum(dim=2), dims=[2], keepdim=False)
    return b.program([_dequantize(b, b.linear(mean, 4))])


def conv2d_program() -> Program:
    b = ProgramBuilder(3)
    q = b.op("quantize", (b.input((2, 7, 9)),))
    c = b.conv(q, 4, (3, 2), stride=[2, 1], padding=[1, 0], dilation=[2, 1], groups=2)
    p = b.op("maxpool", (c,), {"kernel": [2, 2], "stride": [2, 1], "padding": [1, 0]},
             out=b.values[c])
    a = b.pool_sum(p, [2, 2], [1, 1], [0, 1])
    f = b.op("flatten", (a,), {"start": 1, "end": -1}, out=b.values[a])
    return b.program([_dequantize(b, b.linear(f, 5))])


def elementwise_program() -> Program:
    """linear, rescale (sign -1, multiplier > 1), add, mul, lut, concat, const, clamp."""
    b = ProgramBuilder(4)
    q = b.op("quantize", (b.input((6,)),))
    a = b.linear(q, 6)
    m, s = quantize_multiplier(1.7)
    r = b.op("rescale", (a,), {"m": m, "s": s, "sign": -1})
    ma, sa = quantize_multiplier(2.0**-10 * b.rand(0.5, 1.0))
    mb, sb = quantize_multiplier(2.0**-10 * b.rand(0.5, 1.0))
    summed = b.centred(a) * 2.0**10 + b.centred(r) * 2.0**10
    mo, so = b.spread_mult(summed)
    c = b.op("add", (a, r), {"ma": ma, "sa": sa, "mb": mb, "sb": sb, "mo": mo, "so": so})
    d = b.scalar("mul", (c, a), b.centred(c) * b.centred(a), act_min=-90)
    table = torch.randint(-128, 128, (256,), generator=b.g, dtype=torch.int8)
    e = b.op("lut", (d,), consts={"table": b.const(table)})
    ms_ss = [quantize_multiplier(b.rand(0.5, 1.5)) for _ in range(3)]
    f = b.op("concat", (e, a, c), {"axis": 1, "ms": [p[0] for p in ms_ss],
                                   "ss": [p[1] for p in ms_ss]})
    cq = b.values[f]
    same = b.op("concat", (f, f), {"axis": 0, "ms": [2**30, 2**30], "ss": [1, 1]}, out=cq)
    k = b.op("const", (), consts={"value": b.const(b.weights(18))})
    half = quantize_multiplier(2.0**-11)
    mo, so = b.spread_mult((b.centred(same) + b.centred(k)) * 2.0**9)
    g = b.op("add", (same, k), {"ma": half[0], "sa": half[1], "mb": half[0], "sb": half[1],
                                "mo": mo, "so": so})
    h = b.op("clamp", (g,), {"act_min": -20, "act_max": 60}, out=b.values[g])
    return b.program([_dequantize(b, h), _dequantize(b, e)])


def attention_program() -> Program:
    """matmul, transpose, permute, reshape (run-time dims), index, squeeze, unsqueeze."""
    b = ProgramBuilder(5)
    x = b.input((5, 8))
    q8 = b.op("quantize", (x,))
    q, k, v = (b.linear(q8, 8) for _ in range(3))
    kt = b.op("transpose", (k,), {"dims": [1, -1]}, out=b.values[k])
    sc = b.scalar("matmul", (q, kt), b.centred(q) @ b.centred(kt))
    p = b.op("lut", (sc,), consts={"table": b.const(torch.arange(-128, 128, dtype=torch.int8)
                                                     .flip(0))})
    o = b.scalar("matmul", (p, v), b.centred(p) @ b.centred(v))
    r = b.op("reshape", (o,), {"shape": [["dim", x, 0], 5, 2, -1]}, out=b.values[o])
    pe = b.op("permute", (r,), {"dims": [0, 2, -3, 3]}, out=b.values[o])
    ix = b.op("index", (pe,), {"items": ["...", ["slice", 1, None, 2], None]},
              out=b.values[o])                                     # [B, 2, 5, 2, 1]
    sq = b.op("squeeze", (ix,), {"dim": -1}, out=b.values[o])        # [B, 2, 5, 2]
    keep = b.op("squeeze", (sq,), {"dim": 1}, out=b.values[o])       # size 2: unchanged
    us = b.op("unsqueeze", (keep,), {"dim": 1}, out=b.values[o])     # [B, 1, 2, 5, 2]
    pick = b.op("index", (us,), {"items": [["slice", None, None, None], 0, -1,
                                           ["slice", 1, 4, None]]}, out=b.values[o])
    flat = b.op("reshape", (pick,), {"shape": [-1, 6]}, out=b.values[o])
    return b.program([_dequantize(b, b.linear(flat, 3))])


def embedding_program() -> Program:
    b = ProgramBuilder(6)
    ids = b.input((11,), "int64")
    e = b.op("embedding", (ids,), consts={"table": b.const(b.weights(20, 6))})
    mean = b.scalar("mean", (e,), b.centred(e).sum(dim=1), dims=[1], keepdim=True)
    sq = b.op("squeeze", (mean,), {"dim": 1}, out=b.values[mean])
    return b.program([_dequantize(b, b.linear(sq, 4)), _dequantize(b, e)])


@pytest.mark.parametrize("build, shape", [
    (mlp_program, (13,)), (conv1d_program, (3, 17)), (conv2d_program, (2, 7, 9)),
    (elementwise_program, (6,)), (attention_program, (5, 8))])
def test_every_value_bit_exact(build, shape) -> None:
    program = build()
    for x in batches(shape, seed=len(shape)):
        check_exact(program, x)


def test_embedding_ids_bit_exact() -> None:
    program = embedding_program()
    g = torch.Generator().manual_seed(0)
    for batch in (1, 5):
        check_exact(program, torch.randint(-20, 20, (batch, 11), generator=g))


def test_inputs_beyond_int8_and_non_finite_quantize_alike() -> None:
    program = mlp_program()
    x = torch.tensor([[1e30, -1e30, float("inf"), float("-inf"), 0.5, -0.5, 1.5, 2.5,
                       0.0, -0.0, 1e-30, 3.0, -3.0]]).repeat(2, 1)
    check_exact(program, x)


def test_output_batch_is_dynamic() -> None:
    program = mlp_program()
    model = program_to_onnx(program, [(13,)])
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    for x in batches((13,), seed=9):   # one model, two batch sizes
        np.testing.assert_array_equal(run_onnx(model, x)[0], run_values(program, x)["v5"])


# ----------------------------------------------------------------------------- mbqm alone


def _mbqm_graph(m: np.ndarray, s: np.ndarray) -> onnx.ModelProto:
    g = Graph()
    out = g.mbqm("acc", m, s)
    g.nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(
        g.nodes, "mbqm", [helper.make_tensor_value_info("acc", TensorProto.INT64, ["n", 7])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["n", 7])], g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def test_fixed_point_chain_matches_gemmlowp_on_extremes() -> None:
    """Per-channel multipliers with left shifts, deep right shifts, zero; accumulators at
    the int32 limits, beyond them (saturated first), and exact rounding ties."""
    reals = torch.tensor([0.0, 3.7, 1.0, 0.5, 2.0**-20 * 0.75, 0.0123, 2.0**-31 * 1.5],
                         dtype=torch.float64)
    m, s = fixed_point(reals)
    g = torch.Generator().manual_seed(0)
    acc = torch.cat([
        torch.randint(I32_MIN, I32_MAX, (400, 7), generator=g, dtype=torch.int64),
        torch.randint(-5000, 5000, (400, 7), generator=g, dtype=torch.int64),
        torch.tensor([[I32_MIN] * 7, [I32_MAX] * 7, [0] * 7, [1] * 7, [-1] * 7,
                      [2**40] * 7, [-(2**40)] * 7]),
        (torch.arange(-64, 64) * 2**19 + 2**18).reshape(-1, 1).repeat(1, 7),   # ties
    ])
    want = multiply_by_quantized_multiplier(acc, m, s)
    got = run_onnx(_mbqm_graph(m.numpy(), s.numpy()), acc.numpy())[0]
    np.testing.assert_array_equal(got, want.numpy())


# ----------------------------------------------------------------------------- float ops


def float_program() -> Program:
    """Two branches on the same int8 value: softmax and layer norm (each op's input is
    exact, so each output is within the stated bound of the reference)."""
    b = ProgramBuilder(7)
    q = b.op("quantize", (b.input((4, 9)),), out=QType("int8", 0.05, 3))
    sm = b.op("float", (q,), {"fn": "softmax", "args": {"dim": -1}},
              out=QType("int8", 1 / 255, -128))
    w = b.const(torch.rand(9, generator=b.g) + 0.5)
    bias = b.const(torch.randn(9, generator=b.g) * 0.1)
    ln = b.op("float", (q,), {"fn": "layer_norm", "args": {"shape": [9], "eps": 1e-5}},
              {"weight": w, "bias": bias}, out=QType("int8", 0.03, 0))
    ln2 = b.op("float", (q,), {"fn": "layer_norm", "args": {"shape": [9], "eps": 1e-5}},
               out=QType("int8", 0.03, 0))
    return b.program([_dequantize(b, v) for v in (sm, ln, ln2)])


def test_float_ops_within_one_step() -> None:
    program = float_program()
    x = torch.randn(2000, 4, 9, generator=torch.Generator().manual_seed(3)) * 3
    model = program_to_onnx(program, [(4, 9)], expose=["v2", "v3", "v4"])
    got = run_onnx(model, x)
    ref = run_values(program, x)
    names = [o.name for o in model.graph.output]
    for name, out in zip(names, got, strict=True):
        want = ref[name].numpy()
        if program.values[name].dtype == "int8":
            diff = np.abs(out.astype(np.int64) - want)
        else:
            step = program.values[program.ops[[op.outputs[0] for op in program.ops]
                                              .index(name)].inputs[0]].scale
            diff = np.abs(out - want) / step
        assert diff.max() <= 1 + 1e-6, name
        assert (diff > 1e-6).mean() < 0.01, name      # almost every value is exact


# ----------------------------------------------------------------------------- refusals


def test_unknown_op_kind_is_named() -> None:
    program = mlp_program()
    program.ops.insert(2, Op("bogus", ("v2",), ("v2",), source="blocks.3.odd"))
    with pytest.raises(UnsupportedLayerError, match=r"'bogus' \(from blocks\.3\.odd\)"):
        program_to_onnx(program, [(13,)])


def test_squeezing_the_batch_is_refused() -> None:
    b = ProgramBuilder(8)
    q = b.op("quantize", (b.input((4,)),))
    sq = b.op("squeeze", (q,), {"dim": 0}, out=b.values[q])
    program = b.program([_dequantize(b, sq)])
    with pytest.raises(UnsupportedLayerError, match="batch dimension"):
        program_to_onnx(program, [(4,)])


def test_wrong_number_of_sample_shapes() -> None:
    with pytest.raises(NNCError, match="1 input"):
        program_to_onnx(mlp_program(), [(13,), (2,)])
