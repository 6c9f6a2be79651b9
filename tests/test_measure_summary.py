"""accuracy, measure and compare."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nncompress.data import Dataset
from nncompress.errors import DataError
from nncompress.measure import (
    BatchLatency,
    LatencyReport,
    LayerMacs,
    MacCount,
    Measurement,
    ParamCount,
    accuracy,
    compare,
    measure,
)


def _identity_classifier() -> nn.Module:
    """Logits equal the input: the predicted class is the input's arg-max."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    return model


def _loader(batch_size: int = 3) -> DataLoader:
    x = torch.eye(3).repeat(2, 1)  # arg-max classes 0, 1, 2, 0, 1, 2
    y = torch.tensor([0, 1, 2, 0, 2, 2])  # one label disagrees
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_accuracy_is_top1_fraction_and_restores_mode() -> None:
    model = _identity_classifier().train()
    assert accuracy(model, _loader()) == pytest.approx(5 / 6)
    assert all(m.training for m in model.modules())


def test_accuracy_of_empty_loader_is_a_data_error() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError):
        accuracy(_identity_classifier(), empty)


def test_measure_collects_every_field() -> None:
    try:
        from nncompress.formats import save  # noqa: F401
    except (ImportError, AttributeError):
        pytest.skip("nncompress.formats.save is not available yet")
    data = Dataset(name="toy", train=_loader(), test=_loader(), input_shape=(3,),
                   num_classes=3)
    m = measure(_identity_classifier(), data, latency_batches=(1, 4), warmup=0, repeats=2)
    assert m.accuracy == pytest.approx(5 / 6)
    assert (m.params.total, m.params.nonzero) == (12, 3)
    assert m.macs.total == 9 and m.macs.sparse_total == 3
    assert m.artifact_bytes > 0 and m.torch_save_bytes > 0
    assert m.latency is not None and [r.batch for r in m.latency.results] == [1, 4]
    assert measure(_identity_classifier(), data, with_latency=False).latency is None


def _measurement(acc: float, nbytes: int, params: tuple[int, int], macs: tuple[int, int],
                 ms: dict[int, float] | None) -> Measurement:
    layer = LayerMacs("fc", "Linear", macs[0], params[0], params[1], macs[1])
    lat = None if ms is None else LatencyReport(
        threads=4, results=tuple(BatchLatency(b, t, t, t, 3) for b, t in ms.items()))
    return Measurement(accuracy=acc, params=ParamCount(*params),
                       macs=MacCount(macs[0], (layer,)), artifact_bytes=nbytes,
                       torch_save_bytes=2 * nbytes, latency=lat)


def test_compare_ratios_are_before_over_after() -> None:
    before = _measurement(0.90, 4000, (1000, 1000), (800, 800), {1: 2.0, 256: 30.0})
    after = _measurement(0.88, 500, (1000, 100), (800, 80), {1: 1.0, 256: 40.0, 8: 1.0})
    c = compare(before, after)
    assert c.accuracy_delta == pytest.approx(-0.02)
    assert c.size_ratio == pytest.approx(8.0)
    assert c.torch_save_ratio == pytest.approx(16.0)
    assert c.params_ratio == pytest.approx(1.0)
    assert c.nonzero_ratio == pytest.approx(10.0)
    assert c.macs_ratio == pytest.approx(1.0)
    assert c.sparse_macs_ratio == pytest.approx(10.0)
    assert c.speedup == ((1, pytest.approx(2.0)), (256, pytest.approx(0.75)))


def test_compare_without_latency_or_with_zero_denominators() -> None:
    before = _measurement(0.5, 100, (10, 10), (10, 10), None)
    after = _measurement(0.5, 100, (10, 0), (10, 0), {1: 1.0})
    c = compare(before, after)
    assert c.speedup == ()
    assert c.accuracy_delta == 0.0
    assert math.isinf(c.nonzero_ratio) and math.isinf(c.sparse_macs_ratio)
