"""Sparse VD on lookup tables: nn.Embedding with the local reparameterisation of a lookup
(mean = embedding(ids, theta), var = embedding(ids, sigma^2)), nn.EmbeddingBag sampled
per mini-batch. ``TokenModel`` / ``token_data`` are shared with the weight-sharing and
hashing tests of embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress.data import Dataset
from nncompress.prune.dns import DynamicSurgeryConfig, dynamic_surgery
from nncompress.prune.magnitude import MagnitudePruneConfig, magnitude_prune
from nncompress.prune.masks import find_prunable
from nncompress.prune.variational import SparseVDConfig, SVDLayer, sparse_vd
from nncompress.technique import Context

VOCAB, LENGTH, PAD = 24, 8, 0


class TokenModel(nn.Module):
    """int64 ids ``[B, L]`` -> Embedding (padding_idx 0) -> mean over L -> Linear;
    ``bag=True`` uses one nn.EmbeddingBag (mean mode) instead."""

    def __init__(self, dim: int = 16, bag: bool = False) -> None:
        super().__init__()
        self.emb = (nn.EmbeddingBag(VOCAB, dim, mode="mean", padding_idx=PAD) if bag
                    else nn.Embedding(VOCAB, dim, padding_idx=PAD))
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.emb, nn.EmbeddingBag):
            return self.head(self.emb(ids))
        return self.head(self.emb(ids).mean(dim=1))


def token_data(n: int = 192, seed: int = 0) -> Dataset:
    """int64 ids in [1, VOCAB) with the last two positions padded in every other sample;
    the label is the third of the vocabulary most of a sample's tokens come from."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    ids[::2, -2:] = PAD
    third = torch.div((ids - 1).clamp(min=0) * 3, VOCAB - 1, rounding_mode="floor")
    counts = (F.one_hot(third, 3) * (ids != PAD)[..., None]).sum(dim=1)
    y = (counts * 10 + torch.arange(3)).argmax(dim=1)          # ties: the last third
    ds = TensorDataset(ids, y)
    train = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator())
    return Dataset("tokens", train, DataLoader(ds, batch_size=96), (LENGTH,), 3)


def trained_token_model(bag: bool = False) -> tuple[TokenModel, Dataset]:
    torch.manual_seed(0)
    model, data = TokenModel(bag=bag), token_data()
    nc.train.fit(model, data, epochs=3, lr=0.05, progress=False)
    return model, data


def test_token_model_learns() -> None:
    model, data = trained_token_model()
    assert nc.train.evaluate(model, data.test) > 0.7


def test_lookup_mean_and_variance() -> None:
    torch.manual_seed(0)
    layer = nn.Embedding(5, 3, padding_idx=0)
    wrapper = SVDLayer(layer, threshold=3.0, init_log_sigma2=-4.0).train()
    ids = torch.tensor([[1, 0, 4, 1]])
    with torch.no_grad():
        samples = torch.stack([wrapper(ids) for _ in range(4000)])
    var = wrapper.log_sigma2.detach().exp()[ids]
    var[ids == 0] = 0.0                                        # the padding row is noise-free
    assert torch.allclose(samples.mean(0), layer(ids), atol=5 * float(var.max().sqrt()) / 60)
    assert torch.allclose(samples.var(0), var, rtol=0.1, atol=1e-6)
    assert torch.all(samples[:, 0, 1] == 0)


def test_embedding_sparsifies_keeps_padding_zero_and_round_trips(tmp_path: Path) -> None:
    model, data = trained_token_model()
    ctx = Context(data, seed=0, progress=False)
    sparse_vd(model, SparseVDConfig(epochs=3, lr=0.02, init_log_sigma2=-4.0), ctx)
    assert type(model.emb) is nn.Embedding and model.emb.padding_idx == PAD
    assert set(ctx.masks) == {"emb.weight", "head.weight"}
    mask = ctx.masks["emb.weight"]
    assert 0.2 < 1 - float(mask.float().mean()) < 1.0
    assert torch.all(model.emb.weight[~mask] == 0)
    assert torch.all(model.emb.weight[PAD] == 0)
    assert nc.train.evaluate(model, data.test) > 0.6
    nc.save(model, tmp_path / "m.nnc")
    back = nc.load(tmp_path / "m.nnc", skeleton=TokenModel())
    ids = token_data(8, seed=1).test.dataset.tensors[0]
    assert torch.equal(back(ids), model(ids))


def test_embedding_bag_is_sampled_per_batch() -> None:
    model, data = trained_token_model(bag=True)
    ctx = Context(data, seed=0, progress=False)
    sparse_vd(model, SparseVDConfig(epochs=2, lr=0.02, init_log_sigma2=-4.0), ctx)
    assert type(model.emb) is nn.EmbeddingBag and "emb.weight" in ctx.masks
    assert torch.all(model.emb.weight[~ctx.masks["emb.weight"]] == 0)


def test_magnitude_pruning_prunes_embeddings() -> None:
    model, data = trained_token_model()
    assert find_prunable(model).names == ("emb.weight", "head.weight")
    ctx = Context(data, seed=0, progress=False)
    magnitude_prune(model, MagnitudePruneConfig(sparsity=0.5, layers=("emb.*",),
                                                epochs_per_step=0), ctx)
    assert float((model.emb.weight == 0).float().mean()) >= 0.5


def test_dynamic_surgery_prunes_embeddings() -> None:
    model, data = trained_token_model()
    ctx = Context(data, seed=0, progress=False)
    dynamic_surgery(model, DynamicSurgeryConfig(sparsity=0.6, epochs=1, lr=0.01), ctx)
    mask = ctx.masks["emb.weight"]
    assert 0.4 < 1 - float(mask.float().mean()) < 0.8
    assert torch.all(model.emb.weight[~mask] == 0) and torch.all(model.emb.weight[PAD] == 0)
