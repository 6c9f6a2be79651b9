"""Datasets: bundled shapes and splits, determinism, user data references, example inputs."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import torch

from nncompress.data import Dataset, dataset_names, example_input, load_dataset
from nncompress.errors import DataError

USER_MODULE = "nnc_test_userdata"
USER_CODE = textwrap.dedent('''
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def arrays():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(30, 3, 5))
        y = np.arange(30) % 4
        return x[:20], y[:20], x[20:], y[20:]

    def float_labels():
        x = np.zeros((6, 2), dtype=np.float32)
        return x, np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]), x, np.array([2.0, 1.0] * 3)

    def loaders():
        x = torch.randn(12, 1, 6)
        y = torch.tensor([0, 1, 2] * 4)
        ds = TensorDataset(x, y)
        return DataLoader(ds, batch_size=5, shuffle=False), DataLoader(ds, batch_size=5)

    def float_label_loaders():
        ds = TensorDataset(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0]))
        return DataLoader(ds, batch_size=2), DataLoader(ds, batch_size=2)

    def three_things():
        return 1, 2, 3

    def not_a_tuple():
        return "data"

    def mismatched():
        return np.zeros((5, 2)), np.zeros(4, dtype=int), np.zeros((2, 2)), np.zeros(2, dtype=int)

    def fractional_labels():
        return np.zeros((2, 2)), np.array([0.5, 1.0]), np.zeros((2, 2)), np.array([0, 1])

    def shapes_differ():
        return np.zeros((2, 3)), np.array([0, 1]), np.zeros((2, 4)), np.array([0, 1])

    def explodes():
        raise RuntimeError("disk on fire")

    def bad_loaders():
        return [1, 2], [3, 4]

    not_callable = 42
''')


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private cache dir for the whole module (so MNIST-1D is generated only once)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNCOMPRESS_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def mnist1d_first_load(cache: Path) -> tuple[Dataset, float, float]:
    """Generate MNIST-1D once; return it and a global-RNG draw before/after generating."""
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data = load_dataset("mnist1d")
    return data, expected, float(np.random.rand())


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("userdata")
    (root / f"{USER_MODULE}.py").write_text(USER_CODE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield USER_MODULE


def _all(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_dataset_names() -> None:
    assert dataset_names() == ("digits", "mnist1d", "mnist1d-shifted", "mnist1d-tokens")


def test_mnist1d_shapes_and_split(mnist1d_first_load: tuple[Dataset, float, float]) -> None:
    data = mnist1d_first_load[0]
    assert data.name == "mnist1d"
    assert data.input_shape == (1, 40)
    assert data.num_classes == 10
    x, y = _all(data.train)
    assert x.shape == (4000, 1, 40) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    x_test, _ = _all(data.test)
    assert x_test.shape == (1000, 1, 40)


def test_mnist1d_generation_leaves_global_rng_alone(
        mnist1d_first_load: tuple[Dataset, float, float]) -> None:
    _, expected, drawn = mnist1d_first_load
    assert drawn == expected


def test_mnist1d_is_cached_and_reproducible(cache: Path,
                                            mnist1d_first_load: tuple[Dataset, float, float]
                                            ) -> None:
    files = list((cache / "data").glob("mnist1d-*.npz"))
    assert len(files) == 1
    first = _all(mnist1d_first_load[0].test)
    again = _all(load_dataset("mnist1d").test)  # read back from the cache
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_corrupt_mnist1d_cache_is_regenerated(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              cache: Path) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    good = next((cache / "data").glob("mnist1d-*.npz"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / good.name).write_bytes(b"not an npz")
    data = load_dataset("mnist1d")
    assert len(data.test.dataset) == 1000
    with np.load(tmp_path / "data" / good.name) as fresh, np.load(good) as kept:
        assert all(np.array_equal(fresh[k], kept[k]) for k in kept.files)


def test_digits_shapes_split_and_scale(cache: Path) -> None:
    data = load_dataset("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    x, _ = _all(data.train)
    x_test, y_test = _all(data.test)
    assert len(x) == 1437 and len(x_test) == 360
    assert float(x.min()) >= 0.0 and float(x.max()) == 1.0
    counts = torch.bincount(y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified


def test_train_order_depends_on_seed_and_test_order_fixed(cache: Path) -> None:
    a, b, c = (load_dataset("digits", seed=s, batch_size=64) for s in (0, 0, 1))
    ya, yb, yc = (next(iter(d.train))[1] for d in (a, b, c))
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    assert torch.equal(_all(a.test)[1], _all(c.test)[1])
    assert next(iter(a.train))[0].shape[0] == 64


def test_dataset_is_frozen(cache: Path) -> None:
    data = load_dataset("digits")
    with pytest.raises(FrozenInstanceError):
        data.num_classes = 3  # type: ignore[misc]


def test_unknown_name_lists_known(cache: Path) -> None:
    with pytest.raises(DataError, match=r"'cifar'.*digits, mnist1d"):
        load_dataset("cifar")


def test_bad_batch_size() -> None:
    with pytest.raises(DataError, match="batch_size"):
        load_dataset("digits", batch_size=0)


def test_user_arrays(user_module: str) -> None:
    data = load_dataset(f"{user_module}:arrays", batch_size=8, seed=3)
    assert data.name == f"{user_module}:arrays"
    assert data.input_shape == (3, 5)
    assert data.num_classes == 4
    x, y = _all(data.train)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == 20
    assert len(data.test.dataset) == 10


def test_user_whole_number_float_labels(user_module: str) -> None:
    data = load_dataset(f"{user_module}:float_labels")
    assert data.num_classes == 3
    assert _all(data.train)[1].dtype == torch.int64


def test_user_loaders(user_module: str) -> None:
    data = load_dataset(f"{user_module}:loaders")
    assert data.input_shape == (1, 6) and data.num_classes == 3
    assert isinstance(data.train, torch.utils.data.DataLoader)


@pytest.mark.parametrize(("ref", "fragment"), [
    ("nnc_no_such_module_xyz:data", "cannot import"),
    (f"{USER_MODULE}:missing", "no attribute"),
    (f"{USER_MODULE}:not_callable", "not callable"),
    (f"{USER_MODULE}:three_things", "must return"),
    (f"{USER_MODULE}:not_a_tuple", "must return"),
    (f"{USER_MODULE}:mismatched", "samples"),
    (f"{USER_MODULE}:fractional_labels", "non-integer"),
    (f"{USER_MODULE}:shapes_differ", "shaped"),
    (f"{USER_MODULE}:explodes", "disk on fire"),
    (f"{USER_MODULE}:bad_loaders", "DataLoaders"),
    (f"{USER_MODULE}:float_label_loaders", "int64 labels"),
    (f"{USER_MODULE}:", "expected 'package.module:function'"),
])
def test_user_reference_errors_name_the_reference(user_module: str, ref: str,
                                                  fragment: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(ref)
    message = str(info.value)
    assert repr(ref) in message
    assert fragment in message
    assert "\n" not in message


def test_example_input_is_first_test_samples(cache: Path) -> None:
    data = load_dataset("digits", batch_size=16)
    x_test, _ = _all(data.test)
    one = example_input(data)
    assert one.shape == (1, 1, 8, 8)
    assert torch.equal(one[0], x_test[0])
    many = example_input(data, 40)  # spans several test batches
    assert torch.equal(many, x_test[:40])


def test_example_input_repeats_when_too_few(user_module: str) -> None:
    data = load_dataset(f"{user_module}:arrays")
    x = example_input(data, 25)
    x_test, _ = _all(data.test)
    assert x.shape == (25, 3, 5)
    assert torch.equal(x[:10], x_test) and torch.equal(x[10:20], x_test)
    with pytest.raises(ValueError):
        example_input(data, 0)


def test_class_subset_keeps_and_relabels_the_chosen_classes() -> None:
    from nncompress.data import class_subset
    data = load_dataset("digits")
    upper = class_subset(data, [9, 5, 7])
    assert upper.num_classes == 3 and upper.input_shape == data.input_shape
    xs, ys = zip(*upper.test, strict=True)
    y = torch.cat(ys)
    assert set(y.tolist()) == {0, 1, 2}
    full_x, full_y = zip(*data.test, strict=True)
    full_x, full_y = torch.cat(full_x), torch.cat(full_y)
    assert torch.equal(torch.cat(xs), full_x[(full_y == 9) | (full_y == 5) | (full_y == 7)])
    assert torch.equal(y == 0, full_y[(full_y == 9) | (full_y == 5) | (full_y == 7)] == 9)
    with pytest.raises(DataError, match=r"\[12\]"):
        class_subset(data, [1, 12])
    with pytest.raises(DataError, match="two distinct"):
        class_subset(data, [3, 3])


def test_holdout_splits_the_training_samples_disjointly_and_deterministically() -> None:
    from nncompress.data import holdout
    data = load_dataset("digits")
    rest, held = holdout(data, 0.25, seed=3)
    n_train = sum(len(y) for _, y in data.train)
    n_rest = sum(len(y) for _, y in rest.train)
    n_held = sum(len(y) for _, y in held)
    assert n_rest + n_held == n_train and n_held == round(0.25 * n_train)
    rows = {tuple(x.flatten().tolist()) for b, _ in held for x in b}
    assert not rows & {tuple(x.flatten().tolist()) for b, _ in rest.train for x in b}
    again = torch.cat([x for x, _ in holdout(data, 0.25, seed=3)[1]])
    assert torch.equal(again, torch.cat([x for x, _ in held]))
    assert rest.test is data.test
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(DataError, match="fraction"):
            holdout(data, bad)
