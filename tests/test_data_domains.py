"""Domain-shifted MNIST-1D (nncompress.data.domains): deterministic, cached by argument,
different from the source, documented exactly, and strict about its arguments."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nncompress.data import domains as dm
from nncompress.data import load_dataset
from nncompress.errors import DataError

SMALL = 300  # samples per generated domain in these tests (240 train / 60 test)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _slope_spread(x: torch.Tensor) -> float:
    """Std over samples of each signal's least-squares slope (what shear changes)."""
    x = x[:, 0]
    t = torch.linspace(-0.5, 0.5, x.shape[1])
    t = t - t.mean()
    return float((((x - x.mean(1, keepdim=True)) * t).sum(1) / (t * t).sum()).std())


def test_same_arguments_give_the_same_arrays_fresh_or_cached(_cache: Path) -> None:
    first = dm.shifted_arrays(**dm.SHIFT, num_samples=SMALL)
    files = list((_cache / "data").glob("mnist1d-domain-*.npz"))
    assert len(files) == 1
    cached = dm.shifted_arrays(**dm.SHIFT, num_samples=SMALL)
    files[0].unlink()
    regenerated = dm.shifted_arrays(**dm.SHIFT, num_samples=SMALL)
    for other in (cached, regenerated):
        assert torch.equal(first.x_train, other.x_train)
        assert torch.equal(first.y_test, other.y_test)
    assert first.x_train.shape == (240, 1, 40) and first.x_test.shape == (60, 1, 40)


def test_cache_key_includes_every_argument(_cache: Path) -> None:
    dm.shifted_arrays(num_samples=SMALL)
    dm.shifted_arrays(num_samples=SMALL, shear_scale=0.8)
    dm.shifted_arrays(num_samples=SMALL, shear_scale=0.8)
    assert len(list((_cache / "data").glob("mnist1d-domain-*.npz"))) == 2


def test_shifted_domain_differs_from_the_source() -> None:
    source = dm.shifted_arrays(num_samples=SMALL)  # the generator's defaults
    target = dm.shifted_arrays(**dm.SHIFT, num_samples=SMALL)
    assert not torch.equal(source.x_train, target.x_train)
    # the larger shear shows as a wider spread of per-signal linear trends
    assert _slope_spread(target.x_train) > 1.3 * _slope_spread(source.x_train)


def test_defaults_reproduce_the_bundled_mnist1d_generator() -> None:
    """No changes: the standard mnist1d, the source domain (same arrays as 'mnist1d')."""
    from nncompress.data.core import _mnist1d

    ours, bundled = dm.shifted_arrays(seed=42), _mnist1d()
    assert torch.equal(ours.x_train, bundled.x_train)
    assert torch.equal(ours.y_test, bundled.y_test)


def test_docstring_states_exactly_the_shift() -> None:
    doc = dm.shifted_mnist1d.__doc__ or ""
    stated = dict(re.findall(r"- ``(\w+)=([0-9.]+)``", doc))
    assert stated == {k: str(v) for k, v in dm.SHIFT.items()}
    defaults = dm.mnist1d_args()
    for key in dm.SHIFT:  # each bullet names the source's value it replaces
        assert re.search(rf"``{key}=[0-9.]+`` \(source {defaults[key]}\)", doc), key


def test_generator_gets_the_documented_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data

    seen: list[dict] = []
    real = mnist1d.data.make_dataset

    def spy(args: object) -> dict:
        seen.append(dict(vars(args)))
        return real(args)

    monkeypatch.setattr(mnist1d.data, "make_dataset", spy)
    dm.shifted_arrays(**dm.SHIFT, num_samples=SMALL)
    expected = {**dm.mnist1d_args(), **dm.SHIFT, "num_samples": SMALL}
    assert seen == [expected]
    assert expected["shear_scale"] == 2.0 and expected["scale_coeff"] == 0.8


def test_global_rng_state_is_restored() -> None:
    np.random.seed(7)
    random.seed(7)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    dm.shifted_arrays(num_samples=SMALL, seed=5)
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py


def test_dataset_form_and_names() -> None:
    data = dm.shifted_mnist1d(num_samples=SMALL, shear_scale=1.0, batch_size=32)
    assert data.name == "mnist1d[num_samples=300,shear_scale=1.0]"
    assert data.input_shape == (1, 40) and data.num_classes == 10 and data.labelled
    x, y = next(iter(data.train))
    assert x.shape == (32, 1, 40) and y.dtype == torch.int64


def test_bundled_name_loads_the_documented_shift() -> None:
    data = load_dataset("mnist1d-shifted", batch_size=64)
    direct = dm.shifted_arrays()
    assert data.name == dm.SHIFTED_NAME and data.num_classes == 10
    assert torch.equal(data.test.dataset.tensors[0], direct.x_test)
    assert len(data.train.dataset) == 4000 and len(data.test.dataset) == 1000


@pytest.mark.parametrize(("changes", "named"), [
    ({"url": "http://x"}, "'url'"),
    ({"final_seq_length": 50}, "'final_seq_length'"),
    ({"iid_noise_scale": -0.1}, "iid_noise_scale"),
    ({"shear_scale": float("nan")}, "shear_scale"),
    ({"seed": True}, "seed"),
    ({"max_translation": 0}, "max_translation"),
    ({"padding": [60, 36]}, "padding"),
    ({"train_split": 1.0}, "train_split"),
])
def test_bad_arguments_are_one_line_data_errors(changes: dict, named: str) -> None:
    with pytest.raises(DataError, match=re.escape(named)) as info:
        dm.shifted_mnist1d(**changes)
    assert "\n" not in str(info.value)
