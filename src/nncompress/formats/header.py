"""The byte layout of a ``.nnc`` file and the validation of its header.

Layout (all integers little-endian; see ``docs/FORMAT.md``)::

    offset 0   4 bytes   magic b"NNC1"
    offset 4   u32       format version (2; version-1 files are still read)
    offset 8   u64       header length H
    offset 16  H bytes   header: version 2 a compact JSON part + binary tensor table
                         (:mod:`nncompress.formats.table`), version 1 UTF-8 JSON
    16 + H     P bytes   payload: the encoded tensors, at offsets relative to 16 + H
    end - 32   32 bytes  SHA-256 of every byte before it

:func:`unpack` checks magic, version, header length and checksum, in that order;
:func:`parse_header` then checks every field of the header for type and range.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from nncompress.formats._checks import (
    MAX_ELEMENTS,
    check_dict,
    check_int,
    check_keys,
    check_list,
    check_str,
    clip,
    fail,
    short,
)
from nncompress.formats.encodings import DTYPES, ENCODINGS, Buffer
from nncompress.formats.table import read_header_v2

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX_BYTES",
    "Header",
    "TensorEntry",
    "json_header",
    "pack_chunks",
    "parse_header",
    "unpack",
]

MAGIC = b"NNC1"
#: The format version this code writes and the newest it reads.
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<4sIQ")
PREFIX_BYTES = _PREFIX.size
_DIGEST = 32
_MAX_NDIM = 16
_HEADER_KEYS = ("format_version", "writer", "arch", "meta", "tensors")
_TENSOR_KEYS = ("name", "shape", "dtype", "encoding", "params", "offset", "length")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry, validated; ``offset`` is relative to the payload."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    params: dict[str, Any]
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded tensor."""
        return self.numel * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "encoding": self.encoding, "params": self.params, "offset": self.offset,
                "length": self.length}


@dataclass(frozen=True)
class Header:
    """A validated header. ``arch`` (in the version-1 shape, whatever the file's version)
    is checked by :mod:`nncompress.formats.arch` on load."""

    format_version: int
    writer: str
    arch: dict[str, Any]
    meta: dict[str, Any]
    tensors: tuple[TensorEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "writer": self.writer,
                "arch": self.arch, "meta": self.meta,
                "tensors": [t.to_json() for t in self.tensors]}


def json_header(header: dict[str, Any]) -> bytes:
    """A version-1 header: compact UTF-8 JSON (NaN/inf are refused: they are not JSON)."""
    return json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")


def pack_chunks(header: bytes, blobs: Iterable[Buffer], version: int = FORMAT_VERSION
                ) -> Iterator[Buffer]:
    """The file's bytes in order: prefix, header, payload blobs, then the SHA-256."""
    digest = hashlib.sha256()
    for chunk in (_PREFIX.pack(MAGIC, version, len(header)), header, *blobs):
        digest.update(chunk)
        yield chunk
    yield digest.digest()


def header_length(prefix: bytes) -> int | None:
    """The header length a file's first 16 bytes declare (None when they cannot)."""
    if len(prefix) < _PREFIX.size:
        return None
    return _PREFIX.unpack_from(prefix)[2]


def unpack(data: np.ndarray | bytes, source: str, digest: bytes | None = None
           ) -> tuple[int, bytes, np.ndarray]:
    """Check the framing of a whole file; return (version, header bytes, payload).

    ``digest``: the SHA-256 of all but the file's last 32 bytes, when the caller computed
    it while reading.
    """
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if data.size < _PREFIX.size + _DIGEST:
        fail(f"{source} is not a .nnc file: {data.size} bytes is too short")
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        fail(f"{source} is not a .nnc file: magic bytes are {magic!r}, expected {MAGIC!r}")
    if version > FORMAT_VERSION:
        fail(f"file format version {version} is newer than supported {FORMAT_VERSION}; "
             "upgrade nncompress")
    if version < 1:
        fail(f"{source}: unsupported file format version {version}")
    end = data.size - _DIGEST
    if length > end - _PREFIX.size:
        fail(f"{source}: header length {length} runs past the end of the file "
             f"({data.size} bytes); the file is truncated or corrupted")
    if digest is None:
        digest = hashlib.sha256(data[:end]).digest()
    if digest != data[end:].tobytes():
        fail(f"checksum mismatch: file is corrupted ({source})")
    return version, data[_PREFIX.size:_PREFIX.size + length].tobytes(), \
        data[_PREFIX.size + length:end]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_header(raw: bytes, version: int, payload_len: int) -> Header:
    """Decode and validate the header against the file's version and payload size."""
    if version >= 2:
        header = read_header_v2(raw, payload_len)
    else:
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            fail(f"header is not valid UTF-8 JSON: {clip(str(exc), 100)}")
        header = check_keys(obj, "header", _HEADER_KEYS)
    found = check_int(header["format_version"], "header format_version")
    if found != version:
        fail(f"header format_version {found} disagrees with the file's version {version}")
    entries = check_list(header["tensors"], "header tensors")
    tensors = tuple(_parse_tensor(e, i, payload_len) for i, e in enumerate(entries))
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            fail(f"header lists tensor {short(tensor.name)} twice")
        seen.add(tensor.name)
    return Header(format_version=version, writer=check_str(header["writer"], "header writer"),
                  arch=check_dict(header["arch"], "header arch"),
                  meta=check_dict(header["meta"], "header meta"), tensors=tensors)


def _parse_tensor(entry: Any, index: int, payload_len: int) -> TensorEntry:
    obj = check_keys(entry, f"tensor entry {index}", _TENSOR_KEYS)
    name = check_str(obj["name"], f"tensor entry {index} name")
    what = f"tensor {short(name)}"
    dims = check_list(obj["shape"], f"{what} shape", max_len=_MAX_NDIM)
    shape = tuple(check_int(d, f"{what} shape", hi=MAX_ELEMENTS) for d in dims)
    if math.prod(shape) > MAX_ELEMENTS:
        fail(f"{what} shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    dtype = check_str(obj["dtype"], f"{what} dtype")
    if dtype not in DTYPES:
        fail(f"{what} has unsupported dtype {short(dtype)}; supported: {', '.join(DTYPES)}")
    encoding = check_str(obj["encoding"], f"{what} encoding")
    if encoding not in ENCODINGS:
        fail(f"{what} uses unknown encoding {short(encoding)} (known: "
             f"{', '.join(ENCODINGS.names())}); the file may need a newer nncompress")
    codec = ENCODINGS.get(encoding)
    if dtype not in codec.dtypes:
        fail(f"{what}: encoding {encoding!r} cannot hold dtype {dtype}")
    params = check_dict(obj["params"], f"{what} params")
    offset = check_int(obj["offset"], f"{what} offset", hi=payload_len)
    length = check_int(obj["length"], f"{what} length", hi=payload_len - offset)
    return TensorEntry(name, shape, dtype, encoding, params, offset, length)
