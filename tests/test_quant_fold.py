"""fold_batchnorm (Jacob et al. 2018, section 3.2): same outputs, fewer layers, round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models
from nncompress.data import Dataset
from nncompress.quant import fold_pairs
from nncompress.recipe import Recipe, Stage

FOLD = Recipe("fold", (Stage.technique("fold_batchnorm"),))


def tiny_data(shape: tuple[int, ...]) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *shape, generator=g)
    y = (x.flatten(1)[:, 0] > 0).long()
    ds = TensorDataset(x, y)
    return Dataset("tiny", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=32),
                   shape, 2)


def with_stats(model: nn.Module, data: Dataset) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for x, _ in data.train:
            model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize(("arch", "count"), [("cnn1d", 3), ("rescnn", 7)])
def test_fold_keeps_outputs_and_round_trips(arch: str, count: int, tmp_path) -> None:
    data = tiny_data((1, 24))
    torch.manual_seed(0)
    kw = {"channels": [8, 16, 16]} if arch == "cnn1d" else {"channels": 8, "hidden": [16, 16]}
    model = with_stats(models.build(arch, (1, 24), 2, **kw), data)
    result = nc.compress(model, FOLD, data, progress=False, measure_latency=False)
    folded = result.model
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) == count
    x = torch.randn(5, 1, 24)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    path = tmp_path / "f.nnc"
    nc.save(folded, path)
    again = nc.load(path)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in again.modules())
    with torch.no_grad():
        assert torch.allclose(again(x), folded(x), atol=1e-6)


class Shared(nn.Module):
    """The convolution's output feeds the BatchNorm *and* a skip path: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.conv2 = nn.Conv1d(4, 4, 1)
        self.bn2 = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = self.bn(h) + h
        return self.head(self.bn2(self.conv2(h)).flatten(1))


def test_a_shared_output_is_not_folded_and_is_reported() -> None:
    data = tiny_data((1, 24))
    model = with_stats(Shared(), data)
    assert fold_pairs(model, torch.randn(2, 1, 24)) == [("conv", "bn"), ("conv2", "bn2")]
    result = nc.compress(model, FOLD, data, progress=False, measure_latency=False)
    assert isinstance(result.model.bn, nn.BatchNorm1d)
    assert isinstance(result.model.bn2, nn.Identity)
    assert any("bn not folded into conv" in line for line in result.log)
    x = torch.randn(3, 1, 24)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


def test_a_model_without_batchnorm_is_left_as_it_is_and_logged() -> None:
    data = tiny_data((1, 8, 8))
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 2, hidden=[8])
    result = nc.compress(model, FOLD, data, progress=False, measure_latency=False)
    assert any("nothing to fold" in line for line in result.log)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(result.model(x), model.eval()(x))
