"""Validation of an integer program read from a file: every field checked before use.

A ``.nnc`` file's program is hostile until checked (``docs/FORMAT.md``): JSON types, op
kinds (:data:`~nncompress.quant.program.OP_KINDS`), input / output / attr / const counts
and types, values defined before they are read, qtypes with finite positive scales and
int8 zero-points, and bounded integers. Any fault is a one-line
:class:`~nncompress.errors.FormatError` naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from nncompress.formats._checks import (
    check_dict,
    check_float,
    check_int,
    check_keys,
    check_list,
    check_str,
    fail,
    short,
)
from nncompress.quant.affine import QType
from nncompress.quant.program import FLOAT_FNS, OP_KINDS, Op, Program

__all__ = ["check_program", "parse_program"]

_MAX_OPS = 100_000
_DTYPES = ("int8", "float32", "int64")
_BIG = 2**62
_TORCH_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                 "float32": torch.float32}


def _qtype(raw: Any, what: str) -> QType:
    items = check_list(raw, what, max_len=3)
    if len(items) != 3:
        fail(f"{what} must be [dtype, scale, zero_point], got {short(raw)}")
    dtype = check_str(items[0], f"{what} dtype")
    if dtype not in _DTYPES:
        fail(f"{what} dtype must be one of {', '.join(_DTYPES)}, got {short(dtype)}")
    scale = check_float(items[1], f"{what} scale")
    if not (math.isfinite(scale) and scale > 0):
        fail(f"{what} scale must be finite and positive, got {scale}")
    zero = check_int(items[2], f"{what} zero_point", lo=-128, hi=127)
    return QType(dtype, scale, zero)


def _attr(value: Any, what: str, depth: int = 0) -> Any:
    """A JSON attr value: ints bounded by 2^62, finite floats, short strings, lists and
    dicts of them, at most 4 levels deep."""
    if depth > 4:
        fail(f"{what} is nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return check_int(value, what, lo=-_BIG, hi=_BIG)
    if isinstance(value, float):
        return check_float(value, what)
    if isinstance(value, str):
        return check_str(value, what)
    if isinstance(value, list):
        return [_attr(v, what, depth + 1) for v in check_list(value, what, max_len=64)]
    if isinstance(value, dict):
        return {check_str(k, what): _attr(v, f"{what}.{k}", depth + 1)
                for k, v in check_dict(value, what).items()}
    fail(f"{what} has an unsupported value {short(value)}")


def _op(raw: Any, index: int) -> Op:
    what = f"program op {index}"
    entry = check_keys(raw, what, ("kind", "in", "out", "attrs", "consts", "source"))
    kind = check_str(entry["kind"], f"{what} kind")
    if kind not in OP_KINDS:
        fail(f"{what} has unknown kind {short(kind)} (known: {', '.join(OP_KINDS)})")
    spec = OP_KINDS[kind]
    ins = [check_str(v, f"{what} input") for v in check_list(entry["in"], f"{what} in",
                                                             max_len=64)]
    outs = [check_str(v, f"{what} output") for v in check_list(entry["out"], f"{what} out",
                                                               max_len=4)]
    if (spec.inputs >= 0 and len(ins) != spec.inputs) or (spec.inputs < 0 and not ins):
        fail(f"{what} ({kind}) takes {spec.inputs if spec.inputs >= 0 else '1 or more'} "
             f"inputs, got {len(ins)}")
    if len(outs) != spec.outputs:
        fail(f"{what} ({kind}) has {spec.outputs} outputs, got {len(outs)}")
    attrs = {check_str(k, f"{what} attr"): _attr(v, f"{what} attr {k}")
             for k, v in check_dict(entry["attrs"], f"{what} attrs").items()}
    missing = [a for a in spec.attrs if a not in attrs and a not in ("act_min", "act_max")]
    if missing:
        fail(f"{what} ({kind}) lacks attr {missing[0]!r}")
    if kind == "float" and attrs.get("fn") not in FLOAT_FNS:
        fail(f"{what} float fn must be one of {', '.join(FLOAT_FNS)}, got {short(attrs['fn'])}")
    raw_consts = entry["consts"]
    if isinstance(raw_consts, list):   # roles of consts named "<first output>.<role>"
        roles = [check_str(r, f"{what} const role")
                 for r in check_list(raw_consts, f"{what} consts", max_len=64)]
        consts = {role: f"{outs[0] if outs else ''}.{role}" for role in roles}
    else:
        consts = {check_str(k, f"{what} const role"): check_str(v, f"{what} const")
                  for k, v in check_dict(raw_consts, f"{what} consts").items()}
    need = [r for r in spec.consts if r not in consts]
    if need:
        fail(f"{what} ({kind}) lacks const {need[0]!r}")
    return Op(kind, tuple(ins), tuple(outs), attrs, consts,
              check_str(entry["source"], f"{what} source"))


def parse_program(text: str, consts: Mapping[str, torch.Tensor]) -> Program:
    """A :class:`Program` from its JSON structure and its const tensors, validated."""
    if not isinstance(text, str) or len(text) > 64 * 2**20:
        fail("program must be a JSON string of at most 64 MiB")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        fail(f"program is not valid JSON: {exc}")
    record = check_keys(raw, "program", ("inputs", "outputs", "values", "ops"))
    values = {check_str(k, "program value"): _qtype(v, f"program value {short(k)}")
              for k, v in check_dict(record["values"], "program values").items()}
    program = Program(
        [check_str(v, "program input") for v in check_list(record["inputs"], "program inputs",
                                                           max_len=16)],
        [check_str(v, "program output") for v in check_list(record["outputs"],
                                                            "program outputs", max_len=16)],
        values,
        [_op(op, i) for i, op in enumerate(check_list(record["ops"], "program ops",
                                                       max_len=_MAX_OPS))],
        dict(consts))
    check_program(program)
    return program


def _check_sign(program: Program, op: Op, what: str) -> None:
    """A sign op writes int8 +-1 at scale 1, zero-point 0 (what the binary kernels read),
    from one threshold per channel along a non-negative ``axis``."""
    qo = program.values[op.outputs[0]]
    if (qo.dtype, qo.scale, qo.zero_point) != ("int8", 1.0, 0):
        fail(f"{what} output must be int8 at scale 1, zero-point 0, got {short(qo.to_json())}")
    axis = op.attrs["axis"]
    if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
        fail(f"{what} axis must be a non-negative int, got {short(axis)}")
    t = program.consts.get(op.consts.get("t", ""))
    if t is not None and t.dim() != 1:
        fail(f"{what} thresholds must be 1-D, got shape {list(t.shape)}")


def check_program(program: Program) -> None:
    """Values defined before use and typed, consts present with the dtypes their roles
    need, inputs float32/int64 and outputs float32."""
    defined = set(program.inputs)
    for name in (*program.inputs, *program.outputs):
        if name not in program.values:
            fail(f"program value {short(name)} has no qtype")
    for name in program.inputs:
        if program.values[name].dtype == "int8":
            fail(f"program input {short(name)} must be float32 or int64")
    for i, op in enumerate(program.ops):
        what = f"program op {i} ({op.kind})"
        for name in op.inputs:
            if name not in defined:
                fail(f"{what} reads {short(name)} before it is computed")
        for item in op.attrs.get("shape", []) if op.kind == "reshape" else []:
            if isinstance(item, list) and not (len(item) == 3 and item[0] == "dim"
                                               and isinstance(item[1], str)
                                               and item[1] in defined
                                               and isinstance(item[2], int)):
                fail(f"{what} reshapes by {short(item)}, not [\"dim\", a computed value, "
                     "an axis]")
        for name in op.outputs:
            if name not in program.values:
                fail(f"{what} writes {short(name)}, which has no qtype")
            defined.add(name)
        if op.kind == "sign":
            _check_sign(program, op, what)
        roles = {**OP_KINDS[op.kind].consts, **OP_KINDS[op.kind].optional_consts}
        for role, name in op.consts.items():
            if name not in program.consts:
                fail(f"{what} needs const {short(name)}, which the file does not hold")
            want = roles.get(role)
            got = program.consts[name].dtype
            if want is not None and got != _TORCH_DTYPES[want]:
                fail(f"{what} const {short(name)} must be {want}, got {got}")
    for name in program.outputs:
        if name not in defined:
            fail(f"program output {short(name)} is never computed")
        if program.values[name].dtype != "float32":
            fail(f"program output {short(name)} must be float32")
