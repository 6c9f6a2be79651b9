"""Bytes on disk: the packed .nnc artifact, and ``torch.save`` of the state dict (the peer
baseline every size ratio is quoted against)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["TensorBytes", "artifact_bytes", "torch_save_bytes", "weight_bytes"]


@dataclass(frozen=True)
class TensorBytes:
    """One weight tensor (a parameter with >= 2 dimensions) in the .nnc file's encodings.

    ``plain``: data bytes of its smallest lossless encoding *without* entropy coding
    (dense, sparse bitmap, relative-index sparse, CSR, codebook indices); ``coded``: the
    smallest with Huffman-coded encodings allowed too (what ``save`` picks; never more
    than ``plain``). Headers and code tables of the file are not included.
    """

    name: str
    numel: int
    nonzero: int
    plain: int
    plain_encoding: str
    coded: int
    coded_encoding: str


def artifact_bytes(model: nn.Module, *, encodings: Mapping[str, str] | None = None) -> int:
    """Size in bytes of the .nnc file ``nncompress.formats.save(model, path)`` writes.

    ``encodings`` is passed through (``{tensor_name: encoding_name}``); by default each
    tensor gets the smallest lossless encoding. The file goes to a temporary directory
    that is removed afterwards.
    """
    from nncompress import formats  # lazy: keeps measure importable without formats

    with tempfile.TemporaryDirectory(prefix="nncompress-") as tmp:
        path = Path(tmp) / "model.nnc"
        formats.save(model, path, encodings=encodings)
        return path.stat().st_size


def torch_save_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict(), path)`` (dense fp32 as stored)."""
    with tempfile.TemporaryDirectory(prefix="nncompress-") as tmp:
        path = Path(tmp) / "state_dict.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def weight_bytes(model: nn.Module) -> tuple[TensorBytes, ...]:
    """Per weight tensor: bytes under the best plain and the best entropy-coded lossless
    encoding -- the stages of Han et al.'s (2015) Deep Compression table.

    Found as ``save`` finds its choice (:func:`nncompress.formats.smallest_sizes`): from
    cheap statistics, encoding only what can win, so a large dense weight costs a count
    of its non-zeros and a look at a sample of it.
    """
    from nncompress.formats import smallest_sizes

    rows = []
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        plain, coded = smallest_sizes(p.detach())
        rows.append(TensorBytes(name, p.numel(), int(torch.count_nonzero(p.detach())),
                                plain.size, plain.encoding, coded.size, coded.encoding))
    return tuple(rows)
