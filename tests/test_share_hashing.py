"""HashedNets (Chen et al., 2015): the hashed layer, its gradients, the file, the technique."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import formats, models, train
from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.measure import count_macs
from nncompress.share.hashing import (
    HashedLinear,
    HashedNetConfig,
    hash_indices,
    hashed_net,
    to_hashed,
)
from nncompress.technique import TECHNIQUES, Context

M32 = 0xFFFFFFFF


def ref_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x1B873593) & M32
    return x ^ (x >> 16)


def ref_hash(i: int, j: int, n_in: int, buckets: int, seed: int) -> tuple[int, int]:
    """Plain-Python (index, sign) of entry (i, j)."""
    key = i * n_in + j
    key = (key ^ (key >> 32)) & M32
    h = ref_mix(key ^ ((seed * 0x9E3779B1 + 0x85EBCA6B) & M32)) % buckets
    s = 1 - 2 * (ref_mix(key ^ ((seed * 0x9E3779B1 + 0xC2B2AE35) & M32)) & 1)
    return h, s


def test_virtual_weight_matches_plain_reference() -> None:
    torch.manual_seed(0)
    layer = HashedLinear(7, 5, 6, seed=11)
    w = layer.hashed_weight.detach()
    v = layer.virtual_weight().detach()
    for i in range(5):
        for j in range(7):
            h, s = ref_hash(i, j, 7, 6, 11)
            assert (int(layer.index[i, j]), int(layer.sign[i, j])) == (h, s)
            assert v[i, j] == s * w[h]
    assert set(layer.sign.unique().tolist()) == {-1, 1}
    x = torch.randn(3, 7)
    assert torch.allclose(layer(x), x @ v.T + layer.bias.detach())


def test_hash_is_deterministic_and_seeded() -> None:
    a, sa = hash_indices(40, 30, 100, 5)
    b, sb = hash_indices(40, 30, 100, 5)
    c, _ = hash_indices(40, 30, 100, 6)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)
    # roughly uniform: every bucket used, none holding more than 3x its share
    counts = torch.bincount(a.reshape(-1), minlength=100)
    assert counts.min() > 0 and counts.max() < 36
    assert abs(float(sa.float().mean())) < 0.1


def test_bucket_gradient_is_sum_of_signed_virtual_gradients() -> None:
    torch.manual_seed(1)
    layer = HashedLinear(4, 3, 5, seed=2, bias=False)
    x, r = torch.randn(6, 4), torch.randn(6, 3)
    (layer(x) * r).sum().backward()
    grad_v = r.T @ x  # dL/dV [out, in]
    expected = torch.zeros(5)
    for i in range(3):
        for j in range(4):
            h, s = ref_hash(i, j, 4, 5, 2)
            expected[h] += s * grad_v[i, j]
    assert layer.hashed_weight.grad is not None
    assert torch.allclose(layer.hashed_weight.grad, expected, atol=1e-5)


def test_to_hashed_buckets_are_signed_means() -> None:
    torch.manual_seed(2)
    dense = nn.Linear(6, 4)
    hashed = to_hashed(dense, 5, seed=9)
    sums, counts = torch.zeros(5), torch.zeros(5)
    for i in range(4):
        for j in range(6):
            h, s = ref_hash(i, j, 6, 5, 9)
            sums[h] += s * dense.weight[i, j].item()
            counts[h] += 1
    assert torch.allclose(hashed.hashed_weight.detach(), sums / counts.clamp(min=1))
    assert torch.equal(hashed.bias, dense.bias)
    assert torch.equal(hashed.weight, hashed.virtual_weight())  # read-only virtual view
    assert [n for n, _ in hashed.named_parameters()] == ["hashed_weight", "bias"]


def test_macs_count_the_virtual_matrix_params_the_buckets() -> None:
    model = nn.Sequential(HashedLinear(10, 6, 4, seed=1))
    macs = count_macs(model, torch.randn(2, 10))
    assert macs.total == 60
    assert sum(p.numel() for p in model.parameters()) == 4 + 6


def test_file_stores_only_buckets_and_is_smaller(tmp_path: Path) -> None:
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(256, 256, bias=False))
    hashed = nn.Sequential(to_hashed(dense[0], 256 * 256 // 8, seed=0))
    dense_bytes = nc.save(dense, tmp_path / "d.nnc")
    hashed_bytes = nc.save(hashed, tmp_path / "h.nnc")
    header = formats.read_header(tmp_path / "h.nnc")
    assert "0.index" not in str(header) and "0.sign" not in str(header)
    assert hashed_bytes < dense_bytes / 7
    loaded = nc.load(tmp_path / "h.nnc", skeleton=nn.Sequential(nn.Linear(256, 256)))
    x = torch.randn(2, 256)
    assert torch.equal(loaded(x), hashed(x))


def test_technique_hashes_linears_and_roundtrips(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = tiny_data()
    model = models.build("mlp", (1, 12), 3, hidden=[32])
    train.fit(model, data, epochs=3, lr=0.01, seed=0, progress=False)
    ctx = Context(data=data, progress=False, seed=4)
    ctx.masks["layers.fc1.weight"] = torch.ones(32, 12, dtype=torch.bool)
    config = HashedNetConfig(compression=4, epochs=2, lr=0.01)
    out = TECHNIQUES.get("hashed_net").apply(model, config, ctx)
    hashed = [m for m in out.modules() if isinstance(m, HashedLinear)]
    assert len(hashed) == 2
    assert [m.buckets for m in hashed] == [round(32 * 12 / 4), round(3 * 32 / 4)]
    assert [m.seed for m in hashed] == [4, 5]
    assert not ctx.masks  # the shape-changed weight's mask is dropped
    assert train.evaluate(out, data.test) > 0.6
    nc.save(out, tmp_path / "m.nnc")
    loaded = nc.load(tmp_path / "m.nnc")  # rebuilt from the builder record, no skeleton
    x = torch.randn(5, 1, 12)
    out.eval()
    assert torch.equal(loaded(x), out(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in out.parameters())


def test_technique_selection_errors_and_skips() -> None:
    data = tiny_data()
    model = models.build("mlp", (1, 12), 3, hidden=[8])
    ctx = Context(data=data, progress=False)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    with pytest.raises(ModelError, match="'nope'"):
        hashed_net(model, HashedNetConfig(layers=("nope",), epochs=0), ctx)
    other = next((n for n, m in model.named_modules() if n and type(m) is not nn.Linear
                  and not list(m.children())), None)
    if other is not None:
        with pytest.raises(UnsupportedLayerError, match=repr(other)):
            hashed_net(model, HashedNetConfig(layers=(other,), epochs=0), ctx)
    hashed_net(model, HashedNetConfig(layers=("*",), exclude=(names[0],), epochs=0), ctx)
    assert type(model.get_submodule(names[0])) is nn.Linear
    assert isinstance(model.get_submodule(names[-1]), HashedLinear)
    with pytest.raises(ValueError):
        HashedNetConfig(compression=0.5)


def test_layer_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="virtual weights"):
        HashedLinear(2**15, 2**14, 1, device="meta")
    with pytest.raises(ValueError, match="buckets=0"):
        HashedLinear(3, 3, 0)
