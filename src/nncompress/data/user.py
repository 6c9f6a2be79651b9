"""User data references: ``"package.module:function"`` resolved and checked.

The function takes no arguments and returns one of:

- ``(x_train, y_train, x_test, y_test)`` arrays: labelled data (floating features become
  float32, integer ones -- token ids, category codes -- int64; labels integer classes);
- ``(train_loader, test_loader)`` DataLoaders whose batches are ``(x, y)`` pairs, ``x`` a
  tensor of any dtype or a tuple / dict of tensors (see :mod:`nncompress.inputs`), ``y``
  int64 class labels ``[B]``: labelled data;
- inputs only, for label-free compression (an unlabelled :class:`Dataset`,
  ``labelled=False``, whose batches are ``(x, None)``; stages that train distil from the
  uncompressed model): ``(x_train, x_test)`` arrays (not DataLoaders), or
  ``(train_loader, test_loader)`` whose batches are the inputs ``x`` alone -- a tensor, a
  dict of tensors, a one-element tuple (a ``TensorDataset(x)``), or ``(x, None)`` (the
  only way to give a tuple of several input tensors without labels: a two-element batch
  whose second element is a tensor is read as ``(x, y)``).

Anything unusable is a one-line :class:`~nncompress.errors.DataError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from nncompress import inputs
from nncompress.data.core import Dataset, _Arrays, unlabelled
from nncompress.errors import DataError

__all__ = ["load_user"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _resolve_reference(ref: str) -> Callable[[], Any]:
    """Import ``package.module:function`` (the function may be a dotted attribute path)."""
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise DataError(f"bad data reference {ref!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of user code is bad input
        raise DataError(f"cannot import module {module_name!r} of data reference {ref!r}: "
                        f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise DataError(f"data reference {ref!r}: {module_name!r} has no attribute "
                            f"{attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"data reference {ref!r} is not callable")
    return obj


def _as_tensor(value: Any, what: str, ref: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value)) if not torch.is_tensor(value) else value
    except Exception as exc:
        raise DataError(f"data reference {ref!r}: {what} is not an array "
                        f"({type(value).__name__})") from exc


def _check_labels(y: torch.Tensor, what: str, ref: str) -> torch.Tensor:
    """Return labels as int64 [N]; whole-number floats are accepted, anything else is not."""
    if y.dtype == torch.bool or y.is_complex() or y.ndim != 1:
        raise DataError(f"data reference {ref!r}: {what} must be a 1-D array of integer class "
                        f"labels, got dtype {y.dtype} shape {tuple(y.shape)}")
    if y.is_floating_point() and not bool((torch.isfinite(y) & (y == y.round())).all()):
        raise DataError(f"data reference {ref!r}: {what} holds non-integer labels")
    y = y.to(torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"data reference {ref!r}: {what} holds negative labels")
    return y


def _check_features(x: torch.Tensor, split: str, ref: str) -> None:
    if not (x.is_floating_point() or x.dtype in _INT_DTYPES) or x.ndim < 2 or len(x) == 0:
        raise DataError(f"data reference {ref!r}: x_{split} must be a numeric array shaped "
                        f"[N, ...] with N > 0, got dtype {x.dtype} shape {tuple(x.shape)}")


def _same_sample_shape(xt: torch.Tensor, xe: torch.Tensor, ref: str) -> None:
    if xt.shape[1:] != xe.shape[1:]:
        raise DataError(f"data reference {ref!r}: train samples are shaped "
                        f"{tuple(xt.shape[1:])} but test samples {tuple(xe.shape[1:])}")


def _arrays_from_user(parts: Sequence[Any], ref: str) -> _Arrays:
    names = ("x_train", "y_train", "x_test", "y_test")
    xt, yt, xe, ye = (_as_tensor(p, n, ref) for p, n in zip(parts, names, strict=True))
    yt, ye = _check_labels(yt, "y_train", ref), _check_labels(ye, "y_test", ref)
    for x, y, split in ((xt, yt, "train"), (xe, ye, "test")):
        _check_features(x, split, ref)
        if len(x) != len(y):
            raise DataError(f"data reference {ref!r}: x_{split} has {len(x)} samples but "
                            f"y_{split} has {len(y)} labels (need the same, non-zero)")
    _same_sample_shape(xt, xe, ref)
    return _Arrays(_feature_dtype(xt), yt, _feature_dtype(xe), ye)


def _inputs_from_user(parts: Sequence[Any], ref: str, batch_size: int, seed: int) -> Dataset:
    """``(x_train, x_test)`` arrays: an unlabelled Dataset."""
    if any(isinstance(p, DataLoader) for p in parts):
        raise DataError(f"data reference {ref!r} must return two DataLoaders, or two arrays "
                        "(x_train, x_test) of inputs only, not one of each")
    try:
        xt, xe = (_as_tensor(p, n, ref)
                  for p, n in zip(parts, ("x_train", "x_test"), strict=True))
        _check_features(xt, "train", ref)
        _check_features(xe, "test", ref)
    except DataError as exc:
        raise DataError(f"{exc} (two values are (train_loader, test_loader) DataLoaders or "
                        "(x_train, x_test) arrays of inputs only)") from None
    _same_sample_shape(xt, xe, ref)
    return unlabelled(_feature_dtype(xt), _feature_dtype(xe), name=ref, batch_size=batch_size,
                      seed=seed)


def _feature_dtype(x: torch.Tensor) -> torch.Tensor:
    """Floating features as float32; integer ones (token ids, category codes) as int64."""
    return x.to(torch.float32) if x.is_floating_point() else x.to(torch.int64)


def _check_x(x: Any, shape: tuple[int, ...] | None, split: str, ref: str) -> tuple[int, ...]:
    """Check one batch's inputs ``x``; return the per-sample shape of its first tensor,
    which must equal ``shape`` (the earlier batches') for a single-tensor input (a tuple /
    dict may vary its sequence lengths)."""
    try:
        inputs.check(x, f"the {split} loader's x")
    except DataError as exc:
        raise DataError(f"data reference {ref!r}: {exc}") from None
    first = inputs.leaves(x)[0]
    if first.is_complex() or first.dim() < 2:
        raise DataError(f"data reference {ref!r}: the {split} loader must yield x "
                        f"batches shaped [B, ...] of a real dtype, got {inputs.describe(x)}")
    if shape is not None and tuple(first.shape[1:]) != shape and isinstance(x, torch.Tensor):
        raise DataError(f"data reference {ref!r}: {split} samples change shape between "
                        f"batches")
    return shape or tuple(first.shape[1:])


def _scan_loader(loader: DataLoader, split: str, ref: str) -> tuple[tuple[int, ...], int]:
    """Check every batch of a user loader; return (sample shape of the first input tensor,
    max label). ``x`` may be one tensor of any dtype or a tuple/dict of tensors; only the
    first tensor's per-sample shape must stay fixed (sequence lengths may vary)."""
    shape: tuple[int, ...] | None = None
    top = -1
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"data reference {ref!r}: the {split} loader must yield (x, y) "
                            f"batches")
        x, y = batch
        shape = _check_x(x, shape, split, ref)
        if not (torch.is_tensor(y) and y.dtype == torch.int64
                and y.shape == (inputs.batch_size(x),)):
            raise DataError(f"data reference {ref!r}: the {split} loader must yield int64 "
                            f"labels shaped [B], one per sample")
        _check_labels(y, f"{split} y", ref)
        top = max(top, int(y.max()) if len(y) else -1)
    if shape is None:
        raise DataError(f"data reference {ref!r}: the {split} loader yields no batches")
    return shape, top


def _inputs_of(batch: Any) -> tuple[bool, Any]:
    """``(True, x)`` when a user batch holds inputs only (see the module docstring), else
    ``(False, batch)``."""
    if isinstance(batch, (torch.Tensor, Mapping)):
        return True, batch
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return True, batch[0]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and batch[1] is None:
        return True, batch[0]
    return False, batch


class _InputsOnly:
    """A user loader's ``collate_fn`` followed by turning each batch into ``(x, None)``."""

    def __init__(self, collate: Callable[[Any], Any], ref: str) -> None:
        self.collate = collate
        self.ref = ref

    def __call__(self, items: Any) -> tuple[Any, None]:
        found, x = _inputs_of(self.collate(items))
        if not found:
            raise DataError(f"data reference {self.ref!r}: an inputs-only loader yielded a "
                            "batch that is not inputs alone")
        return x, None


def _unlabelled_loader(loader: DataLoader, ref: str) -> DataLoader:
    """The same loader (dataset, order, batching, shuffle generator) yielding ``(x, None)``."""
    common: dict[str, Any] = {
        "num_workers": loader.num_workers, "collate_fn": _InputsOnly(loader.collate_fn, ref),
        "pin_memory": loader.pin_memory, "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn, "generator": loader.generator}
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size,
                          drop_last=loader.drop_last, **common)
    if loader.batch_size is None and loader.batch_sampler is not None:   # a custom one
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      drop_last=loader.drop_last, **common)


def _scan_inputs(loader: DataLoader, split: str, ref: str) -> tuple[int, ...]:
    """Check every batch of an inputs-only loader; return the per-sample shape of the first
    input tensor (fixed across batches for a single-tensor input)."""
    shape: tuple[int, ...] | None = None
    for x, _ in loader:
        shape = _check_x(x, shape, split, ref)
    if shape is None:
        raise DataError(f"data reference {ref!r}: the {split} loader yields no batches")
    return shape


def _first_batch(loader: DataLoader, split: str, ref: str) -> Any:
    for batch in loader:
        return batch
    raise DataError(f"data reference {ref!r}: the {split} loader yields no batches")


def _loaders_from_user(parts: Sequence[Any], ref: str) -> Dataset:
    train, test = parts
    if not (isinstance(train, DataLoader) and isinstance(test, DataLoader)):
        raise DataError(f"data reference {ref!r} must return two DataLoaders, two arrays "
                        "(x_train, x_test) or four arrays")
    kinds = [_inputs_of(_first_batch(loader, split, ref))[0]
             for loader, split in ((train, "train"), (test, "test"))]
    if kinds[0] != kinds[1]:
        which = "train" if kinds[0] else "test"
        raise DataError(f"data reference {ref!r}: the {which} loader yields inputs only but "
                        "the other (x, y) pairs; give labels in both or in neither")
    if kinds[0]:
        train, test = _unlabelled_loader(train, ref), _unlabelled_loader(test, ref)
        shape_tr, shape_te = _scan_inputs(train, "train", ref), _scan_inputs(test, "test", ref)
        labels = 0
    else:
        (shape_tr, top_tr), (shape_te, top_te) = (_scan_loader(train, "train", ref),
                                                  _scan_loader(test, "test", ref))
        labels = max(top_tr, top_te) + 1
    if shape_tr != shape_te:
        raise DataError(f"data reference {ref!r}: train samples are shaped {shape_tr} but test "
                        f"samples {shape_te}")
    return Dataset(ref, train, test, shape_tr, labels, labelled=not kinds[0])


def load_user(ref: str, *, batch_size: int = 128, seed: int = 0) -> Dataset | _Arrays:
    """The data behind ``"package.module:function"``: a Dataset of the user's loaders or
    of inputs-only arrays (``batch_size`` / ``seed``: its loaders'), or the labelled
    arrays it returned (which ``load_dataset`` wraps in loaders)."""
    func = _resolve_reference(ref)
    try:
        result = func()
    except Exception as exc:  # user code failing is bad input, reported in one line
        raise DataError(f"data reference {ref!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 4):
        raise DataError(f"data reference {ref!r} must return (train_loader, test_loader), "
                        f"(x_train, x_test) or (x_train, y_train, x_test, y_test), got "
                        f"{type(result).__name__}")
    if len(result) == 4:
        return _arrays_from_user(result, ref)
    if all(isinstance(p, DataLoader) for p in result):
        return _loaders_from_user(result, ref)
    return _inputs_from_user(result, ref, batch_size, seed)
