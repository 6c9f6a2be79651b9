"""Sparse VD on recurrent weights (Lobacheva, Chirkova & Vetrov 2017): weights sampled once
per mini-batch and shared across time steps, every layer / direction, per-gate report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import models
from nncompress.data import Dataset
from nncompress.prune.masks import gate_blocks, mask_sparsity
from nncompress.prune.variational import SparseVDConfig, sparse_vd
from nncompress.prune.variational_rnn import SampledWeights
from nncompress.technique import Context


def seq_data(features: int = 3, steps: int = 6, n: int = 96) -> Dataset:
    """``[n, features, steps]`` sequences; the label is the argmax of the first three
    features summed over time."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, steps, generator=g)
    y = x[:, :3].sum(dim=2).argmax(dim=1)
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator())
    return Dataset("seq", train, DataLoader(ds, batch_size=48), (features, steps), 3)


class CellLoop(nn.Module):
    """A GRUCell stepped by a Python loop over ``[B, C, L]`` input, then a Linear."""

    def __init__(self, features: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.cell = nn.GRUCell(features, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[2]):
            h = self.cell(x[:, :, t], h)
        return self.head(h)


class BiLSTM(nn.Module):
    """Two-layer bidirectional LSTM with projections -> mean over time -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4,
                           batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x.transpose(1, 2))[0].mean(1))


@pytest.mark.parametrize("make", [lambda: BiLSTM(), lambda: CellLoop()])
def test_one_weight_sample_per_forward_shared_by_all_steps(make) -> None:
    torch.manual_seed(0)
    model = make()
    names = [n for n, _ in model.named_parameters() if n.rpartition(".")[2].startswith(
        ("weight_ih", "weight_hh", "weight_hr"))]
    sampler = SampledWeights(model, names, threshold=3.0, init_log_sigma2=-2.0).train()
    x = torch.randn(5, 3, 6)
    torch.manual_seed(7)
    out = sampler(x)
    # the same draws by hand: one eps per weight (not per sample / step), then the plain
    # model with those weights
    torch.manual_seed(7)
    params = dict(model.named_parameters())
    drawn = {n: params[n] + torch.exp(0.5 * s) * torch.randn_like(params[n])
             for n, s in zip(names, sampler.log_sigma2, strict=True)}
    assert torch.equal(out, functional_call(model, drawn, (x,)))
    assert not torch.equal(out, model(x))                     # the noise is really there
    out.sum().backward()
    assert all(params[n].grad is not None for n in names)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sampler.log_sigma2)


def test_eval_uses_theta_with_high_log_alpha_dropped() -> None:
    torch.manual_seed(0)
    model = CellLoop()
    sampler = SampledWeights(model, ["cell.weight_hh"], threshold=3.0, init_log_sigma2=-30.0)
    with torch.no_grad():
        sampler.log_sigma2[0][:8] = 10.0                       # gate r: log alpha > 3
    mask = sampler.keep_masks()["cell.weight_hh"]
    assert not mask[:8].any() and mask[8:].all()
    x = torch.randn(4, 3, 5)
    expected = model.cell.weight_hh.detach().clone()
    expected[:8] = 0.0
    with torch.no_grad():
        assert torch.equal(sampler.eval()(x),
                           functional_call(model, {"cell.weight_hh": expected}, (x,)))


def test_gate_blocks_follow_pytorch_gate_order() -> None:
    gru, lstm = nn.GRU(3, 4), nn.LSTM(3, 4, proj_size=2)
    assert [g for g, _ in gate_blocks(gru, "weight_hh_l0")] == ["r", "z", "n"]
    assert [(g, s.start, s.stop) for g, s in gate_blocks(lstm, "weight_ih_l0")] == [
        ("i", 0, 4), ("f", 4, 8), ("g", 8, 12), ("o", 12, 16)]
    assert gate_blocks(lstm, "weight_hr_l0") == (("proj", slice(0, 2)),)
    assert gate_blocks(nn.Linear(3, 4), "weight") == (("", slice(0, 4)),)


def test_gru_model_sparsifies_every_recurrent_matrix_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("gru", (3, 6), 3, hidden=16)
    data = seq_data()
    nc.train.fit(model, data, epochs=3, lr=0.01, progress=False)
    keys = set(model.state_dict())
    ctx = Context(data, seed=0, progress=False)
    out = sparse_vd(model, SparseVDConfig(epochs=3, lr=0.01, init_log_sigma2=-4.0), ctx)
    assert out is model and set(model.state_dict()) == keys
    assert all(type(m) is nn.GRU for m in model.layers)
    recurrent = {n for n in keys if re.search(r"weight_(ih|hh)_l0$", n)}
    assert len(recurrent) == 4 and recurrent <= set(ctx.masks)
    assert mask_sparsity(ctx.masks) > 0.3
    params = dict(model.named_parameters())
    for name, mask in ctx.masks.items():
        assert torch.all(params[name][~mask] == 0)
    # the log names every recurrent matrix and its three gates
    lines = [line for line in ctx.log if "(GRU)" in line]
    assert len(lines) == 4
    assert all(re.search(r"r \d+\.\d %, z \d+\.\d %, n \d+\.\d % pruned", x) for x in lines)
    nc.save(model, tmp_path / "gru.nnc")
    x = torch.randn(4, 3, 6)
    assert torch.equal(nc.load(tmp_path / "gru.nnc")(x), model.eval()(x))


def test_bidirectional_projected_lstm_and_cells_are_all_covered() -> None:
    torch.manual_seed(0)
    for model, gates in ((BiLSTM(), "i .*, f .*, g .*, o .*"), (CellLoop(), "r .*, z .*, n")):
        ctx = Context(seq_data(), seed=0, progress=False)
        sparse_vd(model, SparseVDConfig(epochs=1, lr=0.01, init_log_sigma2=-4.0), ctx)
        weights = {n for n, _ in model.named_parameters() if "weight" in n}
        assert set(ctx.masks) == weights                     # every layer and direction
        rnn_lines = [x for x in ctx.log if re.search(r"\((LSTM|GRUCell)\)", x)]
        assert len(rnn_lines) == len(weights) - 1            # all but the head
        assert any(re.search(gates, x) for x in rnn_lines)
    lstm_ctx = Context(seq_data(), seed=0, progress=False)
    sparse_vd(BiLSTM(), SparseVDConfig(epochs=1, layers=("rnn.weight_hr_l1_reverse",)),
              lstm_ctx)
    assert list(lstm_ctx.masks) == ["rnn.weight_hr_l1_reverse"]
    assert any("weight_hr_l1_reverse (LSTM): proj" in x for x in lstm_ctx.log)


@pytest.mark.slow
def test_deep_compression_recipe_runs_on_a_gru() -> None:
    # the default recipe used to refuse every recurrent parameter in its sparse_vd stage
    torch.manual_seed(0)
    model = models.build("gru", (3, 6), 3, hidden=8)
    data = seq_data()
    nc.train.fit(model, data, epochs=3, lr=0.02, progress=False)
    result = nc.compress(model, "deep-compression", data, progress=False,
                         measure_latency=False)
    out = result.model
    assert all(type(m) is nn.GRU for m in out.layers)
    for name, p in out.named_parameters():
        if "weight" in name:
            assert len(set(p[p != 0].tolist())) <= 32, name
    assert any("(GRU): r" in line for line in result.log)
    assert result.final.artifact_bytes < result.baseline.artifact_bytes
