"""The version-2 header: binary tensor table, compact module records, size, version 1 kept."""

from __future__ import annotations

import hashlib
import json
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
from nncompress.formats.table import Reader, varint, write_header

models = pytest.importorskip("nncompress.models")

PREFIX = struct.Struct("<4sIQ")
INPUT_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}


class TinyMLP(nn.Module):
    """Duck-typed ArchModule whose config is its constructor args (not the live widths)."""

    arch_name = "t-mlp"

    def __init__(self, inputs: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.config = {"inputs": inputs, "hidden": hidden, "classes": classes}
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def arch_config(self) -> dict[str, Any]:
        return dict(self.config)


BUILDERS = {"t-mlp": TinyMLP}


def parts(path: Path) -> tuple[int, bytes, bytes]:
    """(version, header, payload) by the documented framing."""
    data = path.read_bytes()
    _, version, length = PREFIX.unpack_from(data)
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    return version, data[16:16 + length], data[16 + length:-32]


def write_v2(path: Path, header: dict[str, Any], payload: bytes) -> None:
    """A version-2 file from a ``read_header``-shaped dict (offsets implied by order)."""
    raw = write_header(header["writer"], header["arch"], header["meta"], header["tensors"])
    path.write_bytes(b"".join(pack_chunks(raw, [payload])))


def resign(path: Path, raw: bytes, payload: bytes, version: int = 2) -> None:
    body = PREFIX.pack(b"NNC1", version, len(raw)) + raw + payload
    path.write_bytes(body + hashlib.sha256(body).digest())


def built(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    shape = INPUT_SHAPES[models.spec(name).default_dataset]
    torch.manual_seed(0)
    model = models.build(name, shape, 10)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape))
    return model.eval(), shape


def test_varints_are_unsigned_leb128() -> None:
    assert varint(0) == b"\x00" and varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01" and varint(300) == b"\xac\x02"
    for value in (0, 1, 2**7, 2**31, 2**62):
        assert Reader(varint(value)).varint("v") == value
    with pytest.raises(FormatError, match="ends inside"):
        Reader(b"\x80").varint("v")
    with pytest.raises(FormatError, match="not a valid varint"):
        Reader(b"\xff" * 10 + b"\x01").varint("v")


def test_layout_json_part_then_tensor_table(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    formats.save(model, tmp_path / "m.nnc", meta={"k": 1})
    version, raw, payload = parts(tmp_path / "m.nnc")
    assert version == formats.FORMAT_VERSION == 2
    reader = Reader(raw)
    info = json.loads(reader.take(reader.varint("J"), "json"))
    assert info["w"].startswith("nncompress ") and info["m"] == {"k": 1}
    assert info["u"].endswith("Linear") and info["d"] == {"": ["Linear", [3, 2, True]]}
    assert reader.varint("T") == 2
    # "weight": no shared prefix, 6 new bytes, float32 (1) * 16 + dense (0), [2, 3], 24 bytes
    assert reader.take(9, "w") == b"\x00\x06weight\x10"
    assert [reader.varint("d") for _ in range(4)] == [2, 2, 3, 24]
    # "bias" shares nothing with "weight"; [2]; 8 bytes; offsets are implicit
    assert reader.take(7, "b") == b"\x00\x04bias\x10"
    assert [reader.varint("d") for _ in range(3)] == [1, 2, 8]
    assert reader.left() == 0 and len(payload) == 32


def test_names_share_prefixes_and_params_are_varints(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(40, 30))
    with torch.no_grad():
        model[0].weight[torch.rand(30, 40, generator=torch.Generator().manual_seed(0)) < .9] = 0
    formats.save(model, tmp_path / "m.nnc", encodings={"0.weight": "sparse"})
    _, raw, _ = parts(tmp_path / "m.nnc")
    assert b"0.weight" in raw and b"0.bias" not in raw and b"\x02\x04bias" in raw
    header = formats.read_header(tmp_path / "m.nnc")
    weight, bias = header["tensors"]
    assert weight["params"] == {"nnz": int((model[0].weight != 0).sum())}
    assert (weight["offset"], bias["offset"]) == (0, weight["length"])


def test_read_header_keeps_the_version_1_shape(tmp_path: Path) -> None:
    formats.save(nn.Linear(3, 2), tmp_path / "m.nnc", meta={"a": [1]})
    header = formats.read_header(tmp_path / "m.nnc")
    assert sorted(header) == ["arch", "format_version", "meta", "tensors", "writer"]
    assert sorted(header["arch"]) == ["builder", "modules"]
    assert sorted(header["tensors"][0]) == ["dtype", "encoding", "length", "name", "offset",
                                            "params", "shape"]


def test_reference_model_records_no_modules(tmp_path: Path) -> None:
    model, _ = built("cnn1d")
    formats.save(model, tmp_path / "c.nnc")
    header = formats.read_header(tmp_path / "c.nnc")
    assert header["arch"]["builder"]["name"] == "cnn1d"
    assert header["arch"]["modules"] == {}  # the builder's own construction, unchanged


def test_changed_layers_record_only_their_changed_args(tmp_path: Path) -> None:
    model = TinyMLP().eval()
    model.fc1 = nn.Linear(8, 5, bias=False)  # narrower, no bias
    model.fc2 = nn.Linear(5, 3)
    formats.save(model, tmp_path / "p.nnc")
    modules = formats.read_header(tmp_path / "p.nnc")["arch"]["modules"]
    assert modules == {"fc1": {"type": "Linear", "args": {"out_features": 5}, "partial": True},
                       "fc2": {"type": "Linear", "args": {"in_features": 5}, "partial": True}}
    loaded = formats.load(tmp_path / "p.nnc", builders=BUILDERS)
    assert loaded.fc1.bias is None and loaded.fc1.out_features == 5  # bias: from the tensors
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), model(x))


def test_removed_layers_are_listed_once(tmp_path: Path) -> None:
    model, shape = built("cnn1d")
    model.features.bn1 = nn.Identity()
    formats.save(model, tmp_path / "c.nnc")
    _, raw, _ = parts(tmp_path / "c.nnc")
    reader = Reader(raw)
    info = json.loads(reader.take(reader.varint("J"), "json"))
    assert info["i"] == ["features.bn1"] and "d" not in info
    loaded = formats.load(tmp_path / "c.nnc")
    assert isinstance(loaded.features.bn1, nn.Identity)
    x = torch.randn(2, *shape)
    assert torch.equal(loaded(x), model(x))


def unstructured(model: nn.Module) -> nn.Module:
    """90% of every weight matrix zeroed, the rest snapped to 32 shared values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                continue
            cut = p.abs().flatten().kthvalue(int(0.9 * p.numel())).values
            codes = torch.linspace(float(p.min()), float(p.max()), 32)
            shared = codes[(p.unsqueeze(-1) - codes).abs().argmin(-1)]
            p.copy_(torch.where(p.abs() > cut, shared, torch.zeros_like(p)))
    return model


def structural(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Every prunable channel / hidden-unit / head group halved."""
    from nncompress.prune.structured import prunable_groups, prune_channels

    x = torch.randn(2, *shape)
    groups = prunable_groups(model, x)
    return prune_channels(model, {g.name: list(range(0, g.size, 2)) for g in groups}, x,
                          groups=groups)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("how", ["dense", "unstructured", "structural"])
@pytest.mark.parametrize("name", models.model_names())
def test_header_fits_300_bytes_plus_the_tensor_names(tmp_path: Path, name: str,
                                                     how: str) -> None:
    model, shape = built(name)
    if how == "unstructured":
        model = unstructured(model)
    elif how == "structural":
        model = structural(model, shape)
    path = tmp_path / "m.nnc"
    formats.save(model, path)
    names = sum(len(n.encode()) for n in model.state_dict())
    header = formats.inspect(path).header_bytes
    assert header <= 300 + names, (header, names)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(formats.load(path)(x), model(x))


def write_v1(model: nn.Module, path: Path, **kwargs: Any) -> None:
    """The version-1 layout (JSON header recording every module, explicit offsets)."""
    formats.save(model, path, **kwargs)
    header = formats.read_header(path)
    _, _, payload = parts(path)
    header["format_version"] = 1
    header["arch"] = describe(model)
    path.write_bytes(b"".join(pack_chunks(json_header(header), [payload], version=1)))


def test_version_1_files_still_load(tmp_path: Path) -> None:
    model, shape = built("transformer")
    write_v1(model, tmp_path / "t.nnc", meta={"old": True})
    assert parts(tmp_path / "t.nnc")[0] == 1
    header = formats.read_header(tmp_path / "t.nnc")
    assert header["format_version"] == 1 and header["meta"] == {"old": True}
    assert header["arch"]["modules"]["embed"]["type"] == "Linear"  # v1 records them all
    loaded = formats.load(tmp_path / "t.nnc")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert formats.inspect(tmp_path / "t.nnc").format_version == 1


def test_version_1_relative_indices_may_leave_any_trailing_zeros(tmp_path: Path) -> None:
    """Version 1 implied every trailing zero; version 2 bounds them (fillers)."""
    model = nn.Linear(300, 200, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = 1.0
    header = {"format_version": 1, "writer": "nncompress 0.1.0", "arch": describe(model),
              "meta": {}, "tensors": [{"name": "weight", "shape": [200, 300],
                                       "dtype": "float32", "encoding": "sparse_rel",
                                       "params": {"entries": 1, "index_bits": 1, "codes": 0,
                                                  "value_bits": 0},
                                       "offset": 0, "length": 5}]}
    data = b"\x00" + torch.tensor([1.0]).numpy().tobytes()
    path = tmp_path / "v1.nnc"
    path.write_bytes(b"".join(pack_chunks(json_header(header), [data], version=1)))
    loaded = formats.load(path, skeleton=nn.Linear(300, 200, bias=False))
    assert torch.equal(loaded.weight, model.weight)
    header["format_version"] = 2  # the same entry in a version-2 file claims too much
    write_v2(path, header, data)
    with pytest.raises(FormatError, match=r"declares 60,000 elements .* at most 3$"):
        formats.load(path, skeleton=nn.Linear(300, 200, bias=False))


def saved_tiny(path: Path) -> tuple[bytes, bytes]:
    torch.manual_seed(0)
    formats.save(TinyMLP(), path)
    _, raw, payload = parts(path)
    return raw, payload


def table_start(raw: bytes) -> int:
    reader = Reader(raw)
    reader.take(reader.varint("J"), "json")
    return reader.pos


def json_mutation(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def mutate(raw: bytes) -> bytes:
        reader = Reader(raw)
        info = json.loads(reader.take(reader.varint("J"), "json"))
        edit(info)
        text = json.dumps(info).encode()
        return varint(len(text)) + text + raw[reader.pos:]
    return mutate


HOSTILE_V2: dict[str, Callable[[bytes], bytes]] = {
    "json-length-past-end": lambda raw: varint(10**6) + raw[1:],
    "json-not-json": lambda raw: varint(3) + b"{x}" + raw[table_start(raw):],
    "json-list": json_mutation(lambda i: i.clear()),
    "json-extra-key": json_mutation(lambda i: i.update(exec="1")),
    "json-builder-and-user": json_mutation(lambda i: i.update(u="x.Y")),
    "json-no-builder": json_mutation(lambda i: i.pop("b")),
    "json-module-record-int": json_mutation(lambda i: i.update(d={"fc1": 3})),
    "json-module-record-long": json_mutation(lambda i: i.update(d={"fc1": ["Linear", [], 1]})),
    "json-module-args-short": json_mutation(lambda i: i.update(d={"fc1": ["Linear", [8]]})),
    "json-partial-bad-arg": json_mutation(lambda i: i.update(d={"fc1": ["Linear",
                                                                        {"rank": 3}]})),
    "json-removed-not-list": json_mutation(lambda i: i.update(i="fc1")),
    "json-removed-twice": json_mutation(lambda i: i.update(d={"fc1": "Identity"},
                                                           i=["fc1"])),
    "table-count-huge": lambda raw: raw[:table_start(raw)] + varint(10**9)
    + raw[table_start(raw) + 1:],
    "table-truncated": lambda raw: raw[:-3],
    "table-trailing-bytes": lambda raw: raw + b"\x00",
    "table-prefix-too-long": lambda raw: raw[:table_start(raw) + 1] + b"\x05"
    + raw[table_start(raw) + 2:],
    "table-name-not-utf8": lambda raw: raw[:table_start(raw) + 3] + b"\xff"
    + raw[table_start(raw) + 4:],
    "table-unknown-dtype": lambda raw: raw.replace(b"fc1.weight\x10", b"fc1.weight\xf0", 1),
    "table-unknown-encoding": lambda raw: raw.replace(b"fc1.weight\x10", b"fc1.weight\x1e",
                                                      1),
    "table-named-encoding": lambda raw: raw.replace(b"fc1.weight\x10",
                                                    b"fc1.weight\x1f\x06pickle", 1),
    "table-ndim-17": lambda raw: raw.replace(b"fc1.weight\x10\x02", b"fc1.weight\x10\x11", 1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_V2))
def test_hostile_version_2_headers_are_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "m.nnc"
    raw, payload = saved_tiny(path)
    mutated = HOSTILE_V2[case](raw)
    assert mutated != raw
    resign(path, mutated, payload)
    for call in (formats.read_header, lambda p: formats.load(p, builders=BUILDERS)):
        with pytest.raises(FormatError) as info:
            call(path)
        assert "\n" not in str(info.value)


def test_payload_must_match_the_table(tmp_path: Path) -> None:
    path = tmp_path / "m.nnc"
    raw, payload = saved_tiny(path)
    resign(path, raw, payload + b"\x00")
    with pytest.raises(FormatError, match=r"tensor lengths add up to .* payload holds"):
        formats.read_header(path)
