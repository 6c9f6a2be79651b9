"""Every reference model round-trips through .nnc with identical outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from nncompress import formats

models = pytest.importorskip("nncompress.models")

#: Per-sample input shapes of the bundled datasets (see docs/ARCHITECTURE.md).
INPUT_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny recurrent forwards are much slower with threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    shape = INPUT_SHAPES[models.spec(name).default_dataset]
    torch.manual_seed(0)
    model = models.build(name, shape, 10)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape))  # non-trivial BatchNorm running statistics
    return model.eval(), shape


@pytest.mark.parametrize("name", models.model_names())
def test_reference_model_roundtrip(tmp_path: Path, name: str) -> None:
    model, shape = build(name)
    path = tmp_path / f"{name}.nnc"
    formats.save(model, path, meta={"model": name})
    loaded = formats.load(path)  # rebuilt through models.ARCHITECTURES
    assert type(loaded) is type(model)
    assert loaded.arch_config() == model.arch_config()
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    info = formats.inspect(path)
    assert info.arch == model.arch_name and info.meta == {"model": name}
    assert info.num_elements == sum(t.numel() for t in model.state_dict().values())


def test_pruned_reference_mlp_loads_into_a_fresh_skeleton(tmp_path: Path) -> None:
    """As the pretrained cache does: load(path, skeleton=freshly built model)."""
    model, shape = build("mlp")
    fc1, fc2 = model.layers.fc1, model.layers.fc2
    keep = torch.arange(0, fc1.out_features, 3)
    narrow1 = nn.Linear(fc1.in_features, len(keep))
    narrow2 = nn.Linear(len(keep), fc2.out_features)
    with torch.no_grad():
        narrow1.weight.copy_(fc1.weight[keep])
        narrow1.bias.copy_(fc1.bias[keep])
        narrow2.weight.copy_(fc2.weight[:, keep])
        narrow2.bias.copy_(fc2.bias)
    model.layers.fc1, model.layers.fc2 = narrow1, narrow2
    formats.save(model, tmp_path / "p.nnc")
    fresh, _ = build("mlp")
    loaded = formats.load(tmp_path / "p.nnc", skeleton=fresh)
    assert loaded.layers.fc1.out_features == len(keep)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(formats.load(tmp_path / "p.nnc")(x), model(x))
