"""The version-2 header: a compact JSON part and a binary tensor table (``docs/FORMAT.md``).

::

    varint J, J bytes   JSON object: "w" writer, "b" + "c" builder name and config or "u"
                        user class, "d" module records {path: [type, [args] | {args} |
                        null] | type} and "i" paths of Identity modules (optional),
                        "m" meta (optional)
    varint T            tensors, then T entries:
        varint shared, varint n, n bytes   the name: ``shared`` bytes of the previous
                                           name's UTF-8, then ``n`` new bytes
        u8 kind                            dtype code * 16 + encoding code (15: the
                                           encoding's name follows: varint length, UTF-8)
        varint ndim, ndim x varint         the shape
        varint per param                   the encoding's ``param_keys``, in order
        varint length                      data bytes; offsets are implicit (back to back)

Varints are unsigned LEB128 (7 bits a byte, least significant group first, at most 9
bytes, at most ``2**62``). :func:`write_header` and :func:`read_header_v2` translate
between this and the version-1 shaped dict that ``read_header`` returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from nncompress.formats._checks import (
    MAX_ELEMENTS,
    MAX_INT,
    check_dict,
    check_keys,
    check_list,
    check_str,
    clip,
    fail,
    short,
)
from nncompress.formats.encodings import DTYPES, ENCODINGS
from nncompress.formats.layer_types import layer_types

__all__ = ["compact_arch", "expand_arch", "read_header_v2", "write_header"]

MAX_NDIM = 16
_NAMED = 15  # encoding code: the name follows
_JSON_KEYS = ("w", "b", "c", "u", "d", "i", "m")


def varint(value: int) -> bytes:
    """``value`` (0 <= value <= 2**62) as unsigned LEB128."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class Reader:
    """Reads varints and byte strings from a header, refusing to run past its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def varint(self, what: str, hi: int = MAX_INT) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                fail(f"header ends inside {what}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift >= 63:
                fail(f"header {what} is not a valid varint")
        if value > hi:
            fail(f"header {what} is {value}, more than {hi}")
        return value

    def take(self, size: int, what: str) -> bytes:
        if size > self.left():
            fail(f"header {what} needs {size} bytes, {self.left()} are left")
        self.pos += size
        return self.data[self.pos - size:self.pos]

    def text(self, size: int, what: str) -> str:
        try:
            return self.take(size, what).decode("utf-8")
        except UnicodeDecodeError:
            fail(f"header {what} is not UTF-8")


def _codes() -> dict[int, str]:
    return {c.code: name for name in ENCODINGS.names()
            if (c := ENCODINGS.get(name)).code is not None}


_DTYPE_BY_CODE = {d.code: d.name for d in DTYPES.values()}


def compact_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 arch record (``{"builder", "modules"}``) in the short version-2 keys;
    layer-type args become lists in the key order of their registered ``args``."""
    builder = arch["builder"]
    out: dict[str, Any] = ({"b": builder["name"], "c": builder["config"]}
                           if builder.get("name") is not None else {"u": builder["class"]})
    modules: dict[str, Any] = {}
    removed = []
    for path, spec in arch["modules"].items():
        args, type_name = spec["args"], spec["type"]
        if type_name == "Identity" and args is not None:
            removed.append(path)  # no children: recorded after every other module
        elif args is None or (spec.get("partial") and not args):
            modules[path] = type_name
        elif spec.get("partial"):
            modules[path] = [type_name, dict(args)]
        else:
            keys = layer_types().get(type_name).args
            modules[path] = [type_name, [args[k] for k in keys]]
    if modules:
        out["d"] = modules
    if removed:
        out["i"] = removed
    return out


def expand_arch(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`compact_arch` (types checked here, values by ``arch``)."""
    if "u" in obj:
        if "b" in obj or "c" in obj:
            fail("header records both a user class and a builder")
        builder: dict[str, Any] = {"name": None, "class": obj["u"]}
    else:
        if "b" not in obj or "c" not in obj:
            fail("header lacks the builder name or config ('b', 'c') or user class ('u')")
        builder = {"name": obj["b"], "config": obj["c"]}
    modules = {}
    for path, spec in check_dict(obj.get("d", {}), "header module records").items():
        modules[path] = _expand_module(spec, f"module {short(path)}")
    for path in check_list(obj.get("i", []), "header removed modules"):
        path = check_str(path, "header removed module path")
        if path in modules:
            fail(f"header records module {short(path)} twice")
        modules[path] = {"type": "Identity", "args": {}}
    return {"builder": builder, "modules": modules}


def _expand_module(spec: Any, what: str) -> dict[str, Any]:
    """One compact module record as ``{"type", "args"}`` (+ ``"partial": true``)."""
    if isinstance(spec, str):  # the type alone: no args, or all from the built module
        return ({"type": spec, "args": {}, "partial": True} if spec in layer_types()
                else {"type": spec, "args": None})
    spec = check_list(spec, what, max_len=2)
    if len(spec) != 2:
        fail(f"{what} record must be [type, args], got {short(spec)}")
    type_name, args = check_str(spec[0], f"{what} type"), spec[1]
    if isinstance(args, dict):
        return {"type": type_name, "args": args, "partial": True}
    if args is not None and type_name in layer_types():
        keys = list(layer_types().get(type_name).args)
        values = check_list(args, f"{what} args", max_len=len(keys))
        if len(values) != len(keys):
            fail(f"{what} records {len(values)} args; {type_name} takes {len(keys)}")
        args = dict(zip(keys, values, strict=True))
    return {"type": type_name, "args": args}


def write_header(writer: str, arch: Mapping[str, Any], meta: Mapping[str, Any],
                 tensors: Sequence[Mapping[str, Any]]) -> bytes:
    """The version-2 header of tensors ``[{name, shape, dtype, encoding, params,
    length}]`` stored back to back."""
    info = {"w": writer, **compact_arch(arch)}
    if meta:
        info["m"] = dict(meta)
    text = json.dumps(info, allow_nan=False, separators=(",", ":")).encode("utf-8")
    out = [varint(len(text)), text, varint(len(tensors))]
    previous = b""
    for entry in tensors:
        name = entry["name"].encode("utf-8")
        shared = len(_common_prefix(previous, name))
        out += [varint(shared), varint(len(name) - shared), name[shared:]]
        out.append(_kind(entry["dtype"], entry["encoding"]))
        out += [varint(len(entry["shape"])), *map(varint, entry["shape"])]
        codec = ENCODINGS.get(entry["encoding"])
        params = entry["params"]
        if sorted(params) != sorted(codec.param_keys) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in params.values()):
            raise ValueError(f"encoding {codec.name!r} returned params {params!r}, not "
                             f"non-negative ints for {codec.param_keys}")
        out += [varint(params[k]) for k in codec.param_keys]
        out.append(varint(entry["length"]))
        previous = name
    return b"".join(out)


def _common_prefix(a: bytes, b: bytes) -> bytes:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return a[:size]


def _kind(dtype: str, encoding: str) -> bytes:
    code = ENCODINGS.get(encoding).code
    head = bytes([DTYPES[dtype].code * 16 + (_NAMED if code is None else code)])
    if code is None:
        raw = encoding.encode("utf-8")
        return head + varint(len(raw)) + raw
    return head


def read_header_v2(raw: bytes, payload_len: int) -> dict[str, Any]:
    """Parse a version-2 header into the version-1 shaped dict (tensors with offsets)."""
    reader = Reader(raw)
    size = reader.varint("JSON length", hi=reader.left())
    try:
        info = json.loads(reader.text(size, "JSON part"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        fail(f"header JSON part is not valid JSON: {clip(str(exc), 100)}")
    info = check_keys(info, "header JSON part", ("w",), _JSON_KEYS)
    count = reader.varint("tensor count", hi=reader.left() // 5)
    tensors, previous, offset = [], b"", 0
    for index in range(count):
        entry, previous = _read_entry(reader, index, previous)
        entry["offset"] = offset
        offset += entry["length"]
        tensors.append(entry)
    if reader.left():
        fail(f"header has {reader.left()} bytes after its {count} tensor entries")
    if offset != payload_len:
        fail(f"tensor lengths add up to {offset} bytes but the payload holds {payload_len}")
    return {"format_version": 2, "writer": check_str(info["w"], "header writer"),
            "arch": expand_arch(info), "meta": check_dict(info.get("m", {}), "header meta"),
            "tensors": tensors}


def _read_entry(reader: Reader, index: int, previous: bytes) -> tuple[dict[str, Any], bytes]:
    what = f"tensor entry {index}"
    shared = reader.varint(f"{what} name prefix", hi=len(previous))
    rest = reader.varint(f"{what} name length", hi=reader.left())
    raw = previous[:shared] + reader.take(rest, f"{what} name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"{what} name is not UTF-8")
    what = f"tensor {short(name)}"
    kind = reader.take(1, f"{what} kind")[0]
    dtype = _DTYPE_BY_CODE.get(kind >> 4)
    if dtype is None:
        fail(f"{what} has unknown dtype code {kind >> 4}")
    encoding = _encoding_name(reader, kind & 15, what)
    ndim = reader.varint(f"{what} ndim", hi=MAX_NDIM)
    shape = [reader.varint(f"{what} shape", hi=MAX_ELEMENTS) for _ in range(ndim)]
    if math.prod(shape) > MAX_ELEMENTS:
        fail(f"{what} shape {shape} has more than {MAX_ELEMENTS} elements")
    params = {k: reader.varint(f"{what} {k}") for k in ENCODINGS.get(encoding).param_keys}
    length = reader.varint(f"{what} length")
    return {"name": name, "shape": shape, "dtype": dtype, "encoding": encoding,
            "params": params, "length": length}, raw


def _encoding_name(reader: Reader, code: int, what: str) -> str:
    if code == _NAMED:
        size = reader.varint(f"{what} encoding name length", hi=reader.left())
        name = reader.text(size, f"{what} encoding name")
    else:
        name = _codes().get(code)
        if name is None:
            fail(f"{what} uses unknown encoding code {code}; the file may need a newer "
                 "nncompress")
    if name not in ENCODINGS:
        fail(f"{what} uses unknown encoding {short(name)} (known: "
             f"{', '.join(ENCODINGS.names())}); the file may need a newer nncompress")
    return name


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
