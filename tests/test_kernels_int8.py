"""The generated C int8 engine against the integer reference, bit for bit (Jacob et al., 2018).

Hand-built programs cover every op kind (odd sizes, grouped / depthwise / strided / padded /
dilated convolutions, broadcasting, concat with different scales, pools, mean, tables, shape
ops, matmul, float ops); each runs at batch 1 and at batches that are not multiples of the
engine's block. The generated source also compiles as portable C99 with -O2.
"""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nncompress.errors import DataError, UnsupportedLayerError
from nncompress.kernels import cbuild
from nncompress.kernels.int8 import Engine, compile_program
from nncompress.kernels.int8_codegen import generate_c
from nncompress.kernels.int8_emit import EMITTERS
from nncompress.kernels.int8_layout import Block, plan_arena
from nncompress.quant import reference
from nncompress.quant.affine import QType, fixed_point
from nncompress.quant.program import OP_KINDS, Op, Program

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
BATCHES = (1, 5, 19)


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNCOMPRESS_CACHE", str(tmp_path_factory.mktemp("int8cache")))
        yield


class Builder:
    """Small random integer programs: random int8 weights, int32 biases and fixed-point
    multipliers sized so outputs spread over the int8 range."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.values: dict[str, QType] = {}
        self.ops: list[Op] = []
        self.consts: dict[str, torch.Tensor] = {}
        self.inputs: list[str] = []

    def _name(self, stem: str) -> str:
        return f"{stem}{len(self.values)}"

    def value(self, dtype: str = "int8") -> str:
        name = self._name("v")
        zp = int(torch.randint(-20, 21, (1,), generator=self.g)) if dtype == "int8" else 0
        self.values[name] = QType(dtype, 0.05 if dtype == "int8" else 1.0, zp)
        return name

    def const(self, t: torch.Tensor) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = t
        return name

    def ints(self, lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=self.g, dtype=dtype)

    def mult(self, n: int, fan_in: int) -> tuple[str, str]:
        real = 0.012 / math.sqrt(fan_in) * (0.5 + 1.5 * torch.rand(n, generator=self.g,
                                                                      dtype=torch.float64))
        m, s = fixed_point(real)
        return self.const(m), self.const(s)

    def scalar_mult(self, real: float) -> tuple[int, int]:
        m, s = fixed_point(torch.tensor([real], dtype=torch.float64))
        return int(m[0]), int(s[0])

    def input(self, dtype: str = "float32") -> str:
        name = self.value(dtype)
        self.inputs.append(name)
        return name

    def op(self, kind: str, inputs: tuple[str, ...], attrs: dict | None = None,
           consts: dict[str, str] | None = None, dtype: str = "int8", outputs: int = 1) -> str:
        outs = tuple(self.value(dtype) for _ in range(outputs))
        self.ops.append(Op(kind, inputs, outs, attrs or {}, consts or {}, f"{kind}{len(self.ops)}"))
        return outs[0]

    def linear(self, x: str, i: int, o: int, bias: bool = True, **attrs: int) -> str:
        m, s = self.mult(o, i)
        consts = {"w": self.const(self.ints(-127, 128, (o, i), torch.int8)), "m": m, "s": s}
        if bias:
            consts["b"] = self.const(self.ints(-3000, 3000, (o,), torch.int32))
        return self.op("linear", (x,), attrs, consts)

    def conv(self, x: str, c: int, o: int, k: tuple[int, ...], groups: int = 1,
             stride: tuple[int, ...] | None = None, padding: tuple[int, ...] | None = None,
             dilation: tuple[int, ...] | None = None) -> str:
        nd = len(k)
        m, s = self.mult(o, c // groups * math.prod(k))
        consts = {"w": self.const(self.ints(-127, 128, (o, c // groups, *k), torch.int8)),
                  "b": self.const(self.ints(-3000, 3000, (o,), torch.int32)), "m": m, "s": s}
        attrs = {"stride": list(stride or (1,) * nd), "padding": list(padding or (0,) * nd),
                 "dilation": list(dilation or (1,) * nd), "groups": groups}
        return self.op("conv", (x,), attrs, consts)

    def program(self, *outputs: str) -> Program:
        return Program(list(self.inputs), list(outputs), dict(self.values), list(self.ops),
                       dict(self.consts))


def _inputs(program: Program, shapes: list[tuple[int, ...]], batch: int, seed: int
            ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in zip(program.inputs, shapes, strict=True):
        if program.values[name].dtype == "int64":
            out.append(torch.randint(0, 11, (batch, *shape), generator=g))
        else:
            out.append(torch.randn((batch, *shape), generator=g) * 3)
    return out


def _check_exact(program: Program, shapes: list[tuple[int, ...]], block: int = 4,
                 flags: tuple[str, ...] = cbuild.FLAGS) -> Engine:
    """The engine equals the reference bit for bit at batch 1 and at batches that are not
    multiples of ``block``. A program with ``float`` ops (layer norm, softmax: double in C,
    float32 in torch, at most one step apart per op, see ``c/int8_float.h``) may differ
    downstream of such a step: then at least 98% of the samples must be identical and no
    output further than 4 of its steps."""
    engine = compile_program(program, shapes, block=block, threads=2, flags=flags)
    for batch in BATCHES:
        xs = _inputs(program, shapes, batch, seed=batch)
        want, got = reference.run(program, *xs), engine(*xs)
        for w, o, name in zip(want, got, program.outputs, strict=True):
            assert o.shape == w.shape and o.dtype == torch.float32
            if not program.float_ops():
                assert torch.equal(o, w), f"{name} at batch {batch}: {(o - w).abs().max()}"
                continue
            source = next(op.inputs[0] for op in program.ops if op.outputs[0] == name)
            steps = (o - w).abs().reshape(batch, -1) / program.values[source].scale
            assert steps.max() <= 4.0001, f"{name} at batch {batch}: {steps.max()} steps"
            assert (steps.amax(dim=1) > 0).float().mean() <= 0.02 + 1 / batch
    return engine


def mlp_program(sizes: tuple[int, ...] = (37, 19, 23, 5), seed: int = 0) -> Program:
    b = Builder(seed)
    h = b.op("quantize", (b.input(),))
    for k, (i, o) in enumerate(itertools.pairwise(sizes)):
        h = b.linear(h, i, o, bias=k != 1)
        if k < len(sizes) - 2:
            h = b.op("clamp", (h,), {"act_min": b.values[h].zero_point, "act_max": 127})
    return b.program(b.op("dequantize", (h,), dtype="float32"))


@needs_gcc
def test_mlp_bit_exact_and_threads() -> None:
    engine = _check_exact(mlp_program(), [(37,)])
    assert engine.arena_bytes > 0 and engine.info.entry == "nnc_run"
    x = torch.randn(64, 37)
    assert torch.equal(engine(x)[0], reference.run(mlp_program(), x)[0])  # split over 2 threads


@needs_gcc
def test_conv1d_pools_and_groups() -> None:
    b = Builder(1)
    h = b.op("quantize", (b.input(),))
    h = b.conv(h, 3, 8, (5,), stride=(2,), padding=(3,), dilation=(2,))      # im2col path
    h = b.op("clamp", (h,), {"act_min": b.values[h].zero_point, "act_max": 100})
    h = b.op("maxpool", (h,), {"kernel": [3], "stride": [2], "padding": [1]})
    h = b.conv(h, 8, 12, (3,), groups=4, padding=(1,))                       # grouped, direct
    h = b.conv(h, 12, 12, (3,), groups=12, padding=(2,), dilation=(2,))      # depthwise
    h = b.conv(h, 12, 24, (3,), groups=12)                                   # depth multiplier 2
    m, s = b.scalar_mult(1 / 3)
    h = b.op("avgpool", (h,), {"kernel": [3], "stride": [1], "padding": [1], "m": m, "s": s})
    h = b.conv(h, 24, 10, (4,), groups=2, padding=(1,))                      # grouped, im2col
    h = b.op("flatten", (h,), {"start": 1, "end": -1})
    h = b.linear(h, 10 * 3, 7)
    _check_exact(b.program(b.op("dequantize", (h,), dtype="float32")), [(3, 23)])


@needs_gcc
def test_conv2d_pools_and_mean() -> None:
    b = Builder(2)
    h = b.op("quantize", (b.input(),))
    h = b.conv(h, 2, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    h = b.conv(h, 6, 6, (3, 3), groups=6, padding=(1, 1))
    h = b.conv(h, 6, 16, (3, 3), padding=(1, 1))
    h = b.op("maxpool", (h,), {"kernel": [2, 3], "stride": [2, 2], "padding": [1, 1]})
    m, s = b.scalar_mult(1 / 4)
    h = b.op("avgpool", (h,), {"kernel": [2, 2], "stride": [1, 1], "padding": [1, 0], "m": m,
                               "s": s})
    m, s = b.scalar_mult(1 / 7)
    h = b.op("mean", (h,), {"dims": [2, 3], "keepdim": False, "m": m, "s": s})
    _check_exact(b.program(b.op("dequantize", (h,), dtype="float32")), [(2, 9, 7)])


@needs_gcc
def test_elementwise_broadcast_concat_tables() -> None:
    b = Builder(3)
    x = b.op("quantize", (b.input(),))                                     # [B, 4, 6]
    pos = b.op("const", (), {}, {"value": b.const(b.ints(-128, 128, (1, 4, 6), torch.int8))})
    ma, sa = b.scalar_mult(0.4)
    mb, sb = b.scalar_mult(0.3)
    mo, so = b.scalar_mult(1 / (1 << 20) * 1.7)
    add = {"ma": ma, "sa": sa, "mb": mb, "sb": sb, "mo": mo, "so": so}
    y = b.op("add", (x, pos), add)
    m, s = b.scalar_mult(1 / 6)
    avg = b.op("mean", (y,), {"dims": -1, "keepdim": True, "m": m, "s": s})  # [B, 4, 1]
    z = b.op("add", (avg, y), {**add, "act_min": -100, "act_max": 90})
    m, s = b.scalar_mult(0.01)
    z = b.op("mul", (z, x), {"m": m, "s": s})
    m, s = b.scalar_mult(1.3)
    r = b.op("rescale", (z,), {"m": m, "s": s, "sign": -1})
    t = b.op("lut", (r,), {}, {"table": b.const(b.ints(-128, 128, (256,), torch.int8))})
    ms, ss = zip(*(b.scalar_mult(v) for v in (0.7, 1.9, 1.0)), strict=True)
    c = b.op("concat", (t, x, avg), {"axis": -1, "ms": list(ms), "ss": list(ss)})  # [B, 4, 13]
    c2 = b.op("concat", (c, c), {"axis": 1, "ms": [ms[0], ms[1]], "ss": [ss[0], ss[1]]})
    _check_exact(b.program(b.op("dequantize", (c2,), dtype="float32")), [(4, 6)])


def _attention(b: Builder, x: str, t: int, d: int, heads: int) -> str:
    hd = d // heads
    q, k, v = (b.linear(x, d, d) for _ in range(3))

    def split(h: str) -> str:
        h = b.op("reshape", (h,), {"shape": [["dim", x, 0], t, heads, hd]})
        return b.op("transpose", (h,), {"dims": [1, 2]})                   # [B, H, T, hd]

    q, k, v = split(q), split(k), split(v)
    m, s = b.scalar_mult(0.05 / hd)
    scores = b.op("matmul", (q, b.op("transpose", (k,), {"dims": [-2, -1]})), {"m": m, "s": s})
    b.values[scores] = QType("int8", 0.1, 0)
    probs = b.op("float", (scores,), {"fn": "softmax", "args": {"dim": -1}})
    b.values[probs] = QType("int8", 1 / 255, -128)
    m, s = b.scalar_mult(0.004)
    mixed = b.op("matmul", (probs, v), {"m": m, "s": s})
    mixed = b.op("permute", (mixed,), {"dims": [0, 2, 1, 3]})
    return b.op("reshape", (mixed,), {"shape": [["dim", x, 0], t, -1]})


@needs_gcc
def test_attention_shape_ops_matmul_float_ops() -> None:
    b = Builder(4)
    x = b.op("quantize", (b.input(),))                                     # [B, 6, 16]
    h = _attention(b, x, 6, 16, 4)
    ln = b.op("float", (h,), {"fn": "layer_norm", "args": {"shape": [16], "eps": 1e-5}},
              {"weight": b.const(torch.rand(16, generator=b.g) + 0.5),
               "bias": b.const(torch.rand(16, generator=b.g) - 0.5)})
    first = b.op("index", (ln,), {"items": [["slice", None, None, None], 0]})   # [B, 16]
    last = b.op("index", (ln,), {"items": ["...", ["slice", 1, None, 2], ["slice", 3, 11, 1]]})
    e = b.op("unsqueeze", (first,), {"dim": 1})
    e = b.op("squeeze", (e,), {"dim": 1})
    out = b.op("dequantize", (e,), dtype="float32")
    out2 = b.op("dequantize", (b.op("permute", (last,), {"dims": [0, 2, 1]}),), dtype="float32")
    program = b.program(out, out2)
    _check_exact(program, [(6, 16)])


@needs_gcc
def test_embedding_ids_and_out_of_range() -> None:
    b = Builder(5)
    ids = b.input("int64")
    table = b.const(b.ints(-128, 128, (11, 8), torch.int8))
    e = b.op("embedding", (ids,), {}, {"table": table})                   # [B, 7, 8]
    m, s = b.scalar_mult(1 / 7)
    pooled = b.op("mean", (e,), {"dims": [1], "keepdim": False, "m": m, "s": s})
    program = b.program(b.op("dequantize", (b.linear(pooled, 8, 3),), dtype="float32"))
    engine = _check_exact(program, [(7,)])
    bad = torch.full((2, 7), 11)
    with pytest.raises(DataError, match="out of range"):
        engine(bad)


@needs_gcc
def test_two_inputs_two_outputs_and_input_checks() -> None:
    b = Builder(6)
    x1, x2 = b.op("quantize", (b.input(),)), b.op("quantize", (b.input(),))
    h1, h2 = b.linear(x1, 5, 4), b.linear(x2, 3, 4)
    m, s = b.scalar_mult(0.02)
    prod = b.op("mul", (h1, h2), {"m": m, "s": s})
    out1 = b.op("dequantize", (prod,), dtype="float32")
    out2 = b.op("dequantize", (h2,), dtype="float32")
    engine = _check_exact(b.program(out1, out2), [(5,), (3,)])
    with pytest.raises(DataError, match="expected"):
        engine(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(DataError, match="takes 2 inputs"):
        engine(torch.randn(2, 5))
    assert engine(torch.randn(0, 5), torch.randn(0, 3))[0].shape == (0, 4)


def test_every_op_kind_has_an_emitter() -> None:
    assert set(EMITTERS) == set(OP_KINDS)


def test_arena_reuses_dead_buffers() -> None:
    blocks = [Block("a", 100, 0, 1), Block("b", 100, 1, 2), Block("c", 100, 2, 3)]
    total = plan_arena(blocks)
    assert blocks[2].offset == blocks[0].offset == 0 and blocks[1].offset == 128
    assert total == 228          # the end of the highest block: 128 + 100, not rounded up


def test_mlp_arena_smaller_than_all_values() -> None:
    program = mlp_program((300, 200, 100, 10))
    _, header, info = generate_c(program, [(300,)], block=1)
    assert f"#define NNC_ARENA_BYTES {info.arena_bytes}" in header
    assert info.arena_bytes < 2 * (300 * 16 + 200 * 4 + 300)  # two layers' buffers at most
    assert info.const_bytes >= 300 * 200 + 200 * 100 + 100 * 10


def test_unsupported_and_bad_shapes_are_named() -> None:
    b = Builder(7)
    x = b.op("quantize", (b.input(),))
    h = b.op("mean", (x,), {"dims": [0], "keepdim": False, "m": 1 << 30, "s": 0})
    with pytest.raises(UnsupportedLayerError, match="batch"):
        generate_c(b.program(b.op("dequantize", (h,), dtype="float32")), [(4,)])
    with pytest.raises(DataError, match="sample shapes"):
        generate_c(mlp_program(), [(36,)])


def _attention_program() -> Program:
    b = Builder(11)
    x = b.op("quantize", (b.input(),))
    h = _attention(b, x, 5, 8, 2)
    h = b.op("float", (h,), {"fn": "layer_norm", "args": {"shape": [8], "eps": 1e-5}})
    return b.program(b.op("dequantize", (h,), dtype="float32"))


@needs_gcc
@pytest.mark.parametrize("which", ["mlp", pytest.param("attention", marks=pytest.mark.slow),
                                   pytest.param("lstm", marks=pytest.mark.slow)])
def test_source_is_portable_c99(which: str, tmp_path: Path) -> None:
    """The generated unit builds as strict C99 for a microcontroller-like target (-O2, no
    -march: the plain C kernels) and for this CPU; only float ops need <math.h>."""
    program, shape = {"mlp": (mlp_program, (37,)), "attention": (_attention_program, (5, 8)),
                      "lstm": (lambda: rnn_program("lstm", 1, False, True), (9, 5))}[which]
    source, header, _ = generate_c(program(), [shape], block=1)
    (tmp_path / "model.c").write_text(source)
    (tmp_path / "model.h").write_text(header)
    (tmp_path / "main.c").write_text('#include "model.h"\nint main(void) { return '
                                     '(int)(nnc_arena_bytes() < 0); }\n')
    for extra in (["-O2"], ["-O3", "-march=native"]):
        done = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic",
                               *extra, "-o", str(tmp_path / "a.out"), str(tmp_path / "model.c"),
                               str(tmp_path / "main.c"), "-lm"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[:2000]
    assert ("#include <math.h>" in source) == (which == "attention")


@needs_gcc
def test_float_ops_within_one_step() -> None:
    """softmax / layer_norm run in double in C and in float32 in the reference: at most one
    int8 step apart, and nearly always equal."""
    b = Builder(9)
    x = b.op("quantize", (b.input(),))
    sm = b.op("float", (x,), {"fn": "softmax", "args": {"dim": 1}})
    b.values[sm] = QType("int8", 1 / 255, -128)
    ln = b.op("float", (x,), {"fn": "layer_norm", "args": {"shape": [3, 40], "eps": 1e-5}})
    b.values[ln] = QType("int8", 0.03, 0)
    program = b.program(b.op("dequantize", (sm,), dtype="float32"),
                        b.op("dequantize", (ln,), dtype="float32"))
    engine = compile_program(program, [(3, 40)], threads=1)
    xs = [torch.randn(500, 3, 40, generator=torch.Generator().manual_seed(0)) * 2]
    for want, got, scale in zip(reference.run(program, *xs), engine(*xs), (1 / 255, 0.03),
                                strict=True):
        steps = (want - got).abs() / scale
        assert steps.max() <= 1.0001 and (steps > 0.5).float().mean() < 1e-3


def rnn_program(kind: str, layers: int, bidirectional: bool, batch_first: bool,
                seed: int = 0) -> Program:
    """quantize -> gru / lstm (quant.int8_rnn.convert_rnn of a random torch module) ->
    every output dequantized; a seq-first module gets transposes around it."""
    from nncompress.quant import int8_rnn
    torch.manual_seed(seed)
    cls = torch.nn.GRU if kind == "gru" else torch.nn.LSTM
    module = cls(5, 12, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    b = Builder(seed)
    x = b.op("quantize", (b.input(),))
    if not batch_first:
        x = b.op("transpose", (x,), {"dims": [0, 1]})
    consts, attrs, qtypes = int8_rnn.convert_rnn(module, b.values[x], "rnn.")
    b.consts.update(consts)
    outs = b.op(kind, (x,), attrs, int8_rnn.const_roles(consts, "rnn."), outputs=len(qtypes))
    names = [outs, *(f"v{int(outs[1:]) + k}" for k in range(1, len(qtypes)))]
    for name, qt in zip(names, qtypes, strict=True):
        b.values[name] = qt
    if not batch_first:
        names[0] = b.op("transpose", (names[0],), {"dims": [0, 1]})
    return b.program(*(b.op("dequantize", (n,), dtype="float32") for n in names))


@needs_gcc
@pytest.mark.parametrize("kind,layers,bidirectional,batch_first",
                         [("gru", 2, True, True), ("lstm", 1, False, False),
                          ("lstm", 3, True, True)])
def test_recurrent_bit_exact(kind: str, layers: int, bidirectional: bool,
                             batch_first: bool) -> None:
    _check_exact(rnn_program(kind, layers, bidirectional, batch_first), [(9, 5)])


PORTABLE = (*cbuild.FLAGS, "-DNNC_PORTABLE")   # the plain C kernels, not the VNNI ones


@needs_gcc
def test_portable_kernels_bit_exact() -> None:
    _check_exact(mlp_program(), [(37,)], flags=PORTABLE)


@needs_gcc
@pytest.mark.slow
def test_portable_kernels_on_every_kind() -> None:
    """The plain C path (what a microcontroller build runs) on convolutions, attention and
    a recurrent layer."""
    b = Builder(10)
    h = b.op("quantize", (b.input(),))
    h = b.conv(h, 3, 20, (5,), padding=(2,))
    h = b.conv(h, 20, 20, (3,), groups=20, padding=(1,))
    h = b.op("transpose", (h,), {"dims": [1, 2]})                           # [B, 11, 20]
    h = _attention(b, h, 11, 20, 2)
    _check_exact(b.program(b.op("dequantize", (h,), dtype="float32")), [(3, 11)],
                 flags=PORTABLE)
    _check_exact(rnn_program("lstm", 2, True, True), [(9, 5)], flags=PORTABLE)


def converted(name: str, seed: int = 0) -> tuple[Program, tuple[int, ...]]:
    """Reference model ``name`` (random weights, BatchNorm statistics randomised then
    folded) converted by ``quant.convert`` with two random calibration batches."""
    from torch.utils.data import DataLoader, TensorDataset

    from nncompress import models
    from nncompress.data import Dataset
    from nncompress.quant.convert import convert
    from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm
    from nncompress.technique import Context
    shape = {"digits": (1, 8, 8), "mnist1d": (1, 40)}[models.spec(name).default_dataset]
    torch.manual_seed(seed)
    model = models.build(name, shape, 10).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(seed))
    ds = TensorDataset(x, torch.zeros(64, dtype=torch.int64))
    data = Dataset("random", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=16),
                   shape, 10)
    fold_batchnorm(model, FoldBatchNormConfig(), Context(data, progress=False))
    program, _ = convert(model, [x[:32], x[32:]])
    return program, shape


@needs_gcc
def test_converted_mlp_bit_exact() -> None:
    program, shape = converted("mlp")
    _check_exact(program, [shape], block=8)


@needs_gcc
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn1d", "cnn2d", "rescnn", "gru", "lstm", "transformer"])
def test_converted_reference_models_bit_exact(name: str) -> None:
    program, shape = converted(name)
    _check_exact(program, [shape], block=8)


@needs_gcc
def test_requantization_general_path() -> None:
    """Multipliers above 1 (left shifts, saturation) and biases near 2^31: the general
    fixed-point path, not the short one the generator proves safe for typical layers."""
    b = Builder(12)
    h = b.op("quantize", (b.input(),))
    m, s = fixed_point(1.0 + 3 * torch.rand(9, generator=b.g, dtype=torch.float64))
    bias = torch.tensor([2**31 - 1, -(2**31), 2**30, -(2**30), 0, 5, -5, 2**29, 7],
                        dtype=torch.int32)
    h = b.op("linear", (h,), {}, {"w": b.const(b.ints(-127, 128, (9, 13), torch.int8)),
                                  "b": b.const(bias), "m": b.const(m), "s": b.const(s)})
    h = b.linear(h, 9, 6)
    _check_exact(b.program(b.op("dequantize", (h,), dtype="float32")), [(13,)])
