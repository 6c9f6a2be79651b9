"""Hostile int8 program records (the ``"int8"`` architecture of a ``.nnc`` file).

An :class:`~nncompress.quant.int8.Int8Model` record -- the integer program's JSON (Jacob
et al., 2018 arithmetic; :mod:`nncompress.quant.program`) and its const list, zlib-
compressed and base64-encoded -- is hostile until :mod:`nncompress.quant.program_check`
has read it. Each damaged record below gives a one-line FormatError naming the fault, both
through ``Int8Model(blob)`` and through ``nc.load`` of a file carrying it, and the load
writes nothing (no engine compiled, no file created).
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import nncompress as nc
from nncompress.errors import FormatError
from nncompress.quant import reference
from nncompress.quant.affine import QType, fixed_point
from nncompress.quant.int8 import Int8Model
from nncompress.quant.program import Op, Program

Record = dict[str, Any]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(cache))
    yield cache


def good_program() -> Program:
    """quantize -> linear (ReLU clamp) -> linear -> dequantize, on 6 float features."""
    g = torch.Generator().manual_seed(0)
    consts = {}
    for name, (o, i) in (("l1", (8, 6)), ("l2", (3, 8))):
        consts[f"{name}.w"] = torch.randint(-127, 128, (o, i), generator=g, dtype=torch.int8)
        consts[f"{name}.b"] = torch.randint(-500, 500, (o,), generator=g, dtype=torch.int32)
        m, s = fixed_point(torch.full((o,), 0.004, dtype=torch.float64), bits=15)
        consts[f"{name}.m"], consts[f"{name}.s"] = m, s
    values = {"x": QType("float32"), "q": QType("int8", 0.03, -3),
              "h": QType("int8", 0.02, -128), "o": QType("int8", 0.05, 4),
              "y": QType("float32")}
    roles = {r: f"{{}}.{r}" for r in ("w", "b", "m", "s")}
    ops = [Op("quantize", ("x",), ("q",), {}, {}, "input"),
           Op("linear", ("q",), ("h",), {"act_min": -128, "act_max": 127},
              {r: n.format("l1") for r, n in roles.items()}, "fc1"),
           Op("linear", ("h",), ("o",), {}, {r: n.format("l2") for r, n in roles.items()},
              "fc2"),
           Op("dequantize", ("o",), ("y",), {}, {}, "output")]
    return Program(["x"], ["y"], values, ops, consts)


def record_of(model: Int8Model) -> Record:
    record = json.loads(zlib.decompress(base64.b64decode(model.blob)))
    record["program"] = json.loads(record["program"])
    return record


def pack(record: Record) -> str:
    """A record as the file holds it (NaN and Infinity allowed through, as hostile JSON)."""
    raw = dict(record)
    raw["program"] = json.dumps(record["program"])
    return base64.b64encode(zlib.compress(json.dumps(raw).encode())).decode("ascii")


def ops(record: Record) -> list[dict[str, Any]]:
    return record["program"]["ops"]


def values(record: Record) -> dict[str, list]:
    return record["program"]["values"]


def edit(fn: Callable[[Record], Any]) -> Callable[[Record], Record]:
    def apply(record: Record) -> Record:
        fn(record)
        return record
    return apply


def set_dtype(record: Record, name: str, dtype: str) -> None:
    for spec in record["consts"]:
        if spec[0] == name:
            spec[1] = dtype


def reshape_by(ref: Any) -> Callable[[Record], None]:
    """Insert ``h2 = reshape(h, [["dim", ref, 0], -1])`` before the second linear."""
    def apply(record: Record) -> None:
        ops(record).insert(2, {"kind": "reshape", "in": ["h"], "out": ["h2"],
                               "attrs": {"shape": [["dim", ref, 0], -1]}, "consts": {},
                               "source": "view"})
        values(record)["h2"] = values(record)["h"]
        ops(record)[3]["in"] = ["h2"]
    return apply


# (id, record edit, what the message must contain)
RECORD_CASES: list[tuple[str, Callable[[Record], Record], str]] = [
    ("unknown-kind", edit(lambda r: ops(r)[1].update(kind="popen")), "unknown kind 'popen'"),
    ("too-many-inputs", edit(lambda r: ops(r)[1].update({"in": ["q", "q"]})),
     "takes 1 inputs, got 2"),
    ("no-inputs", edit(lambda r: ops(r)[2].update({"in": []})), "takes 1 inputs, got 0"),
    ("too-many-outputs", edit(lambda r: ops(r)[1].update(out=["h", "o"])),
     "has 1 outputs, got 2"),
    ("read-before-computed", edit(lambda r: r["program"].update(
        ops=[ops(r)[0], ops(r)[2], ops(r)[1], ops(r)[3]])), "reads 'h' before it is computed"),
    ("undefined-value", edit(lambda r: ops(r)[2].update({"in": ["ghost"]})),
     "reads 'ghost' before it is computed"),
    ("output-never-computed", edit(lambda r: r["program"].update(outputs=["o"])),
     "must be float32"),
    ("missing-attr", edit(lambda r: ops(r).insert(3, {
        "kind": "mean", "in": ["o"], "out": ["o"], "attrs": {"keepdim": True, "m": 1, "s": 0},
        "consts": {}, "source": "pool"})), "(mean) lacks attr 'dims'"),
    ("const-role-missing", edit(lambda r: ops(r)[1]["consts"].pop("w")), "lacks const 'w'"),
    ("const-not-in-file", edit(lambda r: r.update(consts=[c for c in r["consts"]
                                                           if c[0] != "l2.m"])),
     "needs const 'l2.m', which the file does not hold"),
    ("weight-wrong-dtype", edit(lambda r: set_dtype(r, "l1.w", "int32")),
     "const 'l1.w' must be int8"),
    ("multiplier-wrong-dtype", edit(lambda r: set_dtype(r, "l2.m", "float32")),
     "const 'l2.m' must be int32"),
    ("unknown-const-dtype", edit(lambda r: set_dtype(r, "l1.b", "complex64")),
     "dtype 'complex64'"),
    ("nan-scale", edit(lambda r: values(r)["h"].__setitem__(1, float("nan"))), "finite"),
    ("infinite-scale", edit(lambda r: values(r)["h"].__setitem__(1, float("inf"))), "finite"),
    ("negative-scale", edit(lambda r: values(r)["q"].__setitem__(1, -0.5)),
     "finite and positive, got -0.5"),
    ("zero-scale", edit(lambda r: values(r)["o"].__setitem__(1, 0.0)),
     "finite and positive, got 0.0"),
    ("zero-point-high", edit(lambda r: values(r)["h"].__setitem__(2, 128)),
     "zero_point must be between -128 and 127, got 128"),
    ("zero-point-low", edit(lambda r: values(r)["h"].__setitem__(2, -129)),
     "zero_point must be between -128 and 127, got -129"),
    ("zero-point-float", edit(lambda r: values(r)["h"].__setitem__(2, 0.5)),
     "zero_point must be an integer"),
    ("zero-point-bool", edit(lambda r: values(r)["h"].__setitem__(2, True)),
     "zero_point must be an integer"),
    ("qtype-unknown-dtype", edit(lambda r: values(r)["h"].__setitem__(0, "int4")),
     "dtype must be one of"),
    ("value-without-qtype", edit(lambda r: values(r).pop("h")), "'h', which has no qtype"),
    ("int8-program-input", edit(lambda r: values(r).__setitem__("x", ["int8", 0.1, 0])),
     "must be float32 or int64"),
    ("float-fn", edit(lambda r: ops(r).insert(3, {
        "kind": "float", "in": ["o"], "out": ["o2"], "attrs": {"fn": "eval", "args": {}},
        "consts": {}, "source": "x"})), "float fn must be one of"),
    ("attr-too-deep", edit(lambda r: ops(r)[1]["attrs"].update(
        act_min=[[[[[[1]]]]]])), "nested too deeply"),
    ("attr-huge-int", edit(lambda r: ops(r)[1]["attrs"].update(act_max=2**70)),
     "must be between"),
    ("op-extra-key", edit(lambda r: ops(r)[1].update(code="import os")),
     "unexpected key 'code'"),
    ("program-not-object", edit(lambda r: r.update(program=[1, 2])), "must be a JSON object"),
    ("record-extra-key", edit(lambda r: r.update(pickle="x")), "unexpected key 'pickle'"),
    ("const-shape-negative", edit(lambda r: r["consts"][0].__setitem__(2, [-1, 6])),
     "shape must be between"),
    ("const-spec-short", edit(lambda r: r["consts"][0].pop()), "[name, dtype, shape]"),
    ("const-shape-huge", edit(lambda r: r["consts"][0].__setitem__(2, [2**31, 2**31, 2**31])),
     "more than 2147483648 elements"),
    ("reshape-undefined-dim", edit(reshape_by("ghost")), "reshapes by ['dim', 'ghost', 0]"),
    ("reshape-dim-not-a-name", edit(reshape_by(["q"])), "reshapes by ['dim', ['q'], 0]"),
]


def blob_cases() -> list[tuple[str, str, str]]:
    """Blobs damaged below the JSON: (id, blob, message part)."""
    good = Int8Model.from_program(good_program()).blob
    raw = base64.b64decode(good)
    return [
        ("not-base64", "@@not base64!!", "not valid compressed JSON"),
        ("not-ascii", "ü" * 12, "not valid compressed JSON"),
        ("corrupt-zlib", base64.b64encode(bytes(b ^ 0x5A for b in raw)).decode(),
         "not valid compressed JSON"),
        ("truncated", base64.b64encode(raw[: len(raw) // 2]).decode(), "truncated"),
        ("not-json", base64.b64encode(zlib.compress(b"{'a': 1")).decode(),
         "not valid compressed JSON"),
        ("json-not-object", base64.b64encode(zlib.compress(b"[1, 2]")).decode(),
         "int8 record must be a JSON object"),
    ]


def one_line(exc: pytest.ExceptionInfo[FormatError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and len(message) < 400
    return message


@pytest.fixture(scope="module")
def good_record() -> Record:
    return record_of(Int8Model.from_program(good_program()))


def hostile(record: Record, case: Callable[[Record], Record]) -> str:
    return pack(case(json.loads(json.dumps(record))))


def test_the_good_record_loads_and_runs(good_record: Record, tmp_path: Path) -> None:
    """The baseline every case damages: it round-trips and runs."""
    model = Int8Model(pack(good_record))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    want = reference.run(good_program(), x)[0]
    assert torch.equal(Int8Model.from_program(good_program())(x), want)
    assert model.program.to_json() == good_program().to_json()
    path = tmp_path / "good.nnc"
    nc.save(Int8Model.from_program(good_program()), path)
    assert torch.equal(nc.load(path)(x), want)


@pytest.mark.parametrize(("case", "part"), [(c, p) for _, c, p in RECORD_CASES],
                         ids=[i for i, _, _ in RECORD_CASES])
def test_hostile_record_through_the_constructor(good_record: Record, case: Callable,
                                               part: str | None) -> None:
    with pytest.raises(FormatError) as info:
        Int8Model(hostile(good_record, case))
    message = one_line(info)
    assert part is None or part in message, message


@pytest.mark.parametrize("index", range(len(blob_cases())),
                         ids=[c[0] for c in blob_cases()])
def test_damaged_blob_through_the_constructor(index: int) -> None:
    _, blob, part = blob_cases()[index]
    with pytest.raises(FormatError) as info:
        Int8Model(blob)
    assert part in one_line(info)


@pytest.mark.parametrize("blob", [None, 7, b"bytes", ["list"]])
def test_blob_of_the_wrong_type(blob: Any) -> None:
    with pytest.raises(FormatError, match="base64 string"):
        Int8Model(blob)


def test_zlib_bomb_is_refused_before_inflating_past_the_limit() -> None:
    """65 MiB of JSON whitespace compress to ~65 KB: refused at 64 MiB inflated."""
    bomb = zlib.compress(b" " * (65 * 2**20), 9)
    assert len(bomb) < 2**17
    with pytest.raises(FormatError) as info:
        Int8Model(base64.b64encode(bomb).decode())
    assert "inflates past 64 MiB" in one_line(info)
    with pytest.raises(FormatError, match="at most 64 MiB"):
        Int8Model("A" * (64 * 2**20 + 4))


def tampered_file(tmp_path: Path, blob: str) -> Path:
    """A valid int8 model's file with its record replaced by ``blob`` (the tensors stay)."""
    model = Int8Model.from_program(good_program())
    model.blob = blob
    path = tmp_path / "hostile.nnc"
    nc.save(model, path)
    return path


def assert_load_refused(tmp_path: Path, cache: Path, blob: str, part: str | None) -> None:
    path = tampered_file(tmp_path, blob)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(FormatError) as info:
        nc.load(path)
    message = one_line(info)
    assert part is None or part in message, message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before     # nothing written
    assert not cache.exists() or not any(cache.rglob("*"))


FILE_CASES = ("unknown-kind", "too-many-inputs", "read-before-computed", "const-not-in-file",
              "weight-wrong-dtype", "nan-scale", "negative-scale", "zero-point-high",
              "const-shape-negative")


@pytest.mark.parametrize("name", FILE_CASES)
def test_hostile_record_through_load(name: str, good_record: Record, tmp_path: Path,
                                     _cache: Path) -> None:
    _, case, part = next(c for c in RECORD_CASES if c[0] == name)
    assert_load_refused(tmp_path, _cache, hostile(good_record, case), part)


@pytest.mark.parametrize("name", ["not-base64", "corrupt-zlib", "truncated"])
def test_damaged_blob_through_load(name: str, tmp_path: Path, _cache: Path) -> None:
    _, blob, part = next(c for c in blob_cases() if c[0] == name)
    assert_load_refused(tmp_path, _cache, blob, part)


def test_zlib_bomb_through_load(tmp_path: Path, _cache: Path) -> None:
    bomb = base64.b64encode(zlib.compress(b" " * (65 * 2**20), 9)).decode()
    assert_load_refused(tmp_path, _cache, bomb, "inflates past 64 MiB")


def test_a_reshape_by_a_computed_value_is_accepted(good_record: Record) -> None:
    """The baseline of the reshape cases: a size read from a computed value is valid."""
    model = Int8Model(hostile(good_record, edit(reshape_by("q"))))
    model.load_state_dict(Int8Model.from_program(good_program()).state_dict())
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(reference.run(model.current_program(), x)[0],
                       reference.run(good_program(), x)[0])


@pytest.mark.parametrize(("const", "tensor", "part"), [
    (0, torch.zeros(8, 6), "'l1.w' is torch.float32 [8, 6]; its record says torch.int8 [8, 6]"),
    (0, torch.zeros(8, 6, dtype=torch.int64), "'l1.w' is torch.int64"),
    (0, torch.zeros(8, 7, dtype=torch.int8), "'l1.w' is torch.int8 [8, 7]"),
    (1, torch.zeros(2, dtype=torch.int32), "'l1.b' is torch.int32 [2]"),
], ids=["float-weight", "int64-weight", "wider-weight", "shorter-bias"])
def test_file_tensor_unlike_its_record(const: int, tensor: torch.Tensor, part: str,
                                       tmp_path: Path, _cache: Path) -> None:
    """The record is intact; the stored tensor is of another dtype or shape than it says
    (program_check validated the record's, so the file's may not replace them)."""
    model = Int8Model.from_program(good_program())
    name = f"c{const}"
    assert model.state_dict()[name].dtype != tensor.dtype or \
        model.state_dict()[name].shape != tensor.shape
    if name in model._parameters:
        model._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        model._buffers[name] = tensor
    path = tmp_path / "hostile.nnc"
    nc.save(model, path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(FormatError) as info:
        nc.load(path)
    assert part in one_line(info)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not _cache.exists() or not any(_cache.rglob("*"))
    with pytest.raises(FormatError, match="its record says"):
        Int8Model(model.blob, {"l1.w" if const == 0 else "l1.b": tensor})
