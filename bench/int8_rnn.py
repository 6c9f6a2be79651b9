"""Bench section: what the integer GRU / LSTM gate nonlinearities cost (issue 9, section 1).

Integer-arithmetic-only inference after Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018); the ops are
:mod:`nncompress.quant.int8_rnn`. On the trained reference ``gru`` and ``lstm``
(MNIST-1D), top-1 test accuracy of:

- fp32: the model as trained;
- int8 weights: the gate matrices rounded to int8 per row and back (fake quantization),
  everything else fp32 -- what weight rounding alone costs;
- float gates: the int8 RNN ops (int8 input, int8 matrices, int32 accumulators, int8 Q0.7
  state fed back), with gates and state in float32 (``reference(..., gates="float")``);
- full tables: gates read from 4096-entry int16 Q0.15 sigmoid and tanh tables over
  [-8, 8) at step 1/256, no interpolation, 16 KiB per op (``reference(..., gates="table")``);
- LUT gates: the ops as specified: Q.10 pre-activations, sigmoid and tanh from one
  257-entry int16 tanh table (514 bytes per op), interpolated, int16 Q0.15 state
  (``reference(..., gates="lut")``);

the last three followed by the float classifier on the dequantized last step; and, when
the converter (:func:`nncompress.quant.convert.convert`) is importable, the whole integer
program (int8 classifier too) through :func:`nncompress.quant.reference.run`. Also: how
often LUT and float gates give the same class, their largest difference in the last
step's ``h`` (in int8 steps, 2^-7), and the bytes: the tables of each variant, and the
whole program's consts as the ``.nnc`` container encodes them (smallest lossless encoding
per tensor; with the interpolated table, and with the full tables instead) beside the fp32
``torch.save`` file.

Usage: ``python -c "import sys; sys.path.insert(0, 'bench'); import int8_rnn;
print(int8_rnn.section())"``.
"""

from __future__ import annotations

import copy
import io
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from nncompress import models as zoo
from nncompress.data import Dataset
from nncompress.formats.choose import encoded_sizes
from nncompress.quant.affine import QType, activation_qtype, quantize_tensor, weight_scales
from nncompress.quant.int8_rnn import TABLE_SIZE, const_roles, convert_rnn, reference
from nncompress.quant.program import Op, Program
from nncompress.report import fmt_bytes, fmt_pct, fmt_ratio, render_markdown

__all__ = ["GateRow", "measure", "section"]

SEED = 0
MODELS = (("gru", "mnist1d"), ("lstm", "mnist1d"))
CALIB_BATCHES = 4          # training batches whose min / max give the input's int8 type
LUT_BYTES = TABLE_SIZE * 2      # the interpolated tanh table, int16, per op
FULL_TABLE_BYTES = 2 * 4096 * 2  # full sigmoid + tanh tables, int16, per op


@dataclass(frozen=True)
class GateRow:
    """One model: accuracies (fractions of the test split), agreement of LUT and float
    gates, the largest |h_lut - h_float| at the last step in int8 steps, table bytes of all
    RNN ops (LUT and full tables), the fp32 ``torch.save`` bytes and the program's consts
    as encoded (None without the converter), the accuracy with one weight scale per gate
    matrix instead of per row (LUT gates) and the encoded bytes that saves, and the
    seconds this model took."""

    model: str
    fp32: float
    int8_weights: float
    float_gates: float
    full_tables: float
    lut_gates: float
    program: float | None
    per_gate: float
    agreement: float
    max_h_diff: int
    lut_bytes: int
    full_table_bytes: int
    fp32_bytes: int
    program_bytes: int | None
    per_gate_saving: int
    seconds: float


Ops = list[tuple[Program, Op, QType]]


def _rnn_ops(model: nn.Module, qx: QType, per_channel: bool = True) -> Ops:
    """One single-op program per recurrent layer of ``model.layers`` (input type chained)."""
    out = []
    for i, rnn in enumerate(model.layers):
        prefix = f"layers.{i}."
        consts, attrs, qtypes = convert_rnn(rnn, qx, prefix, per_channel=per_channel)
        kind = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
        outs = ("y", "h_n", "c_n")[:len(qtypes)]
        op = Op(kind, ("x",), outs, attrs, const_roles(consts, prefix), source=prefix[:-1])
        values = {"x": qx, **dict(zip(outs, qtypes, strict=True))}
        out.append((Program(["x"], list(outs), values, [op], consts), op, qx))
        qx = qtypes[0]
    return out


def _encoded(ops: Ops) -> int:
    """Bytes of the ops' consts, each in its smallest lossless ``.nnc`` encoding."""
    return sum(min(encoded_sizes(t).values()) for p, _, _ in ops for t in p.consts.values())


def _int8_last_step(ops: Ops, x: torch.Tensor, gates: str
                    ) -> torch.Tensor:
    """The last layer's int8 ``y`` at the last time step (int64 ``[B, H]``)."""
    qx = ops[0][2]
    seq = quantize_tensor(x.transpose(1, 2), qx.scale, qx.zero_point)
    for program, op, q in ops:
        seq = reference(program, op, seq, q, gates=gates)[0]
    return seq[:, -1]


def _fake_quant_weights(model: nn.Module) -> nn.Module:
    """A copy whose recurrent weight matrices are rounded to int8 per row and back."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for rnn in twin.layers:
            for name, w in rnn.named_parameters():
                if name.startswith("weight_"):
                    s = weight_scales(w)[:, None]
                    w.copy_((quantize_tensor(w, s, 0, -127, 127).double() * s).float())
    return twin


def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], data: Dataset) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test:
            correct += int((predict(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def _program(model: nn.Module, data: Dataset, calib: list[torch.Tensor]
             ) -> tuple[float | None, int | None]:
    """The whole integer program's accuracy and its consts' encoded bytes (None, None
    without the converter)."""
    try:
        from nncompress.quant import reference as executor
        from nncompress.quant.convert import convert
    except ImportError:
        return None, None
    program, _ = convert(model, calib)
    encoded = sum(min(encoded_sizes(t).values()) for t in program.consts.values())
    return _accuracy(lambda x: executor.run(program, x)[0], data), encoded


def _fp32_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def _last_steps(ops: Ops, data: Dataset, gates: str) -> torch.Tensor:
    """The int8 last-step ``y`` of the whole test split (int64 ``[N, H]``)."""
    return torch.cat([_int8_last_step(ops, x, gates) for x, _ in data.test])


def measure(name: str, dataset: str) -> GateRow:
    """The row of one reference model (see the module docstring)."""
    start = time.perf_counter()
    model, data = zoo.load(name, dataset, seed=SEED, progress=False)
    model = model.eval()
    calib = [x for x, _ in itertools.islice(data.train, CALIB_BATCHES)]
    lo = min(float(x.min()) for x in calib)
    hi = max(float(x.max()) for x in calib)
    ops = _rnn_ops(model, activation_qtype(lo, hi))
    per_gate = _rnn_ops(model, ops[0][2], per_channel=False)
    labels = torch.cat([y for _, y in data.test])
    scale = ops[-1][0].values["y"].scale
    with torch.no_grad():
        classes = {key: model.classifier(_last_steps(o, data, g).float() * scale).argmax(1)
                   for key, o, g in (("table", ops, "table"), ("per_gate", per_gate, "lut"))}
        lut = _last_steps(ops, data, "lut")
        flt = _last_steps(ops, data, "float")
        classes["lut"] = model.classifier(lut.float() * scale).argmax(1)
        classes["float"] = model.classifier(flt.float() * scale).argmax(1)
    acc = {key: float((c == labels).double().mean()) for key, c in classes.items()}
    program_accuracy, program_bytes = _program(model, data, calib)
    return GateRow(
        model=name, fp32=_accuracy(model, data),
        int8_weights=_accuracy(_fake_quant_weights(model), data),
        float_gates=acc["float"], full_tables=acc["table"], lut_gates=acc["lut"],
        program=program_accuracy, per_gate=acc["per_gate"],
        agreement=float((classes["lut"] == classes["float"]).double().mean()),
        max_h_diff=int((lut - flt).abs().max()), lut_bytes=LUT_BYTES * len(ops),
        full_table_bytes=FULL_TABLE_BYTES * len(ops), fp32_bytes=_fp32_bytes(model),
        program_bytes=program_bytes, per_gate_saving=_encoded(ops) - _encoded(per_gate),
        seconds=time.perf_counter() - start)


def _ratio(r: GateRow, extra: int) -> str:
    return "-" if r.program_bytes is None else fmt_ratio(r.fp32_bytes
                                                         / (r.program_bytes + extra))


def _accuracy_rows(found: Iterable[GateRow]) -> list[list[str]]:
    return [[r.model, fmt_pct(r.fp32), fmt_pct(r.int8_weights), fmt_pct(r.float_gates),
             fmt_pct(r.full_tables), fmt_pct(r.lut_gates), fmt_pct(r.program),
             fmt_pct(r.per_gate),
             fmt_pct(r.lut_gates - r.float_gates, signed=True), fmt_pct(r.agreement),
             str(r.max_h_diff), f"{r.seconds:.0f} s"] for r in found]


def _bytes_rows(found: Iterable[GateRow]) -> list[list[str]]:
    return [[r.model, fmt_bytes(r.lut_bytes), fmt_bytes(r.full_table_bytes),
             fmt_bytes(r.fp32_bytes), fmt_bytes(r.program_bytes), _ratio(r, 0),
             _ratio(r, r.full_table_bytes - r.lut_bytes), _ratio(r, -r.per_gate_saving)]
            for r in found]


INTRO = """## int8 GRU / LSTM: what the gate nonlinearities cost

The recurrent ops of the integer program (`nncompress.quant.int8_rnn`, Jacob et al. 2018
arithmetic): int8 gate matrices (symmetric per row), int32 accumulators, requantized by
fixed-point multipliers to Q.10 pre-activations; the state int16 Q0.15 (LSTM cell int32,
2^-15), fed back to the hidden matrix as int8 Q0.7. Gates, three ways on the same int8
matrices and int32 accumulators: **float** (float32 gates and state), **full tables**
(4096-entry int16 sigmoid and tanh tables over [-8, 8), step 1/256, no interpolation),
**LUT** (what the program specifies: one 257-entry int16 tanh table over [0, 8], step
1/32, linearly interpolated, odd symmetry, sigmoid(x) = (1 + tanh(x/2)) / 2 from the same
table). Accuracy: top-1 on the MNIST-1D test split; "int8 RNN" columns run the int8 ops
then the fp32 classifier on the dequantized last step; "program" is the whole integer
program (int8 classifier too) through the reference executor. "same class": test samples
where LUT and float gates agree; "max h diff": the largest |h_lut - h_float| at the last
step, in int8 steps (2^-7). "per-gate scales": the int8 RNN with one weight scale per
gate matrix (`convert_rnn(..., per_channel=False)`) instead of one per row."""

BYTES_INTRO = """Bytes: the gate tables of all recurrent ops (LUT vs full tables); the
fp32 `torch.save` state dict; the whole program's consts as the `.nnc` container would
encode them (smallest lossless encoding per tensor, no header), and fp32 / that: as
converted (LUT, per-row scales), with full tables instead (their raw bytes), and with
per-gate RNN weight scales (their encoded bytes: fewer distinct multipliers, and int8
weights of lower entropy, which Huffman coding packs). Compute: a LUT gate is two table
loads, a multiply and shifts per unit and step, no float unit in the loop; float gates
add a dequantizing multiply, an exp and a divide per gate (speed is measured in the C
engine's section)."""


def section(echo: Callable[[str], None] | None = None) -> str:
    """The markdown section: one row per recurrent reference model."""
    found = []
    for name, dataset in MODELS:
        if echo is not None:
            echo(f"  int8 rnn gates: {name}")
        found.append(measure(name, dataset))
    accuracy = ["model", "fp32", "int8 weights", "int8 RNN, float gates",
                "int8 RNN, full tables", "int8 RNN, LUT", "program (LUT)",
                "int8 RNN, LUT, per-gate scales", "LUT - float",
                "same class", "max h diff", "time"]
    size = ["model", "LUT", "full tables", "fp32 torch.save", "program consts",
            "fp32 / program", "fp32 / program with full tables",
            "fp32 / program with per-gate RNN scales"]
    return "\n\n".join([INTRO, render_markdown(accuracy, _accuracy_rows(found)),
                        BYTES_INTRO, render_markdown(size, _bytes_rows(found))])
