"""Latency measurement: shape of the report and restored state (never speed itself)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.measure import latency


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3))


def test_report_lists_each_batch_with_positive_times() -> None:
    report = latency(_model(), (2, 4), batch_sizes=(1, 5, 32), warmup=1, repeats=4)
    assert [r.batch for r in report.results] == [1, 5, 32]
    for r in report.results:
        assert r.repeats == 4
        assert r.median_ms > 0
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms  # order statistics, not speed
    assert report.threads == torch.get_num_threads()


def test_threads_are_recorded_and_restored() -> None:
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    report = latency(_model(), (8,), batch_sizes=(2,), warmup=0, repeats=2, threads=wanted)
    assert report.threads == wanted
    assert torch.get_num_threads() == before


def test_train_mode_is_restored() -> None:
    model = _model().train()
    latency(model, (8,), batch_sizes=(1,), warmup=0, repeats=1)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs", [
    {"batch_sizes": ()}, {"batch_sizes": (0,)}, {"repeats": 0}, {"warmup": -1},
    {"threads": 0},
])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        latency(_model(), (8,), **kwargs)


def test_wrong_input_shape_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"\[1, 5\]"):
        latency(_model(), (5,), batch_sizes=(1,), warmup=0, repeats=1)
