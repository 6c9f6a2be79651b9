"""The example input an export traces and checks with, found for a saved model file.

In order: a shape the user gives (``--input-shape``), real test samples of the dataset
the file's metadata names (a bundled dataset), the ``input_shape`` the file's metadata
or its architecture record holds. A model whose file records none needs the shape.
Random examples are seeded (``seed``); token-id inputs are zeros (ids must be valid).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nncompress.errors import NNCError

__all__ = ["example_for_file", "input_dtypes", "shaped_example"]


def input_dtypes(model: nn.Module) -> list[str]:
    """The dtype of each input: an integer program's own (``float32`` / ``int64``), else
    ``["float32"]``."""
    from nncompress.export import program_of

    program = program_of(model)
    if program is None:
        return ["float32"]
    return [program.values[name].dtype for name in program.inputs]


def shaped_example(shape: Sequence[int], dtype: str, batch: int, seed: int) -> torch.Tensor:
    """``batch`` samples of ``shape``: seeded normal floats, or zero token ids."""
    if dtype == "int64":
        return torch.zeros((batch, *shape), dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=g)


def _recorded_shape(path: Path) -> list[int] | None:
    from nncompress import formats

    header = formats.read_header(path)
    for holder in (header.get("meta") or {},
                   ((header.get("arch") or {}).get("builder") or {}).get("config") or {}):
        shape = holder.get("input_shape") if isinstance(holder, dict) else None
        if isinstance(shape, list) and shape and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 2**20
                for d in shape):
            return shape
    return None


def _dataset_samples(path: Path, batch: int) -> tuple[Any, str] | None:
    from nncompress import formats
    from nncompress.data import dataset_names, example_input, load_dataset

    meta = formats.read_header(path).get("meta") or {}
    name = meta.get("dataset") if isinstance(meta, dict) else None
    if not isinstance(name, str) or name not in dataset_names():
        return None
    return example_input(load_dataset(name), batch), f"{batch} test samples of {name}"


def example_for_file(path: Path | None, model: nn.Module, *,
                     input_shape: Sequence[int] | None = None, batch: int = 8, seed: int = 0
                     ) -> tuple[Any, str]:
    """The example input for the model saved at ``path`` (None: a model built by code) and
    a few words on where it came from; NNCError when no input shape is known."""
    dtypes = input_dtypes(model)
    if input_shape is None and path is not None:
        found = _dataset_samples(path, batch)
        if found is not None:
            return found
        input_shape = _recorded_shape(path)
        how = "the input shape recorded in the file"
    else:
        how = "--input-shape"
    if input_shape is None:
        where = f"{path.name} records no input shape or dataset" if path is not None else \
            "a model built by code has no recorded input shape"
        raise NNCError(f"{where}; give --input-shape D,D,... (one sample's shape, without "
                       "the batch dimension)")
    if len(dtypes) != 1:
        raise NNCError(f"the model takes {len(dtypes)} inputs; an input shape describes "
                       "one (save the model with its dataset in the metadata)")
    example = shaped_example(input_shape, dtypes[0], batch, seed)
    kind = "zero token ids" if dtypes[0] == "int64" else "seeded random samples"
    return example, f"{batch} {kind} shaped {list(input_shape)} ({how})"
