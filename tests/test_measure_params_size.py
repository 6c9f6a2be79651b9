"""Parameter counts and bytes on disk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.measure import artifact_bytes, count_params, torch_save_bytes


def test_count_params_total_nonzero_buffers() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 5))
    count = count_params(model)
    assert count.total == 220 + 40 + 105
    assert count.nonzero == count.total - 20  # BatchNorm's bias starts at zero
    assert count.buffers == 20 + 20 + 1  # running mean, var, num_batches_tracked
    with torch.no_grad():
        model[0].weight[:10] = 0.0  # 10 rows x 10 inputs
    after = count_params(model)
    assert (after.total, after.nonzero) == (count.total, count.nonzero - 100)
    assert after.sparsity == pytest.approx(120 / 365)


def test_shared_parameters_counted_once() -> None:
    fc = nn.Linear(4, 4)
    assert count_params(nn.Sequential(fc, nn.ReLU(), fc)).total == 20


def test_torch_save_bytes_grow_with_parameters() -> None:
    small, large = torch_save_bytes(nn.Linear(10, 10)), torch_save_bytes(nn.Linear(100, 100))
    assert small > 10 * 10 * 4
    assert large - small >= (100 * 100 - 10 * 10) * 4


def _formats_save():
    """``nncompress.formats.save``, or skip while that module is not written yet."""
    try:
        from nncompress.formats import save
    except (ImportError, AttributeError):
        pytest.skip("nncompress.formats.save is not available yet")
    return save


def test_artifact_bytes_is_the_saved_file_and_shrinks_when_sparse(tmp_path) -> None:
    save = _formats_save()
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    sparse = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for layer in (sparse[0], sparse[2]):
            weight = layer.weight
            weight[weight.abs() < weight.abs().quantile(0.9)] = 0.0  # keep 10%
    size = artifact_bytes(dense)
    save(dense, tmp_path / "dense.nnc")
    assert size == (tmp_path / "dense.nnc").stat().st_size
    assert artifact_bytes(sparse) < size


def test_weight_bytes_per_tensor_plain_and_entropy_coded() -> None:
    from nncompress.formats import ENCODINGS
    from nncompress.measure import weight_bytes

    layer = torch.nn.Linear(200, 50)
    with torch.no_grad():
        layer.weight.zero_()
        picked = layer.weight[::7, ::3]  # 8 x 67 of the 50 x 200 weights, two values
        layer.weight[::7, ::3] = torch.where(
            torch.arange(picked.numel()).reshape(picked.shape) % 2 == 0, 0.5, -0.25)
    (row,) = weight_bytes(torch.nn.Sequential(layer))  # the bias is not a weight tensor
    assert row.name == "0.weight" and row.numel == 10_000
    assert row.nonzero == int(torch.count_nonzero(layer.weight))
    assert row.plain < 10_000 * 4 and not ENCODINGS.get(row.plain_encoding).entropy_coded
    assert row.coded <= row.plain
    assert row.coded == len(ENCODINGS.get(row.coded_encoding).encode(layer.weight.detach())[0])


def test_measure_reports_the_file_save_writes_on_its_own(tmp_path) -> None:
    """measure() passes weight_bytes' choices to the writer; the bytes must be those of
    the file ``save`` writes choosing by itself."""
    from helpers import tiny_data
    from nncompress import formats
    from nncompress.measure import measure

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight[torch.rand(model[1].weight.shape) < 0.9] = 0.0
        model[3].weight.copy_(torch.randint(-2, 3, model[3].weight.shape) * 0.25)
    got = measure(model, tiny_data(), with_latency=False)
    assert got.artifact_bytes == formats.save(model, tmp_path / "m.nnc")
