"""The ``.nnc`` container: ``save`` / ``load`` / ``read_header`` / ``inspect``.

A ``.nnc`` file holds a JSON header (architecture record, user metadata, one entry per
tensor) and the encoded tensors, framed by magic bytes, a format version and a SHA-256
checksum (layout in :mod:`nncompress.formats.header` and ``docs/FORMAT.md``). It holds no
pickle and no code: loading a hostile file raises :class:`~nncompress.errors.FormatError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nncompress import __version__
from nncompress.errors import FormatError
from nncompress.formats import arch
from nncompress.formats._checks import clip, fail, short
from nncompress.formats.encodings import DTYPES, ENCODINGS, Encoding, dtype_info
from nncompress.formats.header import (
    FORMAT_VERSION,
    Header,
    TensorEntry,
    header_bytes,
    pack_chunks,
    parse_header,
    unpack,
)
from nncompress.registry import Registry

__all__ = ["ContainerInfo", "TensorInfo", "encoded_sizes", "inspect", "load", "read_header",
           "read_tensors", "save", "smallest_encoding"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: bytes on disk (``stored_bytes``) vs. dense bytes (``raw_bytes``).

    ``sparsity`` is the fraction of elements equal to zero (0.0 for an empty tensor).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    stored_bytes: int
    raw_bytes: int
    sparsity: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element (0.0 for an empty tensor)."""
        return 8 * self.stored_bytes / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class ContainerInfo:
    """What a ``.nnc`` file holds. ``arch`` is the builder name, or ``"user:<class>"``."""

    format_version: int
    arch: str
    arch_config: dict[str, Any] | None
    meta: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    total_bytes: int
    header_bytes: int

    @property
    def stored_bytes(self) -> int:
        """Payload bytes of all tensors."""
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def raw_bytes(self) -> int:
        """Bytes all tensors would take stored dense in their own dtypes."""
        return sum(t.raw_bytes for t in self.tensors)

    @property
    def num_elements(self) -> int:
        return sum(t.numel for t in self.tensors)


def _path(path: PathLike) -> Path:
    try:
        return Path(os.fspath(path))
    except TypeError:
        raise FormatError(f"a .nnc path must be a str or path, got {short(path)}") from None


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise FormatError(f"save needs an nn.Module, got {type(model).__name__}")
    state = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"state entry {name!r} is a {type(value).__name__}, not a tensor; "
                              ".nnc stores tensors only")
        if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
            raise FormatError(f"tensor {name!r} ({value.layout}, {value.device.type}) is not a "
                              "plain dense tensor; .nnc cannot store it")
        if value.dtype not in {d.torch for d in DTYPES.values()}:
            raise FormatError(f"tensor {name!r} has dtype {value.dtype}, which .nnc cannot "
                              f"store; supported: {', '.join(DTYPES)}")
        state[name] = value.detach().cpu()
    return state


def _check_choices(encodings: Mapping[str, str] | None,
                   state: Mapping[str, torch.Tensor]) -> dict[str, Encoding]:
    if encodings is not None and not isinstance(encodings, Mapping):
        raise FormatError("encodings must map tensor names to encoding names, got "
                          f"{short(encodings)}")
    choices = {}
    for name, encoding in (encodings or {}).items():
        if name not in state:
            known = ", ".join(list(state)[:8]) + (", ..." if len(state) > 8 else "")
            raise FormatError(f"encodings names tensor {name!r}, which the model does not "
                              f"have; tensors: {known}")
        codec = ENCODINGS.get(encoding)
        if not codec.supports(state[name].dtype):
            raise FormatError(f"encoding {encoding!r} cannot store tensor {name!r} of dtype "
                              f"{dtype_info(state[name].dtype).name}; it stores "
                              f"{', '.join(sorted(codec.dtypes))}")
        choices[name] = codec
    return choices


def _candidates(tensor: torch.Tensor) -> Iterator[tuple[str, bytes, dict]]:
    """``(name, data, params)`` under every lossless encoding the automatic choice uses."""
    for name in ENCODINGS.names():
        codec = ENCODINGS.get(name)
        if codec.lossless and codec.auto and codec.supports(tensor.dtype):
            yield (name, *codec.encode(tensor))


def encoded_sizes(tensor: torch.Tensor) -> dict[str, int]:
    """Data bytes of ``tensor`` under every lossless encoding ``save`` may pick."""
    return {name: len(data) for name, data, _ in _candidates(tensor)}


def smallest_encoding(sizes: Mapping[str, int]) -> str:
    """The encoding ``save`` picks from ``{name: bytes}``: the fewest bytes, dense on
    ties, then by name."""
    return min(sizes, key=lambda name: (sizes[name], name != "dense", name))


def _encode(tensor: torch.Tensor, forced: Encoding | None) -> tuple[str, bytes, dict]:
    """Encode with ``forced``, else with the smallest lossless auto encoding."""
    if forced is not None:
        return (forced.name, *forced.encode(tensor))
    encoded = {name: (data, params) for name, data, params in _candidates(tensor)}
    best = smallest_encoding({name: len(data) for name, (data, _) in encoded.items()})
    return (best, *encoded[best])


def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise FormatError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"meta is not JSON-serialisable: {exc}") from None


def save(model: nn.Module, path: PathLike, *, meta: Mapping[str, Any] | None = None,
         encodings: Mapping[str, str] | None = None) -> int:
    """Write ``model`` to ``path`` as a ``.nnc`` file; return the bytes written.

    Each tensor is stored with ``encodings[name]`` when given (e.g. ``"fp16"``), else with
    the smallest lossless ``auto`` encoding (dense, sparse, codebook, relative-index, CSR,
    Huffman-coded; see docs/FORMAT.md). ``meta`` is any JSON-able dict.
    The write is atomic: on any error no partial file remains and an existing file at
    ``path`` is left as it was.
    """
    target = _path(path)
    state = _state_tensors(model)
    choices = _check_choices(encodings, state)
    entries, blobs, offset = [], [], 0
    for name, tensor in state.items():
        try:
            encoding, data, params = _encode(tensor, choices.get(name))
        except FormatError as exc:
            raise FormatError(f"tensor {name!r}: {exc}") from None
        entries.append(TensorEntry(name, tuple(tensor.shape), dtype_info(tensor.dtype).name,
                                   encoding, params, offset, len(data)).to_json())
        blobs.append(data)
        offset += len(data)
    header = {"format_version": FORMAT_VERSION, "writer": f"nncompress {__version__}",
              "arch": arch.describe(model), "meta": _check_meta(meta), "tensors": entries}
    try:
        raw = header_bytes(header)
    except (TypeError, ValueError) as exc:  # e.g. params of a faulty encoding
        raise FormatError(f"header is not JSON-serialisable: {exc}") from None
    return _write_atomic(target, pack_chunks(raw, blobs))


def _write_atomic(target: Path, chunks: Iterable[bytes]) -> int:
    """Write to a temp file beside ``target``, fsync, then ``os.replace`` it into place."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    written = 0
    try:
        with open(tmp, "xb") as handle:
            for chunk in chunks:
                written += handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise FormatError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return written


def _read(target: Path) -> tuple[Header, memoryview, int, int]:
    """(header, payload, file bytes, header bytes) of a checked file."""
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"no such file: {target}") from None
    except IsADirectoryError:
        raise FormatError(f"{target} is a folder, not a .nnc file") from None
    except OSError as exc:
        raise FormatError(f"cannot read {target}: {exc.strerror or exc}") from None
    version, raw, payload = unpack(data, str(target))
    return parse_header(raw, version, len(payload)), payload, len(data), len(raw)


def _decode(entry: TensorEntry, payload: memoryview) -> torch.Tensor:
    codec = ENCODINGS.get(entry.encoding)
    dtype = DTYPES[entry.dtype].torch
    data = payload[entry.offset:entry.offset + entry.length]
    try:
        tensor = codec.decode(data, entry.params, entry.shape, dtype)
    except FormatError as exc:
        raise FormatError(f"tensor {short(entry.name)}: {exc}") from None
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError, MemoryError) as exc:
        raise FormatError(f"tensor {short(entry.name)} cannot be decoded as "
                          f"{entry.encoding!r}: {clip(str(exc), 120)}") from None
    if tuple(tensor.shape) != entry.shape or tensor.dtype != dtype:
        fail(f"encoding {entry.encoding!r} decoded tensor {short(entry.name)} as "
             f"{tensor.dtype}{list(tensor.shape)}, expected {dtype}{list(entry.shape)}")
    return tensor


def load(path: PathLike, *, skeleton: nn.Module | None = None,
         builders: Mapping[str, Callable[..., nn.Module]] | Registry | None = None
         ) -> nn.Module:
    """Rebuild the model saved at ``path``, in eval mode, with the saved tensors.

    Reference models rebuild from the architecture registry; a user's ArchModule-like
    class needs ``builders={arch_name: cls}``; any other model needs ``skeleton=`` (a
    freshly constructed instance, modified in place and returned). ``builders`` may be a
    mapping or a :class:`~nncompress.registry.Registry`. Layers recorded with
    other constructor args than the skeleton's (structurally pruned ones) are rebuilt.
    """
    if skeleton is not None and not isinstance(skeleton, nn.Module):
        raise FormatError(f"skeleton must be an nn.Module, got {type(skeleton).__name__}")
    if isinstance(builders, Registry):
        builders = {name: builders.get(name) for name in builders.names()}
    if builders is not None and not isinstance(builders, Mapping):
        raise FormatError(f"builders must be a mapping or Registry, got "
                          f"{type(builders).__name__}")
    target = _path(path)
    header, payload, _, _ = _read(target)
    record = arch.parse_record(header.arch)
    tensors = {e.name: _decode(e, payload) for e in header.tensors}
    model = arch.assemble(record, tensors, skeleton=skeleton, builders=builders,
                          source=str(target))
    return model.eval()


def read_tensors(path: PathLike) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of the file, decoded, with the encoding it was stored in:
    ``{name: (encoding, tensor)}`` (no model is built)."""
    header, payload, _, _ = _read(_path(path))
    arch.parse_record(header.arch)
    return {e.name: (e.encoding, _decode(e, payload)) for e in header.tensors}


def read_header(path: PathLike) -> dict[str, Any]:
    """The validated JSON header: format_version, writer, arch, meta, tensors (with
    name, shape, dtype, encoding, params, offset, length each)."""
    header, *_ = _read(_path(path))
    arch.parse_record(header.arch)
    return header.to_json()


def _zero_fraction(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / tensor.numel() if tensor.numel() else 0.0


def inspect(path: PathLike) -> ContainerInfo:
    """Per-tensor encodings, bytes and sparsity of a ``.nnc`` file (decodes every tensor)."""
    header, payload, total, header_len = _read(_path(path))
    record = arch.parse_record(header.arch)
    tensors = tuple(
        TensorInfo(e.name, e.shape, e.dtype, e.encoding, e.length,
                   math.prod(e.shape) * DTYPES[e.dtype].itemsize,
                   _zero_fraction(_decode(e, payload)))
        for e in header.tensors)
    summary = record.name if record.name is not None else f"user:{record.class_name}"
    return ContainerInfo(header.format_version, summary, record.config, header.meta, tensors,
                         total, header_len)
