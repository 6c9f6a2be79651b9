"""Damaged and hostile .nnc files only ever raise FormatError with a one-line message.

The header mutations here work on format-version-1 files (JSON headers), which
``load`` still reads; ``test_formats_header.py`` mutates the version-2 binary table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats.arch import describe
from nncompress.formats.header import json_header, pack_chunks
from nncompress.formats.table import read_header_v2

PREFIX = struct.Struct("<4sIQ")


class TinyMLP(nn.Module):
    """Duck-typed ArchModule (class attr ``arch_name`` + ``arch_config()``)."""

    arch_name = "t-mlp"

    def __init__(self, inputs: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def arch_config(self) -> dict[str, Any]:
        return {"inputs": self.fc1.in_features, "hidden": self.fc1.out_features,
                "classes": self.fc2.out_features}


BUILDERS = {"t-mlp": TinyMLP}


def load(path: Path) -> nn.Module:
    return formats.load(path, builders=BUILDERS)


def split(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    """(version, header, payload) of a file, parsed by the documented layout; a version-2
    header comes back as the equivalent version-1 JSON header (to edit and ``resign``)."""
    _, version, length = PREFIX.unpack_from(data)
    raw, payload = data[16:16 + length], data[16 + length:-32]
    if version == 1:
        return version, json.loads(raw), payload
    header = read_header_v2(raw, len(payload))
    header["format_version"] = 1
    return version, header, payload


def resign(path: Path, payload: bytes, *, header: Any = None, raw: bytes | None = None,
           magic: bytes = b"NNC1", version: int = 1, length: int | None = None) -> None:
    """Write a file with a tampered header/payload and a valid SHA-256 checksum."""
    raw = json.dumps(header).encode() if raw is None else raw
    body = PREFIX.pack(magic, version, len(raw) if length is None else length) + raw + payload
    path.write_bytes(body + hashlib.sha256(body).digest())


def write_v1(model: nn.Module, path: Path, **save_kwargs: Any) -> None:
    """``model`` as the version-1 writer stored it: a JSON header recording every module
    (the tensors are those the current writer encodes, at explicit offsets)."""
    formats.save(model, path, **save_kwargs)
    header = formats.read_header(path)
    data = path.read_bytes()
    length = PREFIX.unpack_from(data)[2]
    header["format_version"] = 1
    header["arch"] = describe(model)
    path.write_bytes(b"".join(pack_chunks(json_header(header), [data[16 + length:-32]],
                                          version=1)))


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A small version-1 file: fc1.weight 90% zero (stored sparse), the rest dense."""
    torch.manual_seed(0)
    model = TinyMLP()
    with torch.no_grad():
        model.fc1.weight[torch.rand_like(model.fc1.weight) < 0.9] = 0.0
    path = tmp_path / "m.nnc"
    write_v1(model, path, meta={"note": "fixture"}, encodings={"fc1.weight": "sparse"})
    return path


def assert_format_error(call: Callable[[], object]) -> FormatError:
    with pytest.raises(FormatError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return info.value


def test_fixture_uses_the_documented_layout(saved: Path) -> None:
    data = saved.read_bytes()
    magic, version, length = PREFIX.unpack_from(data)
    assert (magic, version) == (b"NNC1", 1)
    assert data[16:16 + length].startswith(b"{") and data[15 + length:16 + length] == b"}"
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    _, header, payload = split(data)
    assert [t["encoding"] for t in header["tensors"]] == ["sparse", "dense", "dense", "dense"]
    assert sum(t["length"] for t in header["tensors"]) == len(payload)
    resign(saved, payload, header=header)  # the helper reproduces a loadable file
    assert isinstance(load(saved), TinyMLP)


def test_truncation_at_many_offsets(saved: Path) -> None:
    data = saved.read_bytes()
    cuts = sorted({*range(64), *range(64, len(data), 5), *range(len(data) - 40, len(data))})
    for cut in cuts:
        saved.write_bytes(data[:cut])
        assert_format_error(lambda: load(saved))
    assert_format_error(lambda: formats.inspect(saved))


def test_random_byte_flips(saved: Path) -> None:
    data = saved.read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        broken = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            broken[rng.randrange(len(data))] ^= rng.randint(1, 255)
        saved.write_bytes(bytes(broken))
        error = assert_format_error(lambda: load(saved))
        assert "checksum mismatch" in str(error) or "magic" in str(error) \
            or "version" in str(error) or "header length" in str(error)


@pytest.mark.parametrize("part", ["header", "payload"])
def test_resigned_random_mutations_never_escape_as_other_errors(saved: Path, part: str) -> None:
    """Mutations behind a valid checksum: each load succeeds or raises FormatError."""
    _, header, payload = split(saved.read_bytes())
    raw = json.dumps(header).encode()
    rng = random.Random(1)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        mutated = bytearray(raw if part == "header" else payload)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if part == "header":
            resign(saved, payload, raw=bytes(mutated))
        else:
            resign(saved, bytes(mutated), raw=raw)
        try:
            load(saved)
            outcomes["ok"] += 1
        except FormatError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_wrong_magic(saved: Path) -> None:
    _, header, payload = split(saved.read_bytes())
    resign(saved, payload, header=header, magic=b"PK\x03\x04")
    assert "not a .nnc file" in str(assert_format_error(lambda: load(saved)))


def test_newer_version_asks_to_upgrade(saved: Path) -> None:
    _, header, payload = split(saved.read_bytes())
    header["format_version"] = 7
    resign(saved, payload, header=header, version=7)
    for call in (load, formats.read_header, formats.inspect):
        error = assert_format_error(lambda call=call: call(saved))
        assert str(error) == (f"file format version 7 is newer than supported "
                              f"{formats.FORMAT_VERSION}; upgrade nncompress")


@pytest.mark.parametrize("kwargs", [
    {"version": 0},
    {"length": 2**63},
    {"length": 10**6},
    {"raw": b"\xff\xfe{}"},
    {"raw": b"{not json"},
    {"raw": b"[" * 100_000 + b"]" * 100_000},
    {"raw": b'{"format_version": NaN}'},
    {"raw": b""},
    {"raw": b"null"},
])
def test_hostile_framing_and_raw_header(saved: Path, kwargs: dict[str, Any]) -> None:
    _, header, payload = split(saved.read_bytes())
    resign(saved, payload, header=header, **kwargs)
    assert_format_error(lambda: load(saved))


def test_tiny_files(tmp_path: Path) -> None:
    for content in (b"", b"NNC1", b"NNC1" + b"\x00" * 40):
        (tmp_path / "t.nnc").write_bytes(content)
        assert_format_error(lambda: load(tmp_path / "t.nnc"))


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(header: dict[str, Any]) -> None:
        node: Any = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(header: dict[str, Any]) -> None:
        node: Any = header
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


T0 = ["tensors", 0]
FC1 = ["arch", "modules", "fc1"]
LINEAR = {"in_features": 8, "out_features": 16, "bias": True}
HOSTILE: dict[str, Callable[[dict[str, Any]], None]] = {
    "shape-huge": _set([*T0, "shape"], [2**40]),
    "shape-negative": _set([*T0, "shape"], [-1, 8]),
    "shape-bool": _set([*T0, "shape"], [True, 8]),
    "shape-string": _set([*T0, "shape"], "16x8"),
    "shape-float": _set([*T0, "shape"], [16, 8.0]),
    "shape-ndim": _set([*T0, "shape"], [1] * 17),
    "shape-numel-cap": _set([*T0, "shape"], [2**16, 2**16]),
    "shape-wrong": _set([*T0, "shape"], [8, 16]),
    "offset-past-end": _set([*T0, "offset"], 10**9),
    "offset-negative": _set([*T0, "offset"], -1),
    "offset-string": _set([*T0, "offset"], "0"),
    "length-huge": _set([*T0, "length"], 10**12),
    "length-bool": _set([*T0, "length"], True),
    "length-short": _set([*T0, "length"], 3),
    "dtype-object": _set([*T0, "dtype"], "object"),
    "dtype-torch-name": _set([*T0, "dtype"], "torch.float32"),
    "dtype-int": _set([*T0, "dtype"], 5),
    "dtype-mismatch": _set([*T0, "dtype"], "int64"),
    "encoding-pickle": _set([*T0, "encoding"], "pickle"),
    "encoding-fp16-int": lambda h: (_set([*T0, "dtype"], "int64")(h),
                                    _set([*T0, "encoding"], "fp16")(h)),
    "params-nnz-huge": _set([*T0, "params"], {"nnz": 10**9}),
    "params-nnz-negative": _set([*T0, "params"], {"nnz": -3}),
    "params-nnz-float": _set([*T0, "params"], {"nnz": 1.5}),
    "params-extra": _set([*T0, "params", "code"], "os.system('x')"),
    "params-list": _set([*T0, "params"], []),
    "name-int": _set([*T0, "name"], 5),
    "name-unexpected": _set([*T0, "name"], "fc1.weight2"),
    "tensor-extra-key": _set([*T0, "code"], 1),
    "tensor-missing": lambda h: h["tensors"].pop(),
    "tensor-duplicate": lambda h: h["tensors"].append(dict(h["tensors"][0])),
    "tensors-dict": _set(["tensors"], {}),
    "header-extra-key": _set(["exec"], "print(1)"),
    "header-no-meta": _del(["meta"]),
    "header-meta-list": _set(["meta"], [1]),
    "header-version-mismatch": _set(["format_version"], 2),
    "header-writer-int": _set(["writer"], 1),
    "arch-list": _set(["arch"], []),
    "arch-extra": _set(["arch", "code"], {}),
    "builder-unknown": _set(["arch", "builder", "name"], "nope"),
    "builder-name-int": _set(["arch", "builder", "name"], 3),
    "builder-config-list": _set(["arch", "builder", "config"], []),
    "builder-config-bogus": _set(["arch", "builder", "config"], {"bogus": 1}),
    "builder-config-negative": _set(["arch", "builder", "config", "hidden"], -1),
    "builder-config-huge": _set(["arch", "builder", "config", "hidden"], 10**9),
    "builder-null-without-class": _set(["arch", "builder"], {"name": None}),
    "modules-list": _set(["arch", "modules"], []),
    "module-os-system-args": _set(FC1, {"type": "os.system", "args": {"command": "touch x"}}),
    "module-os-system-null": _set(FC1, {"type": "os.system", "args": None}),
    "module-args-bool": _set([*FC1, "args"], {**LINEAR, "out_features": True}),
    "module-args-huge": _set([*FC1, "args"], {**LINEAR, "out_features": 10**12}),
    "module-args-too-big": _set([*FC1, "args"], {**LINEAR, "out_features": 2**40}),
    "module-args-string": _set([*FC1, "args"], {**LINEAR, "in_features": "8"}),
    "module-args-missing": _set([*FC1, "args"], {"in_features": 8, "out_features": 16}),
    "module-args-extra": _set([*FC1, "args"], {**LINEAR, "device": "cuda"}),
    "module-args-null": _set([*FC1, "args"], None),
    "module-path-missing": _set(["arch", "modules", "nope.fc"], {"type": "Linear",
                                                                 "args": LINEAR}),
    "module-other-type": _set(FC1, {"type": "Conv1d", "args": {
        "in_channels": 8, "out_channels": 16, "kernel_size": [1], "stride": [1],
        "padding": [0], "dilation": [1], "groups": 1, "bias": True,
        "padding_mode": "zeros"}}),
    "module-conv-groups-zero": _set(FC1, {"type": "Conv1d", "args": {
        "in_channels": 8, "out_channels": 16, "kernel_size": [1], "stride": [1],
        "padding": [0], "dilation": [1], "groups": 0, "bias": True,
        "padding_mode": "evil"}}),
    "module-lstm-dropout": _set(FC1, {"type": "LSTM", "args": {
        "input_size": 8, "hidden_size": 16, "num_layers": 1, "bias": True,
        "batch_first": False, "dropout": 5, "bidirectional": False, "proj_size": 0}}),
    "module-embedding-padding": _set(FC1, {"type": "Embedding", "args": {
        "num_embeddings": 16, "embedding_dim": 8, "padding_idx": 99, "max_norm": None,
        "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_refused(saved: Path, case: str) -> None:
    _, header, payload = split(saved.read_bytes())
    HOSTILE[case](header)
    resign(saved, payload, header=header)
    assert_format_error(lambda: load(saved))


@pytest.mark.parametrize("case", [c for c in sorted(HOSTILE) if not c.startswith(
    ("builder-config", "builder-unknown", "module-args-huge", "module-other", "module-path",
     "module-os-system-null", "name-unexpected", "tensor-missing", "shape-wrong",
     "dtype-mismatch", "length-short", "module-embedding", "params-nnz", "params-extra"))])
def test_hostile_header_is_refused_by_read_header(saved: Path, case: str) -> None:
    """What is wrong in the header alone is caught without decoding or building (encoding
    params, like tensor data, are checked by the encoding when it decodes)."""
    _, header, payload = split(saved.read_bytes())
    HOSTILE[case](header)
    resign(saved, payload, header=header)
    assert_format_error(lambda: formats.read_header(saved))


def test_module_type_outside_allowlist_is_never_called(saved: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    _, header, payload = split(saved.read_bytes())
    header["arch"]["modules"]["fc1"] = {"type": "os.system", "args": {"command": "echo hi"}}
    resign(saved, payload, header=header)
    error = assert_format_error(lambda: load(saved))
    assert "'os.system'" in str(error) and " Linear, " in str(error)  # the known types
    header["arch"]["modules"]["fc1"] = {"type": "os.system", "args": None}
    resign(saved, payload, header=header)
    error = assert_format_error(lambda: load(saved))
    assert "recorded as 'os.system' but the model has torch.nn" in str(error)
    assert calls == []


def test_user_model_header_rebuilds_only_through_skeleton(tmp_path: Path) -> None:
    """A header claiming a user class never imports it: a skeleton is required."""
    path = tmp_path / "u.nnc"
    write_v1(nn.Linear(2, 2), path)
    _, header, payload = split(path.read_bytes())
    header["arch"]["builder"] = {"name": None, "class": "os.system"}
    resign(path, payload, header=header)
    error = assert_format_error(lambda: formats.load(path))
    assert "class os.system; pass skeleton=" in str(error)
    assert isinstance(formats.load(path, skeleton=nn.Linear(2, 2)), nn.Linear)
