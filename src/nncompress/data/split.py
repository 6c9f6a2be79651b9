"""Derived datasets: a class subset (one task of a multi-task pair) and a held-out split.

Both materialise the loaders' samples as tensors (the bundled datasets are a few thousand
samples) and rebuild loaders with the same batch size; the new train loader is shuffled by
its own seeded generator, so results stay a function of ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from nncompress import inputs
from nncompress.data.core import Dataset, require_labels, tensor_loader
from nncompress.errors import DataError
from nncompress.inputs import Inputs

__all__ = ["class_subset", "holdout", "tensors"]


def tensors(loader: DataLoader) -> tuple[Inputs, torch.Tensor | None]:
    """All samples in dataset order (a shuffled loader's order would depend on how often
    it was iterated before); the labels are None for an unlabelled loader."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        loader = DataLoader(dataset, batch_size=loader.batch_size or 128, shuffle=False,
                            collate_fn=loader.collate_fn, num_workers=0)
    xs, ys = zip(*loader, strict=True) if len(loader) else ((), ())
    if not xs:
        raise DataError("the loader yields no samples")
    try:
        return inputs.concat(xs), (None if ys[0] is None else torch.cat(ys))
    except RuntimeError:
        raise DataError("the loader's batches have inputs of different shapes (e.g. "
                        "sequence lengths); pad them to one length to split this dataset"
                        ) from None


def _loader(x: Inputs, y: torch.Tensor | None, like: DataLoader, *, shuffle: bool,
            seed: int) -> DataLoader:
    return tensor_loader(x, y, batch_size=like.batch_size or 128, shuffle=shuffle, seed=seed)


def class_subset(data: Dataset, classes: Sequence[int], *, name: str | None = None,
                 seed: int = 0) -> Dataset:
    """Only the samples whose label is in ``classes``, relabelled ``0 .. len(classes)-1``
    in the order given (e.g. digits 5-9 as a 5-class task)."""
    require_labels(data, "class_subset")
    wanted = [int(c) for c in classes]
    if len(wanted) < 2 or len(set(wanted)) != len(wanted):
        raise DataError(f"class_subset needs at least two distinct classes, got {list(classes)}")
    bad = [c for c in wanted if not 0 <= c < data.num_classes]
    if bad:
        raise DataError(f"class_subset: classes {bad} are not in dataset {data.name!r} "
                        f"(0..{data.num_classes - 1})")
    lookup = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(wanted)] = torch.arange(len(wanted))
    parts = []
    for split in (data.train, data.test):
        x, y = tensors(split)
        keep = lookup[y] >= 0
        parts.append((inputs.select(x, keep), lookup[y[keep]]))
    (xt, yt), (xe, ye) = parts
    label = name or f"{data.name}[{','.join(map(str, wanted))}]"
    return Dataset(label, _loader(xt, yt, data.train, shuffle=True, seed=seed),
                   _loader(xe, ye, data.test, shuffle=False, seed=seed), data.input_shape,
                   len(wanted))


def holdout(data: Dataset, fraction: float, *, seed: int = 0) -> tuple[Dataset, DataLoader]:
    """Split ``fraction`` of the training samples off (a seeded random choice) as a held-out
    loader -- for calibrating thresholds or training a router on inputs the models did not
    see. Returns ``(data with the rest as its train split, held-out loader)``."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    x, y = tensors(data.train)
    n = inputs.batch_size(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = round(n * fraction)
    if cut == 0 or cut == n:
        raise DataError(f"holdout fraction {fraction} of {n} training samples leaves "
                        f"an empty split")
    held, kept = order[:cut].sort().values, order[cut:].sort().values
    name = f"{data.name}[without holdout {fraction:g} seed {seed}]"  # never the cached name
    rest = Dataset(name, _loader(inputs.select(x, kept), None if y is None else y[kept],
                                 data.train, shuffle=True, seed=seed),
                   data.test, data.input_shape, data.num_classes, labelled=data.labelled)
    return rest, _loader(inputs.select(x, held), None if y is None else y[held], data.train,
                         shuffle=False, seed=seed)
