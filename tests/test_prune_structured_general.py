"""Structured pruning on models built from PyTorch's own layers: stacked and bidirectional
RNNs, LSTM projections, grouped convolutions, norms after any layer, embeddings, token-id
inputs, and ``nn.TransformerEncoder``.

Exactness: removing units must equal zeroing them (every dropped unit's producer weights,
and what reads it) on models where a zeroed unit outputs exactly zero (no LayerNorm)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress.graph import ChannelGroup, analyse, channel_groups
from nncompress.prune.structured import (
    l1_importance,
    prunable_groups,
    prune_channels,
    select_by_ratio,
)
from nncompress.technique import Context


class BiGRU(nn.Module):
    """Token ids -> Embedding -> 2-layer bidirectional GRU -> last step -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = nn.GRU(16, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class ProjLSTM(nn.Module):
    """2-layer bidirectional LSTM with projections, read through its output and h_n."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2, proj_size=6, bidirectional=True)
        self.head = nn.Linear(12, 5)
        self.state_head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.rnn(x.transpose(0, 1))  # time-major
        return self.head(out[-1]) + self.state_head(h[-1])


class GroupedCNN(nn.Module):
    """Inception-style 1-D CNN: a plain branch and a grouped branch, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 16, 3, padding=1)
        self.grouped = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm1d(16)
        self.point = nn.Conv1d(16, 8, 1)
        self.head = nn.Linear(16 + 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.stem(x))
        b = torch.relu(self.bn(self.grouped(a)))
        c = torch.relu(self.point(b))
        return self.head(torch.cat([a, c], dim=1).mean(dim=-1))


def _rnn_rows(m: nn.RNNBase, units: list[int], size: int) -> list[int]:
    gates = m.weight_hh_l0.shape[0] // m.hidden_size
    return [g * size + j for g in range(gates) for j in units]


def _zero(model: nn.Module, group: ChannelGroup, drop: list[int]) -> None:
    """Zero what the dropped units produce (their producer rows and biases, BN scales),
    for the models above, where a zeroed unit then outputs exactly zero."""
    with torch.no_grad():
        for name, role, units in group.index:
            m = model.get_submodule(name)
            idx = sorted({i for u in drop for i in units[u]})
            sfx = [n.removeprefix("weight_hh") for n, _ in m.named_parameters()
                   if n.startswith("weight_hh")] if isinstance(m, nn.RNNBase) else []
            if role == "cell":
                for s in sfx:
                    for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(m, p + s)[_rnn_rows(m, idx, m.hidden_size)] = 0
            elif role == "out" and isinstance(m, nn.LSTM) and m.proj_size:
                for s in sfx:
                    getattr(m, "weight_hr" + s)[idx] = 0
            elif role == "out" and isinstance(m, nn.RNNBase):
                for s in sfx:
                    for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(m, p + s)[_rnn_rows(m, idx, m.hidden_size)] = 0
            elif role == "out" and isinstance(m, nn.Embedding):
                m.weight[:, idx] = 0
            elif role == "out":
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0
            elif role == "norm":
                m.weight[idx] = 0
                m.bias[idx] = 0


CASES = {
    "bigru": (BiGRU, lambda: torch.randint(0, 50, (3, 7))),
    "proj_lstm": (ProjLSTM, lambda: torch.randn(3, 9, 8)),
    "grouped_cnn": (GroupedCNN, lambda: torch.randn(3, 3, 20)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_equals_zeroing_the_removed_units(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    cls, make = CASES[case]
    model, x = cls().eval(), make()
    groups = prunable_groups(model, x)
    assert groups, "every case has prunable groups"
    keep = select_by_ratio({g.name: l1_importance(model, g) for g in groups}, 0.5)
    masked = copy.deepcopy(model)
    for g in groups:
        _zero(masked, g, sorted(set(range(g.size)) - set(keep[g.name])))
    prune_channels(model, keep, x, groups=groups)
    assert {g.name: g.size for g in channel_groups(model, x)} == {
        n: len(k) for n, k in keep.items()}
    torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-4)
    nc.save(model, tmp_path / "m.nnc")
    loaded = nc.load(tmp_path / "m.nnc", skeleton=cls())
    torch.testing.assert_close(loaded(x), model(x))


def test_stacked_bidirectional_rnn_keeps_one_width_for_every_layer_and_direction() -> None:
    model, x = BiGRU().eval(), CASES["bigru"][1]()
    g = {g.name: g for g in channel_groups(model, x)}
    hidden = g["rnn:hidden"]
    assert (hidden.kind, hidden.size, hidden.consumers) == ("hidden", 12, ("head",))
    assert hidden.units("head", "in")[3] == (3, 15)  # forward and backward unit 3
    assert g["emb"].consumers == ("rnn",)  # embedding dimensions feed the GRU
    prune_channels(model, {"rnn:hidden": list(range(5))}, x)
    assert (model.rnn.hidden_size, model.rnn.weight_ih_l1.shape) == (5, (15, 10))
    assert model(x).shape == (3, 5)


def test_lstm_projection_has_a_projection_group_and_a_cell_group() -> None:
    model, x = ProjLSTM().eval(), CASES["proj_lstm"][1]()
    g = {g.name: g for g in channel_groups(model, x)}
    assert set(g) == {"rnn:hidden", "rnn:cell"}
    assert set(g["rnn:hidden"].consumers) == {"head", "state_head"}
    assert g["rnn:hidden"].units("state_head", "in")[2] == (2,)  # read through h_n[-1]
    assert (g["rnn:hidden"].size, g["rnn:cell"].size) == (6, 16)


def test_grouped_convolution_loses_whole_groups() -> None:
    model, x = GroupedCNN().eval(), CASES["grouped_cnn"][1]()
    g = {g.name: g for g in channel_groups(model, x)}
    stem = g["stem"]  # stem feeds the grouped conv: 4 units of 4 channels
    assert stem.size == 4 and stem.units("stem", "out")[1] == (4, 5, 6, 7)
    assert set(stem.producers) == {"stem", "grouped"}
    prune_channels(model, {"stem": [0, 2, 3]}, x)
    assert (model.grouped.groups, model.grouped.in_channels, model.grouped.out_channels) \
        == (3, 12, 12)
    assert model.bn.num_features == 12 and model(x).shape == (3, 5)


class GRUNorm(nn.Module):
    """The issue's case: a GRU followed by LayerNorm(hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 64, batch_first=True)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(self.norm(h)[:, -1])


class GroupNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 3)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean(dim=-1))


def test_norms_after_any_layer_shrink_with_it() -> None:
    model, x = GRUNorm().eval(), torch.randn(2, 6, 4)
    prune_channels(model, {"rnn:hidden": list(range(48))}, x)
    assert model.norm.normalized_shape == (48,) and model(x).shape == (2, 3)
    cnn, x = GroupNormCNN().eval(), torch.randn(2, 1, 12)
    g = channel_groups(cnn, x)[0]
    assert g.size == 4  # GroupNorm(4, 16): whole groups of 4 channels
    prune_channels(cnn, {g.name: [1, 3]}, x)
    assert (cnn.norm.num_groups, cnn.norm.num_channels) == (2, 8) and cnn(x).shape == (2, 3)


class TextEncoder(nn.Module):
    """Token ids + padding mask -> Embedding -> nn.TransformerEncoder -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(ids), src_key_padding_mask=~mask)
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def _text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 40, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 7:] = False
    return ids, mask


def test_builtin_transformer_is_refused_until_rewritten_then_heads_and_ffn_prune() -> None:
    from nncompress.modules import decompose

    torch.manual_seed(0)
    model, x = TextEncoder().eval(), _text_batch()
    found = analyse(model, x)
    assert any("reads its weights directly" in why for _, why in found.skipped)
    assert not any(g.kind == "heads" for g in found.groups)
    model, notes = decompose(model)
    assert len(notes) == 4  # two attentions, two layers
    names = {g.name for g in channel_groups(model, x)}
    assert {"encoder.layers.0.self_attn:heads", "encoder.layers.0.linear1"} <= names
    before = model(*x)
    keep = {"encoder.layers.0.self_attn:heads": [0, 1, 3], "encoder.layers.1.linear1":
            list(range(40))}
    prune_channels(model, keep, x)
    assert model.encoder.layers[0].self_attn.num_heads == 3
    assert model.encoder.layers[1].linear1.out_features == 40
    after = model(*x)
    assert after.shape == before.shape and not torch.equal(after, before)


def test_l1_filter_prune_through_compress_on_a_builtin_transformer_with_two_inputs() -> None:
    from torch.utils.data import DataLoader

    from nncompress.data import Dataset
    from nncompress.data.core import InputsDataset

    torch.manual_seed(0)
    ids, mask = torch.randint(1, 40, (64, 10)), torch.ones(64, 10, dtype=torch.bool)
    y = ids[:, 0] % 3
    ds = InputsDataset({"ids": ids, "mask": mask}, y)
    data = Dataset("text", DataLoader(ds, batch_size=16, shuffle=True,
                                      generator=torch.Generator().manual_seed(0)),
                   DataLoader(ds, batch_size=32), (10,), 3)
    recipe = nc.Recipe("heads", (nc.Stage.technique("l1_filter_prune", ratio=0.5,
                                                     epochs_per_step=1),))
    result = nc.compress(TextEncoder(), recipe, data, progress=False, measure_latency=False)
    layer = result.model.encoder.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 32
    assert any("rewrote" in line for line in result.log)
    assert result.final.params.total < result.baseline.params.total
    assert result.final.macs.total < result.baseline.macs.total


def test_technique_on_a_bidirectional_gru_through_a_context() -> None:
    from nncompress.prune.filter_l1 import L1FilterPruneConfig, l1_filter_prune

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(1, 8, num_layers=2, bidirectional=True, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(x.transpose(1, 2))
            return self.head(self.norm(h[:, -1]))

    torch.manual_seed(0)
    ctx = Context(data=tiny_data(), progress=False)
    model = l1_filter_prune(Wrap(), L1FilterPruneConfig(ratio=0.5, epochs_per_step=0), ctx)
    assert model.rnn.hidden_size == 4 and model.norm.normalized_shape == (8,)
    assert model(torch.randn(2, 1, 12)).shape == (2, 3)


def test_layer_prune_of_a_builtin_encoder_loads_into_the_users_own_skeleton(tmp_path) -> None:
    """The file records the encoder's remaining layers: loading it into a freshly built
    TextEncoder (two layers, built-in types) gives the pruned, rewritten model back."""
    from nncompress.modules import decompose
    from nncompress.prune.layers import LayerPruneConfig, layer_prune

    torch.manual_seed(0)
    model, x = decompose(TextEncoder().eval())[0], _text_batch()
    ctx = Context(data=_text_data(), progress=False)
    pruned = layer_prune(model, LayerPruneConfig(count=1, epochs=0), ctx).eval()
    assert len(pruned.encoder.layers) == 1
    nc.save(pruned, tmp_path / "m.nnc")
    loaded = nc.load(tmp_path / "m.nnc", skeleton=TextEncoder())
    assert len(loaded.encoder.layers) == 1
    torch.testing.assert_close(loaded(*x), pruned(*x))


def _text_data():
    from torch.utils.data import DataLoader

    from nncompress.data import Dataset
    from nncompress.data.core import InputsDataset

    ids, mask = torch.randint(1, 40, (32, 10)), torch.ones(32, 10, dtype=torch.bool)
    ds = InputsDataset((ids, mask), ids[:, 0] % 3)
    return Dataset("text", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=16),
                   (10,), 3)


def test_pruned_heads_and_ffn_of_a_builtin_encoder_load_into_the_users_skeleton(
        tmp_path) -> None:
    from nncompress.modules import decompose

    torch.manual_seed(0)
    model, x = decompose(TextEncoder().eval())[0], _text_batch()
    prune_channels(model, {"encoder.layers.0.self_attn:heads": [1, 2],
                           "encoder.layers.1.linear1": list(range(20))}, x)
    nc.save(model, tmp_path / "m.nnc")
    loaded = nc.load(tmp_path / "m.nnc", skeleton=TextEncoder())
    assert loaded.encoder.layers[0].self_attn.num_heads == 2
    assert loaded.encoder.layers[1].linear1.out_features == 20
    torch.testing.assert_close(loaded(*x), model(*x))
