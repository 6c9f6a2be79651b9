"""Bytes on disk: the packed .nnc artifact, and ``torch.save`` of the state dict (the peer
baseline every size ratio is quoted against)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["artifact_bytes", "torch_save_bytes"]


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
