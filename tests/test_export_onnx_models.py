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

from nncompress import models
from nncompress.errors import NNCError
from nncompress.export import export, export_bytes, exporter_for
from nncompress.export.onnx_int8 import program_to_onnx, run_onnx
from nncompress.quant.affine import QType
from nncompress.quant.convert import convert
from nncompress.quant.int8_rnn import const_roles, convert_rnn
from nncompress.quant.program import Op, Program
from nncompress.quant.reference import run, run_values

TINY = {
    "mlp": ((1, 5, 7), {"hidden": [11, 6]}),
    "cnn1d": ((1, 23), {"channels": [5, 7, 9]}),
    "cnn2d": ((1, 9, 9), {"channels": [3, 5], "hidden": [10, 6]}),
    "rescnn": ((1, 21), {"channels": 6, "hidden": [8, 8]}),
    "gru": ((1, 7), {"hidden": [6, 5]}),
    "lstm": ((1, 7), {"hidden": [6, 5]}),
    "transformer": ((1, 20), {"patch_size": 4, "dim": 8, "depth": 1, "num_heads": [2],
                              "head_dim": [4], "mlp_dim": [12]}),
}


def _tiny_program(name: str) -> tuple[Program, tuple[int, ...]]:
    shape, overrides = TINY[name]
    torch.manual_seed(0)
    model = models.build(name, shape, 3, **overrides).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn((16, *shape), generator=g) for _ in range(2)]
    with torch.no_grad():   # BatchNorm with non-trivial statistics, then folded
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    _fold(model, calibration[0])
    program, _ = convert(model, calibration)
    return program, shape


def _fold(model: nn.Module, x: torch.Tensor) -> None:
    """``fold_batchnorm`` with ``x`` as the data it reads its example from."""
    from torch.utils.data import DataLoader, TensorDataset

    from nncompress.data import Dataset
    from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm
    from nncompress.technique import Context

    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.int64)),
                        batch_size=len(x))
    data = Dataset("calibration", loader, loader, tuple(x.shape[1:]), 3)
    fold_batchnorm(model, FoldBatchNormConfig(), Context(data=data, progress=False))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", sorted(TINY))
def test_converted_tiny_models_bit_exact(name: str) -> None:
    program, shape = _tiny_program(name)
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

    program, shape = _tiny_program("cnn1d")
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
    program, _ = _tiny_program("mlp")
    with pytest.raises(NNCError, match="example input"):
        export_bytes(program)


def test_unknown_format_is_refused() -> None:
    program, _ = _tiny_program("mlp")
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
@pytest.mark.parametrize("name", sorted(TINY))
def test_trained_reference_models_bit_exact(name: str) -> None:
    from nncompress.data import example_input

    model, data = models.load(name, progress=False)
    model.eval()
    batches = [x for x, _ in list(data.train)[:2]]
    _fold(model, batches[0])
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
