"""Multiply-accumulates of an integer program, counted on the shapes of one reference run.

The same ops count as in :mod:`nncompress.measure.macs` for the float model: Linear and
convolution MACs (output elements x inputs per output), activation matmuls, and the
recurrent layers' gate products; elementwise ops, pooling, lookups and requantization
count 0. The sparse count weights each layer's MACs by the density of its int8 weights.
"""

from __future__ import annotations

import math

import torch

from nncompress.quant.program import Op, Program
from nncompress.quant.reference import run_values

__all__ = ["program_macs"]

_GATES = {"gru": 3, "lstm": 4}


def _density(t: torch.Tensor) -> float:
    return float((t != 0).sum()) / max(1, t.numel())


def _rnn(program: Program, op: Op, x: torch.Tensor) -> tuple[int, int]:
    a = op.attrs
    hidden, layers = a["hidden_size"], a["num_layers"]
    dirs = 2 if a["bidirectional"] else 1
    steps = x.shape[1] if a["batch_first"] else x.shape[0]
    dense = sparse = 0.0
    for role, name in op.consts.items():
        role = role.rsplit(".", 1)[-1]
        if role in ("w_ih", "w_hh"):
            w = program.consts[name]
            dense += steps * w.numel()
            sparse += steps * w.numel() * _density(w)
    if not dense:  # consts named otherwise: count from the attributes
        inputs = x.shape[-1]
        per = sum(_GATES[op.kind] * hidden * ((inputs if i == 0 else hidden * dirs) + hidden)
                  for i in range(layers))
        dense = sparse = steps * dirs * per
    return int(dense), int(sparse)


def program_macs(program: Program, *args: torch.Tensor) -> tuple[int, int]:
    """Dense and non-zero-weight MACs per sample of ``program`` on ``args`` (batch 1)."""
    env = run_values(program, *args)
    dense = sparse = 0
    for op in program.ops:
        out = env[op.outputs[0]]
        if op.kind in ("linear", "conv"):
            w = program.consts[op.consts["w"]]
            per_out = math.prod(w.shape[1:])
            outputs = out.numel() // max(1, args[0].shape[0])
            dense += outputs * per_out
            sparse += round(outputs * per_out * _density(w))
        elif op.kind == "matmul":
            k = env[op.inputs[0]].shape[-1]
            dense += out.numel() * k
            sparse += out.numel() * k
        elif op.kind in _GATES:
            d, s = _rnn(program, op, env[op.inputs[0]])
            dense += d
            sparse += s
    return dense, sparse
