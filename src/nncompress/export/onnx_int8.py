"""Export an integer :class:`~nncompress.quant.program.Program` to ONNX that ONNX Runtime
executes bit-exactly like :mod:`nncompress.quant.reference`.

The integer-arithmetic-only inference of Jacob et al. (2018) written in standard ONNX
operators (opset 17): ``MatMulInteger`` / ``ConvInteger`` for the int8 products (int32
accumulators), int32 biases added in int64, the fixed-point requantization
(``SaturatingRoundingDoublingHighMul`` + ``RoundingDivideByPOT``) as exact int64
``Mul`` / ``Add`` / ``Div`` / ``Where`` chains, ``Clip`` and ``Cast`` for the clamp,
``Gather`` for lookup tables and embeddings, ``MaxPool`` on uint8, average pooling as a
depthwise ``ConvInteger`` of ones, ``ReduceSum`` in int64 for means. Int8 values are held
as uint8 ``q + 128`` inside the graph (see :mod:`nncompress.export.onnx_graph`); the
graph's inputs and outputs have the program's own types (float32, int64 ids, int8).

Exactness: every op but ``float`` (layer norm, softmax in float32) equals the reference
bit for bit; a ``float`` op's output may differ by one step of its output scale where
ONNX Runtime's float kernels round differently from torch's (tested; listed in the
model's metadata). Token ids outside the embedding table fail in both executors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from nncompress.errors import ModelError, NNCError, UnsupportedLayerError
from nncompress.export.onnx_graph import IR_VERSION, OFFSET, OPSET, Graph
from nncompress.export.onnx_ops import EMITTERS, Emit
from nncompress.quant.program import Program

if TYPE_CHECKING:
    from nncompress.export import ExportResult

__all__ = ["example_tensors", "export_program", "output_steps", "program_to_onnx", "run_onnx",
           "value_shapes"]

_ELEM = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int8": TensorProto.INT8}
_PROBE_BATCHES = (2, 3)


def _check_supported(program: Program) -> None:
    """Refuse the first op of a kind without an ONNX form, before anything runs."""
    for op in program.ops:
        if op.kind not in EMITTERS:
            where = f" (from {op.source})" if op.source else ""
            raise UnsupportedLayerError(
                f"cannot export op {op.kind!r}{where} to ONNX: no exact ONNX form for "
                f"this op kind yet (exportable: {', '.join(sorted(EMITTERS))})")


def _probe(program: Program, sample_shapes: Sequence[Sequence[int]], batch: int
           ) -> dict[str, tuple[int, ...]]:
    from nncompress.quant.reference import shapes_at

    try:
        return shapes_at(program, sample_shapes, batch)
    except (RuntimeError, IndexError, ValueError) as exc:   # shapes the program cannot take
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"the integer program fails on the example input shaped "
                         f"{[(batch, *map(int, s)) for s in sample_shapes]}: {first}"
                         ) from None


def value_shapes(program: Program, sample_shapes: Sequence[Sequence[int]]
                 ) -> dict[str, tuple[int | None, ...]]:
    """Every value's shape, found by running the reference at two batch sizes on zeros:
    a dimension that changes with the batch size is ``None``."""
    if len(sample_shapes) != len(program.inputs):
        raise NNCError(f"the program takes {len(program.inputs)} input(s) "
                       f"({', '.join(program.inputs)}), got {len(sample_shapes)} sample "
                       "shape(s)")
    a, b = (_probe(program, sample_shapes, n) for n in _PROBE_BATCHES)
    shapes: dict[str, tuple[int | None, ...]] = {}
    for name, sa in a.items():
        sb = b[name]
        shapes[name] = tuple(x if x == y else None for x, y in zip(sa, sb, strict=True))
    return shapes


def _value_info(name: str, elem: int, shape: tuple[int | None, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, ["batch" if d is None else d
                                                      for d in shape])


def _graph_input(g: Graph, name: str, dtype: str, shape: tuple[int | None, ...]
                 ) -> tuple[onnx.ValueInfoProto, str]:
    """The graph input for a program input and the tensor that holds its value inside."""
    if dtype not in _ELEM:
        raise NNCError(f"program input {name!r} has dtype {dtype!r}")
    held = name
    if dtype == "int8":
        wide = g.node("Add", [g.cast(name, TensorProto.INT32), g.const(OFFSET, np.int32)])
        held = g.cast(wide, TensorProto.UINT8)
    return _value_info(name, _ELEM[dtype], shape), held


def _graph_output(g: Graph, name: str, held: str, dtype: str,
                  shape: tuple[int | None, ...]) -> onnx.ValueInfoProto:
    src = g.to_int8(held) if dtype == "int8" else held
    g.nodes.append(helper.make_node("Identity", [src], [name]))
    return _value_info(name, _ELEM[dtype], shape)


def program_to_onnx(program: Program, sample_shapes: Sequence[Sequence[int]], *,
                    expose: Sequence[str] = (), name: str = "nncompress-int8"
                    ) -> onnx.ModelProto:
    """The ONNX model (opset 17) of ``program``; ``sample_shapes``: one shape per program
    input without the batch dimension (the batch is dynamic). ``expose`` names extra values
    to output (int8 values as int8), for checking a graph value by value.

    Raises :class:`UnsupportedLayerError` naming the first op that has no exact form."""
    _check_supported(program)
    shapes = value_shapes(program, sample_shapes)
    g = Graph(prefix="nnc/")
    names: dict[str, str] = {}
    inputs = []
    for value in program.inputs:
        info, held = _graph_input(g, value, program.values[value].dtype, shapes[value])
        inputs.append(info)
        names[value] = held
    emit = Emit(g, program, shapes, names)
    for op in program.ops:
        for value, tensor in zip(op.outputs, EMITTERS[op.kind](emit, op), strict=True):
            names[value] = tensor
    outputs, seen = [], set(program.inputs)
    for value in [*program.outputs, *expose]:
        if value in seen:
            continue
        seen.add(value)
        if value not in names:
            raise NNCError(f"value {value!r} is not computed by the program")
        outputs.append(_graph_output(g, value, names[value], program.values[value].dtype,
                                     shapes[value]))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="nncompress", ir_version=IR_VERSION)
    floats = [op.source or op.attrs.get("fn", "") for op in program.float_ops()]
    helper.set_model_props(model, {
        "nncompress.form": "integer program (Jacob et al. 2018), int8 held as uint8 + 128",
        "nncompress.exact": "bit-exact with nncompress.quant.reference except float ops "
                            "(at most 1 step of their output scale)",
        "nncompress.float_ops": json.dumps(floats)})
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model: onnx.ModelProto | bytes, *inputs: torch.Tensor | np.ndarray,
             threads: int = 1) -> list[np.ndarray]:
    """Run an ONNX model in ONNX Runtime's CPU engine on ``inputs`` (in graph order)."""
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feeds = {}
    for info, x in zip(session.get_inputs(), inputs, strict=True):
        feeds[info.name] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return session.run(None, feeds)


# ----------------------------------------------------------------------------- exporter


def example_tensors(example: Any, names: Sequence[str] | None = None
                    ) -> tuple[torch.Tensor, ...]:
    """Model inputs (a tensor, a tuple of tensors, or a dict of tensors: ordered by
    ``names`` when they are its keys) as positional tensors."""
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, dict) and all(isinstance(t, torch.Tensor) for t in example.values()):
        if names is not None and set(names) == set(example):
            return tuple(example[n] for n in names)
        return tuple(example.values())
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise NNCError(f"an example input must be a tensor, a tuple or a dict of tensors, got "
                   f"{type(example).__name__}")


def output_steps(program: Program, got: Sequence[np.ndarray], want: Sequence[torch.Tensor]
                 ) -> tuple[float, float]:
    """The largest output difference, absolute and in steps of the dequantized value's
    scale (for float outputs produced by ``dequantize``)."""
    makers = {out: op for op in program.ops for out in op.outputs}
    worst_abs = worst_steps = 0.0
    for name, g, w in zip(program.outputs, got, want, strict=True):
        diff = float(np.abs(g.astype(np.float64) - w.double().numpy()).max(initial=0.0))
        op = makers.get(name)
        scale = program.values[op.inputs[0]].scale if op is not None and \
            op.kind == "dequantize" else 1.0
        worst_abs, worst_steps = max(worst_abs, diff), max(worst_steps, diff / scale)
    return worst_abs, worst_steps


def export_program(obj: Any, example: Any) -> ExportResult:
    """The ``onnx:program`` exporter: exact integer ONNX, checked bit for bit against the
    integer reference on ``example``."""
    from nncompress.export import ExportResult, program_of
    from nncompress.quant.reference import run

    program = program_of(obj)
    if example is None:
        raise NNCError("exporting an integer program needs an example input (it fixes the "
                       "per-sample input shapes; the batch stays dynamic)")
    args = example_tensors(example, program.inputs)
    model = program_to_onnx(program, [tuple(a.shape[1:]) for a in args])
    got = run_onnx(model, *args)
    want = run(program, *args)
    diff, steps = output_steps(program, got, want)
    exact = all(np.array_equal(g, w.numpy()) for g, w in zip(got, want, strict=True))
    check = (f"ONNX Runtime == integer reference bit for bit on {args[0].shape[0]} sample(s)"
             if exact else f"ONNX Runtime vs integer reference: max |diff| {diff:.3g} "
             f"({steps:.3g} output steps) on {args[0].shape[0]} sample(s)")
    notes = [f"kept in float32 (ONNX Runtime may round these 1 step differently): "
             f"{', '.join(op.source or op.kind for op in program.float_ops())}"] \
        if program.float_ops() else []
    if any(op.kind in ("gru", "lstm") for op in program.ops):
        notes.append("recurrent layers are unrolled: the sequence length is fixed to the "
                     "example's")
    return ExportResult(model.SerializeToString(), "onnx:program", exact, diff, check,
                        tuple(notes))


def _register() -> None:
    from nncompress.export import EXPORTERS, Exporter

    EXPORTERS.register("onnx:program", Exporter(
        "onnx:program", "onnx", "integer program -> exact integer ONNX (MatMulInteger, "
        "ConvInteger, int64 fixed-point requantization)", export_program))


_register()
