"""The ``.nnc`` container: ``save`` / ``load`` / ``read_header`` / ``inspect``.

A ``.nnc`` file holds a header (architecture record, user metadata, one entry per tensor)
and the encoded tensors, framed by magic bytes, a format version and a SHA-256 checksum
(layout in :mod:`nncompress.formats.header` and ``docs/FORMAT.md``). It holds no pickle
and no code: loading a hostile file raises :class:`~nncompress.errors.FormatError`, and
bounds what it allocates (``max_bytes``, :mod:`nncompress.formats.limits`).

Dense tensors go to disk as views of the model's memory and come back as views of the
buffer the file is read into, so saving and loading a large dense model costs little
more than its SHA-256 and the disk.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nncompress import __version__
from nncompress.errors import FormatError
from nncompress.formats import arch
from nncompress.formats._checks import clip, fail, short
from nncompress.formats.assemble import build, recorded_modules
from nncompress.formats.choose import Choice, choose_encoding, encoded_sizes, smallest_encoding
from nncompress.formats.encodings import DTYPES, ENCODINGS, Buffer, Encoding, dtype_info
from nncompress.formats.header import (
    PREFIX_BYTES,
    Header,
    TensorEntry,
    header_length,
    pack_chunks,
    parse_header,
    unpack,
)
from nncompress.formats.limits import Budget
from nncompress.formats.table import write_header
from nncompress.registry import Registry

__all__ = ["ContainerInfo", "TensorInfo", "encoded_sizes", "inspect", "load", "read_header",
           "read_tensors", "save", "smallest_encoding", "stored_form"]

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


def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise FormatError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"meta is not JSON-serialisable: {exc}") from None


def _encode(name: str, tensor: torch.Tensor, forced: Encoding | None) -> Choice:
    """``tensor`` in the ``forced`` encoding, else in the smallest lossless one."""
    try:
        if forced is not None:
            return Choice(forced.name, *forced.encode(tensor))
        return choose_encoding(tensor)
    except FormatError as exc:
        raise FormatError(f"tensor {name!r}: {exc}") from None


def save(model: nn.Module, path: PathLike, *, meta: Mapping[str, Any] | None = None,
         encodings: Mapping[str, str] | None = None) -> int:
    """Write ``model`` to ``path`` as a ``.nnc`` file; return the bytes written.

    Each tensor is stored with ``encodings[name]`` when given (e.g. ``"fp16"``), else with
    the smallest lossless ``auto`` encoding (dense, sparse, codebook, relative-index, CSR,
    Huffman-coded; see docs/FORMAT.md), found from cheap statistics
    (:mod:`nncompress.formats.choose`). ``meta`` is any JSON-able dict.
    The write is atomic: on any error no partial file remains and an existing file at
    ``path`` is left as it was.
    """
    target = _path(path)
    model = stored_form(model)
    state = _state_tensors(model)
    choices = _check_choices(encodings, state)
    entries, blobs = [], []
    for name, tensor in state.items():
        choice = _encode(name, tensor, choices.get(name))
        entries.append({"name": name, "shape": list(tensor.shape),
                        "dtype": dtype_info(tensor.dtype).name, "encoding": choice.encoding,
                        "params": choice.params, "length": choice.size})
        blobs.append(choice.data)
    record = arch.describe(model)
    record["modules"] = recorded_modules(model, record)
    try:
        raw = write_header(f"nncompress {__version__}", record, _check_meta(meta), entries)
    except (TypeError, ValueError) as exc:  # e.g. params of a faulty encoding
        raise FormatError(f"header is not JSON-serialisable: {clip(str(exc), 160)}") from None
    return _write_atomic(target, pack_chunks(raw, blobs))


def stored_form(model: nn.Module) -> nn.Module:
    """``model`` as it is stored. The CSR layers of :func:`nncompress.kernels.sparsify` are a
    deploy-time engine choice, not a different model: they are saved as the dense layers
    they stand for (whose zeros then pick a sparse encoding), on a copy, so a sparsified
    model saves, measures and loads like the model before ``sparsify``."""
    from nncompress.kernels import SparseConv, SparseLinear

    if not isinstance(model, nn.Module):  # save's own checks name what it is
        return model
    dense = {id(m): m.to_dense() for m in model.modules()
             if isinstance(m, SparseLinear | SparseConv)}
    if not dense:
        return model
    if id(model) in dense:  # the model is one such layer
        return dense[id(model)]
    return copy.deepcopy(model, memo=dense)  # a CSR tensor cannot be deep-copied itself


def _write_atomic(target: Path, chunks: Iterable[Buffer]) -> int:
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


_READ_CHUNK = 1 << 23


def _read_file(target: Path) -> tuple[np.ndarray, bytes]:
    """The file's bytes, in a buffer placed so that its payload starts 64-byte aligned
    (dense tensors then decode as views of it), and the SHA-256 of all but its last 32
    bytes, computed in a second thread while the rest is read."""
    try:
        with open(target, "rb") as handle, ThreadPoolExecutor(1) as hasher:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(PREFIX_BYTES)
            start = PREFIX_BYTES + (header_length(prefix) or 0)
            room = np.empty(size + 64, dtype=np.uint8)
            shift = -(room.ctypes.data + start) % 64
            data = room[shift:shift + size]
            data[:len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
            digest, done = hashlib.sha256(), len(prefix)
            hashed = hasher.submit(digest.update, data[:min(done, size - 32)])
            while done < size:
                got = handle.readinto(memoryview(data[done:done + _READ_CHUNK]))
                if not got:
                    break
                hashed = hasher.submit(digest.update, data[done:min(done + got, size - 32)])
                done += got
            hashed.result()
            return data[:done], digest.digest() if done == size else b""
    except FileNotFoundError:
        raise FormatError(f"no such file: {target}") from None
    except IsADirectoryError:
        raise FormatError(f"{target} is a folder, not a .nnc file") from None
    except OSError as exc:
        raise FormatError(f"cannot read {target}: {exc.strerror or exc}") from None


def _read(target: Path) -> tuple[Header, np.ndarray, int, int]:
    """(header, payload, file bytes, header bytes) of a checked file whose every tensor
    declares no more elements than its data can describe."""
    data, digest = _read_file(target)
    version, raw, payload = unpack(data, str(target), digest or None)
    header = parse_header(raw, version, payload.size)
    for entry in header.tensors:
        codec = ENCODINGS.get(entry.encoding)
        itemsize = DTYPES[entry.dtype].itemsize
        try:
            most = codec.max_numel(entry.params, entry.length, entry.shape, itemsize, version)
        except FormatError as exc:
            raise FormatError(f"tensor {short(entry.name)}: {exc}") from None
        if entry.numel > most:
            fail(f"tensor {short(entry.name)} declares {entry.numel:,} elements but its "
                 f"{entry.length:,} bytes of {entry.encoding!r} data can describe at most "
                 f"{most:,}")
    return header, payload, data.size, len(raw)


def _budget(header: Header, total: int, max_bytes: int | None, source: str) -> Budget:
    """The load's budget, already charged with the decoded tensors."""
    budget = Budget(max_bytes, total, source)
    budget.spend(sum(e.nbytes for e in header.tensors), "decoded tensors")
    return budget


def _decode(entry: TensorEntry, payload: np.ndarray) -> torch.Tensor:
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
         builders: Mapping[str, Callable[..., nn.Module]] | Registry | None = None,
         max_bytes: int | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``, in eval mode, with the saved tensors.

    Reference models rebuild from the architecture registry; a user's ArchModule-like
    class needs ``builders={arch_name: cls}``; any other model needs ``skeleton=`` (a
    freshly constructed instance, modified in place and returned). ``builders`` may be a
    mapping or a :class:`~nncompress.registry.Registry`. Layers recorded with
    other constructor args than the skeleton's (structurally pruned ones) are rebuilt.

    ``max_bytes`` caps what loading may allocate (decoded tensors plus the modules it
    builds); by default ``max(64 MiB, 1024 x file size)``. A file that needs more raises
    FormatError before anything of that size is allocated.
    """
    if skeleton is not None and not isinstance(skeleton, nn.Module):
        raise FormatError(f"skeleton must be an nn.Module, got {type(skeleton).__name__}")
    if isinstance(builders, Registry):
        builders = {name: builders.get(name) for name in builders.names()}
    if builders is not None and not isinstance(builders, Mapping):
        raise FormatError(f"builders must be a mapping or Registry, got "
                          f"{type(builders).__name__}")
    target = _path(path)
    header, payload, total, _ = _read(target)
    budget = _budget(header, total, max_bytes, str(target))
    record = arch.parse_record(header.arch)
    shapes = {e.name: torch.empty(e.shape, dtype=DTYPES[e.dtype].torch, device="meta")
              for e in header.tensors}
    model = build(record, shapes, lambda: {e.name: _decode(e, payload) for e in header.tensors},
                  skeleton=skeleton, builders=builders, budget=budget, source=str(target))
    return model.eval()


def read_tensors(path: PathLike, *, max_bytes: int | None = None
                 ) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of the file, decoded, with the encoding it was stored in:
    ``{name: (encoding, tensor)}`` (no model is built; ``max_bytes`` as in :func:`load`)."""
    target = _path(path)
    header, payload, total, _ = _read(target)
    _budget(header, total, max_bytes, str(target))
    arch.parse_record(header.arch)
    return {e.name: (e.encoding, _decode(e, payload)) for e in header.tensors}


def read_header(path: PathLike) -> dict[str, Any]:
    """The validated header: format_version, writer, arch (``{"builder", "modules"}``),
    meta, tensors (with name, shape, dtype, encoding, params, offset, length each), in
    the same shape for every format version."""
    header, *_ = _read(_path(path))
    arch.parse_record(header.arch)
    return header.to_json()


def _zero_fraction(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / tensor.numel() if tensor.numel() else 0.0


def inspect(path: PathLike, *, max_bytes: int | None = None) -> ContainerInfo:
    """Per-tensor encodings, bytes and sparsity of a ``.nnc`` file (decodes every tensor;
    ``max_bytes`` as in :func:`load`)."""
    target = _path(path)
    header, payload, total, header_len = _read(target)
    _budget(header, total, max_bytes, str(target))
    record = arch.parse_record(header.arch)
    tensors = tuple(
        TensorInfo(e.name, e.shape, e.dtype, e.encoding, e.length, e.nbytes,
                   _zero_fraction(_decode(e, payload)))
        for e in header.tensors)
    summary = record.name if record.name is not None else f"user:{record.class_name}"
    return ContainerInfo(header.format_version, summary, record.config, header.meta, tensors,
                         total, header_len)
