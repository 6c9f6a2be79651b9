"""Datasets: MNIST-1D (generated offline), sklearn digits, and user data references.

MNIST-1D: Greydanus, "Scaling down deep learning" (2020) — 10 classes of 1-D signals,
each sample shaped ``(1, 40)``; generated here with the ``mnist1d`` package's own
generator (never downloaded) and cached as ``.npz`` under ``cache_dir()/data``.

Digits: the UCI 8x8 handwritten digits bundled with scikit-learn (1797 samples), pixel
values scaled to ``[0, 1]``, each sample shaped ``(1, 8, 8)``.

MNIST-1D tokens (``mnist1d-tokens``): the same signals as token ids of varying length with
a padding mask, ``{"ids": int64 [40], "mask": bool [40]}`` per sample -- a text-like task
for models with an Embedding and several inputs.

User data (:mod:`nncompress.data.user`): ``"package.module:function"`` names a function
taking no arguments that returns
``(train_loader, test_loader)`` or ``(x_train, y_train, x_test, y_test)``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from nncompress import inputs
from nncompress.errors import DataError
from nncompress.inputs import Inputs
from nncompress.paths import cache_dir
from nncompress.registry import Registry

__all__ = ["Dataset", "dataset_names", "example_input", "first_samples", "load_dataset",
           "require_labels", "unlabelled", "without_labels"]

#: Bumped whenever the arrays written to the MNIST-1D cache would change.
_MNIST1D_CACHE_VERSION = 1


@dataclass(frozen=True)
class Dataset:
    """Train/test loaders plus what a model needs to know about the samples.

    ``train`` yields ``(x, y: int64 [B])`` in shuffled order; ``test`` yields the same,
    never shuffled. ``x`` is one tensor of any dtype shaped ``[B, *input_shape]`` (float32
    features, int64 token ids, ...) or a tuple / dict of such tensors (see
    :mod:`nncompress.inputs`), then ``input_shape`` is the per-sample shape of the first.
    ``input_shape`` is per sample, channels first.

    Unlabelled data (inputs only, ``labelled=False``): both loaders yield ``(x, None)``, so
    ``for x, _ in loader`` works everywhere; ``num_classes`` is 0. A stage that needs labels
    checks :func:`require_labels` first and says so in one line. Build one with
    :func:`unlabelled` (from input tensors) or :func:`without_labels` (from a Dataset).
    """

    name: str
    train: DataLoader
    test: DataLoader
    input_shape: tuple[int, ...]
    num_classes: int
    labelled: bool = True


@dataclass(frozen=True)
class _Arrays:
    """A train/test split as tensors: x ``[N, *shape]`` (or a dict / tuple of such),
    y int64 ``[N]``."""

    x_train: Inputs
    y_train: torch.Tensor
    x_test: Inputs
    y_test: torch.Tensor


# --------------------------------------------------------------------------- bundled data


def _mnist1d_cache_path() -> Path:
    """Cache file keyed by the generator's version (its default arguments live there).

    Keying on the installed version keeps a cache hit from importing ``mnist1d`` (which
    pulls in matplotlib and scipy, about a second).
    """
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = f"mnist1d={version};cache={_MNIST1D_CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "data" / f"mnist1d-{digest}.npz"


def _generate_mnist1d(args: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Run the MNIST-1D generator on ``args`` (default: its own default arguments, 4000
    train / 1000 test, seed 42).

    ``make_dataset`` reseeds numpy's and Python's global RNGs; both are restored. The
    arguments' ``url`` field is never used (nothing is downloaded).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as exc:
        raise DataError(f"dataset 'mnist1d' needs the mnist1d package: {exc}") from exc

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args() if args is None else ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x_train": np.asarray(raw["x"], dtype=np.float32),
        "y_train": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError, EOFError):
        return None


def _mnist1d() -> _Arrays:
    """MNIST-1D, samples shaped (1, 40); generated once, then read from the cache."""
    path = _mnist1d_cache_path()
    arrays = _read_npz(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        _write_npz_atomic(path, arrays)
    return _Arrays(
        x_train=torch.from_numpy(arrays["x_train"]).unsqueeze(1),
        y_train=torch.from_numpy(arrays["y_train"]),
        x_test=torch.from_numpy(arrays["x_test"]).unsqueeze(1),
        y_test=torch.from_numpy(arrays["y_test"]),
    )


def _digits() -> _Arrays:
    """sklearn digits, pixels / 16, samples shaped (1, 8, 8); stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return _Arrays(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x_tr, y_tr, x_te, y_te)))


#: tokens of ``mnist1d-tokens``: 0 is padding, 1..TOKEN_BINS the quantised signal
TOKEN_BINS = 32


def _tokens(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """MNIST-1D signals ``[N, 1, 40]`` as token ids: each value quantised into one of
    :data:`TOKEN_BINS` equal-width bins over [-3, 3] (ids 1..32), every sequence cut to a
    seeded random length of 24..40 and padded with id 0; ``mask`` marks real tokens."""
    values = x[:, 0]
    ids = 1 + ((values.clamp(-3, 3) + 3) / 6 * TOKEN_BINS).long().clamp(max=TOKEN_BINS - 1)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(24, values.shape[1] + 1, (len(values),), generator=g)
    mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]
    return {"ids": torch.where(mask, ids, 0), "mask": mask}


def _mnist1d_tokens() -> _Arrays:
    """MNIST-1D as a text-like task: ``{"ids": int64 [40], "mask": bool [40]}`` per sample
    (see :func:`_tokens`), for models with an Embedding and several inputs."""
    base = _mnist1d()
    return _Arrays(_tokens(base.x_train, 1), base.y_train, _tokens(base.x_test, 2),
                   base.y_test)


_BUNDLED: Registry[Callable[[], _Arrays]] = Registry("dataset", error=DataError)
_BUNDLED.register("mnist1d", _mnist1d)
_BUNDLED.register("mnist1d-tokens", _mnist1d_tokens)
_BUNDLED.register("digits", _digits)
_BUNDLED.register("mnist1d-shifted",  # data.domains.SHIFT; imported on first load
                  lambda: importlib.import_module("nncompress.data.domains").shifted_arrays())


# --------------------------------------------------------------------------- public API


class InputsDataset(torch.utils.data.Dataset):
    """In-memory samples whose inputs are a tuple or dict of tensors (see
    :mod:`nncompress.inputs`); item ``i`` is ``(inputs of sample i, y[i])``."""

    def __init__(self, x: Inputs, y: torch.Tensor) -> None:
        self.x = inputs.check(x)
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        return inputs.select(self.x, index), self.y[index]


class _InputsOnly(torch.utils.data.Dataset):
    """In-memory inputs without labels; item ``i`` is the inputs of sample ``i``."""

    def __init__(self, x: Inputs) -> None:
        self.x = inputs.check(x)
        self.n = inputs.batch_size(self.x)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return inputs.select(self.x, index)


def _collate_unlabelled(items: list[Any]) -> tuple[Any, None]:
    """Batches of an unlabelled loader: ``(x, None)``."""
    return torch.utils.data.default_collate(items), None


def tensor_loader(x: Inputs, y: torch.Tensor | None, *, batch_size: int, shuffle: bool,
                  seed: int) -> DataLoader:
    """The loader every dataset here uses: in-memory tensors (``x`` one tensor or a tuple /
    dict of them); a shuffled one draws its order from its own generator seeded with
    ``seed``. ``y=None``: an unlabelled loader, yielding ``(x, None)``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if y is None:
        return DataLoader(_InputsOnly(x), batch_size=batch_size, shuffle=shuffle,
                          generator=generator, num_workers=0, collate_fn=_collate_unlabelled)
    dataset = TensorDataset(x, y) if isinstance(x, torch.Tensor) else InputsDataset(x, y)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=generator, num_workers=0)


def _from_arrays(name: str, arrays: _Arrays, batch_size: int, seed: int) -> Dataset:
    train = tensor_loader(arrays.x_train, arrays.y_train, batch_size=batch_size,
                          shuffle=True, seed=seed)
    test = tensor_loader(arrays.x_test, arrays.y_test, batch_size=batch_size,
                         shuffle=False, seed=seed)
    top = max(int(arrays.y_train.max()), int(arrays.y_test.max()))
    shape = tuple(inputs.leaves(arrays.x_train)[0].shape[1:])
    return Dataset(name, train, test, shape, top + 1)


def load_dataset(name: str, *, batch_size: int = 128, seed: int = 0) -> Dataset:
    """Load a bundled dataset (``"mnist1d"``, ``"digits"``) or a ``"module:function"`` ref.

    The train loader is shuffled by a ``torch.Generator`` seeded with ``seed``; the test
    loader keeps its order. Raises :class:`DataError` for anything that cannot be used.
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"dataset must be a non-empty name, got {name!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if ":" in name:
        from nncompress.data.user import load_user

        found = load_user(name)
        return found if isinstance(found, Dataset) else _from_arrays(name, found, batch_size,
                                                                     seed)
    return _from_arrays(name, _BUNDLED.get(name)(), batch_size, seed)


def dataset_names() -> tuple[str, ...]:
    """Names of the bundled datasets: ``("digits", "mnist1d", "mnist1d-shifted",
    "mnist1d-tokens")``; ``mnist1d-shifted`` is the target domain of
    :mod:`nncompress.data.domains`."""
    return _BUNDLED.names()


def unlabelled(x_train: Inputs, x_test: Inputs | None = None, *, name: str = "unlabelled",
               batch_size: int = 128, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """A :class:`Dataset` of inputs only (``labelled=False``; batches ``(x, None)``).

    ``x_train`` / ``x_test``: a tensor ``[N, ...]`` or a tuple / dict of them. Without
    ``x_test``, the last ``test_fraction`` of ``x_train`` (in the given order) is the test
    split, on which the quality metric compares a model with its teacher.
    """
    x_train = inputs.check(x_train, "x_train")
    if x_test is None:
        n = inputs.batch_size(x_train)
        cut = n - max(1, round(n * test_fraction))
        if not 0 < cut < n:
            raise DataError(f"unlabelled data of {n} samples cannot be split into train and "
                            f"test (test_fraction {test_fraction!r})")
        x_train, x_test = (inputs.select(x_train, torch.arange(cut)),
                           inputs.select(x_train, torch.arange(cut, n)))
    x_test = inputs.check(x_test, "x_test")
    for split, x in (("train", x_train), ("test", x_test)):
        if inputs.batch_size(x) == 0:
            raise DataError(f"unlabelled data {name!r}: the {split} split has no samples")
    shape = tuple(inputs.leaves(x_train)[0].shape[1:])
    return Dataset(name, tensor_loader(x_train, None, batch_size=batch_size, shuffle=True,
                                       seed=seed),
                   tensor_loader(x_test, None, batch_size=batch_size, shuffle=False, seed=seed),
                   shape, 0, labelled=False)


def without_labels(data: Dataset, *, seed: int = 0) -> Dataset:
    """``data`` with its labels dropped: the same inputs in both splits, ``labelled=False``
    (for label-free compression, or to check that a stage never reads labels)."""
    if not data.labelled:
        return data
    from nncompress.data.split import tensors

    (xt, _), (xe, _) = tensors(data.train), tensors(data.test)
    return Dataset(f"{data.name}[inputs only]",
                   tensor_loader(xt, None, batch_size=data.train.batch_size or 128,
                                 shuffle=True, seed=seed),
                   tensor_loader(xe, None, batch_size=data.test.batch_size or 128,
                                 shuffle=False, seed=seed),
                   data.input_shape, 0, labelled=False)


def require_labels(data: Dataset, what: str) -> None:
    """DataError (one line) when ``data`` has no labels and ``what`` needs them."""
    if not data.labelled:
        raise DataError(f"{what} needs labelled data, but {data.name!r} has inputs only; "
                        "use a teacher (distillation) or a label-free stage")


def first_samples(batches: Iterable[Any], count: int) -> list[Inputs]:
    """The inputs of the first ``count`` samples of ``batches`` (``(x, y)`` pairs), as the
    list of their batches (the last one cut; fewer samples if the batches run out)."""
    taken: list[Inputs] = []
    have = 0
    for x, _ in batches:
        taken.append(inputs.take(x, count - have))
        have += inputs.batch_size(taken[-1])
        if have >= count:
            break
    return taken


def example_input(data: Dataset, batch: int = 1) -> Inputs:
    """The first ``batch`` test samples, ``[batch, *input_shape]`` (repeated if too few);
    of the dataset's input form (a tensor, or a tuple / dict of tensors)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    taken = [t for t in first_samples(data.test, batch) if inputs.batch_size(t)]
    if not taken:
        raise DataError(f"dataset {data.name!r} has no test samples")
    try:
        x = inputs.concat(taken)
    except RuntimeError:  # test batches of different sequence lengths: use the first
        x = taken[0]
    return inputs.repeat_to(x, batch)
