"""Sensitivity analysis, per-group ratios for a target, the plot, and ratios_from."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models, train
from nncompress.data import Dataset
from nncompress.errors import ConstraintError
from nncompress.measure import count_macs
from nncompress.prune.sensitivity import SensitivityReport, ratios_for_target, sensitivity
from nncompress.recipe import Recipe, Stage
from nncompress.report.plots import plot_sensitivity


def tiny_data(n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, generator=g)
    y = x[:, 0, :3].argmax(dim=1)
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator())
    return Dataset("tiny", loader, DataLoader(ds, batch_size=48), (1, 16), 3)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, Dataset]:
    torch.manual_seed(0)
    data = tiny_data()
    model = models.build("cnn1d", (1, 16), 3, channels=(8, 16))
    train.fit(model, data, epochs=3, lr=1e-2, progress=False)
    return model.eval(), data


def test_sensitivity_curves(trained, tmp_path) -> None:
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sensitivity(model, data, ratios=(0.25, 0.75))
    assert set(report.curves) == {"features.conv1", "features.conv2"}
    assert report.sizes == {"features.conv1": 8, "features.conv2": 16}
    assert [r for r, _ in report.curves["features.conv1"]] == [0.25, 0.75]
    assert report.baseline == pytest.approx(train.evaluate(model, data.test))
    assert all(0.0 <= a <= 1.0 for pts in report.curves.values() for _, a in pts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    png = plot_sensitivity(report, tmp_path / "sens.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_ratios_for_target_prunes_insensitive_groups_more() -> None:
    report = SensitivityReport(0.9, {
        "a": ((0.25, 0.9), (0.5, 0.89), (0.75, 0.85)),
        "b": ((0.25, 0.7), (0.5, 0.5), (0.75, 0.2)),
    }, {"a": 10, "b": 10})
    assert ratios_for_target(report, mean_ratio=0.3) == {"a": 0.75, "b": 0.0}
    assert ratios_for_target(report, mean_ratio=0.5)["b"] == 0.25
    with pytest.raises(ConstraintError, match=r"max_drop=0\.1"):
        ratios_for_target(report, mean_ratio=0.5, max_drop=0.1)
    with pytest.raises(ConstraintError, match="exactly one"):
        ratios_for_target(report)


def test_ratios_for_macs_target(trained) -> None:
    model, data = trained
    report = sensitivity(model, data, ratios=(0.25, 0.5, 0.75))
    x = torch.randn(2, 1, 16)
    ratios = ratios_for_target(report, macs_reduction=1.5, model=model, example=x)
    assert set(ratios) == set(report.curves) and max(ratios.values()) > 0


def test_l1_filter_prune_ratios_from_sensitivity(trained) -> None:
    model, data = trained
    recipe = Recipe("s", [Stage.technique("l1_filter_prune", macs_reduction=1.5,
                                          ratios_from="sensitivity", epochs_per_step=1,
                                          lr=1e-3)])
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    x = torch.randn(1, 1, 16)
    assert count_macs(result.model, x).total <= count_macs(model, x).total / 1.5
    assert any("sensitivity ratios" in line for line in result.log)
