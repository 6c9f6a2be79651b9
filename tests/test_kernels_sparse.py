"""Sparse inference engine: CSR Linear vs its dense plain-torch reference, sparsify()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nncompress as nc
from nncompress import models
from nncompress.errors import UnsupportedLayerError
from nncompress.kernels import SparseConv, SparseLinear, densify, sparsify


def _pruned_linear(out_f: int, in_f: int, sparsity: float, bias: bool = True,
                   seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin.weight[torch.rand(lin.weight.shape, generator=g) < sparsity] = 0.0
    return lin


def _pruned_mlp(sparsity: float = 0.95) -> nn.Module:
    model = models.build("mlp", (1, 32), 4, hidden=(48, 24))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape, generator=g) < sparsity] = 0.0
    return model.eval()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_reference_and_dense(sparsity: float, batch: int,
                                                   bias: bool) -> None:
    lin = _pruned_linear(30, 50, sparsity, bias=bias)
    sp = SparseLinear.from_linear(lin)
    x = torch.randn(batch, 50, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, ref, dense = sp(x), sp.reference(x), lin(x)
    assert got.shape == (batch, 30)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert sp.nnz == int(torch.count_nonzero(lin.weight))


def test_sparse_linear_leading_dims_and_round_trip() -> None:
    lin = _pruned_linear(8, 12, 0.9)
    sp = SparseLinear.from_linear(lin)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    back = sp.to_dense()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert sp.sparsity == pytest.approx(1 - sp.nnz / 96)


def test_sparse_linear_state_dict_and_dtype_move() -> None:
    sp = SparseLinear.from_linear(_pruned_linear(6, 10, 0.8))
    keys = set(sp.state_dict())
    assert {"crow_indices", "col_indices", "values", "bias"} <= keys
    sp64 = sp.to(torch.float64)
    x = torch.randn(3, 10, dtype=torch.float64)
    assert sp64(x).dtype == torch.float64
    torch.testing.assert_close(sp64(x), sp64.reference(x))


def test_sparse_linear_rejects_bad_weight() -> None:
    with pytest.raises(UnsupportedLayerError, match="2-d float"):
        SparseLinear(torch.zeros(2, 3, 4))


def test_sparsify_same_outputs_and_report() -> None:
    model = _pruned_mlp()
    x = torch.randn(4, 1, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = model(x)
    out, report = sparsify(model, x[:1], batch_sizes=(1, 4), min_sparsity=0.8, repeats=5)
    assert out is model
    assert [r.name for r in report.layers] == ["layers.fc1", "layers.fc2", "layers.fc3"]
    for r in report.layers:
        assert r.sparsity > 0.8 and len(r.dense_us) == 2 and len(r.sparse_us) == 2
        assert r.choice == ("sparse" if all(
            s < d for s, d in zip(r.sparse_us, r.dense_us, strict=True)) else "dense")
        is_sparse = isinstance(model.get_submodule(r.name), SparseLinear)
        assert is_sparse == (r.choice == "sparse")
    assert report.threads == 1
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_sparsify_skips_dense_layers() -> None:
    model = models.build("mlp", (1, 16), 3, hidden=(8,)).eval()
    _, report = sparsify(model, torch.randn(1, 1, 16), min_sparsity=0.5, repeats=2)
    assert all(r.choice == "dense" and "min_sparsity" in r.reason for r in report.layers)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_sparsify_forced_swap_after_nc_load(tmp_path) -> None:
    model = _pruned_mlp()
    path = tmp_path / "m.nnc"
    nc.save(model, path)
    loaded = nc.load(path).eval()
    x = torch.randn(3, 1, 32)
    with torch.inference_mode():
        before = loaded(x)
    # min_sparsity 0 plus layers at 95 % sparsity: every Linear is a candidate; the
    # choice is timing-dependent, so compare outputs whatever was chosen
    _, report = sparsify(loaded, x[:1], min_sparsity=0.0, repeats=3)
    assert len(report.layers) == 3
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(batch_sizes=()), dict(min_sparsity=1.5),
                                    dict(repeats=0)])
def test_sparsify_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sparsify(_pruned_mlp(), torch.randn(1, 1, 32), **kwargs)


def test_densify_then_save_round_trips(tmp_path) -> None:
    model = _pruned_mlp()
    model.layers.fc1 = SparseLinear.from_linear(model.layers.fc1)
    x = torch.randn(2, 1, 32)
    with torch.inference_mode():
        expected = model(x)
    nc.save(densify(model), tmp_path / "d.nnc")
    loaded = nc.load(tmp_path / "d.nnc").eval()
    assert isinstance(loaded.layers.fc1, nn.Linear)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ convolutions


def _pruned(conv: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight[torch.rand(conv.weight.shape, generator=g) < sparsity] = 0.0
    return conv.eval()


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3),
    dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=3, dilation=2, padding=1, bias=False),
])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_sparse_conv1d_matches_reference_and_dense(kwargs, batch, sparsity) -> None:
    torch.manual_seed(0)
    conv = _pruned(nn.Conv1d(4, 6, **kwargs), sparsity)
    sp = SparseConv(conv)
    x = torch.randn(batch, 4, 17, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, ref, dense = sp(x), sp.reference(x), conv(x)
    assert got.shape == dense.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert sp.nnz == int(torch.count_nonzero(conv.weight))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
])
@pytest.mark.parametrize("batch", [1, 2])
def test_sparse_conv2d_matches_reference_and_dense(kwargs, batch) -> None:
    torch.manual_seed(0)
    conv = _pruned(nn.Conv2d(3, 5, **kwargs), 0.9)
    sp = SparseConv(conv)
    x = torch.randn(batch, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, dense = sp(x), conv(x)
    assert got.shape == dense.shape
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp.reference(x), dense, rtol=1e-5, atol=1e-5)
    back = sp.to_dense()
    assert type(back) is nn.Conv2d and torch.equal(back.weight, conv.weight)
    torch.testing.assert_close(back(x), dense)


def test_convolutions_without_a_sparse_path_are_refused_and_reported() -> None:
    grouped = nn.Conv1d(4, 4, 3, groups=2)
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        SparseConv(grouped)
    with pytest.raises(UnsupportedLayerError, match="padding 'same'"):
        SparseConv(nn.Conv1d(4, 4, 3, padding="same"))
    with pytest.raises(UnsupportedLayerError, match="circular"):
        SparseConv(nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"))
    model = nn.Sequential(_pruned(nn.Conv1d(4, 4, 3, groups=2), 0.95), nn.Flatten(),
                          _pruned(nn.Linear(4 * 10, 3), 0.95))
    _, report = sparsify(model, torch.randn(1, 4, 12), repeats=5)
    by_name = {r.name: r for r in report.layers}
    assert by_name["0"].choice == "dense" and "groups=2" in by_name["0"].reason
    assert by_name["0"].shape == (4, 2, 3)
    assert "2" in by_name


def test_sparsify_times_conv_layers_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 40), 10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                m.weight[torch.rand(m.weight.shape, generator=g) < 0.95] = 0.0
    model.eval()
    x = torch.randn(4, 1, 40)
    with torch.inference_mode():
        expected = model(x)
    out, report = sparsify(copy.deepcopy(model), x[:1], batch_sizes=(1, 4), repeats=5,
                           min_sparsity=0.0)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d)]
    assert set(convs) <= {r.name for r in report.layers}
    for r in report.layers:
        assert r.choice in ("dense", "sparse") and len(r.dense_us) == 2
        swapped = out.get_submodule(r.name)
        assert isinstance(swapped, (SparseConv, SparseLinear)) == (r.choice == "sparse")
    with torch.inference_mode():
        torch.testing.assert_close(out(x), expected, rtol=1e-4, atol=1e-5)
    densify(out)
    assert not any(isinstance(m, (SparseConv, SparseLinear)) for m in out.modules())


def test_a_model_that_is_one_layer_is_replaced_by_the_returned_one() -> None:
    lin = _pruned_linear(300, 784, 0.99)
    out, report = sparsify(lin, torch.randn(1, 784), repeats=50)
    assert report.layers[0].name == ""
    assert isinstance(out, SparseLinear) == (report.layers[0].choice == "sparse")
    x = torch.randn(1, 784)
    with torch.inference_mode():
        torch.testing.assert_close(out(x), lin(x), rtol=1e-5, atol=1e-5)
    back = densify(SparseLinear.from_linear(lin))
    assert type(back) is nn.Linear and torch.equal(back.weight, lin.weight)


def test_macs_of_sparse_layers_equal_those_of_their_dense_layers() -> None:
    """A model with CSR layers (what ``sparsify`` may leave, e.g. before ``eval`` measures
    it) counts the MACs of the dense layers it replaced, non-zero MACs included."""
    from nncompress.measure import count_macs

    torch.manual_seed(0)
    lin, conv = nn.Linear(12, 8), nn.Conv1d(3, 5, 3, padding=1)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.2] = 0
        conv.weight[conv.weight.abs() < 0.2] = 0
    for dense, sparse, x in ((lin, SparseLinear.from_linear(lin), torch.randn(2, 4, 12)),
                             (conv, SparseConv(conv), torch.randn(2, 3, 7))):
        want, got = count_macs(dense, x), count_macs(sparse, x)
        assert got.total == want.total
        assert got.layers[0].sparse_macs == want.layers[0].sparse_macs < want.total


@pytest.mark.parametrize("swapped", [("fc1",), ("fc1", "fc2", "fc3")])
def test_a_model_with_csr_layers_saves_and_measures_as_the_dense_model(
        tmp_path, swapped: tuple[str, ...]) -> None:
    """``sparsify`` is a deploy-time engine: a model holding its CSR layers (some or all)
    saves as the dense model (same file bytes, loads as nn.Linear, same outputs), and
    ``measure`` counts the dense parameters -- it used to fail in the architecture record."""
    dense = _pruned_mlp()
    model = copy.deepcopy(dense)
    for name in swapped:
        setattr(model.layers, name, SparseLinear.from_linear(getattr(model.layers, name)))
    x = torch.randn(4, 1, 32)
    with torch.inference_mode():
        expected = model(x)
    bytes_dense = nc.save(dense, tmp_path / "dense.nnc")
    assert nc.save(model, tmp_path / "csr.nnc") == bytes_dense
    assert all(isinstance(getattr(model.layers, n), SparseLinear) for n in swapped)  # kept
    loaded = nc.load(tmp_path / "csr.nnc").eval()
    assert not any(isinstance(m, SparseLinear) for m in loaded.modules())
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    fc2 = dense.layers.fc2
    nc.save(SparseLinear.from_linear(fc2), tmp_path / "one.nnc")  # the model is one layer
    one = nc.load(tmp_path / "one.nnc", skeleton=nn.Linear(fc2.in_features, fc2.out_features))
    assert torch.equal(one.weight, fc2.weight) and torch.equal(one.bias, fc2.bias)
