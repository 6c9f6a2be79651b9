"""HashedNets on lookup tables (HashedEmbedding) and the eval-mode copy of the virtual
weight that makes hashed layers as fast as dense ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nncompress as nc
from nncompress import formats
from nncompress.errors import UnsupportedLayerError
from nncompress.share.hashing import (
    HashedEmbedding,
    HashedLinear,
    HashedNetConfig,
    hash_indices,
    hashed_net,
    to_hashed_embedding,
)
from nncompress.technique import Context
from test_prune_sparse_vd_embedding import TokenModel, token_data, trained_token_model


def test_virtual_table_uses_the_linear_hashes_and_a_zero_padding_row() -> None:
    torch.manual_seed(0)
    emb = HashedEmbedding(7, 5, 9, seed=3, padding_idx=-1)
    assert emb.padding_idx == 6
    index, sign = hash_indices(7, 5, 9, 3)
    expected = emb.hashed_weight.detach()[index] * sign
    expected[6] = 0.0
    assert torch.equal(emb.virtual_weight().detach(), expected)
    ids = torch.tensor([[0, 6, 2], [5, 5, 1]])
    out = emb.train()(ids)                       # training: only the looked-up rows hashed
    assert torch.equal(out.detach(), F.embedding(ids, expected))
    with torch.no_grad():
        assert torch.equal(emb.eval()(ids), out.detach())
    assert [n for n, _ in emb.named_parameters()] == ["hashed_weight"]
    assert not list(emb.buffers())               # no index / sign buffers to hold


def test_bucket_gradient_skips_the_padding_row() -> None:
    torch.manual_seed(1)
    emb = HashedEmbedding(6, 4, 5, seed=2, padding_idx=0).train()
    ids = torch.tensor([0, 3, 3, 5, 0])
    r = torch.randn(5, 4)
    (emb(ids) * r).sum().backward()
    index, sign = hash_indices(6, 4, 5, 2)
    expected = torch.zeros(5)
    for row, weight in zip(ids.tolist(), r, strict=True):
        if row != 0:
            expected.index_add_(0, index[row], sign[row] * weight)
    assert emb.hashed_weight.grad is not None
    assert torch.allclose(emb.hashed_weight.grad, expected, atol=1e-6)


def test_bad_ids_and_sizes_are_refused() -> None:
    emb = HashedEmbedding(4, 2, 3)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        emb.train()(torch.tensor([1, 4]))
    with pytest.raises(TypeError, match="float32"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="padding_idx=4"):
        HashedEmbedding(4, 2, 3, padding_idx=4)
    with pytest.raises(ValueError, match="virtual weights"):
        HashedEmbedding(2**20, 2**10, 1, device="meta")


def test_technique_hashes_tables_and_round_trips(tmp_path: Path) -> None:
    model, data = trained_token_model()
    ctx = Context(data, seed=0, progress=False)
    ctx.masks["emb.weight"] = torch.ones(24, 16, dtype=torch.bool)
    hashed_net(model, HashedNetConfig(compression=4, epochs=3, lr=0.02), ctx)
    assert isinstance(model.emb, HashedEmbedding) and isinstance(model.head, HashedLinear)
    assert model.emb.buckets == round(24 * 16 / 4) and model.emb.padding_idx == 0
    assert not ctx.masks
    assert torch.all(model.emb.weight[0] == 0)
    assert nc.train.evaluate(model, data.test) > 0.5
    nc.save(model, tmp_path / "m.nnc")
    stored = {t.name for t in formats.inspect(tmp_path / "m.nnc").tensors}
    assert stored == {"emb.hashed_weight", "head.hashed_weight", "head.bias"}
    back = nc.load(tmp_path / "m.nnc", skeleton=TokenModel())   # rebuilt from its record
    assert isinstance(back.emb, HashedEmbedding) and back.emb.padding_idx == 0
    ids = token_data(8, seed=1).test.dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), model.eval()(ids))


def test_to_hashed_embedding_buckets_are_signed_means_without_padding() -> None:
    torch.manual_seed(2)
    dense = nn.Embedding(5, 3, padding_idx=1)
    hashed = to_hashed_embedding(dense, 4, seed=7)
    index, sign = hash_indices(5, 3, 4, 7)
    sums, counts = torch.zeros(4), torch.zeros(4)
    for i in (0, 2, 3, 4):
        sums.index_add_(0, index[i], sign[i] * dense.weight.detach()[i])
        counts.index_add_(0, index[i], torch.ones(3))
    assert torch.allclose(hashed.hashed_weight.detach(), sums / counts.clamp(min=1))


def test_max_norm_tables_are_refused_or_skipped() -> None:
    model, data = trained_token_model()
    model.emb.max_norm = 1.0
    ctx = Context(data, seed=0, progress=False)
    with pytest.raises(UnsupportedLayerError, match=r"'emb'.*max_norm"):
        hashed_net(model, HashedNetConfig(layers=("emb",), epochs=0), ctx)
    assert type(model.emb) is nn.Embedding
    hashed_net(model, HashedNetConfig(epochs=0), ctx)
    assert type(model.emb) is nn.Embedding and isinstance(model.head, HashedLinear)
    assert any("not hashed: emb" in line for line in ctx.log)


def test_eval_copy_is_made_once_and_follows_the_buckets() -> None:
    torch.manual_seed(3)
    layer = HashedLinear(6, 4, 5, seed=1).eval()
    x = torch.randn(2, 6)
    with torch.inference_mode():
        first = layer(x)
    cached = layer._cache[3]
    with torch.no_grad():
        assert torch.equal(layer(x), first) and layer._cache[3] is cached   # reused
        layer.hashed_weight.mul_(2.0)                                      # in place
        assert torch.allclose(layer(x), F.linear(x, layer.virtual_weight(), layer.bias))
        assert layer._cache[3] is not cached
    layer.load_state_dict({"hashed_weight": torch.zeros(5), "bias": torch.zeros(4)})
    with torch.no_grad():
        assert torch.equal(layer(x), torch.zeros(2, 4))
    layer.hashed_weight = nn.Parameter(torch.ones(5))                       # another tensor
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.sign.float()))
    layer.train()
    assert layer._cache is None
    assert set(layer.state_dict()) == {"hashed_weight", "bias"}


def test_eval_copy_still_passes_bucket_gradients() -> None:
    torch.manual_seed(4)
    for layer, x in ((HashedLinear(6, 4, 5, seed=1), torch.randn(3, 6)),
                     (HashedEmbedding(6, 4, 5, seed=1, padding_idx=2), torch.tensor([2, 0, 5]))):
        r = torch.randn(3, 4)
        (layer.train()(x) * r).sum().backward()
        expected = layer.hashed_weight.grad.clone()
        layer.hashed_weight.grad = None
        with torch.inference_mode():
            layer.eval()(x)                      # the copy is made in inference mode ...
        (layer(x) * r).sum().backward()          # ... and still works with autograd
        assert torch.allclose(layer.hashed_weight.grad, expected, atol=1e-6)


def test_eval_copy_is_not_saved(tmp_path: Path) -> None:
    model = nn.Sequential(HashedLinear(8, 8, 10, seed=0), HashedEmbedding(8, 4, 6))
    nc.save(model, tmp_path / "a.nnc")
    model.eval()
    with torch.no_grad():
        model[0](torch.randn(1, 8))
        model[1](torch.tensor([1]))
    assert model[0]._cache is not None and model[1]._cache is not None
    nc.save(model, tmp_path / "b.nnc")
    assert (tmp_path / "a.nnc").read_bytes() == (tmp_path / "b.nnc").read_bytes()
