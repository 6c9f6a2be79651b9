"""ONNX export of converted models (``quant.convert``) and of the int8 model a user gets
back: ONNX Runtime == the integer reference bit for bit on tiny versions of all seven
reference architectures, the recurrent ops on their own (every layout), and (slow) on the
trained reference models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from helpers import TINY_MODELS, fold_on, tiny_program
from nncompress import models
from nncompress.errors import NNCError
from nncompress.export import export, export_bytes, exporter_for
from nncompress.export.onnx_int8 import program_to_onnx, run_onnx
from nncompress.quant.affine import QType
from nncompress.quant.convert import convert
from nncompress.quant.int8_rnn import const_roles, convert_rnn
from nncompress.quant.program import Op, Program
from nncompress.quant.reference import run, run_values


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_converted_tiny_models_bit_exact(name: str) -> None:
    program, shape = tiny_program(name)
    inner = [v for op in program.ops for v in op.outputs]
    model = program_to_onnx(program, [shape], expose=inner)
    g = torch.Generator().manual_seed(2)
    for batch in (1, 3):
        x = torch.randn((batch, *shape), generator=g)
        want = run_values(program, x)
        for out, got in zip(model.graph.output, run_onnx(model, x), strict=True):
            ref = want[out.name].numpy()
            if program.values[out.name].dtype == "int8":
                np.testing.assert_array_equal(got.astype(np.int64), ref, err_msg=out.name)
            elif program.values[out.name].dtype == "float32" and any(
                    op.kind == "float" for op in program.ops):
                # float ops (layer norm, softmax) may round one step apart in rare cases
                np.testing.assert_allclose(got, ref, atol=0.5, err_msg=out.name)
            else:
                np.testing.assert_array_equal(got, ref, err_msg=out.name)


def test_int8_model_exports_through_the_dispatcher(tmp_path) -> None:
    from nncompress.quant.int8 import Int8Model

    program, shape = tiny_program("cnn1d")
    model = Int8Model.from_program(program)
    assert exporter_for(model).name == "onnx:program"
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "m.onnx"
    result = export(model, path, x)
    assert result.exact and result.max_abs_diff == 0.0
    assert "bit for bit" in result.check
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]      # no temporary left
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(run_onnx(loaded, x)[0], run(program, x)[0].numpy())
    props = {p.key: p.value for p in loaded.metadata_props}
    assert props["nncompress.float_ops"] == "[]"


def test_program_export_needs_an_example() -> None:
    program, _ = tiny_program("mlp")
    with pytest.raises(NNCError, match="example input"):
        export_bytes(program)


def test_unknown_format_is_refused() -> None:
    program, _ = tiny_program("mlp")
    with pytest.raises(NNCError, match=r"unknown export format .tflite.; known: c, onnx"):
        export_bytes(program, torch.zeros(1, 1, 5, 7), format="tflite")


# ----------------------------------------------------------------------------- recurrent


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first", [
    ("gru", 1, False, True), ("lstm", 1, False, False),
    pytest.param("gru", 2, True, False, marks=pytest.mark.slow),
    pytest.param("lstm", 2, True, True, marks=pytest.mark.slow)])
def test_recurrent_ops_bit_exact(kind: str, layers: int, bidirectional: bool,
                                 batch_first: bool) -> None:
    torch.manual_seed(4)
    cls = nn.GRU if kind == "gru" else nn.LSTM
    module = cls(5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    qx = QType("int8", 0.03, 5)
    consts, attrs, qtypes = convert_rnn(module, qx, "rnn.")
    outs = ("y", "h_n", "c_n")[:len(qtypes)]
    values = {"x": QType("float32"), "q": qx, "qt": qx, **dict(zip(outs, qtypes, strict=True)),
              "out": QType("float32")}
    ops = [Op("quantize", ("x",), ("q",))]
    if not batch_first:   # the program's input stays batch first
        ops.append(Op("transpose", ("q",), ("qt",), {"dims": [0, 1]}))
    ops += [Op(kind, ("qt" if not batch_first else "q",), outs, attrs,
               const_roles(consts, ""), "rnn"), Op("dequantize", ("y",), ("out",))]
    program = Program(["x"], ["out"], values, ops, consts)
    model = program_to_onnx(program, [(6, 5)], expose=list(outs))
    g = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        x = torch.randn(batch, 6, 5, generator=g) * 2
        want = run_values(program, x)
        for out, got in zip(model.graph.output, run_onnx(model, x), strict=True):
            np.testing.assert_array_equal(got.astype(np.float64),
                                          want[out.name].numpy().astype(np.float64),
                                          err_msg=out.name)


# ----------------------------------------------------------------------------- trained


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_trained_reference_models_bit_exact(name: str) -> None:
    from nncompress.data import example_input

    model, data = models.load(name, progress=False)
    model.eval()
    batches = [x for x, _ in list(data.train)[:2]]
    fold_on(model, batches[0])
    program, _ = convert(model, batches)
    x = example_input(data, 16)
    onnx_model = program_to_onnx(program, [tuple(x.shape[1:])])
    got = run_onnx(onnx_model, x)[0]
    want = run(program, x)[0].numpy()
    if program.float_ops():
        steps = np.abs(got - want) / program.values[program.ops[-1].inputs[0]].scale
        assert steps.max() <= 1 + 1e-6 and (steps > 1e-6).mean() < 0.05
    else:
        np.testing.assert_array_equal(got, want)
